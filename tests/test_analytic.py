"""planner.analytic: transformer and CNN profiles against closed forms, and the model spec strings."""
from __future__ import annotations

import pytest

from planner.analytic import (BYTES_PER_PARAM, PRESETS, STATE_BYTES_PER_PARAM, ModelSpecError, block_saved_bytes,
                              cnn_profile, load_model, on_device, pipedream_profiles_dir, split_device_suffix,
                              state_bytes, total_params, transformer_flops_per_token, transformer_param_count,
                              transformer_profile)
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
