"""Point-to-point transport: message tags, the receive-buffer pool, receives posted ahead, and the sender thread.

* SEND: ``isend`` of a tensor that stays alive with its handle until it
  completes. On gloo every message is handed to a sender thread (a gloo
  ``isend`` can hold its caller for milliseconds), so the main thread never
  blocks on them; that thread runs at real-time priority where the process
  may set it, so that a queued message leaves at once instead of after the
  compute thread's time slice.
* RECV: an ``irecv`` into a pooled buffer, posted ahead of time (a few
  receives of lookahead on gloo) and waited for at the RECV.
* Matching: gloo matches by tag = (sending stage, microbatch, direction),
  unique in the run; NCCL matches in order, on one communicator per direction
  (:func:`p2p_orders_agree` checks a program allows that).
* A GPU worker on gloo stages every message through host memory.

The knobs (environment variables, read once per worker by
:meth:`TransportOptions.from_env`): ``PIPETWIN_RECV_LOOKAHEAD`` (8),
``PIPETWIN_SEND_THREAD`` (1; 0 sends inline), ``PIPETWIN_SEND_THREAD_MIN_BYTES``
(0), ``PIPETWIN_SEND_PRIORITY`` (1; 0 keeps the thread at normal priority).
"""
from __future__ import annotations

import os
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from planner.program import Action, Kind, Program

SWITCH_INTERVAL_S = 2e-4  # GIL switch interval while a sender thread runs (Python's default: 5 ms)


@dataclass(frozen=True)
class TransportOptions:
    """How a worker moves its messages.

    Attributes:
        recv_lookahead: receives posted ahead of the RECV that waits for them (gloo; NCCL posts one).
        send_thread: gloo sends go through a thread of their own (False: inline on the main thread).
        send_thread_min_bytes: messages below this size are sent inline. 0 (all through the thread): a
            16 KiB isend held its caller for up to 6 ms in emulated 4-stage runs, and threading them raised
            2BW/1F1B throughput 5-8% there, while 16 KiB messages of real-compute stages showed no loss
            from the hand-off.
        send_priority: the sender thread asks for real-time priority (see :func:`raise_priority`).
    """

    recv_lookahead: int = 8
    send_thread: bool = True
    send_thread_min_bytes: int = 0
    send_priority: bool = True

    @classmethod
    def from_env(cls) -> "TransportOptions":
        env = os.environ
        return cls(recv_lookahead=int(env.get("PIPETWIN_RECV_LOOKAHEAD", "8")),
                   send_thread=env.get("PIPETWIN_SEND_THREAD", "1") != "0",
                   send_thread_min_bytes=int(env.get("PIPETWIN_SEND_THREAD_MIN_BYTES", "0")),
                   send_priority=env.get("PIPETWIN_SEND_PRIORITY", "1") != "0")


def message_tag(src_stage: int, mb: int, grad: bool, num_stages: int) -> int:
    """The gloo tag of a message: unique per (sending stage, microbatch, direction) in a run."""
    return ((mb * num_stages + src_stage) << 1) | int(grad)


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


def p2p_groups(nccl: bool) -> dict[bool, object]:
    """The group each direction's messages use: on NCCL one communicator per direction (collective call)."""
    if not nccl:
        return {False: None, True: None}
    everyone = list(range(dist.get_world_size()))
    return {False: dist.new_group(everyone), True: dist.new_group(everyone)}


class BufferPool:
    """Receive buffers by (shape, dtype, device type), reused and never freed; ``on_new`` sees each buffer it owns."""

    def __init__(self, on_new: Callable[[torch.Tensor], None]) -> None:
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.on_new = on_new

    def acquire(self, shape, dt, device: torch.device) -> torch.Tensor:
        free = self.free.get((shape, dt, device.type))
        if free:
            return free.pop()
        buf = torch.empty(shape, dtype=dt, device=device)
        self.on_new(buf)
        return buf

    def release(self, buf: torch.Tensor) -> None:
        self.on_new(buf)  # a tensor passed on this worker (not received) joins the pool here
        self.free.setdefault((tuple(buf.shape), buf.dtype, buf.device.type), []).append(buf)


