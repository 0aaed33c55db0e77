"""planner.analytic: transformer and CNN profiles against closed forms, and the model spec strings."""
from __future__ import annotations

import pytest

from planner.analytic import ModelSpecError, load_model, on_device, split_device_suffix, total_params
from planner.closedforms import (BYTES_PER_PARAM, STATE_BYTES_PER_PARAM, block_saved_bytes, state_bytes,
                                 transformer_flops_per_token, transformer_param_count)
from planner.cnn import cnn_profile, pipedream_profiles_dir
from planner.transformer import PRESETS
from planner.transformer_profile import transformer_profile
from planner.costmodel import static_bytes_per_param_byte
from topologies.devices import DEVICE_KINDS

GPT3_13B = PRESETS["gpt3-13b"]


def test_gpt3_13b_parameter_count_is_12_L_h2_plus_embeddings_within_2_percent():
    c = GPT3_13B
    closed = 12 * c.layers * c.hidden ** 2 + c.vocab * c.hidden
    assert transformer_param_count(c) == pytest.approx(closed, rel=0.02)
    assert transformer_param_count(c) == pytest.approx(13e9, rel=0.02)


@pytest.mark.parametrize("name,billions", [("gpt3-125m", 0.125), ("gpt3-1.3b", 1.3), ("gpt3-6.7b", 6.7),
                                           ("gpt3-175b", 175), ("gpt2-xl", 1.56), ("bert-large", 0.34)])
def test_preset_sizes_match_their_names(name, billions):
    assert transformer_param_count(PRESETS[name]) / 1e9 == pytest.approx(billions, rel=0.06)


def test_training_flops_per_token_is_6N_plus_the_attention_term():
    c = GPT3_13B
    n = transformer_param_count(c)
    assert transformer_flops_per_token(c) == pytest.approx(6 * n * (1 + c.seq / (6 * c.hidden)), rel=0.02)
    assert transformer_flops_per_token(c) == pytest.approx(6 * n, rel=0.10)


def test_profile_time_is_flops_over_achievable_throughput_and_backward_is_twice_forward():
    p = transformer_profile(GPT3_13B, "h100")
    k = DEVICE_KINDS["h100"]
    total_flops = transformer_flops_per_token(GPT3_13B) * GPT3_13B.seq
    assert p.total_s == pytest.approx(total_flops / (k.peak_flops * k.achievable_fraction), rel=1e-9)
    for layer in p.layers:
        assert layer.backward_s == pytest.approx(2 * layer.forward_s)


def test_layers_are_embedding_blocks_and_head_with_korthikanti_saved_bytes():
    c = GPT3_13B
    p = transformer_profile(c)
    assert len(p) == c.layers + 2
    assert p.layers[0].name == "embedding" and p.layers[-1].name == "ln_f+head"
    block = p.layers[1]
    assert block.activation_bytes == c.seq * c.hidden * 2
    assert block.saved_bytes == block_saved_bytes(c) == c.seq * c.hidden * (34 + 5 * c.heads * c.seq / c.hidden)
    assert total_params(p) == pytest.approx(transformer_param_count(c, tied=False))


def test_param_bytes_with_the_cost_models_adam_accounting_give_16_bytes_per_parameter():
    assert BYTES_PER_PARAM * static_bytes_per_param_byte(1, "adam") == STATE_BYTES_PER_PARAM["adam"] == 16
    assert BYTES_PER_PARAM * static_bytes_per_param_byte(1, "sgd") == STATE_BYTES_PER_PARAM["sgd"] == 12
    assert state_bytes(1e9, "adam") == 16e9


def test_cnn_closed_forms_vgg16_and_resnet50():
    vgg, rn = cnn_profile("vgg16"), cnn_profile("resnet50")
    assert total_params(vgg) == pytest.approx(138.4e6, rel=0.01)
    assert total_params(rn) == pytest.approx(25.6e6, rel=0.01)
    a100 = DEVICE_KINDS["a100-80gb"].achievable_flops
    assert sum(l.forward_s for l in vgg.layers) * a100 == pytest.approx(2 * 15.5e9, rel=0.03)
    assert sum(l.forward_s for l in rn.layers) * a100 == pytest.approx(2 * 4.1e9, rel=0.05)


def test_family_spec_equals_the_preset_and_names_round_trip():
    a = load_model("gpt3-13b")
    b = load_model("gpt:layers=40,hidden=5120,heads=40,seq=2048,vocab=50257")
    assert a.layers == b.layers
    for spec in ("gpt3-13b@h100", "bert-base", "gpt3-1.3b:seq=1024", "resnet50-analytic@v100"):
        p = load_model(spec)
        assert load_model(p.name) == p


