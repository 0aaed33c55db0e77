"""The what-if room and the whatif/search commands: clusters, sweeps (deterministic, cached, re-plannable), answers,
and the simulator's long-run extrapolation they lean on."""
from __future__ import annotations

import json
from functools import partial

import pytest

from planner.costmodel import OPTIMIZER_STATE
from planner.plan import Plan, StagePlan
from pipetwin.args import counts as _counts
from pipetwin.cli import main
from pipetwin.scoring import search, sweep_figures
from sim import simulate_plan
from sim.extrapolate import extrapolation_pair, figures, long_run_figures, splice_length, stream_extrapolated
from sim.params import SimParams
from topologies.clusters import build_cluster, parse_interconnect
from topologies.errors import TopologyError
from whatif import (SweepConfig, SweepPoint, SweepRecord, fewest_devices_for, pareto_front, plan_point,
                    simulated_plan)
from whatif import run_sweep as _run_sweep
from whatif.points import point_cluster, point_profile

run_sweep = partial(_run_sweep, simulate=sweep_figures)

MODEL = "gpt:layers=8,hidden=256,heads=4,seq=128,vocab=1000"
SMALL = SweepConfig(model=MODEL, devices=(2, 4, 8), device_kinds=("a100-80gb", "h100"),
                    interconnects=("dgx-ib200", "pcie-eth100"), global_batch=32, simulate="pareto")


@pytest.fixture(scope="module")
def sweep():
    return run_sweep(SMALL, jobs=1)


def test_interconnect_vocabulary_builds_the_named_clusters():
    assert parse_interconnect("DGX-IB400").gbps == 400
    t = build_cluster("dgx-ib200", 16, "h100")
    assert len(t.devices) == 16 and t.device("s1g7").kind == "h100"
    assert len(build_cluster("pcie-eth100", 8, "v100").devices) == 8
    assert len(build_cluster("fattree-ib400", 64, "h100").devices) == 64
    assert len(build_cluster("ideal", 3, "h100").devices) == 3
    with pytest.raises(TopologyError, match="whole 4-device servers"):
        build_cluster("pcie-eth100", 6, "v100")
    with pytest.raises(TopologyError, match="dgx-ib"):
        parse_interconnect("dgx-eth100")


def test_device_count_lists():
    assert _counts("8,16,...,128") == (8, 16, 32, 64, 128)
    assert _counts("8:32:8") == (8, 16, 24, 32)
    assert _counts("2,3") == (2, 3)


def test_sweep_output_does_not_depend_on_jobs(sweep):
    again = run_sweep(SMALL, jobs=2)
    assert again.to_json() == sweep.to_json()


def test_a_sweep_planned_with_partition_caches_equals_every_point_planned_alone(sweep):
    big = SweepConfig(model=MODEL, devices=(8, 16, 64, 96, 128), device_kinds=("h100",),
                      interconnects=("dgx-ib200", "fattree-ib400"), microbatch_sizes=(1, 2), global_batch=256,
                      simulate="none")  # flat and hierarchical searches
    for c in (SMALL, big):
        shared = sweep if c is SMALL else run_sweep(c, jobs=1)  # the module's sweep is SMALL's, shared caches
        alone = run_sweep(c, jobs=1, share_partition_cache=False)
        assert alone.partition_hits == 0
        assert shared.to_json() == alone.to_json()
    assert shared.partition_hits > 0  # some answers were read back from a group's cache


def test_every_pareto_point_replanned_alone_gives_the_same_answer(sweep):
    assert sweep.pareto
    for i in sweep.pareto:
        rec = sweep.records[i]
        alone = plan_point(rec.point)
        for k in ("status", "plan", "throughput_samples_per_s", "peak_memory_bytes", "stages"):
            assert getattr(alone, k) == getattr(rec, k), k
        assert rec.simulated and rec.simulated["throughput_samples_per_s"] > 0


def test_cache_resumes_and_gives_identical_output(tmp_path, sweep):
    cache = tmp_path / "c.jsonl"
    part = SweepConfig(**{**SMALL.__dict__, "devices": (2, 4)})
    run_sweep(part, jobs=1, cache=cache)
    with cache.open("a") as f:
        f.write('{"key": "cut sho')  # an interrupted write
    full = run_sweep(SMALL, jobs=1, cache=cache)
    assert full.cached == len(part.points())
    assert full.to_json() | {"cached": 0} == sweep.to_json() | {"cached": 0}
    assert run_sweep(SMALL, jobs=1, cache=cache).cached == len(SMALL.points())


