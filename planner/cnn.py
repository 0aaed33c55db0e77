"""The CNNs of the PipeDream paper: analytic layer chains of VGG-16 and ResNet-50, and PipeDream's measured
graph.txt profiles.

Where PipeDream's measured ``graph.txt`` for a model is on disk (see :func:`pipedream_profiles_dir`) the
name resolves to it (``planner.analytic.load_model``); otherwise to a layer-by-layer FLOP count
(``vgg16-analytic``, ``resnet50-analytic`` force the latter). Times in a graph.txt are scaled from the V100 to
the requested kind by achievable FLOP/s, and its per-minibatch bytes become per-sample bytes using the batch
size it was profiled at (:data:`PIPEDREAM_BATCH`).

CNN layers: conv FLOPs ``2·k²·Cin·Cout·Hout·Wout``; saved bytes ≈ the convolution input plus batch-norm
input and ReLU output, 2 bytes each (the units: ``planner.closedforms``).
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from planner.closedforms import BYTES_PER_PARAM, DEFAULT_DEVICE_KIND, seconds
from planner.profile import Layer, ModelProfile, ModelSpecError, read_pipedream_graph
from topologies.devices import device_kind

__all__ = ["CNNS", "CNN_BUILDERS", "PIPEDREAM_BATCH", "PIPEDREAM_REFERENCE_KIND", "cnn_profile",
           "pipedream_profiles_dir", "pipedream_profile", "pipedream_names"]

#: Reference device PipeDream's graph.txt times are scaled from (its clusters are V100s).
PIPEDREAM_REFERENCE_KIND = "v100"
#: CNNs with an analytic fallback (``NAME-analytic``).
CNNS = ("vgg16", "resnet50")
#: PipeDream profile name -> the batch size its graph.txt was profiled at (its README's table);
#: other names in the directory are read as they are (one "sample" = one profiled minibatch).
PIPEDREAM_BATCH: dict[str, int] = {"alexnet": 256, "vgg16": 128, "resnet18": 256, "resnet50": 128, "resnext50": 128,
                                   "resnet101": 64, "resnext101": 64, "densenet121": 64, "inception_v3": 128}


def _conv(cin: int, cout: int, k: int, hw_out: int) -> tuple[float, int, int]:
    """(forward FLOPs, params, output elements) of a k×k convolution with bias-free BN after it."""
    return 2.0 * k * k * cin * cout * hw_out * hw_out, k * k * cin * cout + 2 * cout, cout * hw_out * hw_out


def _vgg16_layers() -> list[tuple[str, float, int, float, float]]:
    """(name, fwd FLOPs, params, output elements, saved elements) per chain node of VGG-16 at 224²."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    out, cin, hw = [], 3, 224
    for i, c in enumerate(cfg):
        if c == "M":
            continue
        pooled = i + 1 < len(cfg) and cfg[i + 1] == "M"
        flops = 2.0 * 9 * cin * c * hw * hw
        params = 9 * cin * c + c
        saved = cin * hw * hw + c * hw * hw  # conv input + ReLU output
        hw_out = hw // 2 if pooled else hw
        out.append((f"conv{len(out)}{'+pool' if pooled else ''}", flops, params, c * hw_out * hw_out, saved))
        cin, hw = c, hw_out
    dims = [cin * hw * hw, 4096, 4096, 1000]
    for j in range(3):
        out.append((f"fc{j}", 2.0 * dims[j] * dims[j + 1], dims[j] * dims[j + 1] + dims[j + 1], dims[j + 1],
                    dims[j] + dims[j + 1]))
    return out


def _resnet50_layers() -> list[tuple[str, float, int, float, float]]:
    """Chain nodes of ResNet-50 v1.5 at 224²: stem, 16 bottleneck blocks, pool + fc."""
    f, p, o = _conv(3, 64, 7, 112)
    out = [("stem", f, p, 64 * 56 * 56, 3 * 224 * 224 + 3 * o)]
    cin, hw = 64, 56
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
        for b in range(blocks):
            stride = 2 if (b == 0 and stage > 0) else 1
            hw_out = hw // stride
            parts = [_conv(cin, width, 1, hw), _conv(width, width, 3, hw_out), _conv(width, 4 * width, 1, hw_out)]
            if b == 0:
                parts.append(_conv(cin, 4 * width, 1, hw_out))
            flops = sum(x[0] for x in parts)
            params = sum(x[1] for x in parts)
            saved = cin * hw * hw + 3 * sum(x[2] for x in parts)  # conv inputs, BN inputs, ReLU outputs
            out.append((f"layer{stage + 1}.{b}", flops, params, 4 * width * hw_out * hw_out, saved))
            cin, hw = 4 * width, hw_out
    out.append(("pool+fc", 2.0 * cin * 1000 + cin * hw * hw, cin * 1000 + 1000, 1000, cin * hw * hw))
    return out


CNN_BUILDERS = {"vgg16": _vgg16_layers, "resnet50": _resnet50_layers}


def cnn_profile(model: str, kind: str = DEFAULT_DEVICE_KIND) -> ModelProfile:
    """The analytic chain profile of a PipeDream-paper CNN (``vgg16``, ``resnet50``) on device ``kind``."""
    try:
        nodes = CNN_BUILDERS[model]()
    except KeyError:
        raise ModelSpecError(f"no analytic CNN {model!r}; known: {', '.join(CNN_BUILDERS)}") from None
    k = device_kind(kind)
    layers = tuple(Layer(n, seconds(fl, k), 2 * seconds(fl, k), 2.0 * act, 2.0 * saved, BYTES_PER_PARAM * params)
                   for n, fl, params, act, saved in nodes)
    return ModelProfile(name=f"{model}-analytic@{k.name}", layers=layers, microbatch_size=1, device=k.name)


def pipedream_profiles_dir() -> Path | None:
    """Where PipeDream's graph.txt profiles are: $PIPETWIN_PIPEDREAM_PROFILES, else shared/data beside the repo."""
    env = os.environ.get("PIPETWIN_PIPEDREAM_PROFILES")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "pipedream_profiles")
    for c in candidates:
        if c.is_dir():
            return c
    return None


def pipedream_profile(model: str, kind: str | None) -> ModelProfile | None:
    """PipeDream's measured profile for ``model`` (None if absent): per sample where its batch size is known,
    times rescaled from the V100 to ``kind`` by achievable FLOP/s."""
    d = pipedream_profiles_dir()
    if d is None or not (d / f"{model}.graph.txt").exists():
        return None
    raw = read_pipedream_graph(d / f"{model}.graph.txt", name=model)
    batch = PIPEDREAM_BATCH.get(model, 1)
    ref, target = device_kind(PIPEDREAM_REFERENCE_KIND), device_kind(kind or PIPEDREAM_REFERENCE_KIND)
    speed = ref.achievable_flops / target.achievable_flops
    # graph.txt bytes are per profiled minibatch; the ModelProfile convention is per sample
    layers = tuple(replace(l, forward_s=l.forward_s * speed, backward_s=l.backward_s * speed,
                           activation_bytes=l.activation_bytes / batch, saved_bytes=l.saved_bytes / batch)
                   for l in raw.layers)
    return replace(raw, name=f"{model}@{target.name}", layers=layers, microbatch_size=batch, device=target.name)


def pipedream_names() -> list[str]:
    """The names of the PipeDream profiles on disk (none when there is no profile folder)."""
    d = pipedream_profiles_dir()
    return sorted(p.name[: -len(".graph.txt")] for p in d.glob("*.graph.txt")) if d else []

