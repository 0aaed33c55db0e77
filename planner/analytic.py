"""Model specs: the one grammar every command names a model by, and the analytic profiles it resolves to.

A what-if needs a profile for a model nobody has run on a device nobody has. :func:`load_model` builds one
from closed forms, no profiling run, for any spec below: a transformer (``planner.transformer``'s
configs and presets, profiled per tensor-parallel rank by ``planner.transformer_profile`` from
``planner.closedforms``), a CNN of the PipeDream paper or PipeDream's measured profile (``planner.cnn``),
or a measured profile file (``planner.profile``). Here too: what a profile implies per device
(:func:`total_params`, :func:`min_memory_per_device_bytes`, :func:`on_device`).

Spec strings (:func:`load_model`, used by every command)::

    gpt3-13b                        a preset (see planner.transformer.PRESETS)
    gpt3-13b@h100                   ... timed on a device kind (default a100-80gb)
    gpt3-13b:seq=4096               a preset with overrides
    gpt:layers=40,hidden=5120,heads=40,seq=2048,vocab=50257[,ffn=20480]
    llama:layers=32,hidden=4096,heads=32,seq=8192,vocab=128256,ffn=14336,kv_heads=8
    gpt3-13b:attention=flash        the attention kernel: flash or unfused (default: llama flash, gpt/bert unfused)
    bert:layers=24,hidden=1024,heads=16,seq=512,vocab=30522
    vgg16, resnet50                 PipeDream graph.txt when present, else analytic
    vgg16-analytic, resnet50-analytic
    alexnet, gnmt, resnet101, ...   any PipeDream graph.txt by name (per sample where its batch is known)
    PATH.json | PATH graph.txt | uniform:...   as planner.profile.load_profile
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from planner.closedforms import BYTES_PER_PARAM, DEFAULT_DEVICE_KIND, check_tp, state_bytes, tp_vocab_multiple
from planner.cnn import CNN_BUILDERS, CNNS, cnn_profile, pipedream_names, pipedream_profile
from planner.efficiency import DeviceCalibration
from planner.profile import ModelProfile, ModelSpecError, load_profile
from planner.transformer import ALIASES, ATTENTION_KERNELS, FAMILIES, PRESETS, TransformerConfig
from planner.transformer_profile import block_key, transformer_profile
from topologies.devices import DEVICE_KINDS, device_kind
from topologies.errors import TopologyError

__all__ = ["load_model", "split_device_suffix", "model_names", "transformer_config", "ModelSpecError",
           "total_params", "min_memory_per_device_bytes", "on_device"]

_SPEC_KEYS = ("layers", "hidden", "heads", "seq", "vocab", "ffn", "kv_heads", "attention")
#: Spec keys whose value is a word, not a number.
_WORD_KEYS = ("attention",)


# ---------------------------------------------------------------------- spec strings
def model_names() -> list[str]:
    """Every model name a spec may use."""
    extra = sorted(set(CNNS) | set(pipedream_names()))
    return sorted(PRESETS) + sorted(ALIASES) + extra + [f"{m}-analytic" for m in sorted(CNN_BUILDERS)]


def split_device_suffix(spec: str) -> tuple[str, str | None]:
    """``gpt3-13b@h100`` -> (``gpt3-13b``, ``h100``); no known kind after the last ``@`` -> (spec, None)."""
    head, sep, tail = spec.rpartition("@")
    if not sep or not head:
        return spec, None
    try:
        return head, device_kind(tail).name
    except TopologyError:
        if "/" in tail or "." in tail:  # looks like a path, not a kind
            return spec, None
        raise ModelSpecError(f"model {spec!r}: unknown device kind {tail!r} after '@'; known: {', '.join(DEVICE_KINDS)}") from None


def _overrides(text: str, where: str) -> dict[str, int | str]:
    out: dict[str, int | str] = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        key, eq, val = part.partition("=")
        key = key.strip().lower()
        if not eq or key not in _SPEC_KEYS:
            raise ModelSpecError(f"{where}: {part!r} is not KEY=VALUE with KEY one of {', '.join(_SPEC_KEYS)}")
        if key in _WORD_KEYS:
            out[key] = val.strip().lower()
            if out[key] not in ATTENTION_KERNELS:
                raise ModelSpecError(f"{where}: attention={val.strip()!r} is not an attention kernel; "
                                     f"choose {' or '.join(ATTENTION_KERNELS)}")
            continue
        try:
            out[key] = int(float(val))
        except ValueError:
            raise ModelSpecError(f"{where}: {key}={val.strip()!r} is not a number") from None
        if out[key] != float(val):
            raise ModelSpecError(f"{where}: {key}={val.strip()!r} must be a whole number")
    return out


def _transformer(spec: str) -> TransformerConfig | None:
    head, _, rest = spec.partition(":")
    name = head.strip().lower()
    name = ALIASES.get(name, name)
    if name in PRESETS:
        return replace(PRESETS[name], **_overrides(rest, name)) if rest else PRESETS[name]
    if name in FAMILIES:
        kw = _overrides(rest, name)
        missing = [k for k in _SPEC_KEYS[:5] if k not in kw]
        if missing:
            raise ModelSpecError(f"{name}: missing {', '.join(missing)}; write {name}:layers=L,hidden=H,heads=A,seq=S,vocab=V")
        return TransformerConfig(family=name, **kw)
    return None


def transformer_config(spec: str, tensor_parallel: int = 1) -> TransformerConfig | None:
    """The transformer a model spec names (a preset like ``gpt3-1.3b``, maybe with overrides, or
    ``gpt:layers=...``; a ``@kind`` suffix is ignored), checked to split over ``tensor_parallel`` ranks;
    None when the spec is not an analytic transformer."""
    cfg = _transformer(split_device_suffix(spec.strip())[0])
    if cfg is not None:
        check_tp(cfg, tensor_parallel)
    return cfg


def load_model(spec: str, device_kind_name: str | None = None, *, calibration: DeviceCalibration | None = None,
               tensor_parallel: int = 1, sequence_parallel: bool = False, microbatch_size: int = 1) -> ModelProfile:
    """Any model spec (see the module docstring) as a ModelProfile.

    ``device_kind_name`` times an analytic model on that kind (a ``@kind``
    suffix in the spec does the same; the two must agree). Measured profiles
    (paths, ``uniform:``) are returned as they are.

    An analytic transformer is built per TP rank of ``tensor_parallel`` (the vocabulary then padded to
    a multiple of 128·T, as Megatron pads it). With a device ``calibration``
    (``planner.efficiency.load_device_calibration``: what every ``--device-calibration FILE`` reads) it
    is timed by the fitted efficiency model on the calibration's device kind at ``microbatch_size``
    (its reference microbatch; the model is not linear in it) instead of at a fixed fraction of peak;
    where the calibration's per-shape table lists the block's shape, its block times are the table's.
    CNNs and measured profiles ignore the calibration.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError("give a model: a name like gpt3-13b, gpt:layers=...,hidden=..., or a profile path")
    text, suffix = split_device_suffix(spec.strip())
    if suffix and device_kind_name and device_kind(device_kind_name).name != suffix:
        raise ModelSpecError(f"model {spec!r} names device {suffix} but --device-kind is {device_kind_name}; give one")
    kind = suffix or (device_kind(device_kind_name).name if device_kind_name else None)
    cfg = _transformer(text)
    if cfg is not None:
        base = text.partition(":")[0].strip().lower()
        name = text if ":" in text else ALIASES.get(base, base)
        if calibration is not None:
            if kind and kind != calibration.kind.name:
                raise ModelSpecError(f"model {spec!r} is timed on {kind} but the device calibration is for "
                                     f"{calibration.kind.name}; give a calibration of that kind or drop the kind")
            kind = calibration.kind.name
        kind = kind or DEFAULT_DEVICE_KIND
        multiple = tp_vocab_multiple(tensor_parallel)
        mb = microbatch_size if calibration is not None else 1
        timing = (calibration.block_timing(block_key(cfg, tensor_parallel, mb, sequence_parallel))
                  if calibration is not None else None)
        return transformer_profile(cfg, kind, name=f"{name}@{device_kind(kind).name}", tensor_parallel=tensor_parallel,
                                   sequence_parallel=sequence_parallel, microbatch_size=mb,
                                   efficiency=calibration.params if calibration is not None else None,
                                   vocab_multiple=multiple, block_timing=timing)
    low = text.lower()
    measured = pipedream_profile(low, kind) if re.fullmatch(r"[a-z0-9_]+", low) else None
    if measured is not None:
        return measured
    if low in CNNS:
        return cnn_profile(low, kind or DEFAULT_DEVICE_KIND)
    if low.endswith("-analytic") and low[: -len("-analytic")] in CNN_BUILDERS:
        return cnn_profile(low[: -len("-analytic")], kind or DEFAULT_DEVICE_KIND)
    if low.startswith("uniform") or Path(text).exists():
        return load_profile(text)
    raise ModelSpecError(f"unknown model {text!r}: not a profile file and not one of {', '.join(model_names())} "
                         f"(or gpt:/bert:/llama:layers=..,hidden=..,heads=..,seq=..,vocab=..[,ffn=..,kv_heads=..,"
                         f"attention=flash|unfused])")