def test_pareto_front_keeps_exactly_the_non_dominated():
    mk = lambda n, thr, mem, status="ok": SweepRecord("k", MODEL, n, "h100", "ideal", "auto", 1, None, status=status,
                                                      throughput_samples_per_s=thr, peak_memory_bytes=mem)
    recs = [mk(8, 100, 10), mk(8, 90, 10), mk(16, 150, 10), mk(16, 150, 5), mk(4, 10, 1), mk(4, 10, 1),
            mk(2, 0.0, None, "no-fit")]
    assert pareto_front(recs) == [0, 3, 4]
    # with prices, a cheaper-per-sample point can join the front
    assert pareto_front(recs, {"h100": 2.0}) == [0, 3, 4]


def test_fewest_devices_for_a_target_and_the_best_reachable(sweep):
    recs = sweep.records
    top = max(r.throughput_samples_per_s for r in recs if r.ok)
    hit, best = fewest_devices_for(recs, top / 3)
    assert hit is not None and hit.throughput_samples_per_s >= top / 3
    assert all(r.devices >= hit.devices for r in recs if r.ok and r.throughput_samples_per_s >= top / 3)
    none, best = fewest_devices_for(recs, top * 10)
    assert none is None and best.throughput_samples_per_s == top


def test_whatif_json_has_points_and_pareto(capsys, tmp_path):
    png = tmp_path / "w.png"
    rc = main(["whatif", "--model", MODEL, "--devices", "2,4", "--interconnects", "dgx-ib200", "--global-batch", "16",
               "--price", "a100-80gb=1.5", "--target-throughput", "1e12", "--jobs", "1", "--json", "--plot", str(png)])
    assert rc == 0 and png.exists()
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["points"]) == 2 and doc["pareto"]
    for p in doc["points"]:
        assert {"devices", "device_kind", "interconnect", "plan", "throughput_samples_per_s", "peak_memory_bytes"} <= set(p)
    assert doc["target"]["reached"] is False and doc["target"]["best_reachable"]["throughput_samples_per_s"] > 0
    assert doc["pareto"][0]["cost_per_sample"] > 0


def test_whatif_text_names_the_best_reachable_when_the_target_is_impossible(capsys):
    rc = main(["whatif", "--model", MODEL, "--devices", "2", "--global-batch", "16", "--jobs", "1",
               "--simulate", "none", "--target-throughput", "1e12"])
    out = capsys.readouterr().out
    assert rc == 0 and "not reachable" in out and "best reachable" in out and "binding" in out


def test_a_model_that_fits_nowhere_says_the_memory_it_needs(capsys):
    rc = main(["whatif", "--model", "gpt3-175b", "--devices", "2,4", "--jobs", "1", "--global-batch", "8"])
    *progress, err = capsys.readouterr().err.strip().splitlines()  # stderr is not a terminal: a line per point
    assert rc == 2 and "fits on no configuration" in err and "would need" in err and "GB" in err
    assert progress == ["planning: 1/2 points", "planning: 2/2 points"]
    rc = main(["whatif", "--model", "gpt3-175b", "--devices", "2,4", "--jobs", "1", "--global-batch", "8",
               "--no-progress"])
    assert rc == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,needle", [(["--interconnects", "infiniband9"], "unknown interconnect"),
                                         (["--device-kinds", "tpu"], "unknown device kind"),
                                         (["--model", "nosuch"], "unknown model")])