class Receives:
    """Every RECV of one worker's action list in program order, ``lookahead`` of them posted ahead.

    ``meta[s]`` is stage s's input (shape, dtype); a gradient into stage s has stage s+1's input shape.
    """

    def __init__(self, acts: Sequence[Action], meta: dict[int, tuple], num_stages: int, pool: BufferPool,
                 device: torch.device, comm_device: torch.device, groups: dict, nccl: bool, lookahead: int) -> None:
        self.pool, self.device, self.comm_device = pool, device, comm_device
        self.groups, self.nccl = groups, nccl
        self.staged = comm_device != device
        self.recvs: list[tuple] = []
        self.slot: dict[int, int] = {}
        for i, a in enumerate(acts):
            if a.kind is Kind.RECV:
                src_stage = a.stage + 1 if a.grad else a.stage - 1
                shape, dt = meta[a.stage + 1] if a.grad else meta[a.stage]
                self.slot[i] = len(self.recvs)
                self.recvs.append((a.peer, message_tag(src_stage, a.mb, a.grad, num_stages), shape, dt, a.grad))
        self.posted: dict[int, tuple] = {}
        self.next_post = 0
        self.lookahead = 1 if nccl else lookahead

    def post(self, upto: int) -> None:
        """Post every receive before number ``upto`` that is not posted yet."""
        upto = min(upto, len(self.recvs))
        while self.next_post < upto:
            j = self.next_post
            peer, tag, shape, dt, grad = self.recvs[j]
            buf = self.pool.acquire(shape, dt, self.comm_device)
            if self.nccl:
                work = dist.irecv(buf, src=peer, group=self.groups[grad])
            else:
                work = dist.irecv(buf, src=peer, tag=tag)
            self.posted[j] = (work, buf)
            self.next_post += 1

    def wait(self, index: int) -> tuple[torch.Tensor, int]:
        """Wait for the receive of action ``index``: (its buffer on the compute device, payload bytes)."""
        j = self.slot[index]
        self.post(j + 1)
        work, buf = self.posted.pop(j)
        work.wait()
        self.post(j + 1 + self.lookahead)
        nbytes = buf.numel() * buf.element_size()
        if self.staged:
            host, buf = buf, self.pool.acquire(tuple(buf.shape), buf.dtype, self.device)
            buf.copy_(host)  # from pageable memory: done when copy_ returns, so the host buffer is free again
            self.pool.release(host)
        return buf, nbytes


class Sends:
    """Issues one worker's sends: through the sender thread (gloo) or inline, each tensor kept until it is done."""

    def __init__(self, groups: dict, nccl: bool, staged: bool, sender: "Sender | None", min_thread_bytes: int) -> None:
        self.groups, self.nccl, self.staged = groups, nccl, staged
        self.sender, self.min_thread_bytes = sender, min_thread_bytes
        self.pending: list = []

    def send(self, index: int, t: torch.Tensor, peer: int, tag: int, grad: bool) -> int:
        """Send ``t`` (SEND action ``index``); its payload bytes."""
        if self.staged:
            t = t.to("cpu")  # waits for the kernels that made it
        nbytes = t.numel() * t.element_size()
        sender = self.sender
        if sender is not None and nbytes >= self.min_thread_bytes:
            sender.check()
            sender.put(index, t, peer, tag)
            return nbytes
        if self.nccl:
            work = dist.isend(t, dst=peer, group=self.groups[grad])
        else:
            work = dist.isend(t, dst=peer, tag=tag)
        pend = self.pending
        pend.append((work, t))
        while len(pend) > 1 and pend[0][0].is_completed():
            pend.pop(0)
        return nbytes

    def close(self, timeout_s: float) -> None:
        """Wait until every send has completed; raise the first error (SendFailed from the thread)."""
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()
        if self.sender is not None:
            self.sender.close(timeout_s)


class SendFailed(Exception):
    """A send issued by the sender thread failed; ``index`` is its SEND action, ``__cause__`` the error."""

    def __init__(self, index: int | None) -> None:
        super().__init__(index)
        self.index = index


def raise_priority() -> bool:
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


class Sender:
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

    def __init__(self, priority: bool = True) -> None:
        self.priority = priority
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: tuple[int, BaseException] | None = None
        self.thread = threading.Thread(target=self._loop, name="pipetwin-sender", daemon=True)
        self.thread.start()

    def put(self, index: int, t: torch.Tensor, peer: int, tag: int) -> None:
        self.queue.put((index, t, peer, tag))

    def _loop(self) -> None:
        if self.priority:
            raise_priority()
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
            raise SendFailed(index) from e

    def close(self, timeout_s: float) -> None:
        """Wait until every queued send has completed; raise the first error."""
        self.queue.put(None)
        self.thread.join(timeout_s)
        self.check()
        if self.thread.is_alive():
            raise TimeoutError(f"the sends of this worker did not complete within {timeout_s:g} s")
