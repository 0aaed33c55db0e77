"""Tensor parallelism and recomputation in the plan, the lowering and the checker; planner.recompute's arithmetic."""
from __future__ import annotations

import json

import pytest

from planner.check import ProgramError, check
from planner.lowering import plan_to_program, tensor_expand, worker_devices
from planner.plan import Plan, PlanError, StagePlan, even_plan, plan_from_flags
from planner.profile import Layer, ModelProfile, uniform_profile
from planner.program import Action, Kind, Program
from planner.recompute import extra_forward_s, kept_bytes, rebuilt_bytes, recompute_mode

FAMILIES = ("gpipe", "1f1b", "pipedream", "2bw", "zb-h1")


def test_a_plan_without_tensor_parallelism_or_recomputation_writes_the_json_it_always_wrote():
    d = even_plan("m", 8, 2, microbatches=4).to_dict()
    assert list(d) == ["model", "stages", "schedule", "microbatch_size", "microbatches", "chunks", "vertical_sync",
                       "batches", "lr", "topology", "predicted"]
    assert d["stages"] == [{"layers": [0, 3], "replicas": 1, "devices": ["d0"]},
                           {"layers": [4, 7], "replicas": 1, "devices": ["d1"]}]


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_a_tensor_parallel_plan_round_trips_through_json(recompute, tmp_path):
    plan = plan_from_flags("m", 8, pp=2, dp=2, tp=4, recompute=recompute, microbatches=4)
    path = tmp_path / "plan.json"
    plan.save(path)
    back = Plan.load(path)
    assert back == plan and back.tensor_parallel == 4 and back.recompute == recompute
    assert json.loads(path.read_text()).get("tensor_parallel") == 4


def test_the_device_grid_is_tensor_rank_fastest_then_replica_then_stage():
    plan = plan_from_flags("m", 8, pp=2, dp=2, tp=2, microbatches=4)
    assert [s.devices for s in plan.stages] == [("d0", "d1", "d2", "d3"), ("d4", "d5", "d6", "d7")]
    assert plan.stages[1].tensor_group(1, 2) == ("d6", "d7")


def test_bad_grids_are_one_line_plan_errors():
    with pytest.raises(PlanError, match="2 replicas x 2 tensor-parallel ranks = 4 devices but names 2 devices"):
        Plan("m", (StagePlan(0, 3, 2, ("a", "b")),), tensor_parallel=2)
    with pytest.raises(PlanError, match="tensor_parallel must be"):
        Plan("m", (StagePlan(0, 3),), tensor_parallel=0)
    with pytest.raises(PlanError, match="recompute mode 'some'"):
        Plan("m", (StagePlan(0, 3),), recompute="some")
    with pytest.raises(PlanError, match="needs 8 devices .* only 4"):
        plan_from_flags("m", 8, pp=2, dp=2, tp=2, devices=["a", "b", "c", "d"])
    with pytest.raises(PlanError, match="--vp 2 .* needs --schedule interleaved"):
        plan_from_flags("m", 8, pp=2, vp=2)
    assert Plan("m", (StagePlan(0, 3),), recompute=True).recompute == "full"  # the old boolean


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tensor_rank_runs_its_replicas_actions_and_talks_to_the_same_rank(family):
    prof = uniform_profile(8, 1e-3, 2e-3, act=100, params=1000)
    T = 3
    base = plan_from_flags("m", 8, pp=2, dp=2, schedule=family, microbatches=4)
    tp = plan_from_flags("m", 8, pp=2, dp=2, tp=T, schedule=family, microbatches=4)
    p1, pt = plan_to_program(base, prof), plan_to_program(tp, prof)
    assert pt.tensor_parallel == T and len(pt.workers) == T * len(p1.workers)
    for w in p1.workers:
        group = pt.tp_group(w * T)
        assert group == tuple(w * T + t for t in range(T))
        for t, wt in enumerate(group):
            assert pt.tp_rank(wt) == t
            for a, b in zip(pt[wt], p1[w], strict=True):
                assert (a.stage, a.kind, a.mb, a.version, a.grad, a.nbytes) == (b.stage, b.kind, b.mb, b.version, b.grad, b.nbytes)
                assert a.peer == (None if b.peer is None else b.peer * T + t)
    for s in range(len(p1.stage_workers)):
        assert pt.replica_workers(s, 1) == tuple(w * T + 1 for w in p1.stage_workers[s])
    devs = worker_devices(tp, pt)
    assert [devs[w] for w in pt.workers] == tp.devices


