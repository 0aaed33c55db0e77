"""The model spec grammar: ``kind:key=value,...`` (or ``module:function``) parsed into a ``ModelSpec``.

``KINDS`` names each built-in model's parameters with their types and defaults, ``BLOCK_ATTENTION`` the
attention kernel each transformer block runs; a bad spec is one ``ModelSpecError`` naming the problem and
the known models (what each spec builds: :mod:`executor.models`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from planner.profile import ModelSpecError


# kind -> {key: (type, default)}
KINDS: dict[str, dict[str, tuple[type, object]]] = {
    "mlp": {"layers": (int, 8), "width": (int, 512)},
    "gpt": {"layers": (int, 4), "hidden": (int, 256), "heads": (int, 4), "seq": (int, 128), "vocab": (int, 512)},
    "llama": {"layers": (int, 4), "hidden": (int, 256), "heads": (int, 4), "kv_heads": (int, 0), "ffn": (int, 0),
              "seq": (int, 128), "vocab": (int, 512)},
    "cnn": {"blocks": (int, 4), "channels": (int, 32), "size": (int, 32), "classes": (int, 10)},
    "uniform": {"layers": (int, 8), "fwd": (float, 1e-3), "bwd": (float, None), "act": (float, 0.0),
                "params": (float, 0.0), "saved": (float, None)},
}
_MINIMUM = {"saved": 0.0, "layers": 1, "width": 1, "hidden": 1, "heads": 1, "seq": 1, "vocab": 2, "kv_heads": 0,
            "ffn": 0, "blocks": 0,
            "channels": 1, "size": 1, "classes": 2, "fwd": 0.0, "bwd": 0.0, "act": 0.0, "params": 0.0}
#: The attention kernel each transformer block of the zoo runs, as ``planner.analytic``'s ``attention=`` key names
#: it: the gpt block an explicit masked softmax (unfused), the llama block ``scaled_dot_product_attention`` (flash).
#: A spec may name it (one string for ``simulate`` and ``run``); naming the other kernel is refused.
BLOCK_ATTENTION = {"gpt": "unfused", "llama": "flash"}
_HELP = "known models: " + "; ".join(
    f"{k}:" + ",".join(f"{p}={d if d is not None else {'bwd': '2*fwd', 'saved': 'act'}[p]}" for p, (_, d) in v.items())
    for k, v in KINDS.items()
) + "; or package.module:function / path/to/file.py:function"


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec: ``kind`` is a built-in name or ``"user"``; ``params`` the resolved parameters.

    For a user model, ``params`` holds ``target`` (module path or file path) and ``function``.
    """

    kind: str
    params: tuple[tuple[str, object], ...]
    text: str

    def get(self, key: str):
        return dict(self.params)[key]

    @property
    def name(self) -> str:
        if self.kind == "user":
            return f"{self.get('target')}:{self.get('function')}"
        return self.kind + ":" + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in self.params if v is not None)


@functools.lru_cache(maxsize=256)
def parse_spec(spec: str) -> ModelSpec:
    """Parse a model spec; raises :class:`ModelSpecError` naming the problem and the known models."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"empty model spec ({_HELP})")
    text = spec.strip()
    head, _, body = text.partition(":")
    head = head.strip()
    if head in KINDS:
        return _parse_builtin(head, body, text)
    if body and (head.endswith(".py") or "/" in head or "." in head):
        fn = body.strip()
        if not fn.isidentifier():
            raise ModelSpecError(f"model {text!r}: {fn!r} is not a function name (use module.path:function)")
        return ModelSpec("user", (("target", head), ("function", fn)), text)
    raise ModelSpecError(f"unknown model {text!r} ({_HELP})")


def _parse_builtin(kind: str, body: str, text: str) -> ModelSpec:
    keys = KINDS[kind]
    values: dict[str, object] = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        if "=" not in part:
            raise ModelSpecError(f"model {text!r}: {part!r} is not key=value (keys for {kind}: {', '.join(keys)})")
        k, v = (s.strip() for s in part.split("=", 1))
        if k == "attention" and kind in BLOCK_ATTENTION:
            if v != BLOCK_ATTENTION[kind]:
                raise ModelSpecError(f"model {text!r}: the executor's {kind} block runs attention="
                                     f"{BLOCK_ATTENTION[kind]}, not attention={v}; drop the key (simulate and plan "
                                     f"cost any kernel)")
            continue
        if k not in keys:
            raise ModelSpecError(f"model {text!r}: unknown parameter {k!r} (keys for {kind}: {', '.join(keys)})")
        typ = keys[k][0]
        try:
            x = float(v)
            if typ is int:
                if not x.is_integer():
                    raise ValueError
                x = int(x)
        except ValueError:
            want = "an integer" if typ is int else "a number"
            raise ModelSpecError(f"model {text!r}: {k}={v!r} is not {want}") from None
        if not math.isfinite(x) or x < _MINIMUM[k]:
            raise ModelSpecError(f"model {text!r}: {k}={v} must be >= {_MINIMUM[k]}")
        values[k] = x
    for k, (typ, default) in keys.items():
        if k not in values:
            values[k] = default
    if kind == "uniform" and values["bwd"] is None:
        values["bwd"] = 2 * float(values["fwd"])
    if kind in ("gpt", "llama") and values["hidden"] % values["heads"]:
        raise ModelSpecError(f"model {text!r}: hidden={values['hidden']} must be a multiple of heads={values['heads']}")
    if kind == "llama":
        values["kv_heads"] = values["kv_heads"] or values["heads"]
        values["ffn"] = values["ffn"] or 4 * values["hidden"]
        if values["heads"] % values["kv_heads"]:
            raise ModelSpecError(f"model {text!r}: kv_heads={values['kv_heads']} must divide heads={values['heads']} "
                                 f"(each key/value head serves heads/kv_heads query heads)")
        if (values["hidden"] // values["heads"]) % 2:
            raise ModelSpecError(f"model {text!r}: the head size hidden/heads = {values['hidden'] // values['heads']} "
                                 f"must be even (rotary embedding turns pairs of features); change hidden or heads")
    return ModelSpec(kind, tuple((k, values[k]) for k in keys), text)
