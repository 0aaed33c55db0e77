"""Validation: calibration recovers known parameters, the comparison math, the report's keys, `validate --quick` end to end."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from planner.plan import even_plan
from planner.profile import uniform_profile
from sim.engine import simulate_plan
from sim.params import SimParams
from topologies.presets import load_topology
from topologies.errors import InputError
from validation.calibrate import Calibration
from validation.compute import ComputeRow, compute_rows, fit_compute, with_action_cost
from validation.links import LinkSegment, fit_links
from validation.measure import chain_saved_bytes
from validation.compare import best_agrees, compare_traces, rel_error, spearman, summarize
from validation.configs import CALIBRATION, FULL, QUICK, check_hold_out

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(30)
def test_compute_fit_recovers_the_overhead_of_a_simulated_trace():
    prof = uniform_profile(12, 2e-3, 4e-3, act=1024)
    rows = []
    for stages in (2, 4, 6):  # 6, 3 and 2 layers per stage
        plan = even_plan("m", 12, stages, schedule="1f1b", microbatches=6, batches=2)
        tr = simulate_plan(plan, prof, load_topology(f"local:{stages}"), SimParams(overhead_s=3e-4))
        rows += compute_rows(tr, plan, prof)
    fit = fit_compute(rows)
    assert fit.overhead_s == pytest.approx(3e-4, rel=1e-6)
    assert fit.scale == pytest.approx(1.0, rel=1e-3)
    assert fit.per_layer_s == pytest.approx(0.0, abs=1e-7) and fit.action_s == pytest.approx(0.0, abs=1e-7)


@pytest.mark.timeout(30)
def test_compute_fit_recovers_scale_per_layer_and_per_action_costs():
    truth = dict(scale=1.7, per_layer=5e-5, action=2e-4, overhead=1e-4)
    rows = [ComputeRow("send", 0.0, 0, truth["overhead"], 10)]
    for n in (2, 3, 6):
        for base in (n * 1e-3, n * 2e-3):
            y = truth["scale"] * base + truth["per_layer"] * n + truth["action"] + truth["overhead"]
            rows.append(ComputeRow(f"{n}:{base}", base, n, y, 8))
    fit = fit_compute(rows)
    assert fit.scale == pytest.approx(truth["scale"], rel=1e-4)
    assert fit.per_layer_s == pytest.approx(truth["per_layer"], rel=1e-3)
    assert fit.action_s == pytest.approx(truth["action"], rel=1e-3)
    assert fit.rms_relative_error < 1e-6


@pytest.mark.timeout(30)
def test_link_fit_finds_latency_bandwidth_and_a_size_break():
    lat, bw = 30e-6, 2e9
    pts = [(b, lat + b / bw) for b in (64, 1024, 16384, 262144, 4 << 20)]
    segs, err = fit_links(pts)
    assert len(segs) == 1 and err < 1e-6
    assert segs[0].latency_s == pytest.approx(lat, rel=1e-4) and segs[0].bandwidth_bytes_per_s == pytest.approx(bw, rel=1e-4)
    small = [(b, 100e-6 + b / 1e8) for b in (64, 256, 1024, 4096)]
    large = [(b, 2e-3 + b / 5e9) for b in (1 << 20, 4 << 20, 16 << 20, 64 << 20)]
    segs, err = fit_links(small + large)
    assert len(segs) == 2 and err < 1e-3
    assert segs[0].bandwidth_bytes_per_s == pytest.approx(1e8, rel=1e-3)
    assert segs[1].bandwidth_bytes_per_s == pytest.approx(5e9, rel=1e-3)


@pytest.mark.timeout(30)
def test_action_cost_is_spread_over_each_stage_exactly():
    prof = uniform_profile(6, 1e-3, 2e-3)
    plan = even_plan("m", 6, 2)
    out = with_action_cost(prof, plan, 3e-4)
    assert out.forward_s(0, 2) == pytest.approx(3e-3 + 3e-4)
    assert out.backward_s(3, 5) == pytest.approx(6e-3 + 3e-4)


@pytest.mark.timeout(60)
def test_chain_saved_bytes_count_each_kept_tensor_once():
    """mlp, 3 layers of width W: a forward keeps the input x, the two ReLU outputs (each also the next Linear's
    input), the last Linear's output and the target (MSE): 5 tensors of 4W bytes per sample. Each goes to the last
    layer that keeps it; the profiler, layer by layer, counts each ReLU output twice."""
    from executor.profiler import profile_model

    W, mbs = 16, 3
    spec = f"mlp:layers=3,width={W}"
    got = chain_saved_bytes(spec, mbs)
    assert got == [4 * W, 4 * W, 3 * 4 * W]  # x; ReLU 1's output; ReLU 2's output, the output and the target
    per_layer = [l.saved_bytes for l in profile_model(spec, microbatch_size=mbs, repeats=1, warmup=0).layers]
    assert per_layer == [2 * 4 * W, 2 * 4 * W, 4 * W]


@pytest.mark.timeout(30)
def test_calibration_files_round_trip(tmp_path):
    cal = Calibration("uniform:layers=4", uniform_profile(4, 1e-3, 2e-3), SimParams(overhead_s=1e-4),
                      [LinkSegment(4096, 1e-5, 1e9), LinkSegment(math.inf, 5e-5, 3e9)], devices=4,
                      residuals={"x": 1}, used=["a"], action_s=2e-4,
                      reference_plan=even_plan("uniform:layers=4", 4, 2).to_dict())
    files = cal.save(tmp_path)
    assert {Path(f).name for f in files.values()} >= {"profile.json", "topology.json", "sim_params.json"}
    back = Calibration.load(tmp_path)
    assert back.params == cal.params and back.links == cal.links and back.action_s == cal.action_s
    assert back.topology(1e6).link("d0", "localhost").latency_s == pytest.approx(2.5e-5)
    SimParams(**json.loads((tmp_path / "sim_params.json").read_text()))


def test_relative_error_and_rank_statistics():
    assert rel_error(110.0, 100.0) == pytest.approx(0.1)
    assert rel_error(90.0, 100.0) == pytest.approx(-0.1)
    assert math.isnan(rel_error(1.0, 0.0))
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    assert best_agrees([1, 5, 3], [2, 9, 1]) and not best_agrees([5, 1, 3], [2, 9, 1])


def test_compare_and_summary_keys():
    prof = uniform_profile(4, 1e-3, 2e-3, act=1024, params=4096)
    plan = even_plan("m", 4, 2, microbatches=4, batches=3)
    a = simulate_plan(plan, prof, load_topology("local:2"))
    b = simulate_plan(plan, prof, load_topology("local:2"), SimParams(overhead_s=1e-4))
    c = compare_traces(a, b)
    assert set(c) == {"predicted", "measured", "error"}
    assert c["error"]["throughput_samples_per_s"] > 0  # no overhead predicts faster
    assert set(c["error"]["peak_memory_bytes"]) == {"0", "1"}
    row = {"name": "x", "model": "m", "schedule": "1f1b", **c}
    s = summarize([row, dict(row, name="y"), dict(row, name="z", model="n")])
    for k in ("mean_abs_throughput_error", "max_abs_throughput_error", "mean_abs_memory_error", "spearman", "n_configs"):
        assert k in s
    assert s["n_configs"] == 3


def test_summary_names_the_configurations_the_model_calls_a_tie_with_its_best():
    """Predicted 100, 99.5, 95: the first two tie (within 1%), the third does not. A measured best among the
    ties counts, though it is not the predicted best; one outside them does not."""
    def row(name, pred, meas):
        return {"name": name, "model": "m", "schedule": "1f1b", "run_spread": 0.02,
                "predicted": {"throughput_samples_per_s": pred}, "measured": {"throughput_samples_per_s": meas},
                "error": {"throughput_samples_per_s": pred / meas - 1, "time_per_batch_s": 0.0, "bubble_fraction": 0.0,
                          "peak_memory_bytes": {}}}

    s = summarize([row("a", 100, 90), row("b", 99.5, 91), row("c", 95, 80)])["by_model"]["m"]
    assert s["predicted_ties"] == ["a", "b"] and s["measured_best"] == "b"
    assert not s["best_predicted_best"] and s["measured_best_among_predicted_ties"]
    s = summarize([row("a", 100, 90), row("b", 99.5, 91), row("c", 95, 92)])["by_model"]["m"]
    assert s["measured_best"] == "c" and not s["measured_best_among_predicted_ties"]
    s = summarize([row("a", float("nan"), 90), row("b", 99.5, 91)])["by_model"]["m"]
    assert s["predicted_ties"] == ["b"] and s["measured_best_among_predicted_ties"]  # no prediction, no tie
    assert s["predicted_best"] == "b" and s["best_predicted_best"]
    s = summarize([row("a", 0.0, 90), row("b", 0.0, 91)])["by_model"]["m"]
    assert s["predicted_ties"] == [] and s["measured_best_among_predicted_ties"] is None


def test_a_missed_best_pick_is_tested_against_the_launches():
    """best_gap_p_value against closed forms: 5 launches all faster than 5 others is the most extreme of the
    C(10, 5) = 252 equally likely orderings (p = 1/252); interleaved sets are nowhere near significant, nor are
    identical ones (ties); fewer than 3 launches test nothing. summarize tests only a miss."""
    from validation.compare import best_gap_p_value

    assert best_gap_p_value([6, 7, 8, 9, 10], [1, 2, 3, 4, 5]) == pytest.approx(1 / 252)
    assert best_gap_p_value([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == pytest.approx(1.0)
    # one overlap (the slowest "best" launch below the fastest "picked" one): 2 of 252 orderings are as extreme
    assert best_gap_p_value([4.5, 7, 8, 9, 10], [1, 2, 3, 4, 5]) == pytest.approx(2 / 252)
    assert best_gap_p_value([1, 2, 3, 4, 5], [1.1, 2.1, 3.1, 4.1, 5.1]) > 0.3
    assert best_gap_p_value([3, 3, 3], [3, 3, 3]) >= 0.5
    assert best_gap_p_value([1, 2], [3, 4, 5]) is None and best_gap_p_value(None, [1, 2, 3]) is None

    def row(name, pred, runs):
        meas = sorted(runs)[len(runs) // 2]
        return {"name": name, "model": "m", "schedule": "1f1b", "measured_runs": sorted(runs),
                "predicted": {"throughput_samples_per_s": pred}, "measured": {"throughput_samples_per_s": meas},
                "error": {"throughput_samples_per_s": pred / meas - 1, "time_per_batch_s": 0.0, "bubble_fraction": 0.0,
                          "peak_memory_bytes": {}}}

    s = summarize([row("a", 100, [90, 91, 92, 93, 94]), row("b", 99, [95, 96, 97, 98, 99])])["by_model"]["m"]
    assert s["measured_best"] == "b" and s["best_gap_p_value"] == pytest.approx(1 / 252)
    s = summarize([row("a", 100, [95, 96, 97, 98, 99]), row("b", 99, [90, 91, 92, 93, 94])])["by_model"]["m"]
    assert s["best_predicted_best"] and s["best_gap_p_value"] is None


def test_matrix_holds_out_the_calibration_runs_and_spans_the_ranges():
    check_hold_out()
    assert len(FULL) >= 30 and set(QUICK) <= set(FULL)
    assert {c.schedule for c in FULL} == {"gpipe", "1f1b", "interleaved", "pipedream", "2bw", "zb-h1"}
    assert min(c.stages for c in FULL) == 2 and max(c.stages for c in FULL) == 8
    assert {c.replicas for c in FULL} == {1, 2}
    assert min(c.microbatches for c in FULL) == 1 and max(c.microbatches for c in FULL) == 32
    assert len({c.model for c in FULL}) >= 2
    used = {c.name for cs in CALIBRATION.values() for c in cs}
    assert not used & {c.name for c in FULL}


@pytest.mark.dist
@pytest.mark.timeout(240)
def test_validate_quick_end_to_end(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "pipetwin", "validate", "--quick", "--json", "--report", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert set(doc) >= {"configs", "summary"}
    s = doc["summary"]
    assert s["n_configs"] == len(doc["configs"]) == len(QUICK)
    for k in ("mean_abs_throughput_error", "max_abs_throughput_error", "mean_abs_memory_error", "spearman"):
        assert s[k] is not None and math.isfinite(s[k]), k
    for c in doc["configs"]:
        assert set(c) >= {"name", "predicted", "measured", "error"}
        assert math.isfinite(c["error"]["throughput_samples_per_s"])
        assert c["measured"]["throughput_samples_per_s"] > 0 and c["predicted"]["throughput_samples_per_s"] > 0
        assert c["error"]["memory_abs_error"] <= 0.05, c["name"]  # the simulator and the executor count the same bytes
        assert (c["device"], c["backend"]) == ("cpu", "gloo"), c["name"]
    for f in ("report.md", "validation.json", "scatter.png", "error_by_schedule.png", "timeline.json", "timeline.png"):
        assert (out / f).exists(), f
    assert (out / "calibration" / "emu" / "sim_params.json").exists()
    report = (out / "report.md").read_text()
    assert "hold-out" in report and f"the CPU with gloo ({len(QUICK)})" in report


def test_runs_compute_where_the_profile_was_taken():
    """run_options: CPU runs always use gloo (on a machine with GPUs, "auto" would otherwise pick NCCL and the
    GPUs for runs profiled on the CPU); a GPU keeps the asked backend; nonsense is refused with what to do."""
    from validation.measure import run_options

    assert run_options("cpu", "auto") == {"device": "cpu", "backend": "gloo"}
    assert run_options("cpu", "gloo") == {"device": "cpu", "backend": "gloo"}
    with pytest.raises(InputError, match="use --device cuda .*or --backend gloo"):
        run_options("cpu", "nccl")
    with pytest.raises(InputError, match="choose cpu or cuda"):
        run_options("tpu")
    with pytest.raises(InputError, match="choose auto, gloo or nccl"):
        run_options("cpu", "mpi")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no GPU that torch can use; use --device cpu"):
            run_options("cuda", "auto")


def test_one_backend_is_chosen_for_the_widest_run(monkeypatch):
    """On GPUs "auto" resolves once, for the widest run: NCCL only when it has a GPU per worker, else gloo for
    every run (a calibration must not fit NCCL and gloo messages as one link); "nccl" on too few GPUs is
    refused with what to do instead."""
    from validation.measure import run_options

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert run_options("cuda", "auto", 4) == {"device": "cuda", "backend": "nccl"}
    assert run_options("cuda", "auto", 8) == {"device": "cuda", "backend": "gloo"}
    assert run_options("cuda", "gloo", 2) == {"device": "cuda", "backend": "gloo"}
    assert run_options("cpu", "auto", 2) == {"device": "cpu", "backend": "gloo"}  # GPUs there or not
    with pytest.raises(InputError, match="the run has 8 workers, this machine 4 GPUs; use --backend gloo"):
        run_options("cuda", "nccl", 8)


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_validate_on_cuda_profiles_times_and_runs_everything_there(monkeypatch):
    """run_matrix(device="cuda") on this CPU machine with the device calls recorded (the runs themselves go to
    the CPU): the profile, the accumulation timing and every launch ask for the GPU, the launches keep the asked
    backend, and the loopback link benchmark (host memory, not the GPUs' links) is never run."""
    from executor.launch import run_plan
    from executor.profiler import profile_model
    from validation import matrix
    from validation.configs import QUICK
    from validation.measure import Instruments, accumulate_s_per_byte

    asked = {"profile": [], "accumulate": [], "run": []}

    def profile(*a, device="cpu", **kw):
        asked["profile"].append(device)
        return profile_model(*a, **kw)

    def accumulate(*a, device="cpu", **kw):
        asked["accumulate"].append(device)
        return accumulate_s_per_byte(*a, **kw)

    def run(plan, timeout_s=60.0, device="auto", backend="auto", **kw):
        asked["run"].append((device, backend))
        return run_plan(plan, timeout_s=timeout_s, device="cpu", backend="gloo", **kw)

    def no_links(*a, **kw):
        raise AssertionError("the loopback link benchmark ran for a GPU matrix")

    recording = Instruments(launch=run, profile=profile, accumulate=accumulate, links=no_links)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with two GPUs, as torch sees it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    mlp = [c for c in QUICK if c.model == "mlp"][:1]
    with pytest.raises(InputError, match="needs one GPU per worker"):  # emu's widest run has 8
        matrix.run_matrix(configs=mlp + [c for c in QUICK if c.model == "emu"], repeats=1, device="cuda",
                          backend="nccl", instruments=recording)
    assert not asked["run"] and not asked["profile"]  # refused before anything ran
    res = matrix.run_matrix(configs=mlp, repeats=1, device="cuda", backend="auto", instruments=recording)
    assert asked["profile"] == ["cuda"] and asked["accumulate"] == ["cuda"]
    # two calibration runs and one scored, all on NCCL: 2 workers, 2 GPUs
    assert len(asked["run"]) == 3 and set(asked["run"]) == {("cuda", "nccl")}
    assert len(res.rows) == 1 and math.isfinite(res.rows[0]["error"]["throughput_samples_per_s"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("argv", [["validate", "--quick", "--device", "cuda"],
                                  ["calibrate", "--model", "mlp", "--device", "cuda"],
                                  ["validate", "--quick", "--backend", "nccl"]])
def test_cli_refuses_a_device_it_cannot_use_in_one_line(argv, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipetwin", *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "use --device" in lines[0] or "--backend gloo" in lines[0]
    assert not any(tmp_path.iterdir())  # nothing ran, nothing written


def test_repeated_launches_score_the_median_throughput_run():
    """run_config(repeats=3) launches three times and scores the launch of median throughput: three real traces
    of the configuration's plan (simulated at three speeds) stand in for the launches."""
    import types

    from planner.trace import throughput_samples_per_s
    from validation import matrix
    from validation.configs import QUICK
    from validation.measure import Instruments

    cfg = QUICK[0]
    plan = cfg.plan()
    topo = load_topology(f"local:{len(plan.devices)}")
    layers = plan.stages[-1].last_layer + 1
    traces = [simulate_plan(plan, uniform_profile(layers, 1e-3 * k, 2e-3 * k, act=1024), topo)
              for k in (1.0, 3.0, 1.5)]  # fastest, slowest, the median
    launches = iter(traces)
    asked = []

    def launch(p, timeout_s, **where):
        asked.append(where)
        return types.SimpleNamespace(trace=next(launches))

    cal = types.SimpleNamespace(simulate=lambda p: traces[0])
    row, pred, meas = matrix.run_config(cfg, cal, repeats=3, instruments=Instruments(launch=launch))
    assert asked == [{"device": "cpu", "backend": "gloo"}] * 3  # the CPU profile's runs stay on the CPU
    rates = [throughput_samples_per_s(t) for t in traces]
    assert rates[1] < rates[2] < rates[0]
    assert meas is traces[2] and pred is traces[0]
    assert row["measured_runs"] == sorted(rates)
    assert row["error"]["throughput_samples_per_s"] == pytest.approx(rates[0] / rates[2] - 1)
    assert row["run_spread"] == pytest.approx((rates[0] - rates[1]) / rates[2])


def test_run_to_run_spread_is_kept_with_every_launch():
    from validation.compare import run_spread

    assert run_spread([8.0, 10.0, 12.0]) == pytest.approx(0.4) and math.isnan(run_spread([5.0]))


def test_calibration_and_scored_runs_are_launched_in_rounds():
    """launch_interleaved: every round launches each calibration run and each scored configuration once, and the
    calibration traces come back grouped per run (the order calibrate() expects for repeats)."""
    import types

    from validation import matrix
    from validation.configs import Config
    from validation.measure import Instruments

    order = []

    def fake_run(plan, timeout_s, **where):
        assert where == {"device": "cpu", "backend": "gloo"}
        key = (plan.schedule, plan.microbatches)
        order.append(key)
        return types.SimpleNamespace(trace=(key, sum(1 for k in order if k == key)))

    cal = [Config("mlp", "1f1b", 2, 8), Config("mlp", "zb-h1", 2, 4)]
    scored = [Config("mlp", "gpipe", 2, 8), Config("mlp", "2bw", 2, 4)]
    cal_traces, runs = matrix.launch_interleaved(cal, scored, repeats=3, instruments=Instruments(launch=fake_run))
    one_round = [("1f1b", 8), ("zb-h1", 4), ("gpipe", 8), ("2bw", 4)]
    assert order == one_round * 3
    assert cal_traces == [(("1f1b", 8), 1), (("1f1b", 8), 2), (("1f1b", 8), 3),
                          (("zb-h1", 4), 1), (("zb-h1", 4), 2), (("zb-h1", 4), 3)]
    assert runs["mlp/2bw/P2/M4"] == [(("2bw", 4), 1), (("2bw", 4), 2), (("2bw", 4), 3)]


def test_calibrate_refuses_traces_that_do_not_match_its_launches():
    from validation.calibrate import CalibrationError, calibrate

    plan = even_plan("uniform:layers=4,fwd=1e-3,bwd=2e-3", 4, 2, microbatches=4)
    with pytest.raises(CalibrationError, match="2 traces given for 3 calibration launches"):
        calibrate("uniform:layers=4,fwd=1e-3,bwd=2e-3", [plan], repeats=3, traces=[None, None], profile_repeats=1)


def test_compute_rows_take_the_accumulation_off_the_backwards_that_add():
    """A simulated trace with a gradient-accumulation cost gives, with that cost passed to compute_rows,
    the same rows as one without it: only the backwards after the first of their round pay it."""
    prof = uniform_profile(4, 2e-3, 4e-3, act=1024, params=1 << 20)
    plan = even_plan("m", 4, 2, schedule="1f1b", microbatches=6, batches=2)
    topo = load_topology("local:2")
    per_byte = 1e-10
    free = compute_rows(simulate_plan(plan, prof, topo, SimParams(overhead_s=1e-4)), plan, prof)
    tr = simulate_plan(plan, prof, topo, SimParams(overhead_s=1e-4, accumulate_s_per_byte=per_byte))
    acc = [per_byte * prof.param_bytes(*sp.layers) for sp in plan.stages]
    assert acc[0] == pytest.approx(2 * (1 << 20) * per_byte)
    from validation.accumulation import accumulation_s

    paid = compute_rows(tr, plan, prof, adds=accumulation_s(tr, plan, acc))
    raw = compute_rows(tr, plan, prof)
    for f, p, r in zip(free, paid, raw):
        assert p.measured_s == pytest.approx(f.measured_s, rel=1e-9), p.label
        if p.kind == "B":
            assert r.measured_s > p.measured_s  # without the correction the adding backwards look slower


def test_link_model_puts_the_pipeline_excess_into_the_receiver_wake_up():
    """With benchmark points the links keep the benchmark's latency and bandwidth, and a pipeline message's
    time beyond overhead + link time becomes recv_wake_s; without them the latency carries it all."""
    from validation.links import fit_link_model

    lat, bw, ovh, wake = 5e-5, 5e9, 4e-5, 3e-4
    bench = [(float(b), lat + b / bw) for b in (256, 4096, 65536, 1 << 20)]
    pipe = [(65536.0, ovh + lat + 65536 / bw + wake)] * 20
    segs, info = fit_link_model(bench, pipe, ovh)
    assert segs[0].latency_s == pytest.approx(lat, rel=1e-3)
    assert info["recv_wake_s"] == pytest.approx(wake, rel=1e-3)
    segs2, info2 = fit_link_model(None, pipe, ovh)
    assert "recv_wake_s" not in info2
    assert segs2[0].latency_s + 65536 / segs2[0].bandwidth_bytes_per_s == pytest.approx(lat + 65536 / bw + wake, rel=1e-3)


def test_refine_moves_every_link_segment_alike_without_a_wake_up():
    """Without a fitted wake-up refine moves the link latency; a piecewise link keeps the gap between its
    segments' latencies (it used to get one latency on every segment)."""
    from validation.calibrate import _with

    prof = uniform_profile(2, 1e-3, 2e-3)
    segs = [LinkSegment(65536.0, 5e-5, 1e9), LinkSegment(math.inf, 2e-4, 5e9)]
    cal = Calibration("m", prof, SimParams(overhead_s=1e-5, recv_ready_s=3e-5), segs, 2,
                      residuals={"links": {"early_receive_mean_s": 4e-5}})
    moved = _with(cal, 2e-5, 8e-5)
    assert [s.latency_s for s in moved.links] == pytest.approx([8e-5, 2.3e-4])
    assert [s.bandwidth_bytes_per_s for s in moved.links] == [1e9, 5e9]
    # compute actions and an early receive keep their totals: what the overhead gains, they give back
    assert moved.action_s == pytest.approx(cal.action_s - 1e-5)
    assert moved.params.recv_ready_s == pytest.approx(2e-5)
    assert _with(cal, 5e-5, 8e-5).params.recv_ready_s == 0.0  # the overhead alone exceeds the measured mean
    # no early receive measured: a lower overhead does not invent an early-receive cost
    bare = Calibration("m", prof, SimParams(overhead_s=2e-4), segs, 2)
    assert _with(bare, 5e-5, 8e-5).params.recv_ready_s == 0.0


def test_ready_durations_find_exactly_the_receives_the_simulator_found_their_message_for():
    """zb-h1 on 4 stages over real links (1 MB messages, 50 us + 1 GB/s) with an overhead, a wake-up and an
    early-receive cost: the engine charges overhead + recv_ready_s exactly to the RECVs whose payload had
    arrived, and ready_durations, given the same link, returns those RECVs' durations and no other RECV's,
    activation and gradient receives alike."""
    from planner.program import Action
    from validation.events import steady_events
    from validation.links import ready_durations

    ovh, wake, ready = 2e-5, 1.4e-4, 2.7e-4
    lat, bw = 5e-5, 1e9
    prof = uniform_profile(8, 1e-3, 2e-3, act=1e6)
    topo = load_topology("local:4").with_link_params(latency_s=lat, bandwidth_bytes_per_s=bw)
    plan = even_plan("m", 8, 4, schedule="zb-h1", microbatches=8, batches=2)
    tr = simulate_plan(plan, prof, topo, SimParams(overhead_s=ovh, recv_wake_s=wake, recv_ready_s=ready))
    link = topo.p2p_time_s("d0", "d1", 1e6)
    got = ready_durations(tr, [LinkSegment(math.inf, link - 1e6 / bw, bw)])
    # the truth from the network's own log: a message arrived when its last hop ended
    arrival = {}
    for e in tr.events:
        if isinstance(e.lane, str) and e.lane.startswith("localhost->"):
            arrival[(e.action.split("SEND")[1].split(">")[0], e.action.split(">w")[1])] = e.end_s
    early = []
    for e in steady_events(tr):
        if e.kind == "RECV":
            tag, peer_of_sender = e.action.split("RECV")[1].split("<")[0], str(e.lane)
            if arrival[(tag, peer_of_sender)] <= e.start_s + ovh + 1e-12:
                early.append(e)
    assert len(early) >= 10 and any(Action.parse(e.action).grad for e in early)
    assert any(not Action.parse(e.action).grad for e in early)
    assert all(e.duration_s == pytest.approx(ovh + ready, abs=1e-12) for e in early)  # the engine charged them
    assert len(got) == len(early) and all(d == pytest.approx(ovh + ready, abs=1e-12) for d in got)
    # ignoring the link's time would take in receives that waited for their message
    assert len(ready_durations(tr, [LinkSegment(math.inf, 0.0, 1e15)])) > len(got)
    assert ready_durations(simulate_plan(even_plan("m", 8, 2, schedule="gpipe", microbatches=1), prof, topo),
                           [LinkSegment(math.inf, lat, bw)]) == []


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_cli_calibrate_writes_files_that_simulate_takes(tmp_path):
    """`pipetwin calibrate` end to end: the files it writes load in `simulate`, and the fitted wake-up and
    accumulation costs are in sim_params.json."""
    out = tmp_path / "cal"
    proc = subprocess.run([sys.executable, "-m", "pipetwin", "calibrate", "--model", "mlp", "--repeats", "1",
                           "-o", str(out), "--json"], cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    prm = doc["sim_params"]
    assert prm["recv_wake_s"] >= 0 and prm["recv_ready_s"] >= 0 and prm["accumulate_s_per_byte"] > 0
    SimParams(**json.loads((out / "sim_params.json").read_text()))
    sim = subprocess.run([sys.executable, "-m", "pipetwin", "simulate", "--model", str(out / "profile.json"),
                          "--topology", str(out / "topology.json"), "--params", str(out / "sim_params.json"),
                          "--stages", "2", "--schedule", "pipedream", "--microbatches", "8", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert sim.returncode == 0, sim.stderr[-2000:]
    assert json.loads(sim.stdout)["throughput_samples_per_s"] > 0


def test_split_backward_share_is_fitted_without_the_accumulation():
    """A zb-h1 trace simulated with bi_fraction 0.3 and a gradient-accumulation cost on the adding BWs gives back
    0.3 once those costs are taken off (and a smaller share without: the accumulation would count as BW)."""
    from validation.accumulation import accumulation_s
    from validation.compute import fit_bi_fraction

    prof = uniform_profile(4, 2e-3, 4e-3, act=1024, params=1 << 20)
    plan = even_plan("m", 4, 2, schedule="zb-h1", microbatches=6, batches=2)
    per_byte = 2e-10
    tr = simulate_plan(plan, prof, load_topology("local:2"), SimParams(bi_fraction=0.3, accumulate_s_per_byte=per_byte))
    acc = [per_byte * prof.param_bytes(*sp.layers) for sp in plan.stages]
    add = accumulation_s(tr, plan, acc)
    assert add and all(v == pytest.approx(acc[1]) or v == pytest.approx(acc[0]) for v in add.values())
    assert fit_bi_fraction([tr], [add]) == pytest.approx(0.3, rel=1e-6)
    assert fit_bi_fraction([tr]) < 0.29
