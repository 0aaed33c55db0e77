"""The executor: runs a plan's program for real, one process per worker, with torch.distributed.

Entry points (``from executor import run_plan, ...``; loaded on first use, so
importing one module of the package does not import the others):

* :func:`run_plan` — run a plan on this machine, get a :class:`RunResult`
  (measured trace, final weights, losses).
* :func:`run_program` — run a program (a file from ``pipetwin schedule -o``) exactly as it is, the same way.
* :class:`RunConfig`, :func:`prepare` — a run's settings and the checks made before any process starts.
* :func:`resolve_backend_device` — the one rule turning "auto" into a backend and a device.
* :class:`SavedBytes` — the one saved-tensor counter (bytes autograd keeps for backward).
* :func:`profile_model` — measure a model spec into a ``planner.profile.ModelProfile``.
* :func:`reference_weights` — the single-process reference trainer (parity oracle).
* :class:`ExecutorError`, :class:`WorkerFailed` — bad input, and a worker that failed.

Modules: ``launch`` (local launcher, watchdog), ``worker`` (process entry,
torchrun), ``prepare`` (RunConfig, prepare), ``runtime`` (the action
interpreter), ``versions`` (weight versions and stashing), ``transport``
(point-to-point), ``collectives`` (replica all-reduce), ``memory`` (saved and
held bytes), ``timing``, ``backend`` (backend/device, process group),
``results`` (RunResult, merging), ``faults``, ``checkpoint``, ``models``,
``emulated``, ``profiler``, ``netbench``, ``reference``.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "run_plan": "executor.launch",
    "run_program": "executor.launch",
    "RunResult": "executor.results",
    "RunConfig": "executor.prepare",
    "prepare": "executor.prepare",
    "DTYPES": "executor.prepare",
    "resolve_backend_device": "executor.backend",
    "SavedBytes": "executor.memory",
    "profile_model": "executor.profiler",
    "reference_weights": "executor.reference",
    "ExecutorError": "executor.errors",
    "WorkerFailed": "executor.errors",
    "FAULT_ENV": "executor.faults",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'executor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