def total_params(profile: ModelProfile) -> float:
    """Parameters stored across the chain (tied matrices counted on both ends), from param_bytes."""
    return sum(l.param_bytes for l in profile.layers) / BYTES_PER_PARAM


def min_memory_per_device_bytes(profile: ModelProfile, devices: int, optimizer: str = "adam",
                                microbatch_size: int = 1) -> float:
    """A lower bound on per-device memory for ``devices`` pipeline stages: training state split evenly,
    plus one microbatch's saved activations of the largest layer (no recomputation)."""
    st = state_bytes(total_params(profile), optimizer) / max(1, min(devices, len(profile)))
    act = max(l.saved_bytes for l in profile.layers) * microbatch_size
    return st + act


def on_device(profile: ModelProfile, kind: str) -> ModelProfile:
    """``profile`` timed on device ``kind``: times scaled by the ratio of achievable FLOP/s when the
    profile's own device is a catalogued kind; a profile from an uncatalogued device is returned as is."""
    target = device_kind(kind)
    try:
        source = device_kind(profile.device)
    except TopologyError:
        return profile
    if source.name == target.name:
        return profile
    k = source.achievable_flops / target.achievable_flops
    layers = tuple(replace(l, forward_s=l.forward_s * k, backward_s=l.backward_s * k,
                           attention_forward_s=l.attention_forward_s * k) for l in profile.layers)
    name, _, _ = profile.name.rpartition("@") if "@" in profile.name else (profile.name, "", "")
    return replace(profile, name=f"{name}@{target.name}", layers=layers, device=target.name)

