"""torch.distributed.pipelining interop both ways, against torch's own schedules and validator.

torch's schedules are built without a process group, the way its own tests build them:
a stand-in stage object that only carries the indices a schedule reads. Every schedule
torch ships is dumped to its CSV, read by pipetwin, checked (the laws), dry-run, and
held against the closed forms pipetwin's own generators meet. The other way, every
pipetwin flush schedule is written as torch CSV and run through torch's validator
(``_validate_schedule``) and its comms simulator (``_simulate_comms_compute``).
Version differences (2.11 vs 2.13): a schedule class torch lacks is skipped.
"""
from __future__ import annotations

import pytest

from planner.check import ProgramError, UnitCosts, dry_run, measured_bounds
from planner.families import FAMILY, ScheduleError
from planner.program import Kind
from planner.schedules import REQUIRES, generate, make_spec
from planner.torch_interop import (TorchAction, TorchFormatError, parse_torch_action, program_from_torch,
                                   read_torch_csv, to_torch_rows, write_torch_csv)
from planner.trace import makespan_s

pytest.importorskip("torch")
from tests.torch_schedules import S, TORCH_SCHEDULES, order_csv as _csv, torch_schedule  # noqa: E402

U = UnitCosts(f=1, b=2, bi=1, bw=1)


def _torch_schedule(name: str, P: int, M: int, V: int = 2):
    sch = torch_schedule(name, P, M, V)
    if sch is None:
        import torch

        pytest.skip(f"this torch ({torch.__version__}) has no Schedule{name}")
    return sch


# --- reading cells and rows --------------------------------------------------------------
@pytest.mark.parametrize("cell,want", [
    ("0F1", [TorchAction(0, "F", 1)]), ("7I0", [TorchAction(7, "I", 0)]), ("3W12", [TorchAction(3, "W", 12)]),
    ("2B5", [TorchAction(2, "B", 5)]), ("0REDUCE_GRAD", [TorchAction(0, "REDUCE_GRAD")]),
    ("1UNSHARD", [TorchAction(1, "UNSHARD")]), ("4RECV_B3", [TorchAction(4, "RECV_B", 3)]), ("", []), ("None", []),
    ("(0F1;3B0)OVERLAP_F_B", [TorchAction(0, "F", 1), TorchAction(3, "B", 0)]),
])
def test_torch_cells_read_as_actions(cell, want):
    assert parse_torch_action(cell) == want


@pytest.mark.parametrize("cell", ["0X1", "F1", "0F", "0SEND_F"])
def test_unreadable_cells_are_refused_naming_the_cell(cell):
    with pytest.raises(TorchFormatError, match="torch action"):
        parse_torch_action(cell)


def test_rows_with_or_without_a_leading_worker_column():
    bare = read_torch_csv("0F0,0B0\n1F0,1B0\n")
    lead = read_torch_csv("0,0F0,0B0\n1,1F0,1B0\n")
    assert bare == lead and [str(a) for a in bare[1]] == ["1F0", "1B0"]


def test_a_stage_split_over_two_ranks_is_refused():
    with pytest.raises(TorchFormatError, match="stage 0 computes on ranks 0 and 1"):
        program_from_torch(read_torch_csv("0F0,0B0\n0F1,0B1\n"))


def test_a_torch_order_that_breaks_a_law_is_refused_naming_the_action():
    with pytest.raises(ProgramError, match="backward before its own forward"):
        program_from_torch(read_torch_csv("0B0,0F0\n1F0,1B0\n"))


