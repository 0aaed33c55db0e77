"""PipeDream-compatible planning: its states, its cost model, its hierarchical optimizer — fast.

Rooms: ``states`` (profile → antichain states), ``reduction`` (the cut-point reduction), ``recurrence``
(one level's dynamic program and its kernels), ``hierarchy`` (levels, stages, ``optimize_pipedream``,
``to_plan``), ``reference`` (brute force: the tests' oracle).

PipeDream's optimizer (``optimizer_graph_hierarchical.py``) turns a model's DAG into a
sequence of *states* (the antichains reachable in topological order), then solves,
level by level of the cluster hierarchy (innermost first), a dynamic program
``A[i][j][m]``: the best bottleneck time of the states ``i..j`` on ``m + 1``
workers of that level. This module reproduces those rules exactly (the same
states, the same arithmetic, the same answers) with vectorised numpy in place
of PipeDream's Python loops:

* one level with ``M`` workers and bandwidth ``B`` (bytes/s); a range of states
  replicated ``m`` ways costs ``(T + 4(m-1)P/(B m) / n_in) / m`` (``n_in``: workers
  per machine of the level below, 1 at the first level);
* a split ``A(i,j,m) = min_{k<j, m'<m} max(A(i,k,m-m'), last, in, out)`` with
  ``last = (T(k+1..j) + 4(m'-1)P(k+1..j)/(B m'))/m'`` and, only with an activation
  compression ratio ``acr``, ``in = 2 a_k/(B m')/acr`` and ``out = 2 a_j/(B m')/acr``
  (no ``out`` for the last state);
* with a memory size, a choice is skipped when ``ceil((M-(m+1))/m') (Act + P)`` of
  its range exceeds it (the base case with ``m' = m+1``);
* the best time of each range on one whole machine of a level is that range's
  compute time at the next level up; replication factors multiply across levels.

How it stays exact and fast (every shortcut drops only candidates that provably
cannot be the minimum, so every cell is the same float PipeDream computes):

* within one m, the columns of ``A[:, :, m]`` depend only on smaller m, so each
  (m, m') is one batch of (min, max) products over all splits (j, k);
* states with the same cumulative figures (they differ by nodes that cost nothing,
  as GNMT's getitem nodes) dominate one another along the DAG: a split after the
  later one is never worse, so the earlier one is dropped (GNMT-16: 283k splits to 57k);
* rows are banded in order of their start's compute; a split is evaluated on a band
  only when its lower bound there is below the band's largest best so far (the m'
  before it tighten the bounds for the m' after it);
* the top level evaluates only predecessor pairs.

Where the antichain count explodes (inception_v3 has 221,564), the states are
reduced to a bounded chain of topological-order cut points and the result says
so (``reduction``).
"""
from planner.pipedream.hierarchy import (PipeDreamResult, PipeDreamStage, optimize_pipedream, pipedream_chain_profile,
                                         to_plan)
from planner.pipedream.reduction import pipedream_states
from planner.pipedream.states import PipeDreamError, States

__all__ = ["PipeDreamError", "States", "PipeDreamStage", "PipeDreamResult", "pipedream_states", "optimize_pipedream",
           "pipedream_chain_profile", "to_plan"]
