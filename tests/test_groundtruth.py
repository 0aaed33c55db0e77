"""validation.groundtruth: the vTrain loader, the calibration rule, the plans, the closed form against the
simulator, the scoring, and `pipetwin groundtruth`'s outputs."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from pipetwin.cli import main
from planner.efficiency import EfficiencyParams
from validation.groundtruth_closed_form import row_model, stage_costs_from_profile
from validation.groundtruth_plan import row_plan, row_profile, simulate_row_s, stage_layer_ranges
from validation.groundtruth_rows import (CALIBRATION_MODULUS, FILES, GroundTruthError, Row, canonical_config,
                                         is_calibration, load_rows, read_rows, why_not_expressible)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "vtrain"
real_data = pytest.mark.skipif(not (DATA / FILES["single"]).is_file(), reason="vTrain data not beside the repo")

SINGLE_HEADER = ("\ufeff# GPUs,global batch,micro batch,hidden size,attention heads,# layers,sequence length,"
                 "tensor parallelism,data parallelism,pipeline parallelism,iteration time (ms)\n")
MULTI_HEADER = ("\ufeffParameters (billion),# GPUs,global batch,micro batch,hidden size,attention heads,# layers,"
                "sequence length,tensor parallelism,data parallelism,pipeline parallelism,iteration time (ms)\n")
P = EfficiencyParams(0.8, 0.8, 10e-6, 50e-6, 0.005, 4.0, 2e-3)


def _row(gpus, gb, micro, tp, dp, pp, hidden=512, heads=8, layers=8, seq=256, source="single"):
    return Row(source, 2, gpus, gb, micro, hidden, heads, layers, seq, tp, dp, pp, 100.0)


def _write(d: Path, single: list[str], multi: list[str]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / FILES["single"]).write_text(SINGLE_HEADER + "".join(l + "\n" for l in single), encoding="utf-8")
    (d / FILES["multi"]).write_text(MULTI_HEADER + "".join(l + "\n" for l in multi), encoding="utf-8")
    return d


# ---------------------------------------------------------------------- loading
def test_loader_reads_both_files_with_their_bom(tmp_path):
    d = _write(tmp_path, ["8,32,4,1024,16,24,1024,2,2,2,219.7"], ["3.6,64,512,8,3072,32,30,2048,1,64,1,3566.5"])
    rows = load_rows(d)
    assert [r.source for r in rows] == ["single", "multi"]
    assert (rows[0].tp, rows[0].dp, rows[0].pp, rows[0].measured_ms, rows[0].line) == (2, 2, 2, 219.7, 2)
    assert rows[1].gpus == 64 and rows[1].microbatches == 1


@pytest.mark.parametrize("line,what", [("8,32,4,1024,16,24,1024,2,2,2", "10 fields"),
                                       ("8,32,x,1024,16,24,1024,2,2,2,219.7", "micro_batch='x' is not a number"),
                                       ("8,32,4.5,1024,16,24,1024,2,2,2,219.7", "positive whole number"),
                                       ("8,32,4,1024,16,24,1024,2,2,2,-3", "positive number of ms")])
def test_a_malformed_line_is_named_by_file_and_line(tmp_path, line, what):
    d = _write(tmp_path, ["8,32,4,1024,16,24,1024,2,2,2,219.7", line], [])
    with pytest.raises(GroundTruthError, match=what) as e:
        load_rows(d)
    assert f"{FILES['single']}:3:" in str(e.value)


def test_cli_reports_a_malformed_line_in_one_line_and_exits_2(tmp_path, capsys):
    d = _write(tmp_path, ["8,32,4,1024,16,24,1024,2,2,2,oops"], [])
    assert main(["groundtruth", "--data", str(d), "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{FILES['single']}:2:" in err and "not a number" in err


def test_cli_refuses_a_missing_data_folder_and_a_bad_calibration_file(tmp_path, capsys):
    assert main(["groundtruth", "--data", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err
    d = _write(tmp_path / "d", ["8,32,4,1024,16,24,1024,2,2,2,219.7"], [])
    (tmp_path / "cal.json").write_text("[]")
    with pytest.raises(SystemExit) as e:  # the shared flag: refused as the command line is read
        main(["groundtruth", "--data", str(d), "--device-calibration", str(tmp_path / "cal.json")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "device_kind" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------------- the calibration rule
def test_calibration_membership_is_the_hash_of_the_config_never_the_measurement():
    c = canonical_config("single", 8, 32, 4, 1024, 16, 24, 1024, 2, 2, 2)
    import hashlib

    assert is_calibration(c) == (int(hashlib.sha256(c.encode()).hexdigest(), 16) % CALIBRATION_MODULUS == 0)
    a = Row("single", 2, 8, 32, 4, 1024, 16, 24, 1024, 2, 2, 2, 219.7)
    b = Row("single", 9, 8, 32, 4, 1024, 16, 24, 1024, 2, 2, 2, 999.0)
    assert a.calibration == b.calibration and a.canonical == b.canonical == c


@real_data
def test_the_rule_picks_about_a_fifth_of_each_file():
    rows = load_rows(DATA)
    for source in FILES:
        xs = [r for r in rows if r.source == source]
        share = sum(r.calibration for r in xs) / len(xs)
        assert 0.12 < share < 0.3


# ---------------------------------------------------------------------- plans
def test_every_real_row_shape_is_expressible_and_the_layers_split_as_megatron_splits_them():
    r = _row(8, 16, 1, 1, 2, 4, layers=10)
    assert why_not_expressible(r) is None
    assert stage_layer_ranges(r) == [(0, 3), (4, 6), (7, 8), (9, 11)]  # 3,3,2,2 blocks; embedding 0, head 11
    plan = row_plan(r)
    assert plan.microbatches == 16 and plan.replicas == (2, 2, 2, 2)
    assert plan.stages[1].devices == ("d2", "d3")  # Megatron rank order: (pp·DP + dp)·TP + tp
    grid = row_plan(_row(16, 16, 1, 2, 2, 4))
    assert grid.tensor_parallel == 2 and grid.recompute == "full"
    assert grid.stages[1].devices == ("d4", "d5", "d6", "d7")  # replica r holds devices[r·T:(r+1)·T]
    assert why_not_expressible(_row(8, 16, 3, 1, 2, 4)) .startswith("global batch")
    assert "heads" in why_not_expressible(_row(8, 16, 1, 8, 1, 1, heads=4))


def test_row_profile_pads_the_vocabulary_to_128_T_and_splits_weights_by_T():
    one = row_profile(_row(2, 8, 1, 1, 2, 1), P)
    eight = row_profile(_row(8, 8, 1, 8, 1, 1), P)
    assert one.layers[0].param_bytes == 4 * (50304 * 512 + 256 * 512)
    assert eight.layers[0].param_bytes == 4 * (51200 * 512 / 8 + 256 * 512)
    assert eight.tensor_parallel == 8 and [c.kind for c in eight.layers[1].tp_forward] == ["all-reduce"] * 2


@pytest.mark.parametrize("shape", [(8, 32, 2, 2, 2, 2), (8, 16, 1, 4, 1, 2), (8, 64, 2, 8, 1, 1), (64, 64, 2, 4, 4, 4)])
def test_fast_stage_costs_equal_the_costs_summed_from_the_per_rank_profile(shape):
    gpus, gb, micro, tp, dp, pp = shape
    r = _row(gpus, gb, micro, tp, dp, pp)
    m = row_model(r)
    fast = m.stage_costs(P)
    slow = stage_costs_from_profile(r, row_profile(r, P), m.links, "a100-80gb", P)
    for a, b in zip((fast.forward_s, fast.backward_s, fast.step_s), (slow.forward_s, slow.backward_s, slow.step_s)):
        assert a == pytest.approx(b, rel=1e-9)


def test_profile_stage_costs_recompute_what_planner_recompute_marks_recomputable():
    """The closed form takes recomputation from planner.recompute (Layer.recomputable), not from layer names:
    a profile whose blocks are not recomputable gets no re-run forward in its backward."""
    r = _row(8, 16, 1, 4, 1, 2)
    m = row_model(r)
    prof = row_profile(r, P)
    kept = replace(prof, layers=tuple(replace(l, recomputable=False) for l in prof.layers))
    full = stage_costs_from_profile(r, prof, m.links, "a100-80gb", P)
    none = stage_costs_from_profile(r, kept, m.links, "a100-80gb", P)
    for s, (a, z) in enumerate(stage_layer_ranges(r)):
        rerun = sum(l.forward_s + m.links.tp_s[s][1][0] for l in prof.layers[a:z + 1] if l.recomputable)
        assert rerun > 0 and full.backward_s[s] - none.backward_s[s] == pytest.approx(rerun, rel=1e-9)
    assert full.forward_s == none.forward_s


# ---------------------------------------------------------------------- closed form against the simulator
@pytest.mark.parametrize("shape", [(2, 16, 2, 1, 1, 2), (4, 16, 1, 1, 1, 4), (4, 32, 2, 1, 4, 1), (8, 32, 1, 1, 2, 4),
                                   (8, 64, 4, 1, 8, 1), (8, 24, 1, 1, 2, 4)])
def test_1f1b_closed_form_equals_the_simulator_on_small_tp1_plans(shape):
    gpus, gb, micro, tp, dp, pp = shape
    r = _row(gpus, gb, micro, tp, dp, pp)
    assert row_model(r).predict_s(P) == pytest.approx(simulate_row_s(r, P), rel=5e-4)


@pytest.mark.parametrize("shape", [(2, 8, 1, 2, 1, 1), (4, 8, 2, 2, 1, 2), (8, 16, 1, 4, 2, 1), (8, 8, 1, 8, 1, 1),
                                   (16, 16, 2, 8, 1, 2)])
def test_1f1b_closed_form_equals_the_simulator_with_tp_collectives_on_the_links(shape):
    gpus, gb, micro, tp, dp, pp = shape
    r = _row(gpus, gb, micro, tp, dp, pp, layers=2 * pp)  # the simulator runs every TP rank: keep it small
    assert row_model(r).predict_s(P) == pytest.approx(simulate_row_s(r, P), rel=5e-4)


@pytest.mark.parametrize("shape", [(32, 32, 1, 4, 4, 2), (32, 16, 2, 8, 4, 1), (32, 32, 1, 2, 8, 2), (32, 8, 1, 16, 2, 1)])
def test_1f1b_closed_form_equals_the_folded_simulator_with_tp_across_nodes(shape):
    gpus, gb, micro, tp, dp, pp = shape
    r = _row(gpus, gb, micro, tp, dp, pp, layers=2 * pp, hidden=1024, heads=16)
    assert row_model(r).predict_s(P) == pytest.approx(simulate_row_s(r, P), rel=5e-4)


@pytest.mark.parametrize("shape", [(8, 1, 2, 4), (8, 2, 2, 2), (64, 4, 8, 2), (64, 2, 4, 8), (64, 16, 4, 1), (32, 1, 16, 2)])
def test_the_budget_counts_the_workers_the_simulator_walks(shape):
    from sim.engine import workers_simulated
    from sim.params import SimParams
    from topologies.presets import load_topology
    from validation.groundtruth_plan import simulated_workers, topology_spec

    gpus, tp, dp, pp = shape
    r = _row(gpus, dp, 1, tp, dp, pp, hidden=256, heads=16, layers=pp, seq=16)
    walked = workers_simulated(row_plan(r), row_profile(r, P), load_topology(topology_spec(gpus)), SimParams())
    assert simulated_workers(r) == walked


def test_rows_over_the_budget_take_the_closed_form_and_say_why():
    from validation.groundtruth_plan import SIMULATE_BUDGET_S, simulation_cost_s, why_closed_form

    small, big = _row(8, 32, 1, 2, 2, 2), _row(512, 1536, 1, 8, 2, 32, layers=96, hidden=12288, heads=96)
    assert simulation_cost_s(small) <= SIMULATE_BUDGET_S < simulation_cost_s(big)
    assert why_closed_form(small) == "" and "budget" in why_closed_form(big)


@pytest.mark.parametrize("grad", [4, 2])
def test_closed_form_equals_the_simulator_across_nodes(grad):
    r = _row(32, 64, 2, 1, 16, 2, hidden=1024, heads=16)  # 4 nodes: DP rings and p2p on the node links
    assert row_model(r).predict_s(P, grad) == pytest.approx(simulate_row_s(r, P, gradient_bytes=grad), rel=5e-4)
    if grad == 2:  # half the gradient bytes: a shorter all-reduce
        assert row_model(r).predict_s(P, 2) < row_model(r).predict_s(P, 4)


# ---------------------------------------------------------------------- scoring and the command
@real_data
def test_json_has_exactly_rows_and_summary_and_calibration_rows_are_never_scored(tmp_path, capsys):
    lines = (DATA / FILES["single"]).read_text(encoding="utf-8-sig").splitlines()[1:]
    multi = (DATA / FILES["multi"]).read_text(encoding="utf-8-sig").splitlines()[1:]
    d = _write(tmp_path / "d", lines[:40], multi[:6])
    assert main(["groundtruth", "--data", str(d), "--json", "--save-calibration", str(tmp_path / "c.json")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"rows", "summary"}
    s = doc["summary"]
    for key in ("mape_single", "mape_multi", "max_abs_error", "n_scored", "n_calibration", "n_skipped"):
        assert key in s
    rows = doc["rows"]
    assert len(rows) == 46 and s["n_skipped"] == 0
    for r in rows:
        assert {"measured_ms", "predicted_ms", "error", "calibration", "tp", "dp", "pp", "micro_batch"} <= set(r)
        assert r["calibration"] == is_calibration(canonical_config(r["source"], r["gpus"], r["global_batch"],
                                                                   r["micro_batch"], r["hidden"], r["heads"],
                                                                   r["layers"], r["seq"], r["tp"], r["dp"], r["pp"]))
    scored = [r for r in rows if not r["calibration"]]
    assert s["n_scored"] == len(scored) and s["n_calibration"] == len(rows) - len(scored) > 0
    single = [abs(r["error"]) for r in scored if r["source"] == "single"]
    assert s["mape_single"] == pytest.approx(sum(single) / len(single), rel=1e-4)
    assert s["max_abs_error"] == pytest.approx(max(abs(r["error"]) for r in scored), rel=1e-4)
    # the calibration the fit wrote scores the same rows the same way when given back
    assert main(["groundtruth", "--data", str(d), "--json", "--device-calibration", str(tmp_path / "c.json")]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [r["predicted_ms"] for r in again["rows"]] == [r["predicted_ms"] for r in rows]


@real_data
def test_a_few_real_rows_are_predicted_within_a_quarter_by_a_calibration_fitted_on_others(tmp_path, capsys):
    lines = (DATA / FILES["single"]).read_text(encoding="utf-8-sig").splitlines()[1:]
    d = _write(tmp_path / "d", lines[:120], [])
    assert main(["groundtruth", "--data", str(d), "--json", "--no-simulate"]) == 0
    doc = json.loads(capsys.readouterr().out)
    scored = [r for r in doc["rows"] if not r["calibration"]]
    assert all(r["method"] == "closed-form" for r in doc["rows"])
    assert doc["summary"]["mape_single"] < 0.15
    assert sorted(abs(r["error"]) for r in scored)[len(scored) // 2] < 0.1  # the median row


@real_data
def test_report_writes_markdown_plot_json_and_the_calibration(tmp_path, capsys):
    lines = (DATA / FILES["single"]).read_text(encoding="utf-8-sig").splitlines()[1:]
    d = _write(tmp_path / "d", lines[:30], [])
    out = tmp_path / "report"
    assert main(["groundtruth", "--data", str(d), "--report", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "MAPE" in text and "scatter.png" in text and "Worst scored rows" in text
    assert (out / "scatter.png").stat().st_size > 10_000
    assert set(json.loads((out / "groundtruth.json").read_text())) == {"rows", "summary"}
    assert json.loads((out / "device-calibration.json").read_text())["device_kind"] == "a100-80gb"
    assert "MAPE" in capsys.readouterr().out


def test_the_report_says_what_the_simulator_walked_per_row_a_tp_group_across_servers_is_not_one_worker(tmp_path):
    """A TP group of 16 spans two 8-GPU servers: the simulator walks all 16 ranks of its one stage (the trace's
    count), so the report may not say "one worker per stage" of every simulated row; the other row's 2 stages are
    walked as one worker each."""
    from planner.efficiency import DeviceCalibration
    from validation.groundtruth import run
    from validation.groundtruth_report import markdown

    d = _write(tmp_path, ["32,8,1,1024,16,2,256,16,2,1,100.0", "8,32,1,512,8,4,256,2,2,2,100.0"], [])
    g = run(d, DeviceCalibration("a100-80gb", P))
    assert [(s.method, s.row.tp, s.workers_simulated) for s in g.scored] == [("simulated", 16, 16), ("simulated", 2, 2)]
    sim = g.summary()["simulated_workers"]
    assert sim == {"one_per_stage": 1, "every_tp_rank_per_stage": 1, "other": 0, "min": 2, "max": 16, "max_gpus": 32}
    text = markdown(g, plot=None)
    assert "one worker per stage on 1;" in text and "every TP rank of one replica per stage on 1 " in text
    assert "2–16 workers walked per row" in text


# ---------------------------------------------------------------------- Korthikanti et al.'s Table 5 (extra)
TABLE5 = DATA.parent / "published" / "korthikanti22_table5_via_calculon.csv"


@pytest.mark.skipif(not TABLE5.is_file(), reason="published data not beside the repo")
def test_table5_selective_recomputation_with_sequence_parallelism_is_predicted_cheaper_than_full():
    from validation.groundtruth_published import score_korthikanti
    from planner.efficiency import DeviceCalibration

    rows = score_korthikanti(TABLE5, DeviceCalibration("a100-80gb", P))
    assert len(rows) == 8
    by = {(r["model"], r["recompute"]): r for r in rows}
    for model in {r["model"] for r in rows}:
        full, sel = by[(model, "full")], by[(model, "seqsel")]
        assert sel["predicted_s"] < full["predicted_s"]
        # the measured saving is 22-24%; the model's comes from dropping three of four forward passes' worth
        assert 1.1 < full["predicted_s"] / sel["predicted_s"] < 1.6


def test_table5_closed_form_without_pipeline_is_microbatches_times_forward_and_backward(tmp_path):
    from planner.transformer import TransformerConfig
    from planner.transformer_profile import transformer_profile
    from planner.efficiency import DeviceCalibration, optimizer_step_s
    from topologies.devices import device_kind
    from validation.groundtruth_published import PublishedRow, predict_published_s

    r = PublishedRow("m", 1024, 4096, 16, 4, 512, 1, 1, 1, 1, 8, 2, 1, "full", 1.0)
    cal = DeviceCalibration("a100-80gb", P)
    prof = transformer_profile(TransformerConfig(4, 1024, 16, seq=512, vocab=51200, ffn=4096), "a100-80gb",
                               microbatch_size=2, efficiency=P, vocab_multiple=128)
    b = prof.layers[1]
    fb = 4 * (2 * b.forward_s + b.backward_s) + sum(l.forward_s + l.backward_s for l in (prof.layers[0], prof.layers[-1]))
    step = optimizer_step_s(sum(l.param_bytes for l in prof.layers[:-1]) / 4, device_kind("a100-80gb"), P)
    assert predict_published_s(r, cal) == pytest.approx(4 * fb + step + P.iteration_overhead_s, rel=1e-9)


def test_the_loss_overhead_costs_each_microbatch_once_in_the_closed_form_and_the_simulator(tmp_path):
    """PP = 1: the head's forward runs once per microbatch on the one stage, so d more seconds at the loss cost
    m·d more per iteration, in both interpreters; a calibration file from before the parameter loads it as 0."""
    import json as _json

    from planner.efficiency import DeviceCalibration, load_device_calibration

    r = _row(8, 32, 2, 2, 4, 1)
    d = 1e-3
    more = replace(P, loss_overhead_s=P.loss_overhead_s + d)
    m = row_model(r)
    assert m.predict_s(more) - m.predict_s(P) == pytest.approx(r.microbatches * d, rel=1e-9)
    assert simulate_row_s(r, more) - simulate_row_s(r, P) == pytest.approx(r.microbatches * d, rel=1e-6)
    doc = DeviceCalibration("a100-80gb", P).to_dict()
    del doc["params"]["loss_overhead_s"]
    (tmp_path / "old.json").write_text(_json.dumps(doc))
    assert load_device_calibration(tmp_path / "old.json").params == replace(P, loss_overhead_s=0.0)


# ---------------------------------------------------------------------- the closed form's terms (--explain)
@pytest.mark.parametrize("shape", [(8, 32, 2, 2, 1, 4), (8, 16, 1, 1, 8, 1), (16, 32, 1, 4, 2, 2), (4, 8, 2, 4, 1, 1)])
def test_the_terms_add_up_to_the_closed_form_and_vanish_where_the_plan_has_no_such_cost(shape):
    from planner.efficiency import DeviceCalibration
    from validation.groundtruth_closed_form import TERMS, closed_form_terms_s

    gpus, gb, micro, tp, dp, pp = shape
    r = _row(gpus, gb, micro, tp, dp, pp, layers=2 * pp)
    m = row_model(r)
    terms = closed_form_terms_s(m, DeviceCalibration("a100-80gb", P))
    assert tuple(terms) == TERMS and all(v >= 0 for v in terms.values())
    assert sum(terms.values()) == pytest.approx(m.predict_s(P), rel=1e-12)
    assert (terms["tp_comm"] > 0) == (tp > 1) and (terms["fill_drain"] > 0) == (pp > 1) and (terms["p2p"] > 0) == (pp > 1)
    assert terms["overhead"] == P.iteration_overhead_s


def test_the_tp_term_is_every_collective_megatron_issues_counted_by_hand_times_the_ring_formula():
    """One stage on one TP group of 4, b = 2, 3 blocks, full recomputation, no sequence parallelism. By hand:
    each block all-reduces its s·h·2·b-byte hidden state twice in forward, twice in the re-run forward and twice
    in backward; the embedding once (forward), the head once (backward); the head's vocabulary-parallel cross
    entropy all-reduces three fp32 per-token statistics (4·s·b bytes each) in forward. Each priced by the ring
    closed form 2(n − 1)·α + 2(n − 1)/n · S/B (``Topology.ring_allreduce_time_s``)."""
    from planner.efficiency import DeviceCalibration
    from topologies.presets import load_topology
    from validation.groundtruth_closed_form import closed_form_terms_s
    from validation.groundtruth_plan import row_config, topology_spec

    r = _row(4, 16, 2, 4, 1, 1, layers=3)
    m = row_model(r)
    c, b = row_config(r), r.micro_batch
    topo = load_topology(topology_spec(r.gpus))
    ring = lambda nbytes: topo.ring_allreduce_time_s(["d0", "d1", "d2", "d3"], nbytes)
    big, small = ring(c.seq * c.hidden * 2 * b), ring(c.seq * 4 * b)
    assert 0 < small < big
    per_mb = (6 * 3 + 1 + 1) * big + 3 * small
    tp_term = closed_form_terms_s(m, DeviceCalibration("a100-80gb", P))["tp_comm"]
    assert tp_term == pytest.approx(r.microbatches * per_mb, rel=1e-9)


@real_data
def test_cli_explain_prints_a_rows_terms_and_refuses_a_row_that_is_not_there(tmp_path, capsys):
    lines = (DATA / FILES["single"]).read_text(encoding="utf-8-sig").splitlines()[1:]
    d = _write(tmp_path / "d", lines[:30], [])
    assert main(["groundtruth", "--data", str(d), "--explain", "single:3", "--no-simulate"]) == 0
    out = capsys.readouterr().out
    for word in ("single:3", "compute", "tp_comm", "fill_drain", "dp_tail", "closed form", "measured"):
        assert word in out
    assert main(["groundtruth", "--data", str(d), "--explain", "single:40"]) == 2
    err = capsys.readouterr().err.strip()
    assert "single:40" in err and "no such data row" in err and len(err.splitlines()) == 1
    assert main(["groundtruth", "--data", str(d), "--explain", "row7"]) == 2
    assert "FILE:LINE" in capsys.readouterr().err
    # --json: the named rows as JSON, their terms adding up to the closed form (it printed the table before)
    assert main(["groundtruth", "--data", str(d), "--explain", "single:3", "--no-simulate", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert sum(row["closed_form_terms_ms"].values()) == pytest.approx(row["closed_form_ms"], rel=1e-3)
    # --report with --explain is refused in one line before anything runs (it wrote no report before)
    assert main(["groundtruth", "--data", str(d), "--explain", "single:3", "--report", str(tmp_path / "r")]) == 2
    assert "give one of them" in capsys.readouterr().err and not (tmp_path / "r").exists()
