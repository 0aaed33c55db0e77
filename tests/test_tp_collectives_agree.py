"""The TP collectives the executor issues equal planner.tpcollectives' enumeration of them, layer by layer.

Two gloo processes run one microbatch of a small gpt and a small llama at TP = 2 (with and without sequence
parallelism) through the executor's own TP layers (``executor.tensor_parallel.parallelize`` and its
vocabulary-parallel loss, what the runtime runs), one layer at a time: each layer's forward on a detached
input, then each layer's backward in reverse, so every collective is attributed to its layer and phase. The
executor's collective wrappers (``all_reduce``, ``all_gather_dim``, ``reduce_scatter_dim``) are wrapped to
record what each call moves (kind, reduction, elements of the whole tensor) and still run it. The record must
be ``planner.tpcollectives.tp_collectives`` of the same shape, collective by collective, in issue order — the list
the cost model and the simulator time.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from planner.analytic import transformer_config
from planner.transformer_profile import transformer_profile
from planner.tpcollectives import tp_collectives

GPT = "gpt:layers=2,hidden=16,heads=2,seq=8,vocab=160"
LLAMA = "llama:layers=2,hidden=16,heads=4,kv_heads=2,ffn=48,seq=8,vocab=160"
MICROBATCH = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: (spec, sequence parallelism, fault) runs of the recording: each configuration, and one with the cross
#: entropy's reductions skipped (``PIPETWIN_TP_FAULT``) to show a missing collective is seen.
RUNS = [(spec, seq, "") for spec in (GPT, LLAMA) for seq in (False, True)] + [(GPT, False, "cross-entropy")]


def _record_rank(rank: int, port: int, out: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    import executor.tensor_parallel as tpm
    from executor.models import build_layers, make_batch

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    rec: list[dict] = []
    where: dict = {}

    def recording(kind, fn, whole):
        def call(t, *args, **kw):
            result = fn(t, *args, **kw)
            op = kw.get("op", args[2] if kind == "all-reduce" and len(args) > 2 else dist.ReduceOp.SUM)
            rec.append(dict(where, kind=kind, op="max" if op == dist.ReduceOp.MAX else "sum",
                            elements=whole(t, result)))
            return result
        return call

    tpm.all_reduce = recording("all-reduce", tpm.all_reduce, lambda t, r: t.numel())
    tpm.all_gather_dim = recording("all-gather", tpm.all_gather_dim, lambda t, r: r.numel())
    tpm.reduce_scatter_dim = recording("reduce-scatter", tpm.reduce_scatter_dim, lambda t, r: t.numel())
    for run, (spec, sequence, skip) in enumerate(RUNS):
        tp = tpm.TPContext(dist.group.WORLD, rank, 2, sequence=sequence, skip=skip)
        layers = tpm.parallelize(build_layers(spec), tp)
        loss = tpm.vocab_parallel_loss(spec, tp)
        x, y = make_batch(spec, MICROBATCH, 0)
        ins, outs, h = [], [], x
        for i, layer in enumerate(layers):
            where.update(run=run, layer=i, phase="forward")
            h = h if i == 0 else h.detach().requires_grad_()
            ins.append(h)
            h = layer(h)
            if i == len(layers) - 1:
                h = loss(h, y)  # the loss belongs to the head layer (planner.analytic's "ln_f+head")
            outs.append(h)
        grad = None
        for i in reversed(range(len(layers))):
            where.update(run=run, layer=i, phase="backward")
            outs[i].backward(grad)
            grad = ins[i].grad if i else None
    Path(out, f"rank{rank}.json").write_text(json.dumps(rec))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> list[list[dict]]:
    """Per run of RUNS, the collectives rank 0 issued (both ranks issue the same)."""
    tmp = tmp_path_factory.mktemp("tp_collectives")
    mp.spawn(_record_rank, args=(_free_port(), str(tmp)), nprocs=2, join=True)
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    return [[r for r in ranks[0] if r["run"] == k] for k in range(len(RUNS))]


def _by_layer(records: list[dict], layers: int) -> list[dict[str, list[tuple]]]:
    out = [{"forward": [], "backward": []} for _ in range(layers)]
    for r in records:
        out[r["layer"]][r["phase"]].append((r["kind"], r["op"], r["elements"]))
    return out


def _analytic(spec: str, sequence: bool) -> list[dict[str, list[tuple]]]:
    cfg = transformer_config(spec, 2)
    out = []
    for layer in tp_collectives(cfg, 2, sequence):
        d = {"forward": [], "backward": []}
        for c in layer:
            d[c.phase].append((c.kind, c.op, c.elements * MICROBATCH))
        out.append(d)
    return out


@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.parametrize("run", range(4), ids=[f"{s.partition(':')[0]}-{'tp+sp' if q else 'tp'}" for s, q, _ in RUNS[:4]])
def test_executor_issues_exactly_the_analytic_tp_collectives_layer_by_layer(run, recorded):
    spec, sequence, _ = RUNS[run]
    cfg = transformer_config(spec, 2)
    got = _by_layer(recorded[run], cfg.layers + 2)
    want = _analytic(spec, sequence)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"layer {i}: executor {g} != analytic {w}"
    # not vacuous: every layer communicates, and the head's cross entropy reduces three per-token statistics
    assert all(g["forward"] for g in got)
    assert [k for k in got[-1]["forward"] if k[2] == cfg.seq * MICROBATCH] == [
        ("all-reduce", "max", 16), ("all-reduce", "sum", 16), ("all-reduce", "sum", 16)]


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_a_skipped_reduction_shows_as_a_disagreement(recorded):
    spec, sequence, _ = RUNS[4]
    got = _by_layer(recorded[4], transformer_config(spec, 2).layers + 2)
    want = _analytic(spec, sequence)
    assert got[:-1] == want[:-1]
    assert got[-1]["forward"] == [] and len(want[-1]["forward"]) == 3


@pytest.mark.parametrize("sequence", [False, True], ids=["tp", "tp+sp"])
@pytest.mark.parametrize("spec", [GPT, LLAMA, "gpt3-13b", "llama3-8b"])
def test_the_profile_times_every_enumerated_collective_and_nothing_else(spec, sequence):
    """Each layer's ``tp_collectives`` (what the cost model, the simulator and the closed forms time) is the
    enumeration's list for that layer, collective by collective: the cross entropy's statistics, sequence
    parallelism's re-gathers and the embedding's backward all-gather included."""
    cfg = transformer_config(spec, 2)
    prof = transformer_profile(cfg, tensor_parallel=2, sequence_parallel=sequence)
    cols = tp_collectives(cfg, 2, sequence)
    assert len(cols) == len(prof.layers)
    for layer, mine in zip(prof.layers, cols):
        assert layer.tp_collectives == mine, layer.name
        assert layer.tp_forward + layer.tp_backward == tuple(sorted(mine, key=lambda c: c.phase != "forward"))
    assert [c.what for c in prof.layers[-1].tp_forward][-3:] == ["ce-max", "ce-sum-exp", "ce-target"]