def test_device_suffix_and_flag_time_the_model_on_that_kind():
    a, h = load_model("gpt3-1.3b"), load_model("gpt3-1.3b@h100")
    ratio = DEVICE_KINDS["h100"].achievable_flops / DEVICE_KINDS["a100-80gb"].achievable_flops
    assert a.total_s / h.total_s == pytest.approx(ratio)
    assert load_model("gpt3-1.3b", "h100") == h
    assert on_device(a, "h100").total_s == pytest.approx(h.total_s)
    assert split_device_suffix("gpt3-13b@h100") == ("gpt3-13b", "h100")
    with pytest.raises(ModelSpecError, match="--device-kind"):
        load_model("gpt3-1.3b@h100", "v100")


@pytest.mark.parametrize("spec,needle", [("gpt:layers=4,hidden=64", "missing heads"), ("gpt:layers=4,hiden=3", "hiden"),
                                         ("gpt3-13b:seq=abc", "seq"), ("nosuchmodel", "gpt3-13b"),
                                         ("gpt3-13b@tpu9", "tpu9"), ("gpt:layers=0,hidden=8,heads=1,seq=4,vocab=9", "layers")])
def test_bad_specs_name_the_field(spec, needle):
    with pytest.raises(ModelSpecError, match=needle):
        load_model(spec)


@pytest.mark.skipif(pipedream_profiles_dir() is None, reason="PipeDream profiles not present")
def test_pipedream_names_resolve_to_graph_txt_per_sample():
    p = load_model("vgg16")
    assert p.microbatch_size == 128 and p.device == "v100" and p.graph is not None
    h = load_model("vgg16@h100")
    assert h.total_s < p.total_s
    assert load_model("vgg16-analytic").name.startswith("vgg16-analytic")


# ---------------------------------------------------------------------- tensor parallelism, Llama
from planner.closedforms import padded_vocab  # noqa: E402
from planner.transformer import TransformerConfig  # noqa: E402
from planner.profile import ModelProfile  # noqa: E402

GPT_EVEN = TransformerConfig(8, 1024, 16, seq=1024, vocab=51200)  # vocabulary divisible by 8·128: no padding


@pytest.mark.parametrize("t", [2, 4, 8])
def test_tp_rank_holds_the_sharded_weights_over_T_and_the_replicated_ones_whole(t):
    c = GPT_EVEN
    one, rank = transformer_profile(c), transformer_profile(c, tensor_parallel=t)
    h = c.hidden
    replicated_per_block = 6 * h  # projection bias, fc2 bias, two LayerNorms (weight + bias)
    replicated = c.layers * replicated_per_block + c.seq * h + 2 * h  # + learned positions + final LN
    assert total_params(rank) * t - (t - 1) * replicated == pytest.approx(total_params(one), rel=1e-12)


@pytest.mark.parametrize("t", [2, 8])
def test_tp_rank_does_one_T_th_of_the_flops_at_a_fixed_fraction_of_peak(t):
    one, rank = transformer_profile(GPT_EVEN), transformer_profile(GPT_EVEN, tensor_parallel=t)
    for a, b in zip(one.layers[1:], rank.layers[1:]):
        assert b.forward_s * t == pytest.approx(a.forward_s, rel=1e-12)


@pytest.mark.parametrize("t,sp", [(1, False), (2, False), (8, False), (4, True), (8, True)])
def test_block_saved_bytes_are_korthikanti_eq_2_and_3(t, sp):
    c = GPT3_13B
    s, h, a = c.seq, c.hidden, c.heads
    expected = s * h * 34 / t + 5 * a * s * s / t if sp else s * h * (10 + 24 / t) + 5 * a * s * s / t
    assert block_saved_bytes(c, t, sp) == pytest.approx(expected, rel=1e-12)
    p = transformer_profile(c, tensor_parallel=t, sequence_parallel=sp, vocab_multiple=128)
    assert p.layers[1].saved_bytes == pytest.approx(expected, rel=1e-12)
    assert p.layers[1].attention_saved_bytes == pytest.approx(5 * a * s * s / t, rel=1e-12)


