"""The executor's "sgd" is SGD with momentum (0.9 by default), the optimizer the planner charges one buffer for.

Truth: ``torch.optim.SGD(momentum=μ)`` driven directly — on the whole chain for a flush schedule, on a stale copy
of the weights for 2BW, and per stage on the version each minibatch used for PipeDream (the versions from
``executor.reference.pipedream_version``, which tests/test_executor_parity.py checks against every program) —
and the planner's own charge (``planner.sharding.zero_state_bytes`` with ``planner.costmodel.OPTIMIZER_STATE``)
for the state bytes each rank reports.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

from executor.launch import run_plan
from executor.models import build_stage, loss_fn, make_batch
from executor.reference import pipedream_version, reference_weights
from planner.costmodel import OPTIMIZER_STATE
from planner.plan import Plan, PlanError, even_plan
from planner.sharding import zero_state_bytes
from tests.test_executor_parity import _assert_weights_equal

MODEL, LAYERS, LR, MBS = "mlp:layers=6,width=16", 6, 0.05, 3


def _plan(stages: int, schedule: str, replicas=None, microbatches: int = 4, batches: int = 3, **kw) -> Plan:
    return even_plan(MODEL, LAYERS, stages, replicas, schedule=schedule, microbatches=microbatches, batches=batches,
                     microbatch_size=MBS, lr=LR, **kw)


def _stage_modules(plan: Plan) -> list[nn.Sequential]:
    """The plan's stages as modules (float64), named ``{layer}.{param}`` as the executor names them."""
    return [nn.Sequential(OrderedDict((str(sp.first_layer + j), m)
                                      for j, m in enumerate(build_stage(plan.model, sp.first_layer, sp.last_layer))))
            .double() for sp in plan.stages]


def _weights(mods: list[nn.Module]) -> dict[str, torch.Tensor]:
    return {f"stage{s}.{n}": p.detach().clone() for s, m in enumerate(mods) for n, p in m.named_parameters()}


def _loss(mods, index: int) -> torch.Tensor:
    x, y = make_batch(MODEL, MBS, index)
    h = x.double()
    for m in mods:
        h = m(h)
    return loss_fn(MODEL)(h, y.double())


def _torch_flush(plan: Plan, momentum: float) -> dict[str, torch.Tensor]:
    """Every batch: the mean gradient of its microbatches, one ``torch.optim.SGD`` step."""
    mods = _stage_modules(plan)
    opt = torch.optim.SGD([p for m in mods for p in m.parameters()], lr=plan.lr, momentum=momentum)
    M = plan.microbatches
    for b in range(plan.batches):
        opt.zero_grad()
        for j in range(M):
            (_loss(mods, b * M + j) / M).backward()
        opt.step()
    return _weights(mods)


def _torch_2bw(plan: Plan, momentum: float) -> dict[str, torch.Tensor]:
    """2BW: batch t's gradient taken on a copy holding W(t − 1) (W(0) for t = 0), stepped into W(t)."""
    mods = _stage_modules(plan)
    params = [p for m in mods for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=plan.lr, momentum=momentum)
    stale = copy.deepcopy(mods)
    M = plan.microbatches
    for b in range(plan.batches):
        for m in stale:
            m.zero_grad()
        for j in range(M):
            (_loss(stale, b * M + j) / M).backward()
        before = [p.detach().clone() for p in params]
        for p, q in zip(params, [q for m in stale for q in m.parameters()]):
            p.grad = q.grad.clone()
        opt.step()
        with torch.no_grad():  # the stale copy becomes W(t) for the next batch
            for q, w in zip([q for m in stale for q in m.parameters()], before):
                q.copy_(w)
    return _weights(mods)


def _torch_pipedream(plan: Plan, momentum: float) -> dict[str, torch.Tensor]:
    """PipeDream without replicas: minibatch i runs stage s on the weights of its version ``v(s, i)``; stage s
    steps after every minibatch with its own ``torch.optim.SGD`` (its buffer never stashed)."""
    mods = _stage_modules(plan)
    S = len(mods)
    opts = [torch.optim.SGD(m.parameters(), lr=plan.lr, momentum=momentum) for m in mods]
    history = [[[p.detach().clone() for p in m.parameters()]] for m in mods]  # history[s][v]
    work = copy.deepcopy(mods)
    for i in range(plan.microbatches):
        with torch.no_grad():
            for s in range(S):
                for q, w in zip(work[s].parameters(), history[s][pipedream_version(plan, s, i)]):
                    q.copy_(w)
        for m in work:
            m.zero_grad()
        _loss(work, i).backward()
        for s in range(S):
            for p, q in zip(mods[s].parameters(), work[s].parameters()):
                p.grad = q.grad.clone()
            opts[s].step()
            history[s].append([p.detach().clone() for p in mods[s].parameters()])
    return _weights(mods)


CASES = {
    "1f1b-3": (dict(stages=3, schedule="1f1b"), _torch_flush),
    "1f1b-replicas-2,1": (dict(stages=2, schedule="1f1b", replicas=(2, 1)), _torch_flush),
    "interleaved-2x2": (dict(stages=4, schedule="interleaved", chunks=2), _torch_flush),
    "2bw-2": (dict(stages=2, schedule="2bw", batches=4), _torch_2bw),
    "pipedream-3": (dict(stages=3, schedule="pipedream", microbatches=9), _torch_pipedream),
    "pipedream-4-vertical-sync": (dict(stages=4, schedule="pipedream", microbatches=9, vertical_sync=True),
                                  _torch_pipedream),
}


