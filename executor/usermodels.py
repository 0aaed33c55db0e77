"""User models: ``package.module:function`` or ``path/to/file.py:function``, with the optional
``NAME_batch``, ``NAME_input_shape`` and ``NAME_loss`` beside it (the contract: :mod:`executor.models`).

A module is imported once per path (file modules under a name derived from the path); every failure is one
``ModelSpecError`` naming the spec and what to define or fix.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from executor.modelspec import ModelSpec, parse_spec
from planner.profile import ModelSpecError


def user_module(ms: ModelSpec):
    return _import_target(ms.get("target"), ms.text)


@functools.lru_cache(maxsize=64)
def _import_target(target: str, text: str):
    if target.endswith(".py") or "/" in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ModelSpecError(f"model {text!r}: no file {str(path)!r}")
        name = "pipetwin_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ModelSpecError(f"model {text!r}: cannot import {str(path)!r} as Python")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise ModelSpecError(f"model {text!r}: importing {str(path)!r} failed: {type(e).__name__}: {e}") from None
        return module
    try:
        return importlib.import_module(target)
    except ImportError as e:
        raise ModelSpecError(f"model {text!r}: cannot import module {target!r} ({e}); "
                             f"check the name or use path/to/file.py:function") from None


def _user_function(ms: ModelSpec, suffix: str = ""):
    module = user_module(ms)
    name = ms.get("function") + suffix
    return getattr(module, name, None)


def user_layers(ms: ModelSpec, seed: int) -> list[nn.Module]:
    fn = _user_function(ms)
    if not callable(fn):
        raise ModelSpecError(f"model {ms.text!r}: {ms.get('target')} has no function {ms.get('function')!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = fn()
    if isinstance(model, nn.Sequential):
        layers = list(model.children())
    elif isinstance(model, (list, tuple)):
        layers = list(model)
    else:
        raise ModelSpecError(f"model {ms.text!r}: {ms.get('function')}() must return nn.Sequential or a list of "
                             f"modules, got {type(model).__name__}")
    if not layers or not all(isinstance(m, nn.Module) for m in layers):
        raise ModelSpecError(f"model {ms.text!r}: {ms.get('function')}() returned no layers or a non-module")
    return layers


def user_batch(ms: ModelSpec, mb: int, index: int, seed: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    batch_fn = _user_function(ms, "_batch")
    if callable(batch_fn):
        out = batch_fn(mb, index, seed)
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, Tensor) for t in out)):
            raise ModelSpecError(f"model {ms.text!r}: {ms.get('function')}_batch must return (input, target) tensors")
        return out[0], out[1]
    shape = _user_function(ms, "_input_shape")
    if callable(shape):
        shape = shape()
    if shape is None:
        fn = ms.get("function")
        raise ModelSpecError(f"model {ms.text!r}: define {fn}_batch(microbatch_size, index, seed) or "
                             f"{fn}_input_shape (per-sample shape) next to {fn}")
    try:
        per_sample = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ModelSpecError(f"model {ms.text!r}: {ms.get('function')}_input_shape must be a tuple of ints") from None
    x = torch.randn((mb, *per_sample), generator=g)
    out_shape = _user_output_shape(ms.text, per_sample)
    return x, torch.randn((mb, *out_shape), generator=g)


@functools.lru_cache(maxsize=32)
def _user_output_shape(spec: str, per_sample: tuple[int, ...]) -> tuple[int, ...]:
    """Per-sample output shape of a user model, found by one no-grad forward pass of a 1-sample input."""
    x = torch.zeros((1, *per_sample))
    with torch.no_grad():
        for layer in user_layers(parse_spec(spec), 0):
            x = layer(x)
    return tuple(x.shape[1:])

