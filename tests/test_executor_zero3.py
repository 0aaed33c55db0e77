"""ZeRO-3 in the executor (FSDP full shard, per layer): a real multi-process run ends on the single-process reference
and on the unsharded run, each rank holds the shard planner.sharding counts for it, and the gathers and
reduce-scatters it ran are the ones planner.sharding enumerates for the plan."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from executor.launch import run_plan
from executor.models import build_stage
from executor.reference import reference_weights
from planner.costmodel import OPTIMIZER_STATE
from planner.plan import even_plan
from planner.program import Kind
from planner.sharding import fsdp_pass_collectives, shard_numel, zero_state_bytes

pytestmark = pytest.mark.dist

#: (model, layers, replicas per stage, microbatches): 2 stages x 2 replicas; and 1 stage x 3 replicas whose layers
#: (4·4 + 4 = 20 parameters) do not split in 3, so every shard is padded to 7.
SHAPES = {"2x2": ("mlp:layers=4,width=16", 4, (2, 2), 4), "1x3": ("mlp:layers=2,width=4", 2, (3,), 3)}
DTYPE_BYTES = 8  # float64


def _plan(shape: str, zero: int, optimizer: str = "adam"):
    model, layers, replicas, m = SHAPES[shape]
    return even_plan(model, layers, len(replicas), replicas, schedule="1f1b", microbatches=m, batches=3,
                     microbatch_size=3, lr=0.05, optimizer=optimizer, zero_stage=zero)


@pytest.fixture(scope="module")
def runs():
    """Each shape's ZeRO-3 run, its ZeRO-0 run and the reference (float64)."""
    out = {}
    for shape in SHAPES:
        out[shape] = {z: run_plan(_plan(shape, z), dtype="float64", timeout_s=60) for z in (3, 0)}
        out[shape]["ref"] = reference_weights(_plan(shape, 0), dtype="float64")
    return out


