"""Unit-cost makespan of every schedule family against its closed form and against torch's own schedules.

For P in {2, 4, 8, 16} and M in {P, 2P, 4P, 3P+1}, at tF = 1, tB = 2 (tBI = tBW = 1; a chunk
of a multi-stage placement costs 1/V of these), the dry run's makespan of:

* pipetwin's generated program (``ours``),
* the published or derived closed form where one exists (``closed``; '-' where none):
  GPipe/1F1B (M + P − 1)·3; interleaved 3M + 3(P − 1)/V when P divides M; ZB-H1 3M + P − 1;
  ZB-H2 one batch 3M + P − 1 (batch after batch 3M once M ≥ 2P − 1, column ``steady``);
  ZB-V 3M + (P − 1)/2 once M ≥ 2P; looped BFS 3M + 3(P − 1)/V once M ≥ P; interleaved zero
  bubble 3M + (P − 1)/V once M ≥ P; DualPipeV 3M + (P − 1)/2 (it needs M ≥ 2P: ``refused``
  below; DeepSeek's published (P − 1)(F&B + B − 3W) over 2P chunks gives this figure when the
  F&B pair takes B, i.e. the forward hidden under the backward; pipetwin runs the pair in order),
  V-Half 3M + (3P − 4)/2 and V-Min 3M + 2P − 5/2 (+1 when 3 divides P > 3) once M ≥ P (derived here),
* torch's schedule of the same family imported into pipetwin and dry-run the same way
  (``torch``), and torch's own timer (``torch steps``: ``_simulate_comms_compute``'s step
  count, where every action, SEND and RECV included, takes one step: a different cost
  model, printed for reference; DualPipeV's OVERLAP_F_B counted as its F then its B), and
  the same timer on pipetwin's program exported and lowered by torch (``ours steps``: equal
  compute orders can still differ by a step or two, from where torch's lowering puts sends
  around its idle cells and its overlapped pairs).

Run: ``PYTHONPATH=. python benchmarks/bench_schedules.py``.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.check import UnitCosts, dry_run  # noqa: E402
from planner.families import ScheduleError  # noqa: E402
from planner.schedules import generate, make_spec  # noqa: E402
from planner.torch_interop import program_from_torch, read_torch_csv  # noqa: E402
from planner.trace import makespan_s, time_per_batch_s  # noqa: E402

U = UnitCosts(f=1, b=2, bi=1, bw=1)
V = 2


def closed_form(family: str, P: int, M: int) -> float | None:
    if family in ("gpipe", "1f1b"):
        return (M + P - 1) * 3.0
    if family == "interleaved":
        return 3 * M + 3 * (P - 1) / V if M % P == 0 else None
    if family in ("zb-h1", "zb-h2"):
        return 3 * M + P - 1.0
    if family == "zb-v":
        return 3 * M + (P - 1) / 2 if M >= 2 * P else None
    if family == "looped-bfs":
        return 3 * M + 3 * (P - 1) / V if M >= P else None
    if family == "v-half" and M >= P:  # derived: tests/test_family_v_half.py
        return 3 * M + ((3 * P - 4) / 2 if P >= 3 else 1.5 * (P - 1))
    if family == "v-min" and M >= P:  # derived: tests/test_family_v_min.py
        return 3 * M + (0.0 if P == 1 else 2 * P - 2.5 + (1.0 if P % 3 == 0 and P > 3 else 0.0))
    if family == "interleaved-zb":
        return 3 * M + (P - 1) / V if M >= P else None
    if family == "dualpipe-v":
        return 3 * M + (P - 1) / 2 if M >= 2 * P else None
    return None


TORCH_OF = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": "Interleaved1F1B", "zb-v": "ZBVZeroBubble",
            "looped-bfs": "LoopedBFS", "interleaved-zb": "InterleavedZeroBubble", "dualpipe-v": "DualPipeV"}
TORCH_ONLY: list[str] = []  # torch's schedules pipetwin has no generator for, imported and dry-run


def _torch(name: str, P: int, M: int):
    """(our dry run of torch's program, torch's step count), or a reason string."""
    try:
        from tests.torch_schedules import order_csv, torch_schedule, torch_steps
    except ImportError:
        return "no torch", ""
    try:
        sch = torch_schedule(name, P, M, V)
    except ValueError as e:  # torch refuses the size (e.g. DualPipeV with M < 2P)
        return "refused", str(e).split(",")[0][:20]
    if sch is None:
        return "absent", ""
    try:
        prog = program_from_torch(read_torch_csv(order_csv(sch.pipeline_order)))
        ours = f"{makespan_s(dry_run(prog, U)):g}"
    except ValueError as e:
        ours = "invalid IR"
    try:
        steps = torch_steps(sch, len(sch.stage_index_to_group_rank) or P) if hasattr(sch, "pipeline_order_with_comms") else "-"
    except Exception:  # torch's timer stops on some of its own programs
        steps = "stops"
    return ours, steps


def _our_steps(prog) -> str:
    """torch's step timer on pipetwin's program (its compute order lowered by torch), or why not."""
    try:
        from tests.torch_schedules import torch_steps_of
    except ImportError:
        return "-"
    try:
        return str(torch_steps_of(prog))
    except Exception:  # torch's timer stops
        return "stops"


def fmt(x) -> str:
    return "-" if x is None else f"{x:g}" if isinstance(x, float) else str(x)


def main() -> None:
    families = ["gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2", "zb-v", "v-half", "v-min", "looped-bfs", "interleaved-zb",
                "dualpipe-v"]
    print(f"{'family':<24} {'P':>3} {'M':>4} {'ours':>8} {'closed':>8} {'steady':>7} {'torch':>10} {'torch steps':>11} "
          f"{'ours steps':>10}")
    for P in (2, 4, 8, 16):
        for M in (P, 2 * P, 4 * P, 3 * P + 1):
            for fam in families:
                try:
                    prog = generate(make_spec(fam, P, M, chunks=V if fam in ("interleaved", "looped-bfs", "interleaved-zb") else 1))
                except ScheduleError:  # DualPipeV needs M >= 2P (torch's too)
                    print(f"{fam:<24} {P:>3} {M:>4} {'refused':>8}")
                    continue
                ours = makespan_s(dry_run(prog, U))
                steady = None
                if fam == "zb-h2":
                    steady = time_per_batch_s(dry_run(generate(make_spec(fam, P, M, batches=3)), U))
                t_ours, t_steps = _torch(TORCH_OF[fam], P, M) if fam in TORCH_OF else ("-", "-")
                cf = closed_form(fam, P, M)
                mark = "" if cf is None or abs(cf - ours) < 1e-9 else "  <- differs"
                mine = _our_steps(prog) if fam in TORCH_OF else "-"
                print(f"{fam:<24} {P:>3} {M:>4} {ours:>8g} {fmt(cf):>8} {fmt(steady):>7} {t_ours:>10} {fmt(t_steps):>11} "
                      f"{mine:>10}{mark}")
            for name in TORCH_ONLY:
                t_ours, t_steps = _torch(name, P, M)
                print(f"{'torch ' + name:<24} {P:>3} {M:>4} {'-':>8} {'-':>8} {'-':>7} {t_ours:>10} {fmt(t_steps):>11}")


def memory_table() -> None:
    """The V families' trade: bubble against 1F1B's and the simulator's peak activations per rank, M = 4P.

    Activations in whole 1F1B-stage microbatches (a 2P-layer model of saved bytes only: 1F1B on P
    stages of 2 layers, the V families on 2P of 1), the busiest rank; the paper's counts beside them.
    """
    from planner.profile import uniform_profile
    from sim.engine import peak_memory

    paper = {"1f1b": lambda P: P, "zb-v": lambda P: P, "v-half": lambda P: (P + 2) // 2, "v-min": lambda P: (P + 4) // 3}
    print()
    print(f"{'family':<8} {'P':>3} {'M':>4} {'bubble':>7} {'/ 1F1B':>7} {'peak act':>9} {'paper':>6}")
    for P in (2, 4, 8, 16):
        M = 4 * P
        prof = uniform_profile(2 * P, 1e-3, 2e-3, act=0.0, params=0.0, saved=1.0)
        one = None
        for fam in ("1f1b", "zb-v", "v-half", "v-min"):
            prog = generate(make_spec(fam, P, M))
            bubble = makespan_s(dry_run(prog, U)) - 3 * M
            one = bubble if one is None else one
            layers = [(2 * s, 2 * s + 1) for s in range(P)] if fam == "1f1b" else None
            peak = max(peak_memory(prog, prof, stage_layers=layers).values()) / 2
            print(f"{fam:<8} {P:>3} {M:>4} {bubble:>7g} {bubble / one if one else 0:>7.2f} {peak:>9g} {paper[fam](P):>6}")


if __name__ == "__main__":
    main()
    memory_table()
