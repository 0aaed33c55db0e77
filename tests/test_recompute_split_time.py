"""What a recomputed split backward costs: the executor's own passes, counted, against the time terms.

The executor (``executor.runtime``) runs a zero-bubble stage's BI as ``autograd.grad`` of the stage output for its
input with the graph kept, and its BW later for the parameters, on layers ``executor.recompute`` made checkpoints
(full) or whose attention core it rebuilds (selective). The truth here is the matrix-multiply FLOPs those calls
run, counted op by op on the executor's gpt blocks (every ``mm``/``addmm``/``bmm`` the dispatcher sees, nested
autograd included): a checkpoint's backward re-runs the layer's forward and its whole backward in the BI and
again in the BW; selective's core forward runs again in both. Against it, the terms of ``planner.recompute`` as
the simulator times each pass and the cost model charges a microbatch, on a profile whose seconds are the
blocks' FLOPs counted by hand (24·b·t·h² + 4·b·t²·h forward, twice that backward, 4·b·t²·h the core).
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from executor.models import build_stage
from executor.recompute import apply_recompute
from planner.costmodel import CostOptions, evaluate
from planner.plan import plan_from_flags
from planner.profile import Layer, ModelProfile
from planner.families import FAMILY
from planner.program import Kind
from planner.recompute import microbatch_recompute_s, pass_recompute_s
from planner.schedules import generate, make_spec
from sim import SimParams, simulate_plan
from topologies import load_topology

B_, T_, H_, HEADS = 2, 16, 32, 2
MODEL = f"gpt:layers=4,hidden={H_},heads={HEADS},seq={T_},vocab=64"
UNIT = 1e-9  # seconds per FLOP in the profile below
_aten = torch.ops.aten


class _Matmuls(TorchDispatchMode):
    """FLOPs of every matrix multiply run under it (2·m·n·k), backward passes and nested autograd included."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        p = func.overloadpacket
        if p in (_aten.mm, _aten.bmm, _aten.addmm, _aten.baddbmm):
            a, b = (args[0], args[1]) if p in (_aten.mm, _aten.bmm) else (args[1], args[2])
            self.flops += 2 * a.numel() * b.shape[-1]
        return out


def _count(fn):
    with _Matmuls() as m:
        fn()
    return m.flops


def _executor_passes(mode: str) -> dict[str, int]:
    """FLOPs of F, BI and BW of the executor's stage of blocks 2-3 (a middle stage), as its handlers call autograd."""
    torch.manual_seed(0)
    layers = build_stage(MODEL, 2, 3, seed=0)
    apply_recompute(layers, mode)
    stage = nn.Sequential(*layers).double()
    params = list(stage.parameters())
    x = torch.randn(B_, T_, H_, dtype=torch.float64).requires_grad_(True)  # the received input (requires a grad)
    g = torch.randn(B_, T_, H_, dtype=torch.float64)
    got = {}
    with _Matmuls() as m:
        out = stage(x)
    got["F"] = m.flops
    got["BI"] = _count(lambda: torch.autograd.grad(out, (x,), g, retain_graph=True))  # _backward_input
    got["BW"] = _count(lambda: torch.autograd.grad(out, params, g, allow_unused=True))  # _backward_weight
    return got


def _block() -> Layer:
    """A gpt block at b, t, h in FLOPs by hand (qkv 3h², proj h², MLP 8h² per token: 24·b·t·h²; QKᵀ and PV 4·b·t²·h)."""
    core = 4 * B_ * T_ * T_ * H_
    fwd = 24 * B_ * T_ * H_ * H_ + core
    return Layer("block", fwd * UNIT, 2 * fwd * UNIT, 0.0, 1.0, 0.0, attention_saved_bytes=0.5,
                 attention_forward_s=core * UNIT)


def _profile() -> ModelProfile:
    edge = Layer("edge", 1e-6, 2e-6, 0.0, 1.0, 0.0, recomputable=False)
    return ModelProfile("m", (edge,) + (_block(),) * 4 + (edge,))


@pytest.fixture(scope="module")
def measured() -> dict[str, dict[str, int]]:
    return {mode: _executor_passes(mode) for mode in ("none", "selective", "full")}