def test_whatif_bad_input_is_one_line(capsys, argv, needle):
    base = {"--model": MODEL, "--devices": "2"}
    for k, v in zip(argv[::2], argv[1::2]):
        base[k] = v
    rc = main(["whatif", *[x for kv in base.items() for x in kv], "--jobs", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_malformed_cluster_file_names_the_field(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("devices:\n  - {name: a, kind: h100}\nlinks:\n  - {a: a, kind: nvlink}\n")
    rc = main(["search", "--model", MODEL, "--topology", str(bad), "--top-k", "2", "--jobs", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "links[0].b" in err and len(err.strip().splitlines()) == 1


def test_search_reranks_by_simulation_and_explains(capsys):
    res = search(MODEL, "dgx:servers=1,gpus=4,kind=h100,ib=200", top_k=6, microbatch_sizes=(1, 2), jobs=1)
    ranks = sorted(r["simulated_rank"] for r in res.rows)
    assert ranks == list(range(1, len(res.rows) + 1)) and len(res.rows) >= 2
    assert [r["analytic_rank"] for r in res.rows] == list(range(1, len(res.rows) + 1))
    assert all(r["cause"] and r["stages"] and "binding" in r["stages"][0] for r in res.rows)
    rc = main(["search", "--model", MODEL, "--topology", "dgx:servers=1,gpus=4,kind=h100,ib=200", "--top-k", "3",
               "--microbatch-sizes", "1", "--jobs", "1", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and len(doc["candidates"]) <= 3 and doc["best_simulated"]["simulated_rank"] == 1


def test_search_explanation_describes_the_merged_best_not_the_first_task():
    """The closing explanation is the planner's account of the plan ranked first after merging every
    (schedule, microbatch size) task: here the first task (microbatch size 1) does not hold that best."""
    res = search(MODEL, "dgx:servers=1,gpus=4,kind=h100,ib=200", top_k=4, microbatch_sizes=(1, 2, 4), jobs=1)
    best = res.rows[0]
    assert best["microbatch_size"] != 1, "the case must have its best outside the first task"
    assert res.explanation.startswith(f"{best['schedule']} with {best['microbatches']} microbatches of "
                                      f"{best['microbatch_size']} on {best['devices_used']} devices")


@pytest.mark.parametrize("interconnect,schedule,mb,gb,tol", [
    ("ideal", "1f1b", 1, 64, 1e-6), ("ideal", "gpipe", 1, 64, 1e-6), ("ideal", "zb-h1", 1, 64, 1e-6),
    ("ideal", "interleaved", 1, 64, 1e-6), ("dgx-ib200", "1f1b", 1, 96, 1e-2)])
def test_flush_figures_extrapolated_from_two_short_runs_match_the_full_run(interconnect, schedule, mb, gb, tol):
    """A one-batch flush schedule is simulated at two short microbatch counts and fitted a + b·M: on ideal
    links that is the full run's figures to 1e-6; on contended links to within a percent."""
    point = SweepPoint(MODEL, 4 if interconnect == "ideal" else 16, "h100", interconnect, schedule, mb, gb)
    rec = plan_point(point)
    assert rec.ok, rec.reason
    plan = simulated_plan(Plan.from_dict(rec.plan), 1)
    profile, topo = point_profile(MODEL, "h100"), point_cluster(interconnect, point.devices, "h100")
    params = SimParams(optimizer_state_factor=OPTIMIZER_STATE["adam"], link_events=False)
    assert extrapolation_pair(plan, params.recv_lookahead) is not None, "the case must exercise the extrapolation"
    fast = long_run_figures(plan, profile, topo, params)
    full = figures(simulate_plan(plan, profile, topo, params=params))
    for k in ("throughput_samples_per_s", "bubble_fraction", "peak_memory_bytes"):
        assert fast[k] == pytest.approx(full[k], rel=tol), k


def _stream_plan(interconnect: str, devices: int, schedule: str, replicas: tuple[int, ...], microbatches: int,
                 layers: list[tuple[int, int]]):
    """A stream plan of MODEL with the given stage shape, on the first devices of a preset cluster."""
    topo = point_cluster(interconnect, devices, "h100")
    devs = iter(topo.devices)
    stages = tuple(StagePlan(a, b, r, tuple(next(devs) for _ in range(r))) for (a, b), r in zip(layers, replicas))
    return Plan(model=MODEL, stages=stages, schedule=schedule, microbatches=microbatches, topology=topo.name), topo


THIRDS = [(0, 3), (4, 7), (8, 9)]


@pytest.mark.parametrize("interconnect,devices,schedule,replicas,layers,tol", [
    # exactly periodic: the spliced run is the full run, to rounding
    ("ideal", 8, "2bw", (2, 3, 1), THIRDS, 1e-9),
    ("ideal", 8, "pipedream", (1, 2, 1, 2), [(0, 2), (3, 5), (6, 7), (8, 9)], 1e-9),
    ("dgx-ib200", 16, "2bw", (2, 4, 2), THIRDS, 1e-9),
    ("dgx-ib100", 16, "2bw", (4, 4, 4, 4), [(0, 2), (3, 5), (6, 7), (8, 9)], 1e-9),  # repeats every 2·lcm
    # contended links, nearly periodic (consecutive blocks within PERIOD_TOL): within a percent
    ("pcie-eth100", 8, "2bw", (1, 2, 3), THIRDS, 1e-2),
    ("pcie-eth100", 16, "2bw", (3, 4, 3), THIRDS, 1e-2),
    ("dgx-ib200", 16, "2bw", (3, 4, 2), THIRDS, 1e-2)])
def test_stream_figures_spliced_from_one_short_run_match_the_full_run(interconnect, devices, schedule, replicas, layers, tol):
    """A long one-batch stream is simulated once, shorter, and its steady block repeated: throughput and
    bubble agree with the full simulation to ``tol`` and the peak memory exactly."""
    plan, topo = _stream_plan(interconnect, devices, schedule, replicas, 512, layers)
    profile, params = point_profile(MODEL, "h100"), SimParams(link_events=False)
    n1, _ = splice_length(plan, params.recv_lookahead)
    assert n1 <= 0.6 * plan.microbatches
    fast = stream_extrapolated(plan, profile, topo, params)
    assert fast is not None, "the case must exercise the splice"
    full = figures(simulate_plan(plan, profile, topo, params=params))
    assert fast["throughput_samples_per_s"] == pytest.approx(full["throughput_samples_per_s"], rel=tol)
    assert fast["bubble_fraction"] == pytest.approx(full["bubble_fraction"], rel=tol, abs=1e-12)
    assert fast["peak_memory_bytes"] == pytest.approx(full["peak_memory_bytes"], rel=1e-12)


def test_a_stream_that_does_not_settle_is_simulated_in_full():
    """On shared Ethernet links this stream has no steady block within PERIOD_TOL: no splice, the full run."""
    plan, topo = _stream_plan("pcie-eth100", 8, "2bw", (2, 3, 3), 512, THIRDS)
    profile = point_profile(MODEL, "h100")
    params = SimParams(optimizer_state_factor=OPTIMIZER_STATE["sgd"], link_events=False)
    assert splice_length(plan, params.recv_lookahead) is not None
    assert stream_extrapolated(plan, profile, topo, params) is None
    assert sweep_figures(plan, profile, topo, "sgd") == figures(simulate_plan(plan, profile, topo, params=params))


# ---------------------------------------------------------------------- golden files
GOLDEN = __import__("pathlib").Path(__file__).parent / "golden"
#: A small sweep through the public path: two interconnects (one with an invalid point: 6 devices are not whole
#: 4-GPU PCIe servers), the planner's choice and 1F1B, every feasible point simulated (flush runs extrapolated,
#: 2BW streams spliced), prices and a target.
WHATIF_SMALL = ["whatif", "--model", MODEL, "--devices", "2,4,6", "--device-kinds", "h100",
                "--interconnects", "dgx-ib200,pcie-eth100", "--schedules", "auto,1f1b", "--global-batch", "128",
                "--price", "h100=2.5", "--target-throughput", "1000", "--simulate", "all", "--jobs", "1", "--json"]
SEARCH_SMALL = ["search", "--model", MODEL, "--topology", "dgx:servers=1,gpus=4,kind=h100,ib=200", "--top-k", "6",
                "--microbatch-sizes", "1,2", "--jobs", "1", "--json"]


@pytest.mark.parametrize("argv,name", [(WHATIF_SMALL, "whatif_small.json"), (SEARCH_SMALL, "search_small.json")])
def test_json_output_equals_the_golden_file(capsys, argv, name):
    """The --json document of a small sweep (and of a small search) is pinned figure for figure: moving code
    between modules must not change a figure. ``PIPETWIN_UPDATE_GOLDEN=1`` rewrites the file on purpose."""
    import os

    assert main(argv) == 0
    out = capsys.readouterr().out
    path = GOLDEN / name
    if os.environ.get("PIPETWIN_UPDATE_GOLDEN") == "1":
        path.write_text(out)
    # every key, string and integer exactly; floats to 12 significant digits: a least-squares rate's last bits
    # move with the numpy release pip resolves (159745.5455159388 vs ...884), a moved figure does not hide there
    assert _rounded(json.loads(out)) == _rounded(json.loads(path.read_text())), \
        f"{name} changed; if on purpose, rerun with PIPETWIN_UPDATE_GOLDEN=1"


def _rounded(x):
    if isinstance(x, float):
        return float(f"{x:.12g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x
