"""Device memory along a worker's action list: what each action allocates and frees.

What is held depends only on the order of a worker's actions, not on their
timing, so the level before and after every action is computed up front and the
simulator only stamps times on it:

- static: weights + gradients + optimizer state (``optimizer_state_factor`` × parameters) of every stage held;
- stashed weight versions: every distinct version used by an in-flight
  microbatch other than the current one costs another copy of the stage's weights;
- activations: saved bytes × microbatch size from a forward's start until its
  backward (BW when split) ends;
- receive buffers: a received payload from its RECV's end until the end of the
  compute action that consumes it.
"""
from __future__ import annotations

from operator import attrgetter

from planner.program import Action, Kind

_F, _B, _BI, _BW, _RECV, _STEP = Kind.F, Kind.B, Kind.BI, Kind.BW, Kind.RECV, Kind.STEP
_nbytes = attrgetter("nbytes")


class _Versions:
    """The weight versions a stage holds: the current one and those of in-flight microbatches."""

    __slots__ = ("current", "used", "of_mb")

    def __init__(self) -> None:
        self.current = 0
        self.used: dict[int, int] = {}   # version -> in-flight microbatches using it
        self.of_mb: dict[int, int] = {}

    def extra(self) -> int:
        """Copies held beyond the current weights."""
        return len(self.used) - (1 if self.current in self.used else 0)


def memory_levels(actions: list[Action], param_bytes: dict[int, float], saved_bytes: dict[int, float],
                  optimizer_state_factor: float) -> tuple[float, list[tuple[float, float]]]:
    """(static bytes, [(level after the action starts, level after it ends)] per action).

    ``param_bytes``/``saved_bytes``: per stage the worker holds; saved bytes per microbatch.
    """
    static = sum(p * (2.0 + optimizer_state_factor) for p in param_bytes.values())
    versions = {s: _Versions() for s in param_bytes}
    buffers: dict[tuple, float] = {}
    dynamic = 0.0
    out: list[tuple[float, float]] = []
    for a in actions:
        k, s = a.kind, a.stage
        start = dynamic
        if k is _F:
            v = versions[s]
            before = v.extra()
            v.of_mb[a.mb] = a.version
            v.used[a.version] = v.used.get(a.version, 0) + 1
            dynamic += saved_bytes[s] + (v.extra() - before) * param_bytes[s]
            start = dynamic
            dynamic -= buffers.pop((0, s, a.mb), 0.0)
        elif k is _B or k is _BW:
            v = versions[s]
            before = v.extra()
            ver = v.of_mb.pop(a.mb, None)
            if ver is not None:
                n = v.used[ver] - 1
                if n:
                    v.used[ver] = n
                else:
                    del v.used[ver]
            dynamic += (v.extra() - before) * param_bytes[s] - saved_bytes[s]
            if k is _B:
                dynamic -= buffers.pop((1, s, a.mb), 0.0)
        elif k is _BI:
            dynamic -= buffers.pop((1, s, a.mb), 0.0)
        elif k is _STEP:
            v = versions[s]
            before = v.extra()
            v.current = a.version
            dynamic += (v.extra() - before) * param_bytes[s]
        elif k is _RECV and a.nbytes:
            key = (1 if a.grad else 0, s, a.mb)  # 0: input of F, 1: input of B/BI
            buffers[key] = buffers.get(key, 0.0) + a.nbytes
            dynamic += a.nbytes
        out.append((static + start, static + dynamic))
    return static, out


def memory_marks(actions: list[Action], param_bytes: dict[int, float], saved_bytes: dict[int, float],
                 optimizer_state_factor: float) -> tuple[float, list[tuple[float | None, float | None]] | None]:
    """(static bytes, [(new level at the action's start, new level at its end)] per action).

    The samples a worker's memory track needs, starting from ``static`` at time 0: an
    entry is None where the level does not change. Marks are None when nothing
    ever changes (no parameters, saved activations or received payloads).
    """
    if not any(param_bytes.values()) and not any(saved_bytes.values()) and not any(map(_nbytes, actions)):
        # every level is static + 0.0 == static: versions, activations and buffers all weigh 0
        return sum(p * (2.0 + optimizer_state_factor) for p in param_bytes.values()), None
    static, levels = memory_levels(actions, param_bytes, saved_bytes, optimizer_state_factor)
    marks = []
    cur = static
    for m0, m1 in levels:
        if m0 != cur:
            cur = ms = m0
        else:
            ms = None
        if m1 != cur:
            cur = me = m1
        else:
            me = None
        marks.append((ms, me))
    return static, marks
