"""Vocabulary-parallel embedding, head and cross entropy in the executor's tensor parallelism (Megatron's split,
as planner.analytic costs it): per-rank parameters against the analytic profile, the cross entropy against
torch's and by gradcheck across two gloo ranks, and parity that fails without each of the new reductions.

The models' vocabulary (160) is padded to 256 for T = 2 (a multiple of 128·T), so rank 0 holds ids 0..127 and
rank 1 ids 128..159 plus 96 padding rows: both ranks hold real words, and there is padding to leave out.
"""
from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from executor import run_plan
from executor.models import build_stage, num_layers
from executor.reference import reference_weights
from executor.tensor_parallel import (TP_FAULT_ENV, TPContext, _VocabParallelCrossEntropy, parallelize,
                                      vocab_parallel_cross_entropy, vocab_slice)
from planner.analytic import load_model
from planner.closedforms import BYTES_PER_PARAM
from planner.transformer import PRESETS, TransformerConfig
from planner.plan import plan_from_flags

GPT = "gpt:layers=2,hidden=16,heads=2,seq=8,vocab=160"
LLAMA = "llama:layers=2,hidden=32,heads=4,kv_heads=2,ffn=48,seq=8,vocab=160"


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("config", [TransformerConfig(2, 16, 2, 8, 160), TransformerConfig(2, 32, 4, 8, 160, ffn=48,
                                    family="llama", kv_heads=2), PRESETS["gpt3-1.3b"], PRESETS["llama3-8b"],
                                    PRESETS["llama3-70b"]], ids=["gpt", "llama", "1.3b", "8b", "70b"])
def test_each_rank_s_embedding_and_head_hold_the_analytic_profile_s_weights(config):
    """Per TP rank (first and last) of T = 1, 2, 4, 8: the embedding's and the head's parameters are exactly the
    analytic profile's that the planner and simulator cost (``load_model``: the vocabulary padded to 128·T, split
    by T; unpadded on one rank; GPT's positions and the norms whole). Built on the meta device: no memory for 8B
    and 70B."""
    spec = config.spec()
    last = num_layers(spec) - 1
    for t in (1, 2, 4, 8):
        if config.heads % t or (config.kv_heads or config.heads) % t:
            continue
        prof = load_model(spec, tensor_parallel=t)
        want = [prof.layers[0].param_bytes / BYTES_PER_PARAM, prof.layers[-1].param_bytes / BYTES_PER_PARAM]
        for rank in (0, t - 1):
            with torch.device("meta"):
                layers = parallelize(build_stage(spec, 0, 0) + build_stage(spec, last, last),
                                     TPContext(None, rank, t, compute_only=True))
            assert [_params(layers[0]), _params(layers[1])] == want, (t, rank)


def test_a_rank_s_slice_is_its_ids_of_the_padded_vocabulary():
    assert [vocab_slice(160, TPContext(None, r, 2)) for r in range(2)] == [(0, 128, 128), (128, 128, 32)]
    assert vocab_slice(32, TPContext(None, 1, 2)) == (128, 128, 0)  # all padding
    assert vocab_slice(50257, TPContext(None, 7, 8)) == (7 * 6400, 6400, 50257 - 7 * 6400)  # 51200 = 50·1024
    assert vocab_slice(160, TPContext(None, 0, 1)) == (0, 160, 160)  # one rank: the real words, no padding


def test_the_cross_entropy_on_one_rank_is_torch_s_without_the_padding():
    tp = TPContext(None, 0, 1, compute_only=True)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 160, generator=g, dtype=torch.float64)
    z[..., 150:] = 40.0  # the padding's logits: they must not enter the softmax
    target = torch.randint(0, 150, (2, 3), generator=g)
    got = vocab_parallel_cross_entropy(z, target, 150, tp)
    assert torch.allclose(got, F.cross_entropy(z[..., :150].reshape(-1, 150), target.reshape(-1)), atol=1e-12)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gradcheck_rank(rank: int, port: int) -> None:
    """Rank ``rank`` of 2: the loss of the split logits is torch's of the whole ones; then each rank in turn runs
    gradcheck on its slice while the other evaluates the same forwards on its fixed slice (a flag all-reduced
    before each forward keeps the two in step, as each forward's three all-reduces need)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        tp = TPContext(dist.group.WORLD, rank, 2)
        vocab, n = 160, 3
        g = torch.Generator().manual_seed(1)
        whole = torch.randn(n, 256, generator=g, dtype=torch.float64)
        whole[:, vocab:] = 40.0
        target = torch.tensor([5, 150, 130])  # one of rank 0's ids, two of rank 1's
        first, rows, real = vocab_slice(vocab, tp)
        mine = whole[:, first:first + rows].clone()
        loss = vocab_parallel_cross_entropy(mine, target, vocab, tp)
        assert torch.allclose(loss, F.cross_entropy(whole[:, :vocab], target), atol=1e-12), loss

        def one(z):
            return _VocabParallelCrossEntropy.apply(z, target, tp, first, real)

        for checker in range(2):
            if rank == checker:
                def step(z):
                    dist.all_reduce(torch.ones(1))
                    return one(z)
                assert torch.autograd.gradcheck(step, (mine.clone().requires_grad_(True),), fast_mode=True)
                dist.all_reduce(torch.zeros(1))
            else:
                while True:
                    flag = torch.zeros(1)
                    dist.all_reduce(flag)
                    if not flag.item():
                        break
                    one(mine)
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.timeout(90)
def test_the_split_cross_entropy_is_torch_s_and_passes_gradcheck_across_two_gloo_ranks():
    mp.spawn(_gradcheck_rank, args=(_free_port(),), nprocs=2, join=True)


def _plan(model: str, sequence_parallel: bool):
    return plan_from_flags(model, num_layers(model), pp=2, tp=2, schedule="1f1b", microbatches=4, batches=2,
                           microbatch_size=2, lr=0.1, sequence_parallel=sequence_parallel)


@pytest.mark.dist
@pytest.mark.timeout(180)
@pytest.mark.parametrize("fault, model, sequence_parallel", [
    ("embedding", LLAMA, True), ("head", GPT, True), ("cross-entropy", GPT, False)])
def test_parity_fails_without_each_vocabulary_parallel_reduction(fault, model, sequence_parallel, monkeypatch):
    """Skipping the embedding's sum (llama: its reduce-scatter), the head's input-gradient sum (sequence parallel:
    its reduce-scatter) or the cross entropy's reductions makes the run drift from the reference; run without the
    fault, the same plans equal it (tests/test_executor_tp.py, tests/test_executor_llama.py)."""
    plan = _plan(model, sequence_parallel)
    monkeypatch.setenv(TP_FAULT_ENV, fault)
    res = run_plan(plan, dtype="float64", timeout_s=60)
    want = reference_weights(plan, dtype="float64")
    assert max((res.weights[k] - want[k]).abs().max().item() for k in want) > 1e-4
