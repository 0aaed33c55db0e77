"""SimParams, the knobs of the cluster model, and SimError, the simulator's bad-input error."""
from __future__ import annotations

from dataclasses import dataclass

from planner.sharding import check_planned_zero
from sim.memory import RECV_LOOKAHEAD
from topologies.errors import InputError

ALLREDUCE_ALGORITHMS = ("ring", "hierarchical", "auto")
TP_RINGS = ("fused", "phases")


class SimError(InputError):
    """Input the simulator cannot run (a device missing from the topology, a profile too short, ...)."""


@dataclass(frozen=True)
class SimParams:
    """How the simulated cluster behaves beyond what the profile and topology say.

    Attributes:
        overhead_s: fixed device time added to every action (kernel launch and framework cost);
            calibration fits it.
        overlap_comm: True (as on GPUs): a SEND is posted and the device moves on while the
            transfer runs. False: the device waits until its SEND is delivered.
        bi_fraction: share of a stage's backward time spent in BI (input gradient) when the
            backward is split; BW gets the rest.
        split_factor: BI + BW of a stage that computes an input gradient take this multiple of its
            backward (a split backward walks the graph twice; calibration fits it, 1 by default).
        first_stage_bi_free: stage 0 computes no input gradient, so its BI takes no compute and its BW
            the whole backward, as the executor runs it (False: stage 0 splits like the others, as the
            closed forms assume).
        optimizer_state_factor: optimizer state in multiples of parameter bytes (SGD with
            momentum 1, Adam 2, plain SGD 0).
        recv_lookahead: receives a worker posts ahead, each holding a pooled buffer from its post
            (the executor's: 8 on gloo, ``PIPETWIN_RECV_LOOKAHEAD``; 1 on NCCL); see ``sim.memory``.
        step_time_s: device time of one optimizer STEP.
        recv_wake_s: time a RECV that had to wait takes after its message arrives: waking a blocked
            receiver (on a loaded CPU host: the futex wake-up and getting a core back, a few hundred us);
            a message that arrives before its RECV costs no such time (but ``recv_ready_s``). 0: none.
        recv_ready_s: time a RECV takes, beyond ``overhead_s``, whose message had arrived by the time it
            looked for it (its start plus ``overhead_s``). gloo's transfers
            are rendezvous work done by a progress thread of each process; on a CPU its compute keeps busy
            that thread gets a core only once the receiver blocks, so even an early message costs its
            receiver the copy and a wake-up. 0: free, as on a GPU whose copy engines move data while it
            computes.
        accumulate_s_per_byte: device time per parameter byte of adding a backward's gradients into its
            round's (every B or BW after the first of its optimizer round on a worker and stage: flush
            schedules and 2BW accumulate M/r − 1 times a batch, PipeDream never); memory-bound, so not
            scaled by device speed. 0: free, as the closed forms assume.
        jitter: relative standard deviation of seeded Gaussian noise on compute times (0: none).
        seed: seed of that noise.
        allreduce: "ring" over all replicas, "hierarchical" (reduce inside each server, ring
            across servers, broadcast inside), or "auto" (hierarchical when the replicas span
            several servers and some server holds more than one).
        tp_ring: how a tensor-parallel all-reduce inside a compute action runs on the links: "fused" (one
            phase of 2(T − 1)/T of the bytes per neighbour pair plus the later phases' latencies: the ring's
            cost on free links, one flow event per pair) or "phases" (the ring's 2(T − 1) phases one after
            another); see ``sim.collectives``.
        use_symmetry: simulate one representative per set of identical stage replicas when
            that is exact (see ``sim.engine``); the trace is the same either way.
        link_events: record one event per link hop of every transfer (link lanes "u->v").
        zero_stage: ZeRO sharding of each stage's training state over its replicas (0 to 3;
            ``planner.sharding``, as ``CostOptions.zero_stage``): its memory, and its collectives on the links
            (1, 2: a ring reduce-scatter + all-gather of 16-bit tensors at the all-reduce point; 3: each unit's
            all-gathers and reduce-scatters inside the compute passes); one weight version (flush schedules).
        fsdp_overlap: ZeRO-3 prefetch (``planner.sharding.fsdp_pass_s``): the next unit's gather is issued when a
            unit's compute starts and its reduce-scatter runs on while the next unit computes; False: each
            collective waits for the compute before it and blocks what follows.
    """

    overhead_s: float = 0.0
    overlap_comm: bool = True
    bi_fraction: float = 0.5
    split_factor: float = 1.0
    first_stage_bi_free: bool = False
    optimizer_state_factor: float = 1.0
    recv_lookahead: int = RECV_LOOKAHEAD
    step_time_s: float = 0.0
    accumulate_s_per_byte: float = 0.0
    recv_wake_s: float = 0.0
    recv_ready_s: float = 0.0
    jitter: float = 0.0
    seed: int = 0
    allreduce: str = "auto"
    tp_ring: str = "fused"
    use_symmetry: bool = True
    link_events: bool = True
    zero_stage: int = 0
    fsdp_overlap: bool = True

    def __post_init__(self) -> None:
        check_planned_zero(self.zero_stage, SimError)
        if self.allreduce not in ALLREDUCE_ALGORITHMS:
            raise SimError(f"unknown all-reduce algorithm {self.allreduce!r}; choose one of {', '.join(ALLREDUCE_ALGORITHMS)}")
        if self.tp_ring not in TP_RINGS:
            raise SimError(f"unknown tp_ring {self.tp_ring!r}; choose one of {', '.join(TP_RINGS)}")
        if not 0.0 <= self.bi_fraction <= 1.0:
            raise SimError(f"bi_fraction must lie in [0, 1] (got {self.bi_fraction})")
        if self.recv_lookahead < 0 or int(self.recv_lookahead) != self.recv_lookahead:
            raise SimError(f"recv_lookahead must be a whole number >= 0 (got {self.recv_lookahead})")
        if self.split_factor <= 0:
            raise SimError(f"split_factor must be > 0 (got {self.split_factor})")
        for name in ("overhead_s", "optimizer_state_factor", "step_time_s", "accumulate_s_per_byte", "recv_wake_s", "recv_ready_s", "jitter"):
            if getattr(self, name) < 0:
                raise SimError(f"{name} must be >= 0 (got {getattr(self, name)})")
