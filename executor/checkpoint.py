"""Checkpoints: each stage's weights, optimizer state and version counter, every N optimizer steps.

Layout: ``DIR/step{k}/stage{s}.pt``, one file per stage, written by replica 0
of the stage right after its k-th optimizer step (atomically: a temporary file
then a rename). A step is *complete* when every stage's file exists; resuming
starts from the newest complete step, so a run killed while writing one resumes
from the step before.

Checkpoints are taken at flush boundaries, where no microbatch is in flight,
so a resumed run is the same computation as an uninterrupted one: with SGD's
momentum buffer, which a file keeps beside the weights (``optimizer``:
``{"kind": "momentum", "lr", "momentum", "state": {param: buffer}}``; plain SGD
``{"kind": "sgd", "lr", "state": {}}``, as every file written before the
executor's SGD had momentum). A resume checks every stage's file holds the state
of the optimizer the run steps with (:func:`check_optimizer`) and refuses in one
line otherwise: resuming a momentum run from a file without its buffer (or a
plain one from a file with it) would not be the uninterrupted run. PipeDream and
2BW keep minibatches in flight across steps; their runs cannot be checkpointed
mid-stream (the launcher says so).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from executor.errors import ExecutorError
from topologies.files import output_path

_STEP_RE = re.compile(r"^step(\d+)$")


def stage_path(directory: str | Path, step: int, stage: int) -> Path:
    return Path(directory) / f"step{step}" / f"stage{stage}.pt"


def save_stage(directory: str | Path, step: int, stage: int, weights: dict[str, torch.Tensor], *,
               model: str, layers: tuple[int, int], family: str, lr: float,
               momentum_buffers: dict[str, torch.Tensor] | None = None, momentum: float = 0.0) -> Path:
    """Write one stage's state after its ``step``-th optimizer step (version ``step``): its weights and, for SGD
    with ``momentum``, the momentum buffer by parameter name (None: plain SGD)."""
    path = stage_path(directory, step, stage)
    output_path(path)
    doc = {
        "stage": stage,
        "version": step,
        "weights": {k: v.detach().cpu().clone() for k, v in weights.items()},
        "optimizer": ({"kind": "sgd", "lr": lr, "state": {}} if momentum_buffers is None else
                      {"kind": "momentum", "lr": lr, "momentum": float(momentum),
                       "state": {k: v.detach().cpu().clone() for k, v in momentum_buffers.items()}}),
        "model": model,
        "layers": list(layers),
        "family": family,
    }
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(doc, tmp)
    os.replace(tmp, path)
    return path


def latest_complete_step(directory: str | Path, num_stages: int) -> int | None:
    """The newest step for which every stage 0..num_stages-1 has a file, or None."""
    d = Path(directory)
    if not d.is_dir():
        return None
    steps = sorted((int(m.group(1)) for p in d.iterdir() if (m := _STEP_RE.match(p.name))), reverse=True)
    for k in steps:
        if all(stage_path(d, k, s).is_file() for s in range(num_stages)):
            return k
    return None


def load_stage(directory: str | Path, step: int, stage: int, *, model: str, layers: tuple[int, int]) -> dict:
    """Read one stage's state, checking it was written for this model and partition."""
    path = stage_path(directory, step, stage)
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
        raise ExecutorError(f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {e}); "
                            f"delete the step{step} folder to resume from an earlier step") from None
    if doc.get("model") != model or tuple(doc.get("layers", ())) != tuple(layers):
        raise ExecutorError(f"checkpoint {str(path)!r} holds layers {doc.get('layers')} of model {doc.get('model')!r}, "
                            f"but the plan's stage {stage} is layers {list(layers)} of {model!r}; "
                            f"use a fresh --checkpoint-dir or the plan it was written with")
    return doc


def _kind(doc: dict) -> str:
    opt = doc.get("optimizer")
    return opt.get("kind", "sgd") if isinstance(opt, dict) else "sgd"


def check_optimizer(directory: str | Path, step: int, layers: list[tuple[int, int]], *, model: str,
                    optimizer: str) -> None:
    """Every stage's file of ``step`` holds the state of the executor's ``optimizer`` ("momentum": a buffer for each
    weight; "sgd": none), else one line saying how to resume it."""
    for s, lay in enumerate(layers):
        doc = load_stage(directory, step, s, model=model, layers=lay)
        kind, path = _kind(doc), str(stage_path(directory, step, s))
        if optimizer == "momentum" and kind != "momentum":
            raise ExecutorError(f"checkpoint {path!r} was written by plain SGD (no momentum buffer, as every "
                                f"checkpoint from before the executor's SGD had momentum); resume it with --optimizer "
                                f"none, or use a fresh --checkpoint-dir")
        if optimizer == "sgd" and kind != "sgd":
            raise ExecutorError(f"checkpoint {path!r} holds SGD momentum buffers; resume it with --optimizer sgd, or "
                                f"use a fresh --checkpoint-dir")
        if kind == "momentum" and set(doc["optimizer"].get("state", {})) != set(doc.get("weights", {})):
            raise ExecutorError(f"checkpoint {path!r} lacks the momentum buffer of some weights; delete the step{step} "
                                f"folder to resume from an earlier step")