def test_the_hand_count_is_the_executors_forward_and_backward(measured):
    """The profile's figures are the executor's: the stage's F, and BI + BW of a full checkpoint (F + B each)."""
    blk = _block()
    assert measured["none"]["F"] == pytest.approx(2 * blk.forward_s / UNIT, rel=1e-12)
    assert measured["full"]["BI"] == pytest.approx(2 * (blk.forward_s + blk.backward_s) / UNIT, rel=1e-12)


def test_the_simulator_times_each_pass_as_the_executor_runs_it(measured):
    """ZB-H1 over 3 stages; stage 1 holds blocks 2-3. The split of a backward without recomputation is what a
    calibration fits (``SimParams.bi_fraction``, ``split_factor``: the executor's BW walks the graph again, BI + BW
    = 1.5 B here), read from the ``none`` passes; with it, every recomputed pass is the executor's to the FLOP: a
    checkpoint's BI and BW the whole F + B each, selective's the core's forward more in both. Before
    (the re-run forward in the BI alone), full's BW was 1.0 of the F + B it runs and selective's BW lacked the core."""
    prof = _profile()
    blk = prof.layers[1]
    b_stage = 2 * blk.backward_s / UNIT
    none = measured["none"]
    params = SimParams(bi_fraction=none["BI"] / (none["BI"] + none["BW"]),
                       split_factor=(none["BI"] + none["BW"]) / b_stage)
    topo = load_topology("ideal:3")
    for mode in ("none", "selective", "full"):
        plan = plan_from_flags("m", 6, pp=3, schedule="zb-h1", microbatches=3, recompute=mode, devices=topo.devices)
        trace = simulate_plan(plan, prof, topo, params)
        for kind in ("F", "BI", "BW"):
            durations = [e.duration_s / UNIT for e in trace.events if e.lane == 1 and e.kind == kind]
            assert len(durations) == 3
            assert durations == pytest.approx([measured[mode][kind]] * 3, rel=1e-9), (mode, kind)


def test_the_cost_model_charges_a_microbatch_the_executors_passes(measured):
    """The cost model splits evenly (BI = BW = B/2: the closed forms'); what recomputation adds to a microbatch's
    BI + BW is the executor's: full 2F + B (its passes F + B each against B without), selective two core forwards."""
    prof = _profile()
    topo = load_topology("ideal:3")
    compute = {}
    for mode in ("none", "selective", "full"):
        plan = plan_from_flags("m", 6, pp=3, schedule="zb-h1", microbatches=3, recompute=mode, devices=topo.devices)
        compute[mode] = evaluate(plan, prof, topo).stages[1].compute_s / UNIT
    run = {mode: sum(measured[mode].values()) for mode in measured}
    assert compute["full"] == pytest.approx(run["full"], rel=1e-9)  # F + 2(F + B): no split to calibrate
    assert compute["selective"] - compute["none"] == pytest.approx(run["selective"] - run["none"], rel=1e-9)
    b_stage = 2 * prof.layers[1].backward_s
    assert microbatch_recompute_s(prof, 2, 3, "full", split=True) == pytest.approx(
        (run["full"] - measured["full"]["F"]) * UNIT - b_stage, rel=1e-9)


@pytest.mark.parametrize("mode", ["selective", "full"])
@pytest.mark.parametrize("family,P,M", [("1f1b", 3, 6), ("zb-h1", 3, 6), ("zb-h2", 3, 6), ("zb-v", 2, 4),
                                         ("dualpipe-v", 2, 4), ("dualpipe-v", 3, 7), ("interleaved-zb", 2, 4)])
