"""The stage worker: one process interprets its action list of a program with torch.distributed.

The program is the source of truth. Every compute action runs on the weight
version it carries; a STEP makes the version it names. A stage keeps
``versions: dict[version, (params, by_name)]`` of parameter tensors; a forward
binds its version's tensors into the module (as ``torch.func.functional_call``
would, without its per-call cost) and the autograd graph of a microbatch
already references the tensors of the version its forward used, so its
backward needs no restore (weight stashing). A version is dropped right after
its last use in this worker's action list (a forward or backward tagged with
it, or the STEP that reads it), so a stage holds exactly the versions its
in-flight microbatches (and, under vertical sync, its future forwards) need,
plus the newest. A STEP that is itself the last use of the version it reads
updates that version's tensors in place (every STEP of a flush schedule; under
PipeDream, a stage none of whose in-flight microbatches still uses it);
otherwise it writes into the tensors of a version freed earlier (one is kept
per stage) or into new ones.

Actions:

* ``F``: the input comes from the data (stage 0), a RECV, or the previous
  stage on this worker. The last stage applies the loss, scaled by 1/M for
  flush schedules and 2BW (a batch's gradient is the mean over its M
  microbatches) and unscaled for PipeDream (one minibatch per step).
* ``B``: ``torch.autograd.grad`` of the output with respect to the version's
  parameters and the stage input; parameter gradients accumulate into the
  round the microbatch belongs to (flush / 2BW: its batch; PipeDream: the
  replica's k-th minibatch is round k).
* ``BI`` / ``BW`` (ZB-H1): the input gradient with ``retain_graph``, later the
  parameter gradient. Stage 0 computes no input gradient, so its BI is empty
  and its BW does the whole backward.
* ``SEND``: ``isend`` of a tensor that stays alive with its handle until it
  completes; on gloo, every message is handed to a sender
  thread (a gloo ``isend`` can hold its caller for milliseconds), so the main
  thread never blocks on them; that thread runs at real-time priority where
  the process may set it, so that a queued message leaves at once instead of
  after the compute thread's time slice. RECV: an ``irecv`` into a pooled buffer, posted ahead of time
  (a few receives of lookahead on gloo) and waited for at the RECV. Gloo
  matches by tag = (sending stage, microbatch, direction), unique in the run;
  NCCL matches in order, on one communicator per direction.
* ``ALLREDUCE``: one flat all-reduce (sum) of the round's gradients plus a
  contribution count on the stage's replica group; PipeDream divides by the
  count (replicas average their minibatch gradients), flush and 2BW sum
  (each replica's gradients are already scaled by 1/M).
* ``STEP``: SGD, ``W(v+1) = W(v) − lr·g``, on the newest version (in place
  when nothing else reads ``W(v)``, see above); the gradient may come from an
  older (stashed) version.

Every action is timed (``time.perf_counter``; CUDA events for compute on a
GPU). Memory on CPU is counted exactly, in bytes held between actions, and
sampled after every action that changes it (and once at the start): for the
microbatches in flight, the bytes autograd saves for backward
(``saved_tensors_hooks``, parameters and receive buffers excluded, each
storage once) and the stage's output (the root of the backward); live
parameter versions plus the freed one kept for reuse; gradient buffers;
optimizer state (plain SGD: none); input gradients waiting for their SEND;
and every pooled receive buffer (the pool never frees one, and receives are
posted ahead). Transients inside one action and messages the transport holds
are not counted. ``sim.memory`` models the same quantity. On a GPU,
``torch.cuda`` allocator figures.
"""
from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from executor import checkpoint as ckpt
from executor.errors import ExecutorError
from planner.plan import Plan, PlanError
from planner.program import Action, Kind, Program, FLUSH_FAMILIES

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
FAULT_ENV = "PIPETWIN_FAULT"  # "RANK:ACTION:MODE", MODE one of raise|exit|kill|hang (tests inject failures with it)
_RECV_LOOKAHEAD = int(os.environ.get("PIPETWIN_RECV_LOOKAHEAD", "8"))
_SEND_THREAD = os.environ.get("PIPETWIN_SEND_THREAD", "1") != "0"  # gloo sends from a thread of their own (0: inline)
# messages below this size are sent inline. 0 (all through the thread): a 16 KiB isend held its caller for up
# to 6 ms in emulated 4-stage runs, and threading them raised 2BW/1F1B throughput 5-8% there, while 16 KiB
# messages of real-compute stages showed no loss from the hand-off
_SEND_THREAD_MIN_BYTES = int(os.environ.get("PIPETWIN_SEND_THREAD_MIN_BYTES", "0"))
# the sender thread runs at real-time priority where the process may set it (0: normal priority)
_SEND_PRIORITY = os.environ.get("PIPETWIN_SEND_PRIORITY", "1") != "0"
_SWITCH_INTERVAL_S = 2e-4  # GIL switch interval while a sender thread runs (Python's default: 5 ms)
_DATA_PREFETCH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class RunConfig:
    """How to run a plan; the same on every worker.

    Attributes:
        plan: the plan as a dict (``Plan.to_dict``).
        backend: "gloo" or "nccl" (the launcher resolves "auto").
        device: where stages compute: "cpu" or "cuda" (the launcher resolves "auto"). NCCL implies
            "cuda" with one GPU per worker; gloo with "cuda" lets workers share the GPUs there are
            (rank modulo the GPU count) and stages every message and all-reduce through host memory.
        timeout_s: limit of every blocking call (process-group timeout).
        seed: model weights and data seed.
        dtype: parameter and activation dtype name (see DTYPES).
        checkpoint_dir: where to write and read checkpoints (None: none).
        checkpoint_every: write a checkpoint every N optimizer steps (0: only with a dir, at the end).
        resume: continue from the newest complete checkpoint in checkpoint_dir.
        collect_weights: send the final weights to rank 0.
        track_memory: record memory samples.
    """

    plan: dict
    backend: str = "gloo"
    device: str = "cpu"
    timeout_s: float = 60.0
    seed: int = 0
    dtype: str = "float32"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    collect_weights: bool = True
    track_memory: bool = True


