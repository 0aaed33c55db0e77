"""The zoo's llama model: rotary positions, grouped-query attention, SwiGLU, its parameter counts against the analytic
profile, and its Megatron tensor parallelism against the single-process reference (2 stages x 2 TP ranks, gloo)."""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch

from executor import ExecutorError, run_plan
from executor.models import (GroupedQueryAttention, LlamaBlock, ModelSpecError, build_stage, num_layers, parse_spec,
                             rotary_angles, rotate)
from executor.recompute import attention_probabilities_times_values
from executor.reference import reference_weights
from executor.tensor_parallel import TPContext, parallelize
from planner.analytic import transformer_config
from planner.closedforms import BYTES_PER_PARAM
from planner.transformer import PRESETS, TransformerConfig
from planner.transformer_profile import transformer_profile
from planner.plan import plan_from_flags

MODEL = "llama:layers=2,hidden=32,heads=4,kv_heads=2,ffn=48,seq=8,vocab=160"  # both TP ranks hold real words


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_rotary_turns_each_feature_pair_by_its_position_angle_so_scores_see_only_the_offset():
    """Independent truth: feature pair (j, j + d/2) as the complex number a + ib, multiplied by e^{i·p·θ_j}."""
    seq, d = 12, 8
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(seq, d, generator=g, dtype=torch.float64) for _ in range(2))
    angle = rotary_angles(seq, d)
    assert torch.allclose(angle[3], 3 * 500_000.0 ** (-torch.arange(4, dtype=torch.float64) / 4))
    got = rotate(q, angle.cos(), angle.sin())
    z = torch.complex(q[:, : d // 2], q[:, d // 2:]) * torch.polar(torch.ones_like(angle), angle)
    assert torch.allclose(got, torch.cat((z.real, z.imag), dim=-1), atol=1e-12)
    # the same two vectors at positions (p, p') and (p + 5, p' + 5) give the same score
    rq, rk = (rotate(z[:1].expand(seq, d), angle.cos(), angle.sin()) for z in (q, k))
    assert math.isclose(rq[2] @ rk[6], rq[7] @ rk[11], rel_tol=1e-9)
    assert not math.isclose(rq[2] @ rk[6], rq[2] @ rk[7], rel_tol=1e-3)


def test_the_rotation_s_backward_keeps_nothing_and_is_the_numerical_gradient():
    from executor.memory import SavedBytes
    from executor.models import _Rotation

    angle = rotary_angles(6, 4)
    x = torch.randn(2, 3, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: _Rotation.apply(z, angle.cos(), angle.sin()), (x,))
    with SavedBytes(set()).counting() as rec:
        _Rotation.apply(x, angle.cos(), angle.sin())
    assert rec.nbytes == 0


def _as_multi_head(gqa: GroupedQueryAttention) -> GroupedQueryAttention:
    """The same attention with one key/value head per query head (each a copy of its group's)."""
    h, d, g, r = gqa.proj.out_features, gqa.head_dim, gqa.kv_heads, gqa.heads // gqa.kv_heads
    mha = GroupedQueryAttention(h, gqa.heads, gqa.heads).double()
    rows = gqa.qkv.weight.view(g, r + 2, d, h)
    per_head = [torch.stack((rows[j // r, j % r], rows[j // r, r], rows[j // r, r + 1])) for j in range(gqa.heads)]
    with torch.no_grad():
        mha.qkv.weight.copy_(torch.stack(per_head).reshape(-1, h))
        mha.proj.weight.copy_(gqa.proj.weight)
    return mha


def test_grouped_query_attention_is_multi_head_attention_with_each_group_s_key_and_value_shared():
    torch.manual_seed(0)
    gqa = GroupedQueryAttention(32, 4, 2).double()
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    mha = _as_multi_head(gqa)
    assert torch.allclose(gqa(x), mha(x), atol=1e-12)
    # SDPA's causal core against the explicit softmax (the gpt block's core)
    q, k, v = (torch.randn(2, 4, 8, 16, dtype=torch.float64) for _ in range(3))
    from executor.models import causal_attention
    assert torch.allclose(causal_attention(q, k, v), attention_probabilities_times_values(q, k, v), atol=1e-12)
    # causal: tokens after position 4 do not change the outputs up to it
    y = x.clone()
    y[:, 5:] += 1.0
    assert torch.allclose(gqa(x)[:, :5], gqa(y)[:, :5], atol=1e-12)
    assert not torch.allclose(gqa(x)[:, 5:], gqa(y)[:, 5:])


def test_selective_recomputation_of_the_llama_core_gives_the_same_gradients():
    torch.manual_seed(1)
    block = LlamaBlock(32, 4, 2, 48).double()
    again = copy.deepcopy(block)
    again.attn.recompute_core = True
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    for b in (block, again):
        b(x).square().sum().backward()
    for (n, p), q in zip(block.named_parameters(), again.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-12), n


@pytest.mark.parametrize("config", [TransformerConfig(2, 32, 4, 8, 32, ffn=48, family="llama", kv_heads=2),
                                    PRESETS["llama3-8b"], PRESETS["llama3-70b"]], ids=["tiny", "8b", "70b"])
def test_the_zoo_model_holds_the_analytic_profile_s_parameters_per_layer(config):
    """Per chain layer, whole (T = 1) and per TP rank of a block (T = 2, 8): the module's parameters are exactly the
    analytic profile's (built on the meta device: no memory for the 8B and 70B shapes). The same spec string names
    both. The embedding's and head's per-rank counts: tests/test_executor_vocab.py."""
    spec = config.spec()
    last = num_layers(spec) - 1
    with torch.device("meta"):
        layers = [build_stage(spec, i, i)[0] for i in (0, 1, last)]
    want = [l.param_bytes / BYTES_PER_PARAM for l in transformer_profile(config).layers]
    assert [_params(l) for l in layers] == [want[0], want[1], want[-1]]
    for t in (2, 8) if config.kv_heads % 8 == 0 else (2,):
        with torch.device("meta"):
            block = parallelize(build_stage(spec, 1, 1), TPContext(None, 0, t, compute_only=True))[0]
        assert _params(block) == transformer_profile(config, tensor_parallel=t).layers[1].param_bytes / BYTES_PER_PARAM


def test_a_tp_rank_s_compute_is_its_share_of_the_whole_block():
    """Compute-only shards (no collectives): the ranks' attention and SwiGLU outputs sum to the whole block's."""
    torch.manual_seed(2)
    whole = LlamaBlock(32, 4, 2, 48)
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    ranks = [parallelize([copy.deepcopy(whole)], TPContext(None, r, 2, compute_only=True))[0].double()
             for r in range(2)]
    whole.double()
    with torch.no_grad():
        assert torch.allclose(sum(b.attn(x) for b in ranks), whole.attn(x), atol=1e-12)
        assert torch.allclose(sum(b.mlp(x) for b in ranks), whole.mlp(x), atol=1e-12)
    assert ranks[0].attn.qkv.weight.shape == ((2 + 2) * 8, 32)  # one KV group: its 2 query heads, its k and v
    assert ranks[0].mlp.gate_up.weight.shape == (2 * 24, 32)


@pytest.mark.dist
@pytest.mark.timeout(120)
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_two_stages_by_two_tp_ranks_of_llama_equal_the_reference(sequence_parallel):
    plan = plan_from_flags(MODEL, num_layers(MODEL), pp=2, tp=2, schedule="1f1b", microbatches=4, batches=2,
                           microbatch_size=2, lr=0.1, sequence_parallel=sequence_parallel)
    res = run_plan(plan, dtype="float64", timeout_s=60)
    assert len(res.program.workers) == 4 and res.program.tensor_parallel == 2
    want = reference_weights(plan, dtype="float64")
    start = reference_weights(replace(plan, lr=0.0), dtype="float64")
    assert max((want[k] - start[k]).abs().max().item() for k in want) > 1e-3  # training moved the weights
    assert res.weights.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(res.weights[k], want[k], rtol=1e-9, atol=1e-12, msg=lambda m: f"{k}: {m}")


def test_tp_refuses_degrees_that_split_a_key_value_group_or_the_swiglu():
    m = "llama:layers=2,hidden=32,heads=4,kv_heads=1,ffn=48,seq=8,vocab=32"
    with pytest.raises(ExecutorError, match="must divide the model's kv_heads=1"):
        run_plan(plan_from_flags(m, num_layers(m), pp=2, tp=2))
    m = "llama:layers=2,hidden=32,heads=4,kv_heads=2,ffn=45,seq=8,vocab=32"
    with pytest.raises(ExecutorError, match="must divide the model's ffn=45"):
        run_plan(plan_from_flags(m, num_layers(m), pp=2, tp=2))


@pytest.mark.parametrize("spec, says", [
    ("llama:hidden=32,heads=4,kv_heads=3", "kv_heads=3 must divide heads=4"),
    ("llama:hidden=36,heads=4", "head size hidden/heads = 9 must be even"),
    ("llama:hidden=30,heads=4", "must be a multiple of heads=4"),
])
def test_bad_llama_specs_say_what_is_wrong(spec, says):
    with pytest.raises(ModelSpecError, match=says):
        parse_spec(spec)


def test_a_spec_may_name_the_attention_kernel_its_block_runs_and_is_refused_the_other():
    """One string for simulate and run: ``attention=`` as planner.analytic takes it, the block's own kernel accepted
    (the same model), the other refused in one line (``run`` said 'unknown parameter' for both before)."""
    for kind, own, other in (("llama", "flash", "unfused"), ("gpt", "unfused", "flash")):
        base = f"{kind}:layers=2,hidden=32,heads=4,seq=8,vocab=32"
        assert parse_spec(f"{base},attention={own}").params == parse_spec(base).params
        assert transformer_config(f"{base},attention={own}") == transformer_config(base)  # the planner's same model
        with pytest.raises(ModelSpecError, match=f"block runs attention={own}, not attention={other}"):
            parse_spec(f"{base},attention={other}")


def test_zero_kv_heads_and_ffn_mean_multi_head_and_four_times_hidden_as_in_the_analytic_spec():
    ms = parse_spec("llama:layers=1,hidden=32,heads=4,seq=8,vocab=32")
    assert (ms.get("kv_heads"), ms.get("ffn")) == (4, 128)
    cfg = TransformerConfig(1, 32, 4, 8, 32, family="llama")
    with torch.device("meta"):
        block = build_stage(cfg.spec(), 1, 1)[0]
    assert _params(block) == transformer_profile(cfg).layers[1].param_bytes / BYTES_PER_PARAM