def test_check_rejects_a_tensor_rank_that_strays_from_its_group():
    prof = uniform_profile(4, 1e-3, 2e-3, act=100)
    prog = plan_to_program(plan_from_flags("m", 4, pp=2, tp=2, microbatches=2), prof)
    acts = {w: list(a) for w, a in prog.actions.items()}
    i = next(i for i, a in enumerate(acts[1]) if a.kind is Kind.SEND)
    a = acts[1][i]
    acts[1][i] = Action(a.stage, a.kind, a.mb, a.version, 2, a.grad, a.nbytes)  # rank 1 sends to rank 0 of the peer
    with pytest.raises(ProgramError, match="TP rank 1 of group \\[0, 1\\] runs 0SEND0a>w2"):
        check(prog.with_actions(acts))
    acts = {w: list(a) for w, a in prog.actions.items()}
    acts[3] = acts[3][:-1]
    with pytest.raises(ProgramError, match="runs .* actions, rank 0"):
        check(prog.with_actions(acts))


def test_a_tensor_rank_slice_is_the_plain_program_relabelled():
    prof = uniform_profile(4, 1e-3, 2e-3, act=100)
    p1 = plan_to_program(plan_from_flags("m", 4, pp=2, dp=2, microbatches=4), prof)
    pt = tensor_expand(p1, 2)
    sl = pt.tp_slice(1)
    assert sl.tensor_parallel == 1 and sl.stage_workers == tuple(tuple(w * 2 + 1 for w in ws) for ws in p1.stage_workers)
    check(sl)
    assert Program.from_json(pt.to_json()).tensor_parallel == 2 and "tensor_parallel" not in p1.to_json()


# --- planner.recompute ------------------------------------------------------------------------
def _profile():
    """Three layers with different inputs, saved bytes and attention cores (bytes per sample)."""
    return ModelProfile("p", (
        Layer("a", 1.0, 2.0, activation_bytes=10, saved_bytes=30, param_bytes=0),
        Layer("b", 2.0, 4.0, activation_bytes=20, saved_bytes=100, param_bytes=0, attention_saved_bytes=60,
              attention_forward_s=0.5),
        Layer("c", 3.0, 6.0, activation_bytes=5, saved_bytes=50, param_bytes=0, attention_saved_bytes=10,
              attention_forward_s=0.25),
    ))


def test_recomputation_modes_keep_and_rebuild_what_the_closed_forms_say():
    p = _profile()
    assert (extra_forward_s(p, 0, 2, "none"), kept_bytes(p, 0, 2, "none"), rebuilt_bytes(p, 0, 2, "none")) == (0.0, 180, 0.0)
    # full: each layer keeps its input (layer 0: its own saved bytes), its backward re-runs its forward and
    # rebuilds its saved bytes less that input, one layer at a time
    assert extra_forward_s(p, 0, 2, "full") == 6.0
    assert kept_bytes(p, 0, 2, "full") == 30 + 10 + 20
    assert rebuilt_bytes(p, 0, 2, "full") == max(0, 100 - 10, 50 - 20)
    assert kept_bytes(p, 1, 2, "full") == 10 + 20
    # selective: the attention cores are dropped and re-run
    assert extra_forward_s(p, 0, 2, "selective") == 0.75
    assert kept_bytes(p, 0, 2, "selective") == 30 + 40 + 40
    assert rebuilt_bytes(p, 0, 2, "selective") == 60
    assert recompute_mode(True) == "full" and recompute_mode(False) == "none"


def test_a_profile_without_attention_cores_recomputes_nothing_selectively():
    p = uniform_profile(4, 1e-3, 2e-3, act=7, saved=9)
    assert (extra_forward_s(p, 0, 3, "selective"), kept_bytes(p, 0, 3, "selective"), rebuilt_bytes(p, 0, 3, "selective")) \
        == (0.0, kept_bytes(p, 0, 3, "none"), 0.0)


def test_attention_fields_survive_json_and_old_profiles_write_unchanged():
    p = _profile()
    assert ModelProfile.from_dict(p.to_dict()) == p
    assert "attention_saved_bytes" not in p.to_dict()["layers"][0]
    assert p.scaled(4).layers[1].attention_forward_s == 2.0