@dataclass(frozen=True)
class Prepared:
    """A plan checked against its model, with the program this run executes.

    Attributes:
        plan: the full plan.
        program: the program of the batches left to run (None when a resumed run has nothing left).
        start_step: optimizer steps already done (from a checkpoint), 0 for a fresh run.
    """

    plan: Plan
    program: Program | None
    start_step: int


def prepare(cfg: RunConfig) -> Prepared:
    """Check the plan against its model and generate the program; raise ExecutorError on bad input."""
    from executor.models import ModelSpecError, num_layers
    from planner.check import ProgramError
    from planner.lowering import plan_to_program
    from planner.schedules import ScheduleError

    try:
        plan = Plan.from_dict(cfg.plan)
    except PlanError as e:
        raise ExecutorError(f"bad plan: {e}") from None
    try:
        n = num_layers(plan.model)
    except ModelSpecError as e:
        raise ExecutorError(f"the plan's model: {e}") from None
    if plan.num_layers != n:
        raise ExecutorError(f"the plan covers {plan.num_layers} layers but model {plan.model!r} has {n}; "
                            f"re-plan for this model (or fix the stages' layer ranges)")
    if cfg.dtype not in DTYPES:
        raise ExecutorError(f"unknown dtype {cfg.dtype!r}; choose one of {', '.join(DTYPES)}")
    streaming = plan.schedule not in FLUSH_FAMILIES
    if (cfg.checkpoint_every or cfg.resume) and streaming:
        raise ExecutorError(f"checkpoints need a flush schedule (gpipe, 1f1b, interleaved, zb-h1): {plan.schedule} keeps "
                            f"minibatches in flight across optimizer steps, so there is no clean point to stop and resume")
    if (cfg.checkpoint_every or cfg.resume) and not cfg.checkpoint_dir:
        raise ExecutorError("--checkpoint-every and --resume need --checkpoint-dir")
    start = 0
    if cfg.resume:
        start = ckpt.latest_complete_step(cfg.checkpoint_dir, len(plan.stages)) or 0
        start = min(start, plan.batches)
    if start >= plan.batches and start > 0:
        return Prepared(plan, None, start)
    run_plan = replace(plan, batches=plan.batches - start) if start else plan
    try:
        program = plan_to_program(run_plan)
    except (PlanError, ScheduleError, ProgramError) as e:
        raise ExecutorError(f"the plan's schedule: {e.args[0] if e.args else e}") from None
    return Prepared(plan, program, start)


def p2p_orders_agree(program: Program) -> str | None:
    """None when, per (sender, receiver, direction), sends and receives come in the same order (NCCL needs it)."""
    sends: dict[tuple, list] = {}
    recvs: dict[tuple, list] = {}
    for w in program.workers:
        for a in program[w]:
            if a.kind is Kind.SEND:
                sends.setdefault((w, a.peer, a.grad), []).append((a.stage, a.mb))
            elif a.kind is Kind.RECV:
                src_stage = a.stage + 1 if a.grad else a.stage - 1
                recvs.setdefault((a.peer, w, a.grad), []).append((src_stage, a.mb))
    for key, seq in sends.items():
        if recvs.get(key) != seq:
            return f"w{key[0]} sends {'gradients' if key[2] else 'activations'} to w{key[1]} in another order than w{key[1]} receives them"
    return None


# --- per-stage state ---------------------------------------------------------------------
class _Entry:
    """A microbatch between its forward and its (weight-gradient) backward."""

    __slots__ = ("x", "out", "version", "bufs", "saved_bytes", "gout")

    def __init__(self, x, out, version, bufs, saved_bytes):
        self.x, self.out, self.version, self.bufs, self.saved_bytes, self.gout = x, out, version, bufs, saved_bytes, None


class _Stage:
    """One (virtual) stage held by this worker: its module, weight versions, in-flight microbatches and gradients."""

    def __init__(self, index: int, first: int, last: int, layers: list[nn.Module], num_stages: int) -> None:
        self.index, self.first, self.last = index, first, last
        self.module = nn.Sequential(OrderedDict((str(first + i), m) for i, m in enumerate(layers)))
        named = list(self.module.named_parameters())
        self.names = tuple(n for n, _ in named)
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        self.versions: dict[int, tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]] = {}
        self.current = 0
        self.inflight: dict[int, _Entry] = {}
        self.acc: dict[int, list[torch.Tensor]] = {}
        self.count: dict[int, int] = {}
        self.group = None
        self.param_bytes = sum(p.numel() * p.element_size() for _, p in named)
        self.numel = sum(p.numel() for _, p in named)
        self.spare: list[tuple[torch.Tensor, ...]] = []  # at most one freed version's tensors, reused by the next STEP
        # bytes one forward of this stage keeps for its backward, once measured (see StageWorker._forward)
        self.saved_bytes: int | None = None
        self.saved_varies = False
        self.forwards = 0
        self.slots: list = []
        self.bound = None

    def set_version(self, v: int, params) -> None:
        params = tuple(params)
        self.versions[v] = (params, dict(zip(self.names, params)))

    def release_module_params(self) -> None:
        """Drop the module's own parameter storage and learn where each parameter lives, for :meth:`bind`.

        ``slots`` lists (submodule, attribute, index into a version's tensors) for every
        parameter reference, tied ones included (``remove_duplicate=False``).
        """
        index = {id(p): j for j, (_, p) in enumerate(self.module.named_parameters())}
        self.slots = []
        for name, p in self.module.named_parameters(remove_duplicate=False):
            owner, _, attr = name.rpartition(".")
            self.slots.append((self.module.get_submodule(owner) if owner else self.module, attr, index[id(p)]))
        for p in self.module.parameters():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self.bound = None

    def bind(self, v: int) -> None:
        """Make the module compute with version ``v``'s tensors.

        The same as ``torch.func.functional_call`` with the version's tensors, at a
        dict store per parameter and only when the version changes: the tensors are
        put into the submodules' ``_parameters`` directly (they are leaves that
        require grad, not ``nn.Parameter``), and stay there until another version
        is bound. Autograd records the tensors a forward used, so a backward never
        needs a rebind.
        """
        params = self.versions[v][0]
        if self.bound is params:
            return
        for mod, attr, j in self.slots:
            mod._parameters[attr] = params[j]
        self.bound = params

    def weights(self, v: int | None = None) -> dict[str, torch.Tensor]:
        return dict(self.versions[self.current if v is None else v][1])