def test_the_cost_models_compute_is_the_simulators_busy_time(family, P, M, mode):
    """One truth: a rank's compute per batch in the cost model (compute_s × M) is the sum of its passes' durations
    in the simulator, on stages of unequal layers (so which passes split matters), for every way a family runs its
    backwards: whole (1F1B), split (ZB), or some of each (DualPipeV: ``Family.split_share``)."""
    blk = _block()
    layers = tuple(Layer(f"l{i}", blk.forward_s * (1 + i % 3), blk.backward_s * (1 + i % 2), 0.0, 1.0, 0.0,
                         attention_saved_bytes=0.5, attention_forward_s=blk.attention_forward_s * (1 + i % 4),
                         recomputable=i % 5 != 0)
                   for i in range(24))
    prof = ModelProfile("m", layers)
    fam = FAMILY[family]
    V = fam.chunks or 2
    topo = load_topology(f"ideal:{P}")
    plan = plan_from_flags("m", 24, pp=P, vp=V if fam.multi_stage else 1, schedule=family, microbatches=M,
                           recompute=mode, devices=topo.devices)
    trace = simulate_plan(plan, prof, topo)
    cost = evaluate(plan, prof, topo)
    busy = Counter()
    for e in trace.events:
        if e.is_compute and isinstance(e.lane, int):
            busy[e.lane] += e.duration_s
    for st in cost.stages:
        rank = st.devices[0]
        lane = topo.devices.index(rank)
        assert busy[lane] == pytest.approx(st.compute_s * M, rel=1e-9), (st.stage, lane)


@pytest.mark.parametrize("P", [2, 3, 4, 5])
def test_dualpipe_v_splits_the_backwards_its_split_share_says(P):
    fam = FAMILY["dualpipe-v"]
    for M in (2 * P, 2 * P + 3, 4 * P):
        prog = generate(make_spec("dualpipe-v", P, M, chunks=2))
        for w in range(P):
            split = Counter(a.stage for a in prog[w] if a.kind is Kind.BI)
            whole = Counter(a.stage for a in prog[w] if a.kind is Kind.B)
            for v in (w, 2 * P - 1 - w):
                assert split[v] + whole[v] == M
                assert fam.split_share(P, v, M) == split[v] / M, (M, w, v)


def test_a_checkpoints_passes_do_not_read_the_split():
    """Whatever bi_fraction and split_factor a calibration fits, a checkpoint's BI and BW are its F + B each."""
    blk = _block()
    for bi, split in ((0.5, 1.0), (0.3, 1.5), (0.7, 1.2)):
        for kind, share in (("BI", bi), ("BW", 1 - bi)):
            total = blk.backward_s * split * share + pass_recompute_s(blk, "full", kind, bi, split)
            assert total == pytest.approx(blk.forward_s + blk.backward_s, rel=1e-12)


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_a_split_backwards_tp_rings_are_where_the_executor_runs_them(mode):
    """ZB-H1, two stages of two TP ranks on a star, 2 all-reduces per layer in forward and 2 in backward: a BI
    runs the backward's (the input gradient's), a BW none, and under full recomputation each of them runs the
    checkpoint whole, its re-run forward's 2 and its backward's 2 (``planner.recompute.pass_tp_collectives``);
    every pass's duration in the simulator is its compute plus those rings' closed form, and the cost model's
    compute per microbatch is their sum."""
    from tests.test_sim import star
    from tests.test_tensor_parallel import _ring_s, _tp_profile

    prof = _tp_profile(2, layers=4, fwd=1e-3, bwd=2e-3, tp_bytes=4e6, params=1e6, attn_s=4e-4, attn_bytes=1.0)
    topo = star(4, bandwidth=1e9, latency=1e-6)
    plan = plan_from_flags("m", 4, pp=2, tp=2, schedule="zb-h1", microbatches=4, recompute=mode, devices=topo.devices)
    trace = simulate_plan(plan, prof, topo, SimParams(optimizer_state_factor=0.0))
    ar = _ring_s(2, 4e6)
    core = {"none": 0.0, "selective": 4e-4, "full": 0.0}[mode]
    per_layer = {"F": 1e-3 + 2 * ar, "BI": 1e-3 + core + 2 * ar, "BW": 1e-3 + core}
    if mode == "full":
        per_layer["BI"] = per_layer["BW"] = 3e-3 + 4 * ar
    for kind, want in per_layer.items():
        got = [e.duration_s for e in trace.events if isinstance(e.lane, int) and e.kind == kind]
        assert got == pytest.approx([2 * want] * len(got), rel=1e-6), kind
    cand = evaluate(plan, prof, topo, CostOptions(optimizer="none", link_load=False))
    assert cand.stages[0].compute_s == pytest.approx(2 * sum(per_layer.values()), rel=1e-9)


@pytest.mark.parametrize("P,M", [(2, 8), (3, 12), (4, 4), (4, 16)])
@pytest.mark.parametrize("F,B,mode", [(1, 2, "none"), (1, 4, "none"), (3, 2, "none"), (1, 2, "full"),
                                      (1, 2, "selective"), (2, 1, "full")])
