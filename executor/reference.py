"""Single-process reference trainer: each schedule family's update rule written out directly.

It does not interpret a program. It builds the same layers (same seed), the
same microbatches, and applies, per family, the update ``W ← W − lr·d`` where
``d`` is the step's gradient ``g`` for plain SGD (the plan's optimizer "none")
and, for SGD with momentum μ (the plan's "sgd" and "momentum";
``torch.optim.SGD(momentum=μ)``), the stage's one momentum buffer after
``b ← μ·b + g`` (zeros before the first step; one buffer per stage, advanced by
each of the stage's steps in order, never stashed with a weight version):

* Flush (GPipe, 1F1B, interleaved, ZB-H1): for each batch b, the gradient is
  the mean over its M microbatches (each microbatch's loss divided by M,
  accumulated) at ``W(b)``; then ``W(b+1) = W(b) − lr·d``. Partition and
  replication do not change the arithmetic, nor does ZeRO sharding. A plan
  whose optimizer is Adam steps ``W(b+1) = W(b) − lr·m̂/(√v̂ + ε)`` with the
  bias-corrected moments of the gradients so far (β = 0.9, 0.999; ε = 1e-8).
* 2BW: batch b's gradient is taken at ``W(max(0, b − 1))`` (one step stale):
  ``W(t+1) = W(t) − lr·d_t`` with ``g_t = ∇f_t(W(t−1))`` and ``W(−1) = W(0)``.
* PipeDream (1F1B-RR, weight stashing): minibatch i runs stage s on the
  stage's version ``v(s, i)`` (below); stage s steps once per round k, with
  the mean of the gradients of the round's minibatches (one per replica):
  ``W_s(k+1) = W_s(k) − lr·d_s(k)``, ``g_s(k) = mean_j ∇_s f_{k·r_s + j}``. Each minibatch's
  gradient for stage s flows through every stage at its own version ``v(·, i)``.

Where ``v(s, i)`` comes from. Stage s has ``r_s`` replicas; minibatch i goes to
replica ``i mod r_s`` as that replica's local minibatch ``n = ⌊i / r_s⌋``.
1F1B-RR gives each replica the in-flight limit ``L_s = ⌈(r_s + … + r_{P−1}) / r_s⌉``
(``P − s`` without replication): a warm-up of ``L_s − 1`` forwards, then each
forward ``F(n)`` comes right before ``B(n − L_s + 1)``. So when ``F(n)`` runs,
the replica has finished exactly ``max(0, n − L_s + 1)`` backwards, each
followed by its round's all-reduce and step — a round completes on every
replica together — hence the stage holds version

    v(s, i) = max(0, ⌊i / r_s⌋ − L_s + 1)

and weight stashing makes the backward use it too. Without replication this is
``max(0, i − (P − s) + 1)``: stage P−1 always uses the newest weights, stage 0
weights that are P − 1 minibatches stale. With vertical sync every stage uses
stage 0's version: ``v(s, i) = v(0, i)``.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn
from torch.func import functional_call

from executor.prepare import DTYPES
from planner.plan import Plan
from planner.program import FLUSH_FAMILIES


def pipedream_version(plan: Plan, stage: int, i: int) -> int:
    """Weight version stage ``stage`` uses for minibatch ``i`` under PipeDream (see the module docstring)."""
    if plan.vertical_sync and stage > 0:
        return pipedream_version(plan, 0, i)
    r = plan.replicas
    limit = math.ceil(sum(r[stage:]) / r[stage])
    return max(0, i // r[stage] - limit + 1)


def _stage_modules(plan: Plan, seed: int, dtype: torch.dtype) -> list[nn.Sequential]:
    from executor.models import build_stage

    out = []
    for sp in plan.stages:
        layers = build_stage(plan.model, sp.first_layer, sp.last_layer, seed=seed)
        mod = nn.Sequential(OrderedDict((str(sp.first_layer + j), m) for j, m in enumerate(layers)))
        out.append(mod.to(dtype=dtype))
    return out


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


class _Model:
    """The chain split as the plan splits it, run with explicit per-stage parameter tuples."""

    def __init__(self, plan: Plan, seed: int, dtype: torch.dtype) -> None:
        from executor.models import loss_fn, make_batch

        self.plan, self.seed, self.dtype = plan, seed, dtype
        self.mods = _stage_modules(plan, seed, dtype)
        self.names = [tuple(n for n, _ in m.named_parameters()) for m in self.mods]
        self.loss = loss_fn(plan.model)
        self.make_batch = make_batch

    def initial(self) -> list[tuple[torch.Tensor, ...]]:
        return [tuple(p.detach().clone() for p in m.parameters()) for m in self.mods]

    def grads(self, weights: list[tuple[torch.Tensor, ...]], index: int, scale: float) -> list[tuple[torch.Tensor, ...]]:
        """Per-stage gradients of ``scale · loss`` of microbatch ``index``, stage s evaluated at ``weights[s]``."""
        x, y = self.make_batch(self.plan.model, self.plan.microbatch_size, index, self.seed)
        h, y = _cast(x, self.dtype), _cast(y, self.dtype)
        leaves = [tuple(p.detach().requires_grad_(True) for p in w) for w in weights]
        for mod, names, ps in zip(self.mods, self.names, leaves):
            h = functional_call(mod, dict(zip(names, ps)), (h,))
        loss = self.loss(h, y) * scale
        flat = [p for ps in leaves for p in ps]
        g = torch.autograd.grad(loss, flat, allow_unused=True, materialize_grads=True)
        out, k = [], 0
        for ps in leaves:
            out.append(tuple(g[k:k + len(ps)]))
            k += len(ps)
        return out

    def state_dict(self, weights: list[tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
        return {f"stage{s}.{n}": t.detach().clone() for s, (names, w) in enumerate(zip(self.names, weights))
                for n, t in zip(names, w)}


class _SGD:
    """SGD of every stage: plain (``momentum`` None) or with momentum, one buffer per stage (see the module
    docstring)."""

    def __init__(self, stages: int, momentum: float | None) -> None:
        self.momentum = momentum
        self.bufs: list[tuple[torch.Tensor, ...] | None] = [None] * stages

    def step(self, s: int, w: tuple[torch.Tensor, ...], g: tuple[torch.Tensor, ...], lr: float) -> tuple[torch.Tensor, ...]:
        """Stage ``s``'s weights ``w`` after one step by gradient ``g``."""
        if self.momentum is not None:
            b = self.bufs[s] or tuple(torch.zeros_like(p) for p in w)
            g = self.bufs[s] = tuple(self.momentum * x + d for x, d in zip(b, g))
        return tuple(p - lr * d for p, d in zip(w, g))