class _SavedCounter:
    """saved_tensors_hooks pack/unpack that adds up the bytes of each saved storage once, parameters excluded."""

    def __init__(self) -> None:
        self.exclude: set[int] = set()
        self.seen: set[int] = set()
        self.nbytes = 0

    def pack(self, t: torch.Tensor):
        try:
            s = t.untyped_storage()
            key = s.data_ptr()
            if key not in self.exclude and key not in self.seen:
                self.seen.add(key)
                self.nbytes += s.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def start(self) -> None:
        self.seen.clear()
        self.nbytes = 0


class _SendFailed(Exception):
    """A send issued by the sender thread failed; ``index`` is its SEND action, ``__cause__`` the error."""

    def __init__(self, index: int | None) -> None:
        super().__init__(index)
        self.index = index


def _raise_priority() -> bool:
    """Give the calling thread real-time priority (``SCHED_FIFO`` 1), if this process may; else leave it as it is.

    A woken thread of normal priority waits for the running compute thread's time
    slice to end before it gets a core (EEVDF: up to a few ms on a loaded machine),
    and a sender thread that waits holds a message that the next stage waits for:
    on 2 cores, a 2-stage PipeDream pipeline measured 1.7-5 ms from queueing a
    send to ``isend`` and ran its two stages almost in turn. At priority 1 the
    thread runs as soon as it wakes; it only blocks (on its queue, the GIL,
    ``isend``), never spins, and the kernel's real-time throttling still bounds it.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        return True
    except (OSError, AttributeError):  # no CAP_SYS_NICE (an unprivileged user, a container) or not Linux
        return False


class _Sender:
    """Issues this worker's gloo sends from a thread of its own, in program order.

    A gloo ``isend`` can hold its caller for milliseconds (the transport's pair
    lock, a loaded machine), which on the main thread delays the next compute
    action. The main thread only queues ``(action index, tensor, peer, tag)``;
    the thread issues ``isend`` and keeps each tensor alive until its send has
    completed. The first error is kept with its action index and raised on the
    main thread by :meth:`check` (at the next SEND) or :meth:`close` (end of
    the run), so a failure still names the action. The thread is a daemon: a
    worker that fails exits without waiting for it.
    """

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: tuple[int, BaseException] | None = None
        self.thread = threading.Thread(target=self._loop, name="pipetwin-sender", daemon=True)
        self.thread.start()

    def put(self, index: int, t: torch.Tensor, peer: int, tag: int) -> None:
        self.queue.put((index, t, peer, tag))

    def _loop(self) -> None:
        if _SEND_PRIORITY:
            _raise_priority()
        pending: deque = deque()
        index = None
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    break
                index, t, peer, tag = item
                pending.append((dist.isend(t, dst=peer, tag=tag), t, index))
                while pending and pending[0][0].is_completed():
                    work, _, index = pending.popleft()
                    work.wait()  # returns at once; raises if the send failed
            while pending:
                work, _, index = pending.popleft()
                work.wait()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = (index, e)

    def check(self) -> None:
        if self.error is not None:
            index, e = self.error
            raise _SendFailed(index) from e

    def close(self, timeout_s: float) -> None:
        """Wait until every queued send has completed; raise the first error."""
        self.queue.put(None)
        self.thread.join(timeout_s)
        self.check()
        if self.thread.is_alive():
            raise TimeoutError(f"the sends of this worker did not complete within {timeout_s:g} s")


class ActionFailed(Exception):
    """Raised out of the action loop: ``index`` is the failing action, ``__cause__`` the error."""

    def __init__(self, index: int | None, comm: bool) -> None:
        super().__init__(index)
        self.index, self.comm = index, comm


# --- the worker ----------------------------------------------------------------------------
class StageWorker:
    """Runs one worker's action list. Construct after ``init_process_group``; then ``setup()``, ``run()``, ``results()``."""

    def __init__(self, cfg: RunConfig, prepared: Prepared, rank: int, device: torch.device, progress=None) -> None:
        self.cfg, self.prep = cfg, prepared
        self.plan, self.program = prepared.plan, prepared.program
        self.rank, self.device = rank, device
        self.progress = progress
        self.spec = self.program.spec
        self.family = self.spec.family
        self.acts: list[Action] = self.program[rank]
        self.S = len(self.program.stage_workers)
        self.M = self.spec.microbatches
        self.dtype = DTYPES[cfg.dtype]
        self.lr = float(self.plan.lr)
        self.mbs = self.plan.microbatch_size
        self.mb_offset = prepared.start_step * self.M
        self.base_version = prepared.start_step
        self.cuda = device.type == "cuda"
        self.nccl = cfg.backend == "nccl"
        # gloo moves host memory only: on a GPU, messages and all-reduces go through host copies
        self.staged = self.cuda and not self.nccl
        self.comm_device = torch.device("cpu") if self.staged else device
        self.stages: dict[int, _Stage] = {}
        self.inbox: dict[tuple[int, int, bool], torch.Tensor] = {}
        self.outbox: dict[tuple[int, int, bool], torch.Tensor] = {}
        self.pool: dict[tuple, list[torch.Tensor]] = {}
        self.pending_sends: list = []
        self.sender: _Sender | None = None
        self.losses: dict[int, torch.Tensor] = {}
        self.times: list[tuple[int, float, float, int]] = []
        self.cuda_events: list = []
        self.memory: list[tuple[float, float]] = []
        self.saved = _SavedCounter()
        self.mem_saved = 0
        self.mem_grads = 0
        self.mem_pool = 0  # pooled receive buffers: the pool keeps every buffer it ever handed out
        self.pool_storages: set[int] = set()
        self.t0 = 0.0
        self.fault_index, self.fault_mode = None, None

    # --- setup ----------------------------------------------------------------------
    def setup(self) -> None:
        from executor.models import build_stage, loss_fn, make_batch

        self._make_groups()
        plan = self.plan
        for s in self.program.stages_of(self.rank):
            sp = plan.stages[s]
            layers = build_stage(plan.model, sp.first_layer, sp.last_layer, seed=self.cfg.seed)
            st = _Stage(s, sp.first_layer, sp.last_layer, layers, self.S)
            st.module.to(device=self.device, dtype=self.dtype)
            st.param_bytes = sum(p.numel() * p.element_size() for p in st.module.parameters())
            if self.prep.start_step:
                doc = ckpt.load_stage(self.cfg.checkpoint_dir, self.prep.start_step, s, model=plan.model,
                                      layers=(sp.first_layer, sp.last_layer))
                w = doc["weights"]
                if set(w) != set(st.names):
                    raise ExecutorError(f"checkpoint stage {s} has parameters {sorted(w)[:4]}..., the model {sorted(st.names)[:4]}...")
                params = [w[n].to(device=self.device, dtype=self.dtype) for n in st.names]
            else:
                params = [p.detach().clone() for p in st.module.parameters()]
            st.set_version(0, (p.requires_grad_(True) for p in params))
            st.release_module_params()
            st.group = self.ar_groups.get(s)
            self.stages[s] = st
        self.loss = loss_fn(plan.model)
        self.make_batch = make_batch
        self._exchange_shapes()
        self._prefetch_data()
        self._plan_frees()
        self._plan_recvs()
        self._resolve_fault()
        _warm_up_autograd()
        if self.cuda:  # cuBLAS handles, kernel loading and the caching allocator's first blocks, before the clock
            for st in self.stages.values():
                st.bind(0)
                warm_up_stage(st.module, st.versions[0][0], self.in_meta[st.index], self.device)
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.handlers = [self._handler(a) for a in self.acts]
        self.kinds = [a.kind for a in self.acts]
        self.saved.exclude = {p.untyped_storage().data_ptr() for st in self.stages.values()
                              for ps, _ in st.versions.values() for p in ps}

    def _make_groups(self) -> None:
        """Replica groups for all-reduce (and, on NCCL, one p2p communicator per direction): same order on every rank."""
        self.ar_groups = {}
        for s, ws in enumerate(self.program.stage_workers):
            if len(ws) > 1:
                g = dist.new_group(list(ws))
                if self.rank in ws:
                    self.ar_groups[s] = g
        if self.nccl:
            everyone = list(range(dist.get_world_size()))
            self.p2p_groups = {False: dist.new_group(everyone), True: dist.new_group(everyone)}
        else:
            self.p2p_groups = {False: None, True: None}

    def _exchange_shapes(self) -> None:
        """Learn every stage boundary's (shape, dtype): each stage's replica 0 runs one no-grad eval-mode forward and broadcasts."""
        x, _ = self.make_batch(self.plan.model, self.mbs, 0, self.cfg.seed)
        meta = (tuple(x.shape), self._cast_dtype(x.dtype))
        self.in_meta: dict[int, tuple] = {0: meta}
        for s in range(self.S - 1):
            src = self.program.stage_workers[s][0]
            obj = [None]
            if self.rank == src:
                st = self.stages[s]
                shape, dt = self.in_meta[s]
                was = st.module.training
                st.module.eval()
                with torch.no_grad():
                    st.bind(0)
                    y = st.module(torch.zeros(shape, dtype=dt, device=self.device))
                st.module.train(was)
                if not isinstance(y, torch.Tensor):
                    raise ExecutorError(f"stage {s} (layers {st.first}..{st.last}) returns {type(y).__name__}; "
                                        f"a stage boundary must be one tensor")
                obj = [(tuple(y.shape), y.dtype)]
            dist.broadcast_object_list(obj, src=src, device=self.device if self.nccl else None)
            self.in_meta[s + 1] = obj[0]

    def _cast_dtype(self, dt: torch.dtype) -> torch.dtype:
        return self.dtype if dt.is_floating_point else dt

    def _prefetch_data(self) -> None:
        """Stage-0 inputs and last-stage targets of this worker's microbatches, made before the clock starts."""
        self.inputs: dict[int, torch.Tensor] = {}
        self.targets: dict[int, torch.Tensor] = {}
        need_in = sorted({a.mb for a in self.acts if a.kind is Kind.F and a.stage == 0})
        need_tg = sorted({a.mb for a in self.acts if a.kind is Kind.F and a.stage == self.S - 1})
        x, y = self.make_batch(self.plan.model, self.mbs, 0, self.cfg.seed)
        per = x.numel() * x.element_size() + y.numel() * y.element_size()
        self.prefetched = per * (len(need_in) + len(need_tg)) <= _DATA_PREFETCH_BYTES
        if self.prefetched:
            for mb in sorted(set(need_in) | set(need_tg)):
                x, y = self._batch(mb)
                if mb in need_in:
                    self.inputs[mb] = x
                if mb in need_tg:
                    self.targets[mb] = y

    def _batch(self, mb: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.make_batch(self.plan.model, self.mbs, self.mb_offset + mb, self.cfg.seed)
        x = x.to(device=self.device, dtype=self._cast_dtype(x.dtype))
        y = y.to(device=self.device, dtype=self._cast_dtype(y.dtype))
        return x, y

    def _plan_frees(self) -> None:
        """frees[i]: (stage, version) pairs whose last use on this worker is action i (the newest is kept)."""
        last: dict[tuple[int, int], int] = {}
        newest: dict[int, int] = {}
        for i, a in enumerate(self.acts):
            if a.is_compute:
                last[(a.stage, a.version)] = i
            elif a.kind is Kind.STEP:
                last[(a.stage, a.version - 1)] = i
                newest[a.stage] = max(newest.get(a.stage, 0), a.version)
        self.frees: dict[int, list[tuple[int, int]]] = {}
        for (s, v), i in last.items():
            if v != newest.get(s, 0):
                self.frees.setdefault(i, []).append((s, v))
        # a STEP that is the last use of the version it reads updates it in place (always so for flush schedules)
        self.step_in_place = frozenset(i for i, a in enumerate(self.acts)
                                       if a.kind is Kind.STEP and last.get((a.stage, a.version - 1)) == i)

    def _plan_recvs(self) -> None:
        """Every RECV in program order with its tag and buffer shape; the first few are posted now."""
        self.recvs = []
        self.recv_slot: dict[int, int] = {}
        for i, a in enumerate(self.acts):
            if a.kind is Kind.RECV:
                src_stage = a.stage + 1 if a.grad else a.stage - 1
                shape, dt = self.in_meta[a.stage + 1] if a.grad else self.in_meta[a.stage]
                self.recv_slot[i] = len(self.recvs)
                self.recvs.append((a.peer, self._tag(src_stage, a.mb, a.grad), shape, dt, a.grad))
        self.posted: dict[int, tuple] = {}
        self.next_post = 0
        self.lookahead = 1 if self.nccl else _RECV_LOOKAHEAD

    def _tag(self, src_stage: int, mb: int, grad: bool) -> int:
        return ((mb * self.S + src_stage) << 1) | int(grad)

    def _resolve_fault(self) -> None:
        text = os.environ.get(FAULT_ENV, "")
        if not text:
            return
        try:
            r, act, mode = text.split(":")
        except ValueError:
            return
        if int(r) != self.rank:
            return
        for i, a in enumerate(self.acts):
            if str(a) == act:
                self.fault_index, self.fault_mode = i, mode
                return

    # --- handlers -------------------------------------------------------------------
    def _handler(self, a: Action):
        return {
            Kind.F: self._forward, Kind.B: self._backward, Kind.BI: self._backward_input, Kind.BW: self._backward_weight,
            Kind.SEND: self._send, Kind.RECV: self._recv, Kind.ALLREDUCE: self._allreduce, Kind.STEP: self._step,
        }[a.kind]

    def _acquire(self, shape, dt, device=None) -> torch.Tensor:
        device = self.device if device is None else device
        free = self.pool.get((shape, dt, device.type))
        if free:
            return free.pop()
        buf = torch.empty(shape, dtype=dt, device=device)
        self._count_pooled(buf)
        return buf

    def _count_pooled(self, buf: torch.Tensor) -> None:
        """Count a buffer the pool now owns (once; it is never freed) and keep it out of the saved bytes."""
        if not self.cfg.track_memory or self.cuda:
            return
        key = buf.untyped_storage().data_ptr()
        if key not in self.pool_storages:
            self.pool_storages.add(key)
            self.mem_pool += buf.untyped_storage().nbytes()
            self.saved.exclude.add(key)

    def _release(self, buf: torch.Tensor) -> None:
        self._count_pooled(buf)  # a tensor passed on this worker (not received) joins the pool here
        self.pool.setdefault((tuple(buf.shape), buf.dtype, buf.device.type), []).append(buf)

    def _post_recvs(self, upto: int) -> None:
        upto = min(upto, len(self.recvs))
        while self.next_post < upto:
            j = self.next_post
            peer, tag, shape, dt, grad = self.recvs[j]
            buf = self._acquire(shape, dt, self.comm_device)
            if self.nccl:
                work = dist.irecv(buf, src=peer, group=self.p2p_groups[grad])
            else:
                work = dist.irecv(buf, src=peer, tag=tag)
            self.posted[j] = (work, buf)
            self.next_post += 1

    def _deliver(self, s_from: int, mb: int, grad: bool, t: torch.Tensor) -> None:
        """Hand a stage's output (or input gradient) to its consumer: the outbox for a SEND, or a local stage."""
        dst_stage = s_from - 1 if grad else s_from + 1
        if self.program.worker_of(dst_stage, mb) == self.rank:
            self.inbox[(dst_stage, mb, grad)] = t
        else:
            self.outbox[(s_from, mb, grad)] = t

    def _forward(self, a: Action) -> int:
        st = self.stages[a.stage]
        mb = a.mb
        bufs = None
        if st.is_first:
            x = self.inputs.pop(mb) if self.prefetched else self._batch(mb)[0]
            xin = x
        else:
            x = self.inbox.pop((a.stage, mb, False))
            bufs = x
            xin = x.detach().requires_grad_(x.is_floating_point())
        st.bind(a.version)
        st.forwards += 1
        # the saved-tensor hooks cost a Python call per saved tensor (5-10% of a small stage's time); what a
        # forward keeps is the same every time for a fixed input shape, so it is counted on the first forward,
        # checked on every 8th, and counted on every forward from the first check that disagrees
        known = st.saved_bytes if not st.saved_varies and st.forwards % 8 != 1 else None
        if self.cfg.track_memory and not self.cuda and known is not None:
            out = st.module(xin)
            if st.is_last:
                out = self._loss(out, mb)
            saved = known
            self.mem_saved += saved
        elif self.cfg.track_memory and not self.cuda:
            sc = self.saved
            sc.start()
            with torch.autograd.graph.saved_tensors_hooks(sc.pack, sc.unpack):
                out = st.module(xin)
                if st.is_last:
                    out = self._loss(out, mb)
            if not st.is_last:
                sc.pack(out)  # held until the backward, its root (counted once if autograd saved it too)
            saved = sc.nbytes
            self.mem_saved += saved
            if st.saved_bytes is not None and saved != st.saved_bytes:
                st.saved_varies = True
            st.saved_bytes = saved
        else:
            out = st.module(xin)
            if st.is_last:
                out = self._loss(out, mb)
            saved = 0
        if not st.is_last:
            self._deliver(a.stage, mb, False, out.detach())
        st.inflight[mb] = _Entry(xin if bufs is not None else None, out, a.version, bufs, saved)
        return 0

    def _loss(self, out: torch.Tensor, mb: int) -> torch.Tensor:
        y = self.targets.pop(mb) if self.prefetched else self._batch(mb)[1]
        loss = self.loss(out, y)
        self.losses[mb] = loss.detach()
        return loss if self.family == "pipedream" else loss / self.M

    def _round(self, st: _Stage, mb: int) -> int:
        if self.family == "pipedream":
            return mb // len(self.program.stage_workers[st.index])
        return mb // self.M

    def _accumulate(self, st: _Stage, mb: int, grads) -> None:
        k = self._round(st, mb)
        acc = st.acc.get(k)
        if acc is None:
            st.acc[k] = list(grads)
            st.count[k] = 1
            self.mem_grads += st.param_bytes
        else:
            torch._foreach_add_(acc, list(grads))
            st.count[k] += 1

    def _gout(self, st: _Stage, mb: int):
        if st.is_last:
            return None
        return self.inbox.pop((st.index, mb, True))

    def _finish(self, st: _Stage, ent: _Entry) -> None:
        self.mem_saved -= ent.saved_bytes
        if ent.bufs is not None:
            self._release(ent.bufs)

    def _backward(self, a: Action) -> int:
        st = self.stages[a.stage]
        ent = st.inflight.pop(a.mb)
        gout = self._gout(st, a.mb)
        params = st.versions[ent.version][0]
        n = len(params)
        inputs = params + (ent.x,) if ent.x is not None else params
        grads = torch.autograd.grad(ent.out, inputs, gout, allow_unused=True, materialize_grads=True)
        self._accumulate(st, a.mb, grads[:n])
        if ent.x is not None and not st.is_first:
            self._deliver(a.stage, a.mb, True, grads[n])
        if gout is not None:
            self._release(gout)
        ent.out = None
        self._finish(st, ent)
        return 0

    def _backward_input(self, a: Action) -> int:
        st = self.stages[a.stage]
        ent = st.inflight[a.mb]
        ent.gout = self._gout(st, a.mb)
        if ent.x is not None and not st.is_first:
            (gx,) = torch.autograd.grad(ent.out, (ent.x,), ent.gout, retain_graph=True, materialize_grads=True)
            self._deliver(a.stage, a.mb, True, gx)
        return 0

    def _backward_weight(self, a: Action) -> int:
        st = self.stages[a.stage]
        ent = st.inflight.pop(a.mb)
        params = st.versions[ent.version][0]
        grads = torch.autograd.grad(ent.out, params, ent.gout, allow_unused=True, materialize_grads=True)
        self._accumulate(st, a.mb, grads)
        if ent.gout is not None:
            self._release(ent.gout)
        ent.out = ent.gout = None
        self._finish(st, ent)
        return 0

    def _send(self, a: Action) -> int:
        t = self.outbox.pop((a.stage, a.mb, a.grad))
        if self.staged:
            t = t.to("cpu")  # waits for the kernels that made it
        sender = self.sender
        nbytes = t.numel() * t.element_size()
        if sender is not None and nbytes >= _SEND_THREAD_MIN_BYTES:
            sender.check()
            sender.put(self._index, t, a.peer, self._tag(a.stage, a.mb, a.grad))
            return nbytes
        if self.nccl:
            work = dist.isend(t, dst=a.peer, group=self.p2p_groups[a.grad])
        else:
            work = dist.isend(t, dst=a.peer, tag=self._tag(a.stage, a.mb, a.grad))
        pend = self.pending_sends
        pend.append((work, t))
        while len(pend) > 1 and pend[0][0].is_completed():
            pend.pop(0)
        return t.numel() * t.element_size()

    def _recv(self, a: Action) -> int:
        j = self.recv_slot[self._index]
        self._post_recvs(j + 1)
        work, buf = self.posted.pop(j)
        work.wait()
        self._post_recvs(j + 1 + self.lookahead)
        nbytes = buf.numel() * buf.element_size()
        if self.staged:
            host, buf = buf, self._acquire(tuple(buf.shape), buf.dtype)
            buf.copy_(host)  # from pageable memory: done when copy_ returns, so the host buffer is free again
            self._release(host)
        self.inbox[(a.stage, a.mb, a.grad)] = buf
        return nbytes

    def _allreduce(self, a: Action) -> int:
        st = self.stages[a.stage]
        k = a.mb
        acc = st.acc.get(k)
        if acc is None:
            flat = torch.zeros(st.numel + 1, dtype=self.dtype, device=self.device)
            self.mem_grads += st.param_bytes
        else:
            count = torch.tensor([float(st.count[k])], dtype=self.dtype, device=self.device)
            flat = torch.cat([g.reshape(-1) for g in acc] + [count])
        if self.staged:
            host = flat.to("cpu")
            dist.all_reduce(host, group=st.group)
            flat.copy_(host)
        else:
            dist.all_reduce(flat, group=st.group)
        if self.family == "pipedream":
            flat[:-1].div_(flat[-1].clamp(min=1.0))
        views, off = [], 0
        for p in st.versions[st.current][0]:
            views.append(flat[off:off + p.numel()].view_as(p))
            off += p.numel()
        st.acc[k] = views
        st.count[k] = 1
        return flat.numel() * flat.element_size()

    def _step(self, a: Action) -> int:
        """``W(v+1) = W(v) - lr * g``: in place when this STEP is the last use of W(v) on this worker, else into
        a spare (freed) version's tensors or new ones. Same arithmetic either way (``a + alpha * b``)."""
        st = self.stages[a.stage]
        grads = st.acc.pop(a.mb, None)
        st.count.pop(a.mb, None)
        old_v = st.current
        cur = st.versions[old_v][0]
        if grads is not None:
            self.mem_grads -= st.param_bytes
        with torch.no_grad():
            if self._index in self.step_in_place:
                # nothing on this worker reads W(v) after this action, and every backward that used it is done
                del st.versions[old_v]
                if grads is not None:
                    torch._foreach_add_(list(cur), grads, alpha=-self.lr)
                st.set_version(a.version, cur)
                new = None
            elif st.spare:
                new = st.spare.pop()
                if grads is None:
                    torch._foreach_copy_(list(new), list(cur))
                else:
                    for n, c, g in zip(new, cur, grads):
                        torch.add(c, g, alpha=-self.lr, out=n)
            elif grads is None:
                new = [p.detach().clone().requires_grad_(True) for p in cur]
            else:
                new = [t.requires_grad_(True) for t in torch._foreach_add(list(cur), grads, alpha=-self.lr)]
        if new is not None:
            st.set_version(a.version, new)
            if self.cfg.track_memory and not self.cuda:
                self.saved.exclude.update(t.untyped_storage().data_ptr() for t in new)
        st.current = a.version
        self._maybe_checkpoint(st, a.version)
        return 0

    def _maybe_checkpoint(self, st: _Stage, version: int) -> None:
        cfg = self.cfg
        if not cfg.checkpoint_dir or self.program.stage_workers[st.index][0] != self.rank:
            return
        step = self.base_version + version
        final = version == self.spec.batches
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or final:
            sp = self.plan.stages[st.index]
            ckpt.save_stage(cfg.checkpoint_dir, step, st.index, st.weights(), model=self.plan.model,
                            layers=(sp.first_layer, sp.last_layer), family=self.family, lr=self.lr)

    def _free(self, i: int) -> None:
        for s, v in self.frees[i]:
            st = self.stages[s]
            got = st.versions.pop(v, None)
            if got is None:  # renamed to the next version by an in-place STEP
                continue
            ps = got[0]
            if not st.spare:  # kept (as an allocator would cache it) for the next STEP to write into
                st.spare.append(ps)
            elif self.cfg.track_memory and not self.cuda:
                for p in ps:
                    self.saved.exclude.discard(p.untyped_storage().data_ptr())

    def _memory_bytes(self) -> float:
        if self.cuda:
            return float(torch.cuda.memory_allocated(self.device))
        # every live version plus the freed one kept for the next STEP to write into
        params = sum(st.param_bytes * (len(st.versions) + len(st.spare)) for st in self.stages.values())
        optimizer_state = 0  # plain SGD
        # input gradients made by a backward and not yet handed to the transport by their SEND (an output
        # activation waiting in the outbox is the forward's output, already in mem_saved)
        outgoing = sum(t.untyped_storage().nbytes() for (_, _, grad), t in self.outbox.items() if grad)
        return float(self.mem_saved + params + self.mem_grads + optimizer_state + self.mem_pool + outgoing)

    # --- the loop -------------------------------------------------------------------
    def run(self) -> None:
        """Interpret the action list; raise ActionFailed(index) with the cause chained."""
        self._post_recvs(self.lookahead)
        switch_s = sys.getswitchinterval()
        if not self.nccl and _SEND_THREAD and any(k is Kind.SEND for k in self.kinds):
            self.sender = _Sender()
            # the sender thread needs the GIL for a few microseconds per send; with the default 5 ms switch
            # interval it can wait that long whenever the main thread is between torch ops
            sys.setswitchinterval(min(switch_s, _SWITCH_INTERVAL_S))
        try:
            self._run()
        finally:
            sys.setswitchinterval(switch_s)

    def _run(self) -> None:
        dist.barrier()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.base_event = torch.cuda.Event(enable_timing=True)
            self.base_event.record()
        self.t0 = time.perf_counter()
        cpu0 = time.process_time()
        pc = time.perf_counter
        acts, handlers, kinds = self.acts, self.handlers, self.kinds
        frees, times, memory = self.frees, self.times, self.memory
        progress, rank = self.progress, self.rank
        track = self.cfg.track_memory
        held = None
        if track:  # at the start: the weights and the receive buffers posted ahead
            held = self._memory_bytes()
            memory.append((0.0, held))
        fault = self.fault_index if self.fault_index is not None else -1
        t0 = self.t0
        i = -1
        try:
            for i in range(len(acts)):
                self._index = i
                if progress is not None:
                    progress[rank] = i
                if i == fault:
                    self._inject_fault()
                a = acts[i]
                if self.cuda and a.kind in (Kind.F, Kind.B, Kind.BI, Kind.BW, Kind.STEP):
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    nbytes = handlers[i](a)
                    e1.record()
                    self.cuda_events.append((i, e0, e1))
                    t_start = t_end = pc()  # replaced by the CUDA event times after the run
                else:
                    t_start = pc()
                    nbytes = handlers[i](a)
                    t_end = pc()
                times.append((i, t_start - t0, t_end - t0, nbytes))
                if i in frees:
                    self._free(i)
                if track:  # after every action that changes what is held (a RECV can grow the pool, a SEND
                    m = self._memory_bytes()  # hand a gradient over), so that no peak falls between samples
                    if m != held:
                        memory.append((t_end - t0, m))
                        held = m
            self._index = None
            for work, _ in self.pending_sends:
                work.wait()
            self.pending_sends.clear()
            if self.sender is not None:
                self.sender.close(float(self.cfg.timeout_s) + 5.0)
            self.cpu_s = time.process_time() - cpu0
            self.wall_s = pc() - t0
        except _SendFailed as e:
            raise ActionFailed(e.index, True) from e.__cause__
        except BaseException as e:  # noqa: BLE001 - annotated and re-raised
            idx = self._index if self._index is not None else None
            comm = idx is None or self.acts[idx].kind in (Kind.SEND, Kind.RECV, Kind.ALLREDUCE)
            raise ActionFailed(idx, comm) from e
        if self.cuda:
            self._resolve_cuda_times()

    def _inject_fault(self) -> None:
        mode = self.fault_mode
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "exit":
            os._exit(3)
        if mode == "hang":
            while True:
                time.sleep(3600)
        raise RuntimeError(f"injected fault ({FAULT_ENV})")

    def _resolve_cuda_times(self) -> None:
        torch.cuda.synchronize(self.device)
        by_index = {i: (e0, e1) for i, e0, e1 in self.cuda_events}
        fixed = []
        for i, s, e, nb in self.times:
            if i in by_index:
                e0, e1 = by_index[i]
                s = self.base_event.elapsed_time(e0) / 1e3
                e = self.base_event.elapsed_time(e1) / 1e3
            fixed.append((i, s, e, nb))
        self.times = fixed

    # --- results --------------------------------------------------------------------
    def results(self) -> dict:
        """What this worker sends to rank 0: timed actions, memory samples, losses and (replica 0) final weights."""
        if self.cuda:
            self.memory.append((self.times[-1][2] if self.times else 0.0, float(torch.cuda.max_memory_allocated(self.device))))
        weights = {}
        if self.cfg.collect_weights:
            for s, st in self.stages.items():
                if self.program.stage_workers[s][0] == self.rank:
                    for n, t in st.weights().items():
                        weights[f"stage{s}.{n}"] = t.detach().to("cpu").clone()
        return {
            "rank": self.rank,
            "times": self.times,
            "memory": self.memory,
            "losses": {self.mb_offset + mb: float(v) for mb, v in self.losses.items()},
            "weights": weights,
            "device": str(self.device),
            "cpu_s": self.cpu_s,
            "wall_s": self.wall_s,
        }


def warm_up_stage(module: nn.Module, params, in_meta: tuple, device: torch.device) -> None:
    """One forward and backward of ``module`` on a zero input of ``in_meta`` = (shape, dtype) that leaves no trace.

    On a GPU the first forward and backward of a stage pay CUDA's lazy set-up
    (cuBLAS handles, kernel loading, the caching allocator's first blocks),
    which a timed run would otherwise count against its first microbatch.
    Nothing the run computes changes: the gradients are returned and dropped
    (``autograd.grad``, no ``.grad``), buffers such as batch-norm statistics
    are put back, and the random number generators are forked, so dropout
    masks later in the run are the ones they would have been.
    """
    shape, dt = in_meta
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        x = torch.zeros(shape, dtype=dt, device=device)
        if x.is_floating_point():
            x.requires_grad_(True)
        out = module(x)
        want = [p for p in params if p.requires_grad] + ([x] if x.requires_grad else [])
        if want and out.requires_grad:
            torch.autograd.grad(out.float().sum(), want, allow_unused=True)
    with torch.no_grad():
        for n, b in module.named_buffers():
            b.copy_(buffers[n])


def _warm_up_autograd() -> None:
    """Pay torch's lazy imports of a first ``autograd.grad`` with gradient tensors (about 0.5 s) before the clock starts."""
    w = torch.ones(2, requires_grad=True)
    torch.autograd.grad(w * 2.0, (w,), torch.ones(2), allow_unused=True, materialize_grads=True)


# --- process-level entry shared by the local launcher and torchrun -------------------------------
def resolve_backend(backend: str, local_world: int) -> str:
    if backend not in ("auto", "gloo", "nccl"):
        raise ExecutorError(f"unknown backend {backend!r}; choose auto, gloo or nccl")
    if backend != "auto":
        return backend
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world:
        return "nccl"
    return "gloo"


def resolve_device(device: str, backend: str) -> str:
    """"cpu" or "cuda" for a requested device ("auto": the GPUs when the backend is NCCL, else the CPU)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ExecutorError(f"unknown device {device!r}; choose auto, cpu or cuda")
    if backend == "nccl":
        if device == "cpu":
            raise ExecutorError("NCCL communicates between GPUs: use --device cuda (or auto), or --backend gloo")
        return "cuda"
    if device == "auto":  # gloo: the CPU unless asked (several workers sharing a GPU is a choice to make)
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ExecutorError("--device cuda: this machine has no GPU that torch can use; use --device cpu")
    return device


def _keep_freed_memory() -> None:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.

    Every backward returns fresh gradient tensors of a stage's parameter size;
    with glibc's defaults such allocations are mmapped (or the heap is trimmed
    when they are freed), so each one page-faults its memory in again — about
    0.7 ms per backward of a 4 x Linear(512) stage, a fifth of its time. A
    fixed mmap threshold (32 MiB, glibc's maximum) and no trimming keep the
    freed blocks in the heap. Process-wide, done once per worker process; a
    no-op off glibc or with ``PIPETWIN_MALLOC_TUNE=0``.
    """
    if os.environ.get("PIPETWIN_MALLOC_TUNE", "1") == "0" or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 32 * 2**20)
        libc.mallopt(m_trim_threshold, 2**30)
    except (OSError, AttributeError):
        pass