@pytest.mark.dist
@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", list(CASES))
def test_multi_stage_momentum_runs_end_on_torch_optim_sgd_and_on_the_reference(case):
    kw, truth = CASES[case]
    plan = _plan(**kw, momentum=0.8)
    want = truth(plan, 0.8)
    _assert_weights_equal(reference_weights(plan, dtype="float64"), want, rtol=1e-10, atol=1e-12)
    _assert_weights_equal(run_plan(plan, dtype="float64", timeout_s=30).weights, want, rtol=1e-10, atol=1e-12)


def test_momentum_changes_every_rule_so_the_parity_is_discriminating():
    gap = lambda a, b: max((a[k] - b[k]).abs().max().item() for k in a)
    for kw, truth in CASES.values():
        plan = _plan(**kw)
        assert plan.momentum == 0.9 and plan.optimizer == "sgd"  # the default: PipeDream's SGD
        plain = reference_weights(_plan(**kw, optimizer="none"), dtype="float64")
        assert gap(truth(plan, 0.9), plain) > 1e-4, kw
        assert gap(truth(plan, 0.9), truth(plan, 0.5)) > 1e-5, kw


@pytest.mark.dist
@pytest.mark.timeout(60)
def test_optimizer_none_runs_plain_sgd_with_no_state():
    plan = _plan(stages=3, schedule="pipedream", microbatches=7, optimizer="none")
    res = run_plan(plan, dtype="float64", timeout_s=30)
    _assert_weights_equal(res.weights, _torch_pipedream(plan, 0.0), rtol=1e-10, atol=1e-12)
    assert all(d["optimizer_state_bytes"] == 0 for d in res.summary()["per_device"].values())


STATE_CASES = {
    "sgd-1f1b": dict(stages=2, schedule="1f1b"),
    "sgd-interleaved (two stages a rank)": dict(stages=4, schedule="interleaved", chunks=2),
    "sgd-pipedream-replicas": dict(stages=2, schedule="pipedream", replicas=(2, 1), microbatches=6),
    "sgd-2bw": dict(stages=2, schedule="2bw"),
    "sgd-zero1": dict(stages=2, schedule="1f1b", replicas=(2, 2), zero_stage=1),
    "sgd-zero2": dict(stages=2, schedule="1f1b", replicas=(2, 2), zero_stage=2),
    "adam-1f1b": dict(stages=2, schedule="1f1b", optimizer="adam"),
    "adam-zero2": dict(stages=2, schedule="1f1b", replicas=(2, 2), zero_stage=2, optimizer="adam"),
    "none-1f1b": dict(stages=2, schedule="1f1b", optimizer="none"),
}


@pytest.mark.dist
@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", list(STATE_CASES))
def test_each_ranks_measured_optimizer_state_is_the_planners_charge(case):
    """Per rank: the sum over its stages of ``zero_state_bytes(stage parameter bytes, replicas, zero,
    OPTIMIZER_STATE[optimizer]).optimizer_bytes`` (SGD: the momentum buffer, 1x; Adam 2x; ZeRO: with the master
    copy, over the replicas) is what the executor's optimizer holds, to the byte; and the run (two steps, so
    the buffer carries over) ends on the reference's weights."""
    plan = _plan(**STATE_CASES[case], batches=2)
    res = run_plan(plan, dtype="float64", timeout_s=30)
    _assert_weights_equal(res.weights, reference_weights(plan, dtype="float64"), rtol=1e-10, atol=1e-12)
    program = res.program
    want: dict[int, float] = {}
    for s, workers in enumerate(program.stage_workers):
        param_bytes = sum(t.numel() for k, t in res.weights.items() if k.startswith(f"stage{s}.")) * 8  # float64
        charge = zero_state_bytes(param_bytes, len(workers), plan.zero_stage, OPTIMIZER_STATE[plan.optimizer])
        for w in workers:
            want[w] = want.get(w, 0) + charge.optimizer_bytes
    got = {int(w): d["optimizer_state_bytes"] for w, d in res.summary()["per_device"].items()}
    assert got == want
    assert all(v > 0 for v in got.values()) == (plan.optimizer != "none")


def test_a_momentum_outside_0_1_is_refused_in_one_line():
    for bad in (0, 1, 1.5, -0.1, True):
        with pytest.raises(PlanError, match="strictly between 0 and 1"):
            _plan(stages=2, schedule="1f1b", momentum=bad)
    assert "momentum" not in _plan(stages=2, schedule="1f1b").to_dict()  # old plan files stay byte-identical
    assert Plan.from_dict(_plan(stages=2, schedule="1f1b", momentum=0.5).to_dict()).momentum == 0.5


@pytest.mark.parametrize("args,says", [
    (["--model", "mlp:layers=4,width=16", "--pp", "2", "--momentum", "1.5"], "strictly between 0 and 1"),
    (["--model", "mlp:layers=4,width=16", "--pp", "2", "--momentum", "0"], "plain SGD is the optimizer 'none'"),
])
def test_run_refuses_a_bad_momentum_in_one_line_before_any_process_starts(args, says, capsys):
    from pipetwin.cli import main

    assert main(["run", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and says in err and "Traceback" not in err