def _adam(w, g, moments, t: int, lr: float):
    """Adam's t-th step (t from 1) of stage weights ``w`` by gradients ``g``; ``moments``: (m, v) per parameter,
    None before the first step. Returns the new weights and moments."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    if moments is None:
        moments = tuple((torch.zeros_like(p), torch.zeros_like(p)) for p in w)
    new_w, new_mom = [], []
    for p, d, (m, v) in zip(w, g, moments):
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d * d
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        new_w.append(p - lr * m_hat / (torch.sqrt(v_hat) + eps))
        new_mom.append((m, v))
    return tuple(new_w), tuple(new_mom)


def _add(a, b):
    return b if a is None else tuple(x + y for x, y in zip(a, b))


def reference_weights(plan: Plan, *, seed: int = 0, dtype: str = "float32", first_batch: int = 0,
                      start: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Final weights (keys ``stage{s}.{param}``) after the plan's training under its family's update rule.

    Args:
        plan: the plan (model, partition, replicas, family, microbatches, batches, lr).
        seed: weights and data seed (as the executor's).
        dtype: "float32" or "float64".
        first_batch: flush and 2BW: the batch index the run starts at (data offset), for resumed runs.
        start: weights to start from instead of the seed's initial weights (momentum buffers start at zero).
    """
    dt = DTYPES[dtype]
    model = _Model(plan, seed, dt)
    W = model.initial()
    if start is not None:
        W = [tuple(_cast(start[f"stage{s}.{n}"], dt) for n in names) for s, names in enumerate(model.names)]
    S, M, lr = len(W), plan.microbatches, plan.lr
    sgd = _SGD(S, None if plan.optimizer == "none" else float(plan.momentum))
    if plan.schedule in FLUSH_FAMILIES or plan.schedule == "2bw":
        history = [W]  # history[t] = W(t), all stages
        if plan.optimizer == "adam":
            if plan.schedule not in FLUSH_FAMILIES:
                raise ValueError(f"no Adam reference for schedule {plan.schedule!r}")
            moments = [None] * S
            for b in range(plan.batches):
                g = [None] * S
                for j in range(M):
                    gi = model.grads(W, (first_batch + b) * M + j, 1.0 / M)
                    g = [_add(a, x) for a, x in zip(g, gi)]
                stepped = [_adam(w, d, mo, b + 1, lr) for w, d, mo in zip(W, g, moments)]
                W, moments = [w for w, _ in stepped], [mo for _, mo in stepped]
            return model.state_dict(W)
        for b in range(plan.batches):
            at = history[-1] if plan.schedule != "2bw" else history[max(0, len(history) - 2)]
            g = [None] * S
            for j in range(M):
                gi = model.grads(at, (first_batch + b) * M + j, 1.0 / M)
                g = [_add(a, x) for a, x in zip(g, gi)]
            history.append([sgd.step(s, w, d, lr) for s, (w, d) in enumerate(zip(history[-1], g))])
        return model.state_dict(history[-1])
    if plan.schedule != "pipedream":
        raise ValueError(f"no reference for schedule {plan.schedule!r}")
    N, r = M, plan.replicas
    versions = [[w] for w in W]  # versions[s][v]
    acc: list[dict[int, tuple]] = [{} for _ in range(S)]
    for i in range(N):
        at = [versions[s][pipedream_version(plan, s, i)] for s in range(S)]
        gi = model.grads(at, i, 1.0)
        for s in range(S):
            k = i // r[s]
            acc[s][k] = _add(acc[s].get(k), gi[s])
            members = min(N, (k + 1) * r[s]) - k * r[s]
            if i == min(N, (k + 1) * r[s]) - 1:  # the round's last minibatch: all-reduce (mean) and step
                mean = tuple(t / members for t in acc[s].pop(k))
                versions[s].append(sgd.step(s, versions[s][-1], mean, lr))
    return model.state_dict([v[-1] for v in versions])
