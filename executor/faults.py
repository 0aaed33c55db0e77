"""Injected faults: ``PIPETWIN_FAULT="RANK:ACTION:MODE"`` makes one worker fail at one action (tests use it).

MODE is one of ``raise`` (an exception in the action), ``exit`` (the process
exits with code 3), ``kill`` (SIGKILL) or ``hang`` (sleeps forever, so its
peers time out).
"""
from __future__ import annotations

import os
import signal
import time
from typing import Sequence

from planner.program import Action

FAULT_ENV = "PIPETWIN_FAULT"


def fault_at(acts: Sequence[Action], rank: int) -> tuple[int | None, str | None]:
    """(action index, mode) of the fault the environment injects into ``rank``, or (None, None)."""
    text = os.environ.get(FAULT_ENV, "")
    if not text:
        return None, None
    try:
        r, act, mode = text.split(":")
    except ValueError:
        return None, None
    if int(r) != rank:
        return None, None
    for i, a in enumerate(acts):
        if str(a) == act:
            return i, mode
    return None, None


def inject(mode: str) -> None:
    """Fail the calling worker as ``mode`` says."""
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "exit":
        os._exit(3)
    if mode == "hang":
        while True:
            time.sleep(3600)
    raise RuntimeError(f"injected fault ({FAULT_ENV})")
