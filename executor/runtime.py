"""The action interpreter: one worker walks its action list of a program, one handler per action kind.

The program is the source of truth: :class:`StageWorker` runs each action of
its worker in order, and every compute action runs on the weight version it
carries (a STEP makes the version it names; :mod:`executor.versions` keeps
the versions and decides where each is freed).

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
* ``SEND`` / ``RECV``: through :mod:`executor.transport` (a sender thread on
  gloo, receives posted ahead into pooled buffers).
* ``ALLREDUCE``: the round's gradients over the stage's replica group
  (:mod:`executor.collectives`).
* ``STEP``: SGD with momentum μ, ``b ← μ·b + g``, ``W(v+1) = W(v) − lr·b``, on
  the newest version with the stage's one momentum buffer; the gradient may
  come from an older (stashed) version (the plan's optimizer "none": plain SGD,
  ``W(v+1) = W(v) − lr·g``; :mod:`executor.versions`). With Adam or ZeRO-1/2
  (flush schedules) :mod:`executor.zero` steps instead: ZeRO-2's ALLREDUCE is
  a reduce-scatter to this rank's slice, and the STEP updates the slice and
  all-gathers the weights. Under ZeRO-3 a stage holds only its shards
  (:class:`executor.zero.ShardedStage`): F and B gather each layer's weights
  before it runs, B reduce-scatters its gradient after, the ALLREDUCE runs
  nothing and the STEP updates the shards.

Every action is timed (:mod:`executor.timing`). Memory on the CPU is counted
exactly (:mod:`executor.memory`) and sampled after every action that changes
it, and once at the start; on a GPU, ``torch.cuda`` allocator figures.

The module is one class of about 500 lines: its setup (groups, stages, shapes,
data) and one handler per action kind, which read best side by side; what the
handlers call lives in the modules named above.
"""
from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

from executor import checkpoint as ckpt
from executor.collectives import reduce_gradients, replica_groups, tensor_group
from executor.errors import ExecutorError
from executor.faults import fault_at, inject
from executor.memory import HeldBytes
from executor.prepare import DTYPES, Prepared, RunConfig
from executor.recompute import apply_recompute
from executor.tensor_parallel import (TPContext, gather_weights, parallelize, reduce_sequence_parallel_grads,
                                      sequence_parallel_params, shard, shard_specs, skip_from_env,
                                      vocab_parallel_loss)
from executor.timing import CudaActionTimes, warm_up_autograd, warm_up_stage
from executor.transport import (SWITCH_INTERVAL_S, BufferPool, Receives, Sender, SendFailed, Sends, TransportOptions,
                                message_tag, p2p_groups)
from executor.versions import Entry, StageState, plan_frees
from executor.zero import EXECUTOR_OPTIMIZERS, Reduced, ShardedStage, StageOptimizer
from planner.program import Action, Kind

_DATA_PREFETCH_BYTES = 256 * 2**20
_GPU_TIMED = frozenset({Kind.F, Kind.B, Kind.BI, Kind.BW, Kind.STEP})


class ActionFailed(Exception):
    """Raised out of the action loop: ``index`` is the failing action, ``__cause__`` the error."""

    def __init__(self, index: int | None, comm: bool) -> None:
        super().__init__(index)
        self.index, self.comm = index, comm