def _unit_numels(plan, s: int) -> list[int]:
    """Parameters of each layer of stage ``s``, counted on the model's own modules."""
    first, last = plan.stages[s].layers
    return [sum(p.numel() for p in layer.parameters()) for layer in build_stage(plan.model, first, last)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_zero_3_adam_run_ends_on_the_reference_and_on_the_unsharded_run(runs, shape):
    want = runs[shape]["ref"]
    sgd = reference_weights(_plan(shape, 0, "sgd"), dtype="float64")
    assert any(not torch.allclose(want[k], sgd[k]) for k in want)  # Adam is not SGD: the check can fail
    z3, z0 = runs[shape][3], runs[shape][0]
    assert z3.weights.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(z3.weights[k], want[k], rtol=1e-10, atol=1e-12, msg=lambda m: f"{k}: {m}")
        assert not torch.equal(z3.weights[k], z3.weights[k].new_zeros(())), k
    assert len(z3.losses) == 3 * SHAPES[shape][3] and z3.losses.keys() == z0.losses.keys()
    for mb, v in z0.losses.items():
        assert z3.losses[mb] == pytest.approx(v, rel=1e-10)
    assert z3.losses != {mb: z3.losses[0] for mb in z3.losses}  # training moved the loss


@pytest.mark.timeout(300)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_rank_holds_the_zero_3_state_planner_sharding_counts(runs, shape):
    """Between passes a rank holds its padded 1/D shard of every layer (the weights, which are the master copy) and
    Adam's moments of it: planner.sharding's optimizer state (master copy and moments) of the padded stage; with the
    gradient shard a round accumulates, its whole stage-3 total."""
    res = runs[shape][3]
    plan, per = res.plan, res.summary()["per_device"]
    for s, workers in enumerate(res.program.stage_workers):
        D = len(workers)
        padded = sum(D * shard_numel(n, D) for n in _unit_numels(plan, s) if n)
        planned = zero_state_bytes(padded * DTYPE_BYTES, D, 3, OPTIMIZER_STATE["adam"])
        for w in workers:
            d = per[str(w)]
            assert d["param_shard_bytes"] == padded * DTYPE_BYTES // D, (s, w)
            assert d["param_shard_bytes"] + d["optimizer_state_bytes"] == planned.optimizer_bytes, (s, w)
            assert 2 * d["param_shard_bytes"] + d["optimizer_state_bytes"] == planned.total_bytes, (s, w)
    if shape == "1x3":
        assert padded > sum(_unit_numels(plan, 0))  # the padding is real here
    unsharded = runs[shape][0].summary()["per_device"]
    assert all(per[w]["peak_memory_bytes"] < unsharded[w]["peak_memory_bytes"] for w in per)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("optimizer", ["sgd", "none"])
def test_a_zero_3_sgd_run_shards_its_momentum_and_ends_on_the_reference(optimizer):
    """SGD with momentum under ZeRO-3: each rank keeps its shard's momentum buffer (planner.sharding's SGD state:
    the shard and one buffer of it), and the run ends on the reference's momentum SGD; plain SGD keeps none."""
    plan = _plan("1x3", 3, optimizer)
    res = run_plan(plan, dtype="float64", timeout_s=60)
    want = reference_weights(_plan("1x3", 0, optimizer), dtype="float64")
    for k in want:
        torch.testing.assert_close(res.weights[k], want[k], rtol=1e-10, atol=1e-12, msg=lambda m: f"{k}: {m}")
    other = reference_weights(_plan("1x3", 0, "none" if optimizer == "sgd" else "sgd"), dtype="float64")
    assert any(not torch.allclose(want[k], other[k]) for k in want)  # momentum moves the weights: the check can fail
    D = 3
    padded = sum(D * shard_numel(n, D) for n in _unit_numels(plan, 0) if n)
    planned = zero_state_bytes(padded * DTYPE_BYTES, D, 3, OPTIMIZER_STATE[optimizer])
    for w, d in res.summary()["per_device"].items():
        assert d["param_shard_bytes"] + d["optimizer_state_bytes"] == planned.optimizer_bytes, w
        assert d["optimizer_state_bytes"] == (d["param_shard_bytes"] if optimizer == "sgd" else 0), w


@pytest.mark.timeout(300)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_the_collectives_run_are_the_ones_planner_sharding_enumerates(runs, shape):
    """Per rank, in order: for every F and B of its action list, planner.sharding's ZeRO-3 pass collectives (no
    prefetch) over the stage's layers — op, layer and bytes of the padded gathered or reduced tensor; nothing at
    the ALLREDUCE or the STEP."""
    res = runs[shape][3]
    program = res.program
    ran = res.extra["collectives"]
    for s, workers in enumerate(program.stage_workers):
        units = _unit_numels(res.plan, s)
        for w in workers:
            want = [(i, op, j, nbytes) for i, a in enumerate(program[w]) if a.kind in (Kind.F, Kind.B)
                    for op, j, nbytes in fsdp_pass_collectives(a.kind.value, units, len(workers), DTYPE_BYTES)]
            assert ran[w] == want, w
            kinds = {program[w][i].kind for i, *_ in ran[w]}
            assert kinds == {Kind.F, Kind.B}
            per_step = SHAPES[shape][3] // len(workers)  # microbatches of this replica per batch
            assert len(want) == 3 * per_step * 3 * sum(1 for n in units if n)  # 2 gathers + 1 scatter per layer


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipetwin", "run", "--model", "mlp:layers=4,width=16", "--pp", "2",
                           "--dp", "2", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("args,says", [
    (("--zero", "4", "--optimizer", "adam"), "invalid choice: 4"),
    (("--zero", "3", "--optimizer", "adam", "--schedule", "zb-h1"), "whole backwards"),
    (("--zero", "3", "--optimizer", "adam", "--microbatches", "3"), "unevenly"),
    (("--zero", "3", "--optimizer", "adam", "--schedule", "pipedream"), "shards one weight version"),
    (("--zero", "3", "--optimizer", "adam", "--recompute"), "without recomputation"),
])
def test_zero_3_input_the_executor_does_not_run_is_one_line_and_exit_2(args, says):
    r = _cli(*args)
    err = [x for x in r.stderr.strip().splitlines() if "Warning" not in x and "cpu = _conversion" not in x]
    assert r.returncode == 2 and len(err) == 1 and says in err[0] and "Traceback" not in r.stderr, r.stderr


@pytest.mark.timeout(300)
def test_run_zero_3_prints_each_workers_shard(tmp_path):
    r = _cli("--zero", "3", "--optimizer", "adam", "--batches", "2", "--timeout", "60")
    assert r.returncode == 0, r.stderr
    assert "ZeRO 3 over each stage's replicas" in r.stdout and r.stdout.count("parameter shard") == 4, r.stdout


def test_a_sharded_stage_frees_each_gathered_copy_and_differentiates_as_autograd_does():
    """One replica (no process group): every copy of a layer's weights that a gather makes is gone once its pass
    ends (autograd keeps tokens, not the tensor), and the unit-by-unit backward gives the whole stage's gradients."""
    import copy
    import gc
    import weakref

    from torch import nn

    from executor.versions import StageState
    from executor.zero import ShardedStage, ShardedUnit

    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3)] + [nn.ReLU()]
    st = StageState(0, 0, len(layers) - 1, copy.deepcopy(layers), 1)
    params = [p.detach().clone().requires_grad_(True) for p in st.module.parameters()]
    st.set_version(0, params)
    st.release_module_params()
    stage = ShardedStage(st.module, st.names, params, st.slots, None, False)
    copies = []
    gather = ShardedUnit.gather

    def tracked(unit):
        t = gather(unit)
        copies.append(weakref.ref(t))
        return t

    x = torch.randn(5, 4, requires_grad=True)
    ShardedUnit.gather = tracked
    try:
        out, chain = stage.forward(x)
        gc.collect()
        assert len(copies) == 3 and all(r() is None for r in copies)
        grads, gx = stage.backward(chain, out.square().sum(), None, True)
        gc.collect()
        assert len(copies) == 6 and all(r() is None for r in copies)
    finally:
        ShardedUnit.gather = gather
    ref = nn.Sequential(*layers)
    x2 = x.detach().clone().requires_grad_(True)
    ref(x2).square().sum().backward()
    torch.testing.assert_close(out, ref(x2))
    torch.testing.assert_close(gx, x2.grad)
    for g, layer in zip(grads, layers[:3]):
        torch.testing.assert_close(g, torch.cat([p.grad.reshape(-1) for p in layer.parameters()]))