def test_zb_h1s_batch_time_is_the_simulators_whatever_recomputation_adds(P, M, F, B, mode):
    """ZB-H1 (M ≥ P): stage 0 runs P forwards, then waits for microbatch 0's input gradient to come back through
    P − 1 BIs, so the fill and drain cost (P − 1)·max(F, BI); a checkpoint's BI is F + B, so recomputation always
    makes the round trip the longer (Qi et al.'s F + BI − BW was F here: 1/3 of the simulator's bubble at F = 1,
    B = 2 under full recomputation)."""
    layer = Layer("l", F, B, 0.0, 1.0, 0.0, attention_saved_bytes=0.5, attention_forward_s=0.3)
    prof = ModelProfile("m", (layer,) * P)
    topo = load_topology(f"ideal:{P}")
    plan = plan_from_flags("m", P, pp=P, schedule="zb-h1", microbatches=M, recompute=mode, devices=topo.devices)
    from planner.trace import time_per_batch_s

    sim = time_per_batch_s(simulate_plan(plan, prof, topo))
    cand = evaluate(plan, prof, topo, CostOptions(optimizer="none", link_load=False))
    assert cand.time_per_batch_s == pytest.approx(sim, rel=1e-9)


@pytest.mark.parametrize("P,V,M", [(2, 2, 4), (3, 2, 7), (3, 3, 9), (4, 2, 4), (4, 3, 12)])
@pytest.mark.parametrize("F,B,mode", [(1, 2, "none"), (1, 4, "none"), (3, 1, "none"), (1, 2, "full"),
                                      (1, 2, "selective")])
def test_interleaved_zero_bubbles_batch_time_is_the_simulators_whatever_recomputation_adds(P, V, M, F, B, mode):
    """Interleaved zero bubble (M ≥ P) fills and drains a V-th of ZB-H1's: (P − 1)·max(F, BI)/V over a rank's
    chunks (a chunk's forward against its input gradient's round trip); a chunk's F alone undercharged it 3×
    under full recomputation at F = 1, B = 2."""
    from planner.trace import time_per_batch_s

    layer = Layer("l", F, B, 0.0, 1.0, 0.0, attention_saved_bytes=0.5, attention_forward_s=0.3)
    prof = ModelProfile("m", (layer,) * (P * V))
    topo = load_topology(f"ideal:{P}")
    plan = plan_from_flags("m", P * V, pp=P, vp=V, schedule="interleaved-zb", microbatches=M, recompute=mode,
                           devices=topo.devices)
    sim = time_per_batch_s(simulate_plan(plan, prof, topo))
    cand = evaluate(plan, prof, topo, CostOptions(optimizer="none", link_load=False))
    assert cand.time_per_batch_s == pytest.approx(sim, rel=1e-9)


@pytest.mark.parametrize("P", [2, 3, 4, 5])
@pytest.mark.parametrize("F,B,mode", [(1, 2, "none"), (1, 4, "none"), (2, 2, "none"), (3, 1, "none"), (1, 2, "full"),
                                      (1, 2, "selective")])
def test_zb_h1_on_fewer_microbatches_than_stages_is_the_simulators(P, F, B, mode):
    """m < P: the round trip binds; each microbatch after the first waits max(F, BI) for its input gradient
    (BI > F under recomputation: (m − 1)·(BI − F) more than the m·(F + BW) + (P − 1)(F + BI) + BI of equal passes)."""
    from planner.trace import time_per_batch_s

    layer = Layer("l", F, B, 0.0, 1.0, 0.0, attention_saved_bytes=0.5, attention_forward_s=0.3)
    prof = ModelProfile("m", (layer,) * P)
    topo = load_topology(f"ideal:{P}")
    for m in range(1, P):
        plan = plan_from_flags("m", P, pp=P, schedule="zb-h1", microbatches=m, recompute=mode, devices=topo.devices)
        sim = time_per_batch_s(simulate_plan(plan, prof, topo))
        cand = evaluate(plan, prof, topo, CostOptions(optimizer="none", link_load=False))
        assert cand.time_per_batch_s == pytest.approx(sim, rel=1e-9), m
