"""The cut-point reduction: where PipeDream's antichains are too many, a bounded chain of topological-order cuts;
and ``pipedream_states``, which picks PipeDream's full states or the reduction."""
from __future__ import annotations

import numpy as np

from planner.pipedream.states import (States, _bits, _clean_dag, _Dag, _extras_function, _figures, _full_states,
                                      _TooManyStates)
from planner.profile import ModelProfile

#: The most states a reduced (cut-point) state chain keeps.
REDUCED_STATES_CAP = 160


def _prefix_states(dag: _Dag, cap: int, why: str) -> States:
    """A bounded chain of states: prefixes of the topological order, kept at least-crossing cut points.

    Every prefix of a topological order is a down-set, so each kept prefix is one of PipeDream's states
    (its antichain is the prefix's maximal nodes, augmented as PipeDream augments); the plan is the
    optimum over those cuts. It is not a bound on PipeDream's optimum in either direction: on GNMT-16
    8x8 the cut-point figure (0.016497 s) lies below PipeDream's exact 0.017779 s, so the costs of a
    cut here and of PipeDream's state for it differ somewhere (not yet pinned down).
    """
    live = list(dag.alive)
    n = len(live)
    pos = {v: i for i, v in enumerate(live)}
    first_use = [min((pos[o] for o in dag.out[v]), default=n) for v in live]
    last_use = [max((pos[o] for o in dag.out[v]), default=-1) for v in live]
    extras = _extras_function(dag)
    prefix_masks, aug_lists = [], []
    open_count = np.zeros(n + 1, dtype=int)  # nodes before position i still feeding a node after it
    mask = 0
    maximal: list[int] = []
    for i, v in enumerate(live):
        mask |= 1 << v
        prefix_masks.append(mask)
        maximal = [u for u in maximal if first_use[pos[u]] > i] + [v]
        e = 0
        for a in maximal:
            e |= extras(a)
        aug_lists.append(_bits(e) + maximal)
        if last_use[i] > i:
            open_count[i + 1] += 1
            open_count[last_use[i]] -= 1
    open_before = np.cumsum(open_count)[:n]  # open nodes strictly before position i, at the cut after i
    single = [i for i in range(n) if open_before[i] == 0]
    if n <= cap:
        keep = list(range(n))
        how = f"all {n} prefixes of a topological order"
    else:
        members_comp = np.cumsum([dag.compute_s[v] for v in live])
        oact = np.array([sum(dag.act[v] for v in aug) for aug in aug_lists])
        keep_set = {n - 1}
        if len(single) <= cap // 2:
            keep_set.update(single)
        buckets = cap - len(keep_set)
        total = members_comp[-1] if members_comp[-1] > 0 else 1.0
        edges = np.linspace(0.0, total, buckets + 1)
        b_of = np.minimum(np.searchsorted(edges, members_comp, side="right") - 1, buckets - 1)
        for b in range(buckets):
            idx = np.nonzero(b_of == b)[0]
            idx = [i for i in idx if i not in keep_set]
            if idx:
                keep_set.add(min(idx, key=lambda i: (oact[i], -i)))
        keep = sorted(keep_set)[-cap:] if len(keep_set) > cap else sorted(keep_set)
        n_single = len(set(keep) & set(single))
        how = (f"{len(keep)} cut points of a topological order, "
               + ("all single-node cuts, one per compute bucket with the least crossing activation"
                  if n_single == len(keep) else
                  f"{n_single} single-node cuts and the least-crossing cut of each compute bucket"))
    member_masks = [prefix_masks[i] for i in keep]
    outputs = [aug_lists[i] for i in keep]
    members, comp, act, par, oact = _figures(dag, member_masks, outputs)
    k = len(keep)
    return States(
        node_ids=dag.ids,
        antichains=tuple(tuple(outputs[s]) for s in range(k)),
        members=tuple(members),
        compute_s=comp,
        activation_bytes=act,
        param_bytes=par,
        output_activation_bytes=oact,
        preds=tuple(tuple(range(s)) for s in range(k)),
        reduction="cut-points",
        message=f"{why}; planned over {how}: optimal within those cuts, not PipeDream's exact state set (its figure may differ either way)",
        full_count=None,
    )


def pipedream_states(profile: ModelProfile, max_states: int = 20000) -> States:
    """PipeDream's states of ``profile`` (its antichain DAG in its topological order).

    Past ``max_states`` antichains the states are reduced to at most ``REDUCED_STATES_CAP``
    topological-order cut points and ``States.reduction`` says so.
    """
    dag = _clean_dag(profile)
    try:
        return _full_states(dag, max_states)
    except _TooManyStates:
        why = f"{profile.name}: more than {max_states:,} antichains (the cap)"
        return _prefix_states(dag, REDUCED_STATES_CAP, why)