class StageWorker:
    """Runs one worker's action list. Construct after joining the process group; then ``setup()``, ``run()``, ``results()``."""

    def __init__(self, cfg: RunConfig, prepared: Prepared, rank: int, device: torch.device, progress=None) -> None:
        self.cfg, self.prep = cfg, prepared
        self.program = prepared.program
        self.rank, self.device = rank, device
        self.progress = progress
        self.spec = self.program.spec
        self.family = self.spec.family
        self.acts: list[Action] = self.program[rank]
        self.S = len(self.program.stage_workers)
        self.M = self.spec.microbatches
        self.dtype = DTYPES[cfg.dtype]
        self.model = prepared.model
        self.lr = float(prepared.lr)
        self.mbs = prepared.microbatch_size
        self.mb_offset = prepared.start_step * self.M
        self.base_version = prepared.start_step
        self.T = self.program.tensor_parallel
        plan = prepared.plan  # a program file runs its optimizer (SGD with momentum, or plain) without ZeRO
        self.zero = plan.zero_stage if plan is not None else 0
        self.optimizer = EXECUTOR_OPTIMIZERS[prepared.optimizer]
        self.momentum = prepared.momentum
        self.tp_rank = self.program.tp_rank(rank)
        self.cuda = device.type == "cuda"
        self.nccl = cfg.backend == "nccl"
        # gloo moves host memory only: on a GPU, messages and all-reduces go through host copies
        self.staged = self.cuda and not self.nccl
        self.comm_device = torch.device("cpu") if self.staged else device
        self.options = TransportOptions.from_env()
        self.stages: dict[int, StageState] = {}
        self.inbox: dict[tuple[int, int, bool], torch.Tensor] = {}
        self.outbox: dict[tuple[int, int, bool], torch.Tensor] = {}
        self.held = HeldBytes(cfg.track_memory and not self.cuda)
        self.pool = BufferPool(self.held.add_pooled)
        self.sends: Sends | None = None
        self.losses: dict[int, torch.Tensor] = {}
        self.times: list[tuple[int, float, float, int]] = []
        self.memory: list[tuple[float, float]] = []
        self.t0 = 0.0
        self.cpu_s = self.wall_s = 0.0
        self._index: int | None = None
        self._chain = None  # ZeRO-3: the chain of the forward that just ran (executor.zero.ShardedStage.forward)

    # --- setup ----------------------------------------------------------------------
    def setup(self) -> None:
        """Groups, stages and their weights, boundary shapes, data, the free and receive plans; warm-ups off the clock."""
        from executor.models import loss_fn, make_batch

        self.groups = replica_groups(self.program, self.rank)
        tp_group = tensor_group(self.program, self.rank)
        self.tp = None if tp_group is None else TPContext(tp_group, self.tp_rank, self.T, self.staged, skip_from_env(),
                                                          self.prep.sequence_parallel)
        self.p2p = p2p_groups(self.nccl)
        for s in self.program.stages_of(self.rank):
            self.stages[s] = self._build_stage(s)
        # tensor parallelism: the head's logits are this rank's vocabulary slice, and the loss is taken without them
        self.loss = loss_fn(self.model) if self.tp is None else vocab_parallel_loss(self.model, self.tp)
        self.make_batch = make_batch
        self._exchange_shapes()
        self._prefetch_data()
        self.frees, self.step_in_place = plan_frees(self.acts)
        self.receives = Receives(self.acts, self.in_meta, self.S, self.pool, self.device, self.comm_device,
                                 self.p2p, self.nccl, self.options.recv_lookahead)
        self.fault_index, self.fault_mode = fault_at(self.acts, self.rank)
        warm_up_autograd()
        if self.cuda:  # cuBLAS handles, kernel loading and the caching allocator's first blocks, before the clock
            for st in self.stages.values():
                st.bind(0)
                warm_up_stage(st.module, st.versions[0][0], self.in_meta[st.index], self.device)
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.handlers = [self._handler(a) for a in self.acts]
        self.kinds = [a.kind for a in self.acts]
        for st in self.stages.values():
            if self.zero == 3:  # the shards replace the weights: every version, the module's and the spare
                st.fsdp = ShardedStage(st.module, st.names, st.versions[0][0], st.slots, st.group, self.staged,
                                       self.optimizer, self.momentum)
                st.versions.clear()
                st.spare.clear()
                st.bound = None
                self.held.add_params(st.fsdp.shards)
                self.held.optimizer += st.fsdp.state_bytes
                continue
            for ps, _ in st.versions.values():
                self.held.add_params(ps)
            if self.zero or self.optimizer == "adam":
                st.opt = StageOptimizer(st.versions[0][0], self.zero, self.optimizer, st.group, self.staged,
                                        self.momentum)
                self.held.optimizer += st.opt.state_bytes
            elif self.optimizer == "momentum":  # SGD through StageState.step, its buffer (a checkpoint's, resumed)
                self.held.optimizer += st.use_momentum(self.momentum)
                if st.resumed_buf is not None:
                    torch._foreach_copy_(st.buf, st.resumed_buf)
                st.resumed_buf = None

    def _build_stage(self, s: int) -> StageState:
        """Stage ``s``'s module with its version 0: the seed's weights, or the checkpoint a resumed run starts from.

        With tensor parallelism the module holds this TP rank's shard (``st.shards`` says how each sharded
        parameter is split), cut from the whole weights; the run's recomputation mode is applied to its layers.
        """
        from executor.models import build_stage

        first, last = self.prep.layers[s]
        layers = build_stage(self.model, first, last, seed=self.cfg.seed)
        if self.tp is not None:
            layers = parallelize(layers, self.tp)
        apply_recompute(layers, self.prep.recompute)
        st = StageState(s, first, last, layers, self.S)
        st.shards = shard_specs(st.module)
        if self.tp is not None and self.tp.sequence:
            partial = sequence_parallel_params(st.module)
            st.sequence_partial = [j for j, n in enumerate(st.names) if n in partial]
        st.module.to(device=self.device, dtype=self.dtype)
        st.param_bytes = sum(p.numel() * p.element_size() for p in st.module.parameters())
        if self.prep.start_step:
            doc = ckpt.load_stage(self.cfg.checkpoint_dir, self.prep.start_step, s, model=self.model,
                                  layers=(first, last))
            w = doc["weights"]
            if set(w) != set(st.names):
                raise ExecutorError(f"checkpoint stage {s} has parameters {sorted(w)[:4]}..., the model {sorted(st.names)[:4]}...")
            params = [(shard(w[n], st.shards[n], self.tp_rank, self.T) if n in st.shards else w[n])
                      .to(device=self.device, dtype=self.dtype) for n in st.names]
            buf = doc["optimizer"].get("state") or {}  # SGD's momentum (prepare checked the kind matches the run)
            if buf:
                st.resumed_buf = [(shard(buf[n], st.shards[n], self.tp_rank, self.T) if n in st.shards else buf[n])
                                  .to(device=self.device, dtype=self.dtype) for n in st.names]
        else:
            params = [p.detach().clone() for p in st.module.parameters()]
        st.set_version(0, (p.requires_grad_(True) for p in params))
        st.release_module_params()
        st.group = self.groups.get(s)
        return st

    def _exchange_shapes(self) -> None:
        """Learn every stage boundary's (shape, dtype): each stage's replica 0 runs one no-grad eval-mode forward
        (every TP rank of it, as the forward's TP collectives need them all) and its first worker broadcasts."""
        x, _ = self.make_batch(self.model, self.mbs, 0, self.cfg.seed)
        meta = (tuple(x.shape), self._cast_dtype(x.dtype))
        self.in_meta: dict[int, tuple] = {0: meta}
        for s in range(self.S - 1):
            src = self.program.stage_workers[s][0]
            obj = [None]
            if self.rank in self.program.tp_group(src):
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
                if self.rank == src:
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
        x, y = self.make_batch(self.model, self.mbs, 0, self.cfg.seed)
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
        x, y = self.make_batch(self.model, self.mbs, self.mb_offset + mb, self.cfg.seed)
        x = x.to(device=self.device, dtype=self._cast_dtype(x.dtype))
        y = y.to(device=self.device, dtype=self._cast_dtype(y.dtype))
        return x, y

    # --- the loop -------------------------------------------------------------------
    def run(self) -> None:
        """Interpret the action list; raise ActionFailed(index) with the cause chained."""
        self.receives.post(self.receives.lookahead)
        switch_s = sys.getswitchinterval()
        sender = None
        if not self.nccl and self.options.send_thread and any(k is Kind.SEND for k in self.kinds):
            sender = Sender(self.options.send_priority)
            # the sender thread needs the GIL for a few microseconds per send; with the default 5 ms switch
            # interval it can wait that long whenever the main thread is between torch ops
            sys.setswitchinterval(min(switch_s, SWITCH_INTERVAL_S))
        self.sends = Sends(self.p2p, self.nccl, self.staged, sender, self.options.send_thread_min_bytes)
        try:
            self._run()
        finally:
            sys.setswitchinterval(switch_s)

    def _run(self) -> None:
        dist.barrier()
        gpu_times = CudaActionTimes(self.device) if self.cuda else None
        self.t0 = t0 = time.perf_counter()
        cpu0 = time.process_time()
        pc = time.perf_counter
        acts, handlers = self.acts, self.handlers
        frees, times, memory = self.frees, self.times, self.memory
        progress, rank = self.progress, self.rank
        track = self.cfg.track_memory
        held = None
        if track:  # at the start: the weights and the receive buffers posted ahead
            held = self._memory_bytes()
            memory.append((0.0, held))
        fault = self.fault_index if self.fault_index is not None else -1
        i = -1
        try:
            for i in range(len(acts)):
                self._index = i
                if progress is not None:
                    progress[rank] = i
                if i == fault:
                    inject(self.fault_mode)
                a = acts[i]
                if gpu_times is not None and a.kind in _GPU_TIMED:
                    nbytes = gpu_times.run(i, handlers[i], a)
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
            self.sends.close(float(self.cfg.timeout_s) + 5.0)
            self.cpu_s = time.process_time() - cpu0
            self.wall_s = pc() - t0
        except SendFailed as e:
            raise ActionFailed(e.index, True) from e.__cause__
        except BaseException as e:  # noqa: BLE001 - annotated and re-raised
            idx = self._index if self._index is not None else None
            comm = idx is None or self.acts[idx].kind in (Kind.SEND, Kind.RECV, Kind.ALLREDUCE)
            raise ActionFailed(idx, comm) from e
        if gpu_times is not None:
            self.times = gpu_times.resolve(self.times)

    def _handler(self, a: Action):
        return {
            Kind.F: self._forward, Kind.B: self._backward, Kind.BI: self._backward_input, Kind.BW: self._backward_weight,
            Kind.SEND: self._send, Kind.RECV: self._recv, Kind.ALLREDUCE: self._allreduce, Kind.STEP: self._step,
        }[a.kind]

    # --- F, B, BI, BW -----------------------------------------------------------------
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
        if st.fsdp is None:
            st.bind(a.version)
        st.forwards += 1
        held = self.held
        # the saved-tensor hooks cost a Python call per saved tensor (5-10% of a small stage's time); what a
        # forward keeps is the same every time for a fixed input shape, so it is counted on the first forward,
        # checked on every 8th, and counted on every forward from the first check that disagrees
        known = st.saved_bytes if not st.saved_varies and st.forwards % 8 != 1 else None
        if held.exact and known is not None:
            out = self._stage_forward(st, xin, mb)
            saved = known
        elif held.exact:
            with held.counter.counting() as sc:
                out = self._stage_forward(st, xin, mb, sc.pack)
            if not st.is_last:
                sc.pack(out)  # held until the backward, its root (counted once if autograd saved it too)
            saved = sc.nbytes
            if st.saved_bytes is not None and saved != st.saved_bytes:
                st.saved_varies = True
            st.saved_bytes = saved
        else:
            out = self._stage_forward(st, xin, mb)
            saved = 0
        held.saved += saved
        if not st.is_last:
            self._deliver(a.stage, mb, False, out.detach())
        st.inflight[mb] = Entry(xin if bufs is not None else None, out, a.version, bufs, saved, self._chain)
        self._chain = None
        return 0

    def _stage_forward(self, st: StageState, xin: torch.Tensor, mb: int, pack=None) -> torch.Tensor:
        """The stage's output; on the last stage its loss, scaled for the family (see the module docstring).
        ZeRO-3: unit by unit (``pack``: the saved-tensor counter's hook, when it counts), the chain in ``_chain``."""
        if st.fsdp is not None:
            st.fsdp.set_action(self._index)
            out, self._chain = st.fsdp.forward(xin, pack)
        else:
            out = st.module(xin)
        if not st.is_last:
            return out
        y = self.targets.pop(mb) if self.prefetched else self._batch(mb)[1]
        loss = self.loss(out, y)
        self.losses[mb] = loss.detach()
        return loss / self.M if self.spec.traits.batched else loss

    def _backward(self, a: Action) -> int:
        st = self.stages[a.stage]
        ent = st.inflight.pop(a.mb)
        gout = self._gout(st, a.mb)
        if st.fsdp is not None:
            return self._backward_sharded(st, a, ent, gout)
        params = st.versions[ent.version][0]
        n = len(params)
        inputs = params + (ent.x,) if ent.x is not None else params
        grads = torch.autograd.grad(ent.out, inputs, gout, allow_unused=True, materialize_grads=True)
        self._accumulate(st, a.mb, grads[:n])
        if ent.x is not None and not st.is_first:
            self._deliver(a.stage, a.mb, True, grads[n])
        if gout is not None:
            self.pool.release(gout)
        ent.out = None
        self._finish(ent)
        return 0

    def _backward_sharded(self, st: StageState, a: Action, ent: Entry, gout) -> int:
        """ZeRO-3's B: unit by unit, each gathered, differentiated and its gradient reduce-scattered; the round
        accumulates this rank's shard gradients."""
        st.fsdp.set_action(self._index)
        grads, gx = st.fsdp.backward(ent.chain, ent.out, gout, ent.x is not None and not st.is_first)
        if st.accumulate(self._round(st, a.mb), grads):
            self.held.grads += st.fsdp.param_bytes
        if gx is not None:
            self._deliver(a.stage, a.mb, True, gx)
        if gout is not None:
            self.pool.release(gout)
        ent.out = ent.chain = None
        self._finish(ent)
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
            self.pool.release(ent.gout)
        ent.out = ent.gout = None
        self._finish(ent)
        return 0

    def _gout(self, st: StageState, mb: int):
        if st.is_last:
            return None
        return self.inbox.pop((st.index, mb, True))

    def _deliver(self, s_from: int, mb: int, grad: bool, t: torch.Tensor) -> None:
        """Hand a stage's output (or input gradient) to its consumer: the outbox for a SEND, or a local stage."""
        dst_stage = s_from - 1 if grad else s_from + 1
        if self.program.worker_of(dst_stage, mb, self.tp_rank) == self.rank:
            self.inbox[(dst_stage, mb, grad)] = t
        else:
            self.outbox[(s_from, mb, grad)] = t

    def _round(self, st: StageState, mb: int) -> int:
        return self.program.round_of(st.index, mb)

    def _accumulate(self, st: StageState, mb: int, grads) -> None:
        if st.accumulate(self._round(st, mb), grads):
            self.held.grads += st.param_bytes

    def _finish(self, ent: Entry) -> None:
        self.held.saved -= ent.saved_bytes
        if ent.bufs is not None:
            self.pool.release(ent.bufs)

    # --- SEND, RECV -----------------------------------------------------------------
    def _send(self, a: Action) -> int:
        t = self.outbox.pop((a.stage, a.mb, a.grad))
        return self.sends.send(self._index, t, a.peer, message_tag(a.stage, a.mb, a.grad, self.S), a.grad)

    def _recv(self, a: Action) -> int:
        buf, nbytes = self.receives.wait(self._index)
        self.inbox[(a.stage, a.mb, a.grad)] = buf
        return nbytes

    # --- ALLREDUCE, STEP ------------------------------------------------------------
    def _allreduce(self, a: Action) -> int:
        st = self.stages[a.stage]
        if st.fsdp is not None:  # ZeRO-3: every B reduce-scattered its gradients already
            return 0
        k = a.mb
        acc = st.acc.get(k)
        if acc is None:
            self.held.grads += st.param_bytes
        if self.zero:
            return self._reduce_sharded(st, k, acc)
        views, flat = reduce_gradients(acc, st.count.get(k, 0), st.versions[st.current][0], st.group, self.staged,
                                       not self.spec.traits.batched, self.dtype, self.device)
        st.acc[k] = views
        st.count[k] = 1
        return flat.numel() * flat.element_size()

    def _reduce_sharded(self, st: StageState, k: int, acc) -> int:
        """ZeRO: the round's gradients all-reduced whole (1) or reduce-scattered to this rank's slice (2)
        (:mod:`executor.zero`); sequence parallelism's partial gradients are summed over the TP group first."""
        if acc is not None and st.sequence_partial:
            reduce_sequence_parallel_grads(acc, st.sequence_partial, self.tp)
        red = st.opt.reduce(acc, st.versions[st.current][0])
        self.held.grads += red.nbytes - st.param_bytes
        st.acc[k] = red
        st.count[k] = 1
        return st.param_bytes

    def _step(self, a: Action) -> int:
        st = self.stages[a.stage]
        grads = st.acc.pop(a.mb, None)
        st.count.pop(a.mb, None)
        if st.fsdp is not None:  # ZeRO-3: Adam on the shards, in place
            if grads is not None:
                self.held.grads -= st.fsdp.param_bytes
            st.fsdp.step(grads, self.lr)
            st.current = a.version
            return 0
        if st.opt is not None:
            return self._step_optimizer(st, a, grads)
        if grads is not None:
            self.held.grads -= st.param_bytes
            if st.sequence_partial:  # sequence parallelism: norms and row-parallel biases saw 1/T of the tokens
                reduce_sequence_parallel_grads(grads, st.sequence_partial, self.tp)
        new = st.step(a.version, grads, self.lr, self._index in self.step_in_place)
        if new is not None:
            self.held.add_params(new)
        self._maybe_checkpoint(st, a.version)
        return 0

    def _step_optimizer(self, st: StageState, a: Action, grads) -> int:
        """Adam, or any optimizer under ZeRO (:class:`executor.zero.StageOptimizer`): the current weights updated
        in place (flush schedules: the STEP is their last use) and renamed to the new version."""
        if grads is not None:
            self.held.grads -= grads.nbytes if isinstance(grads, Reduced) else st.param_bytes
            if not isinstance(grads, Reduced) and st.sequence_partial:
                reduce_sequence_parallel_grads(grads, st.sequence_partial, self.tp)
        if self._index not in self.step_in_place:
            raise ExecutorError(f"{a}: {self.optimizer} steps the weights in place, but an action after this STEP "
                                f"still reads version {st.current}; run it with a flush schedule")
        params = st.versions.pop(st.current)[0]
        st.opt.step(params, grads, self.lr)
        st.set_version(a.version, params)
        st.current = a.version
        self._maybe_checkpoint(st, a.version)
        return 0

    def _maybe_checkpoint(self, st: StageState, version: int) -> None:
        cfg = self.cfg
        if not cfg.checkpoint_dir or not self._holds_replica_0(st.index):
            return
        step = self.base_version + version
        final = version == self.spec.batches
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or final:
            weights = self._whole_weights(st)
            buf = self._whole(st, st.buf) if st.buf is not None else None
            if weights is None:  # a TP rank other than 0: its shards went to rank 0
                return
            ckpt.save_stage(cfg.checkpoint_dir, step, st.index, weights, model=self.model,
                            layers=self.prep.layers[st.index], family=self.family, lr=self.lr,
                            momentum_buffers=buf, momentum=st.momentum)

    def _holds_replica_0(self, s: int) -> bool:
        """This worker is (a TP rank of) stage ``s``'s replica 0, which saves and reports the stage's weights."""
        return self.rank in self.program.stage_workers[s][:self.T]

    def _whole_weights(self, st: StageState) -> dict[str, torch.Tensor] | None:
        """The stage's current weights, whole: with tensor parallelism gathered on TP rank 0 (None on the others;
        a collective over the replica's TP group)."""
        return self._whole(st, st.versions[st.current][0])

    def _whole(self, st: StageState, tensors) -> dict[str, torch.Tensor] | None:
        """``tensors`` (one per parameter of the stage: its weights, or its momentum buffer) by name, whole (with
        tensor parallelism gathered on TP rank 0, None on the others; a collective over the replica's TP group)."""
        if self.tp is None:
            return dict(zip(st.names, tensors))
        return gather_weights(st.names, tensors, st.shards, self.tp)

    def _free(self, i: int) -> None:
        for s, v in self.frees[i]:
            dropped = self.stages[s].free(v)
            if dropped is not None:
                self.held.drop_params(dropped)

    def _memory_bytes(self) -> float:
        if self.cuda:
            return float(torch.cuda.memory_allocated(self.device))
        params = sum(st.held_param_bytes() for st in self.stages.values())
        # input gradients made by a backward and not yet handed to the transport by their SEND (an output
        # activation waiting in the outbox is the forward's output, already in the saved bytes)
        outgoing = sum(t.untyped_storage().nbytes() for (_, _, grad), t in self.outbox.items() if grad)
        return self.held.total(params, outgoing)

    # --- results --------------------------------------------------------------------
    def results(self) -> dict:
        """What this worker sends to rank 0: timed actions, memory samples, losses and (replica 0) final weights."""
        if self.cuda:
            self.memory.append((self.times[-1][2] if self.times else 0.0, float(torch.cuda.max_memory_allocated(self.device))))
        weights = {}
        if self.cfg.collect_weights:
            for s, st in self.stages.items():
                if st.fsdp is not None:  # gathered by every rank of the group, kept by replica 0
                    whole = st.fsdp.whole_weights()
                    whole = whole if self._holds_replica_0(s) else None
                else:
                    whole = self._whole_weights(st) if self._holds_replica_0(s) else None
                for n, t in (whole or {}).items():
                    weights[f"stage{s}.{n}"] = t.detach().to("cpu").clone()
        return {
            "rank": self.rank,
            "times": self.times,
            "memory": self.memory,
            "losses": {self.mb_offset + mb: float(v) for mb, v in self.losses.items()},
            "weights": weights,
            "device": str(self.device),
            "cpu_s": self.cpu_s,
            "optimizer_state_bytes": sum(st.opt.state_bytes for st in self.stages.values() if st.opt is not None)
            + sum(st.fsdp.state_bytes for st in self.stages.values() if st.fsdp is not None)
            + sum(st.state_bytes for st in self.stages.values()),
            "param_shard_bytes": sum(st.fsdp.param_bytes for st in self.stages.values() if st.fsdp is not None),
            "collectives": [e for st in self.stages.values() if st.fsdp is not None for e in st.fsdp.log],
            "wall_s": self.wall_s,
        }
