"""Device memory along a worker's action list: what each action allocates and frees.

The accounting itself is ``planner.stagememory``'s, the one the cost model charges a plan by, so that
``pipetwin simulate`` and ``pipetwin plan``/``whatif`` weigh a stage from the same figures; the simulator
reads it from here (``sim.engine``) and stamps times on the levels it returns.
"""
from __future__ import annotations

from planner.stagememory import (RECV_LOOKAHEAD, StageBytes, fsdp_transients, fsdp_units, memory_levels,
                                 memory_marks, round_function, stage_bytes)

__all__ = ["RECV_LOOKAHEAD", "StageBytes", "fsdp_transients", "fsdp_units", "memory_levels", "memory_marks",
           "round_function", "stage_bytes"]
