"""Speed-ups that must not change a result: each fast path against the plain definition it replaces.

* ``check._round_microbatches`` (the microbatches an update point covers) against the definition: every
  microbatch of the round that round robin puts on the worker, ``worker_of`` asked per microbatch;
* ``schedules._replica_mbs`` (a replica's microbatches of a range) against the filter i mod r == replica;
* ``planner.trace``'s one-pass ``span_s`` / ``busy_s`` / ``throughput_samples_per_s`` against the plain
  min / max / ``sum`` / parse-every-event formulas, bit for bit (floats compared with ==, types too), on
  random traces with ties, int times, idle workers, link lanes and every stage's backwards.
"""
from __future__ import annotations

import math
import random

import pytest

from planner.check import _round_microbatches
from planner.lowering import tensor_expand
from planner.program import FAMILIES, FAMILY, Action, Kind, ScheduleError, chunks_for
from planner.schedules import REQUIRES, _replica_mbs, generate, make_spec
from planner.trace import Event, Trace, busy_s, span_s, throughput_samples_per_s, worker_events


def _programs():
    for name in FAMILIES:
        fam = FAMILY[name]
        V = chunks_for(name, 2) if fam.multi_stage else 1
        for P, M, reps, batches in ((3, 7, (2, 3, 1), 2), (2, 6, (3, 2), 3), (4, 8, (1, 2, 4, 1), 1), (3, 5, (2, 1, 1), 1)):
            if fam.multi_stage:
                reps = (reps[0],) * (P * V) if fam.replicable else (1,) * (P * V)
            elif not fam.replicable:
                reps = (1,) * P
            try:
                spec = make_spec(name, P, M, reps, chunks=V, batches=batches if fam.batched else 1)
                REQUIRES.get(name, lambda s: None)(spec)
                prog = generate(spec)
            except ScheduleError:
                continue
            yield name, prog
            if not fam.multi_stage:
                yield name + "/tp2", tensor_expand(prog, 2)


@pytest.mark.parametrize("name,prog", list(_programs()), ids=lambda x: x if isinstance(x, str) else "")
def test_round_microbatches_equals_round_robin_definition(name, prog):
    N, M = prog.spec.total_microbatches, prog.spec.microbatches
    rounds = (N // M + 1) if prog.spec.traits.batched else N + 1
    checked = 0
    for s, ws in enumerate(prog.stage_workers):
        others = [max(prog.workers) + 1] if prog.spec.traits.batched else []  # and a worker that holds none of it
        for w in list(ws) + others:  # every worker of the stage, TP ranks above 0 included
            for k in range(rounds + 1):
                got = _round_microbatches(prog, s, k, w)
                if prog.spec.traits.batched:
                    want = [i for i in range(k * M, min(k * M + M, N)) if prog.worker_of(s, i) == w]
                    assert got == want, (s, k, w)
                    checked += len(want)
    assert not prog.spec.traits.batched or checked == N * len(prog.stage_workers)


def test_replica_microbatches_equal_round_robin_filter():
    for r in range(1, 7):
        for rep in range(r):
            for lo in range(0, 9):
                for hi in range(lo, 20):
                    assert _replica_mbs(r, rep, range(lo, hi)) == [i for i in range(lo, hi) if i % r == rep]


def _plain_span(trace):
    evs = [e for e in trace.events if isinstance(e.lane, int)]
    if not evs:
        return (0.0, 0.0)
    return (min(e.start_s for e in evs), max(e.end_s for e in evs))


def _plain_busy(trace):
    return {w: sum(e.duration_s for e in evs if e.is_compute) for w, evs in sorted(worker_events(trace).items())}


def _plain_finished(trace):
    finished = {}
    for e in trace.events:
        if isinstance(e.lane, int) and e.kind in ("B", "BW"):
            a = Action.parse(e.action)
            if a.stage == 0 and e.end_s > finished.get(a.mb, -math.inf):
                finished[a.mb] = e.end_s
    return sorted(finished.values())


def _random_trace(rng: random.Random) -> Trace:
    tr = Trace(meta={"family": rng.choice(["1f1b", "2bw", "gpipe"]), "microbatch_size": 1})
    kinds = ["F", "B", "BI", "BW", "SEND", "RECV", "ALLREDUCE", "STEP"]
    grid = [0, 0.0, 1, 0.5, 1.5, 2.0, 3, 0.1 + 0.2, 0.3]  # ties, ints beside floats, inexact sums
    for _ in range(rng.randrange(0, 60)):
        if rng.random() < 0.15:
            tr.events.append(Event(f"d{rng.randrange(3)}->d{rng.randrange(3)}", "x", rng.choice(grid), rng.choice(grid) + 9, "", 4))
            continue
        w, k, s, mb = rng.randrange(5), rng.choice(kinds), rng.choice([0, 0, 1, 10, 2]), rng.randrange(6)
        a = Action(s, Kind(k), mb, rng.randrange(2), peer=1 if k in ("SEND", "RECV") else None)
        t0 = rng.choice(grid) * rng.choice([1, 1e-3, 7])
        tr.events.append(Event(w, str(a), t0, t0 + rng.choice(grid), k, 0))
    return tr


def test_trace_metrics_one_pass_equal_plain_formulas_bit_for_bit():
    rng = random.Random(7)
    for _ in range(3000):
        tr = _random_trace(rng)
        got, want = span_s(tr), _plain_span(tr)
        assert got == want and [type(x) for x in got] == [type(x) for x in want]
        got_b, want_b = busy_s(tr), _plain_busy(tr)
        assert list(got_b) == list(want_b)
        assert all(got_b[w] == want_b[w] and type(got_b[w]) is type(want_b[w]) for w in want_b)
        done = _plain_finished(tr)
        thr = throughput_samples_per_s(tr, exclude_warmup=False)
        start = want[0]
        plain = len(done) / (done[-1] - start) if done and done[-1] - start > 0 else 0.0
        assert thr == plain