def init_process_group(cfg: RunConfig, rank: int, world: int, store=None) -> torch.device:
    """Join the run's process group with the run's timeout; the device this rank computes on."""
    torch.set_num_threads(1)
    _keep_freed_memory()
    timeout = timedelta(seconds=float(cfg.timeout_s))
    kw = {}
    if cfg.backend == "nccl" or cfg.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank)) % max(1, torch.cuda.device_count())
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        if cfg.backend == "nccl":
            kw = {"device_id": device}
    else:
        device = torch.device("cpu")
    if store is not None:
        dist.init_process_group(cfg.backend, store=store, rank=rank, world_size=world, timeout=timeout, **kw)
    else:
        dist.init_process_group(cfg.backend, rank=rank, world_size=world, timeout=timeout, **kw)
    return device


def gather_results(payload: dict, rank: int) -> list[dict] | None:
    """Every worker's results on rank 0 (None elsewhere)."""
    out = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(payload, out, dst=0)
    return out


def merge_trace(program: Program, plan: Plan, parts: list[dict]):
    """One measured Trace from every worker's results (times are seconds since the common barrier)."""
    from planner.trace import Event, MemorySample, Trace

    trace = Trace(meta={"source": "measured", "family": plan.schedule, "microbatch_size": plan.microbatch_size,
                        "model": plan.model, "devices": {str(p["rank"]): p["device"] for p in parts},
                        "device_kind": "cuda" if any(str(p["device"]).startswith("cuda") for p in parts) else "cpu",
                        "cpu_s": {str(p["rank"]): p.get("cpu_s", 0.0) for p in parts}})
    for p in parts:
        w = p["rank"]
        acts = program[w]
        for i, s, e, nb in p["times"]:
            a = acts[i]
            trace.events.append(Event(w, str(a), s, e, a.kind.value, int(nb)))
        for t, b in p["memory"]:
            trace.memory.append(MemorySample(w, t, b))
    trace.events.sort(key=lambda e: (e.start_s, str(e.lane)))
    return trace


def merge_weights(parts: list[dict]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in parts:
        out.update(p["weights"])
    return dict(sorted(out.items(), key=lambda kv: (int(kv[0].split(".")[0][5:]), kv[0])))


def merge_losses(parts: list[dict]) -> dict[int, float]:
    out: dict[int, float] = {}
    for p in parts:
        out.update(p["losses"])
    return dict(sorted(out.items()))


def weights_from_checkpoint(prep: Prepared, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """Final weights of a resumed run that had nothing left to do."""
    out = {}
    for s, sp in enumerate(prep.plan.stages):
        doc = ckpt.load_stage(cfg.checkpoint_dir, prep.start_step, s, model=prep.plan.model,
                              layers=(sp.first_layer, sp.last_layer))
        for n, t in doc["weights"].items():
            out[f"stage{s}.{n}"] = t
    return out