def test_tp_collectives_two_per_block_each_way_one_for_embedding_forward_three_ce_statistics_and_one_for_head():
    c = GPT3_13B
    p = transformer_profile(c, tensor_parallel=4, vocab_multiple=128)
    emb, block, head = p.layers[0], p.layers[1], p.layers[-1]
    sh2, s4 = c.seq * c.hidden * 2, c.seq * 4  # a bf16 hidden state; the cross entropy's fp32 per-token statistic
    kinds = lambda cols: [(x.kind, x.nbytes) for x in cols]
    assert kinds(emb.tp_forward) == [("all-reduce", sh2)] and emb.tp_backward == ()
    assert kinds(block.tp_forward) == kinds(block.tp_backward) == [("all-reduce", sh2)] * 2
    assert kinds(head.tp_forward) == [("all-reduce", s4)] * 3 and kinds(head.tp_backward) == [("all-reduce", sh2)]
    assert [x.op for x in head.tp_forward] == ["max", "sum", "sum"]
    assert p.tensor_parallel == 4
    one = transformer_profile(c)
    assert all(l.tp_collectives == () for l in one.layers)


def test_megatron_pads_the_vocabulary_to_128_T():
    assert padded_vocab(50257, 1, 128) == 50304
    assert padded_vocab(50257, 2, 128) == 50432
    assert padded_vocab(50257, 8, 128) == 51200
    assert padded_vocab(50257) == 50257


def test_tp_degree_that_does_not_divide_the_heads_is_refused():
    with pytest.raises(ModelSpecError, match="must divide heads"):
        transformer_profile(PRESETS["gpt3-2.7b"], tensor_parallel=3)


@pytest.mark.parametrize("name,billions", [("llama3-8b", 8.03), ("llama3-70b", 70.55), ("llama3-405b", 405.85)])
def test_llama3_presets_have_their_published_parameter_counts(name, billions):
    assert transformer_param_count(PRESETS[name]) / 1e9 == pytest.approx(billions, rel=0.003)


def test_llama_block_flops_count_gqa_and_three_swiglu_matrices():
    c = PRESETS["llama3-8b"]
    s, h, f, kv = c.seq, c.hidden, c.ffn_size, 8 * 128
    # the causal flash core (Llama's default kernel) meets s/2 keys per query on average: 4·s·(s/2)·h
    closed = 2 * s * h * (h + 2 * kv) + 2 * s * h * h + 6 * s * h * f + 4 * s * (s // 2) * h
    p = transformer_profile(c)
    assert p.layers[1].forward_s == pytest.approx(closed / DEVICE_KINDS["a100-80gb"].achievable_flops, rel=1e-12)
    assert load_model("llama3-8b").layers[1] == p.layers[1]


def test_profile_with_tp_fields_round_trips_and_an_old_profile_loads_with_defaults():
    p = transformer_profile(GPT_EVEN, tensor_parallel=2, sequence_parallel=True)
    assert ModelProfile.from_dict(p.to_dict()) == p
    old = {"name": "m", "layers": [{"name": "l", "forward_s": 1, "backward_s": 2, "activation_bytes": 3,
                                     "saved_bytes": 4, "param_bytes": 5}]}
    q = ModelProfile.from_dict(old)
    assert q.tensor_parallel == 1 and q.layers[0].tp_collectives == ()
    assert "tp_forward_allreduces" not in transformer_profile(GPT_EVEN).to_dict()["layers"][0]
    assert "tp_collectives" not in transformer_profile(GPT_EVEN).to_dict()["layers"][0]
    # a profile of the older spelling (whole all-reduces of one size, counted) loads as those collectives
    old["layers"][0].update(tp_allreduce_bytes=8, tp_forward_allreduces=2, tp_backward_allreduces=1)
    legacy = ModelProfile.from_dict(old).layers[0]
    assert [(x.phase, x.kind, x.nbytes) for x in legacy.tp_collectives] == [
        ("forward", "all-reduce", 8), ("forward", "all-reduce", 8), ("backward", "all-reduce", 8)]
    assert ModelProfile.from_dict(ModelProfile.from_dict(old).to_dict()) == ModelProfile.from_dict(old)


def test_load_model_with_a_device_calibration_times_by_the_efficiency_model_per_tp_rank():
    from planner.efficiency import DeviceCalibration, EfficiencyParams

    cal = DeviceCalibration("h100", EfficiencyParams(0.7, 0.8, 5e-6, 20e-6, 0.0, 4.0))
    p = load_model("gpt3-1.3b", calibration=cal, tensor_parallel=2, microbatch_size=4)
    ref = transformer_profile(PRESETS["gpt3-1.3b"], "h100", tensor_parallel=2, microbatch_size=4,
                              efficiency=cal.params, vocab_multiple=128)
    assert p.layers == ref.layers and p.device == "h100" and p.microbatch_size == 4
    assert load_model("gpt3-1.3b") == transformer_profile(PRESETS["gpt3-1.3b"], name="gpt3-1.3b@a100-80gb")
    with pytest.raises(ModelSpecError, match="calibration is for h100"):
        load_model("gpt3-1.3b@a100", calibration=cal)