# --- torch -> pipetwin: every schedule torch ships --------------------------------------------
@pytest.mark.parametrize("name", TORCH_SCHEDULES)
@pytest.mark.parametrize("P,M", [(2, 4), (4, 8), (4, 12), (8, 16)])
def test_every_torch_schedule_imports_checks_and_dry_runs(name, P, M):
    sch = _torch_schedule(name, P, M)
    n_stages = max(a.stage_index for row in sch.pipeline_order.values() for a in row if a is not None) + 1
    try:
        S._validate_schedule(sch.pipeline_order, P, n_stages, M)
    except (AssertionError, RuntimeError, ValueError) as e:
        # torch 2.13's Schedule1F1B writes rank r >= 1's IR one microbatch late (1F1, 1B0, ..., 1F4); its own
        # validator refuses it, and so must pipetwin's check
        with pytest.raises(ProgramError):
            program_from_torch(read_torch_csv(_csv(sch.pipeline_order)))
        pytest.xfail(f"torch's own validator rejects its {name} IR: {str(e).splitlines()[0]}")
    prog = program_from_torch(read_torch_csv(_csv(sch.pipeline_order)))  # check() ran: the laws hold
    assert prog.spec.family == "custom" and len(prog.workers) == P
    comms = getattr(sch, "pipeline_order_with_comms", None)
    if comms:  # the with-communication format reads to the same program
        again = program_from_torch(read_torch_csv(_csv(comms)))
        assert again.actions == prog.actions
    span = makespan_s(dry_run(prog, U))
    V = prog.spec.chunks
    if name in ("GPipe", "1F1B"):
        assert span == pytest.approx((M + P - 1) * 3)
    elif name == "Interleaved1F1B":
        assert span == pytest.approx(3 * M + 3 * (P - 1) / V)
    elif name in ("InterleavedZeroBubble", "DualPipeV"):  # pipetwin's generators write torch's order
        ours = generate(make_spec({"InterleavedZeroBubble": "interleaved-zb", "DualPipeV": "dualpipe-v"}[name], P, M, chunks=V))
        assert prog.actions == ours.actions
        assert span == pytest.approx(3 * M + (P - 1) / V)
    elif name == "ZBVZeroBubble":  # the closed form pipetwin's zb-v meets
        assert span == pytest.approx(3 * M + (P - 1) / 2)
        ours = makespan_s(dry_run(generate(make_spec("zb-v", P, M)), U))
        assert span == pytest.approx(ours)
    bounds = measured_bounds(prog)
    assert bounds["in_microbatch_order"] is (name != "LoopedBFS")  # looped BFS runs backwards in reverse
    assert bounds["backward"] == {"DualPipeV": "mixed", "InterleavedZeroBubble": "split",
                                  "ZBVZeroBubble": "split"}.get(name, "full")


# --- pipetwin -> torch: every flush family, through torch's validator and simulator ------------
FLUSH = [n for n, f in FAMILY.items() if f.generated and f.flush]


@pytest.mark.parametrize("family", FLUSH)
@pytest.mark.parametrize("P,M", [(2, 4), (4, 8), (4, 6), (3, 7)])
def test_every_pipetwin_flush_schedule_passes_torchs_validator_and_simulator(family, P, M):
    spec = make_spec(family, P, M, chunks=2 if FAMILY[family].multi_stage else 1)
    try:
        REQUIRES.get(family, lambda s: None)(spec)
    except ScheduleError as e:  # DualPipeV needs M >= 2P, as torch's does
        pytest.skip(f"{family} refuses P={P}, M={M}: {e}")
    prog = generate(spec)
    S_n = len(prog.stage_workers)
    rank_of = {s: ws[0] for s, ws in enumerate(prog.stage_workers)}
    compute = {r: [S._Action.from_str(t) for t in row] for r, row in to_torch_rows(prog).items()}
    mapping = S._validate_schedule(compute, P, S_n, M)
    assert mapping == rank_of
    comms = {r: [S._Action.from_str(t) for t in row] for r, row in to_torch_rows(prog, "compute_comms").items()}
    S._simulate_comms_compute(comms, lambda s: rank_of[s], S_n)  # raises on a deadlock or a misordered message
    assert program_from_torch(read_torch_csv(write_torch_csv(prog))).actions == prog.actions  # round trip


def test_streaming_or_replicated_programs_are_refused_for_torch():
    with pytest.raises(TorchFormatError, match="one batch"):
        to_torch_rows(generate(make_spec("pipedream", 2, 4)))
    with pytest.raises(TorchFormatError, match="unreplicated"):
        to_torch_rows(generate(make_spec("1f1b", 2, 4, replicas=(2, 1))))
