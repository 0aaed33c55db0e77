"""The tensor-parallel collectives of a transformer layer: what Megatron-LM issues, one record each, and their time.

``tp_collectives`` lists, per layer of ``planner.transformer_profile``'s chain (embedding, each block, final norm + head),
every collective one TP rank issues in one microbatch's forward and backward, in issue order; the executor
issues exactly these (``tests/test_tp_collectives_agree.py`` records them on 2 gloo ranks). The profile carries
each layer's list (``Layer.tp_collectives``), and every interpreter times the list and nothing else: the cost
model and the row closed forms with :func:`ring_time_s` (through :func:`collectives_time_s`), the simulator with
the same ring's phases on its links (``sim.tensor``, ``sim.engine``). So what is timed is what is issued, by
construction: one enumeration, no separate counts.

The ring of each kind over n ranks, a tensor of S bytes, links of bandwidth B and latency α (ideal links):
all-reduce ``2(n − 1)·α + 2(n − 1)/n · S/B``; all-gather and reduce-scatter ``(n − 1)·α + (n − 1)/n · S/B``
(half the steps). Under ``collectives=nccl`` each is NCCL's model of that collective
(``topologies.ncclcost.choose``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:  # only the shape's fields are read; planner.profile imports this module, planner.transformer it
    from planner.transformer import TransformerConfig

__all__ = ["TPCollective", "tp_collectives", "CROSS_ENTROPY_BYTES", "KINDS", "NCCL_COLLECTIVE", "allreduces",
           "ring_steps", "ring_time_s", "collectives_time_s"]

#: Collective kinds, and the name ``topologies.ncclcost`` gives each.
KINDS = ("all-reduce", "all-gather", "reduce-scatter")
NCCL_COLLECTIVE = {"all-reduce": "allreduce", "all-gather": "all_gather", "reduce-scatter": "reduce_scatter"}

#: Bytes per element of the vocabulary-parallel cross entropy's per-token statistics (row maximum, sum of
#: exponentials, target logit): Megatron takes the loss of fp32 logits (``fp16_lm_cross_entropy`` off).
CROSS_ENTROPY_BYTES = 4


@dataclass(frozen=True)
class TPCollective:
    """One collective a tensor-parallel rank issues in one layer's forward or backward, per sample.

    Attributes:
        phase: ``"forward"`` or ``"backward"``.
        kind: ``"all-reduce"``, ``"all-gather"`` or ``"reduce-scatter"``.
        elements: elements per sample of the whole tensor (an all-gather's output, a reduce-scatter's input).
        element_bytes: bytes per element (16-bit activations: 2; the cross entropy's fp32 statistics: 4).
        op: the reduction (``"sum"``, or ``"max"`` for the cross entropy's row maximum).
        what: what it carries (``"attention"``, ``"mlp"``, ``"embedding"``, ``"head"``, ``"ce-max"``, ...).
    """

    phase: str
    kind: str
    elements: float
    element_bytes: int = 2
    op: str = "sum"
    what: str = ""

    @property
    def nbytes(self) -> float:
        """Bytes per sample of the whole tensor."""
        return self.elements * self.element_bytes

    def __post_init__(self) -> None:
        if self.phase not in ("forward", "backward"):
            raise ValueError(f"TP collective phase must be forward or backward (got {self.phase!r})")
        if self.kind not in KINDS:
            raise ValueError(f"TP collective kind must be one of {', '.join(KINDS)} (got {self.kind!r})")

    @property
    def ring_allreduces(self) -> float:
        """Its ring volume in all-reduces of the same tensor: 1, or ½ for an all-gather or a reduce-scatter."""
        return 1.0 if self.kind == "all-reduce" else 0.5


def tp_collectives(c: TransformerConfig, tensor_parallel: int = 1,
                   sequence_parallel: bool = False) -> list[tuple[TPCollective, ...]]:
    """The TP collectives of one microbatch per layer (embedding, each block, final norm + head; chain order),
    each phase's in issue order: what Megatron-LM runs and ``executor.tensor_parallel`` runs (the agreement is
    tested collective by collective, ``tests/test_tp_collectives_agree.py``). Empty lists for T = 1.

    Without sequence parallelism: the vocabulary-parallel embedding's partial sums are all-reduced (forward;
    its ids take no gradient, so nothing in backward); a block all-reduces the attention's and the MLP's
    row-parallel outputs (forward, ``g``) and the input gradients of its two column-parallel layers (backward,
    ``f``: MLP first); the head all-reduces its input gradient (backward) and its vocabulary-parallel cross
    entropy three per-token fp32 statistics in forward: the row maximum (a max), the sum of exponentials and
    the target's logit (sums).

    With sequence parallelism each ``f`` is an all-gather along the sequence (backward: a reduce-scatter) and
    each ``g`` a reduce-scatter (backward: an all-gather), all of the whole s·h tensor; a column-parallel layer
    keeps only its rank's part of the input and all-gathers it again in backward for its weight gradient
    (Megatron-LM; Korthikanti et al. 2022, section 4.2.2; what :func:`block_saved_bytes` counts). A block's
    forward is all-gather, reduce-scatter, all-gather, reduce-scatter; its backward (MLP first) all-gather
    (fc2's output gradient), all-gather (fc1's input again), reduce-scatter, and the same for the attention.
    The head's matrix gathers the sequence (forward all-gather; backward all-gather again, reduce-scatter). The Llama embedding reduce-scatters its
    partial sums (backward: an all-gather of the output gradient); a GPT embedding all-reduces them, adds the
    positions and keeps its part of the sequence, which in backward all-gathers the output gradient (as
    Megatron does where there are position embeddings). Not per microbatch, so not here: sequence
    parallelism's once-per-step all-reduce of the norms' and row-parallel biases' gradients.

    Every one of them is timed: ``planner.transformer_profile.transformer_profile`` puts each layer's tuple into its
    ``Layer.tp_collectives``, and the cost model, the simulator and the row closed forms price each collective
    as issued, a ring of its kind over the TP group (:func:`ring_time_s`), one after another inside the
    layer's compute.
    """
    if tensor_parallel == 1:
        return [()] * (c.layers + 2)
    sh = float(c.seq * c.hidden)
    AR, AG, RS = "all-reduce", "all-gather", "reduce-scatter"

    def col(phase: str, kind: str, what: str) -> TPCollective:
        return TPCollective(phase, kind, sh, 2, "sum", what)

    ce = tuple(TPCollective("forward", AR, float(c.seq), CROSS_ENTROPY_BYTES, op, what)
               for op, what in (("max", "ce-max"), ("sum", "ce-sum-exp"), ("sum", "ce-target")))
    if not sequence_parallel:
        emb = (col("forward", AR, "embedding"),)
        block = (col("forward", AR, "attention"), col("forward", AR, "mlp"),
                 col("backward", AR, "mlp"), col("backward", AR, "attention"))
        head = (*ce, col("backward", AR, "head"))
    else:
        emb = ((col("forward", RS, "embedding"),) if c.llama else
               (col("forward", AR, "embedding"),)) + (col("backward", AG, "embedding"),)
        block = (col("forward", AG, "attention"), col("forward", RS, "attention"),
                 col("forward", AG, "mlp"), col("forward", RS, "mlp"),
                 col("backward", AG, "mlp"), col("backward", AG, "mlp-input"), col("backward", RS, "mlp"),
                 col("backward", AG, "attention"), col("backward", AG, "attention-input"),
                 col("backward", RS, "attention"))
        head = (col("forward", AG, "head"), *ce, col("backward", AG, "head-input"), col("backward", RS, "head"))
    return [emb] + [block] * c.layers + [head]


def allreduces(nbytes: float, forward: int = 0, backward: int = 0, what: str = "all-reduce") -> tuple[TPCollective, ...]:
    """``forward`` then ``backward`` whole all-reduces of ``nbytes`` per sample (a hand-made layer's shorthand:
    ``Layer(tp_allreduce_bytes=..., tp_forward_allreduces=..., tp_backward_allreduces=...)``)."""
    one = lambda phase: TPCollective(phase, "all-reduce", float(nbytes), 1, "sum", what)
    return (one("forward"),) * forward + (one("backward"),) * backward


def ring_steps(kind: str, ranks: int) -> int:
    """Ring steps of a collective of ``kind`` over ``ranks`` ranks: 2(n − 1) for an all-reduce, n − 1 otherwise."""
    if kind not in KINDS:
        raise ValueError(f"unknown collective kind {kind!r}; use one of {', '.join(KINDS)}")
    return (2 if kind == "all-reduce" else 1) * max(0, ranks - 1)


def ring_time_s(topology, group: list[str], kind: str, nbytes: float) -> float:
    """Seconds of one ring collective of ``kind`` on a tensor of ``nbytes`` over the devices ``group`` (in ring
    order) of ``topology``, under its collectives mode (``Topology.ring_time_s``)."""
    return topology.ring_time_s(list(group), nbytes, NCCL_COLLECTIVE[kind])


def collectives_time_s(collectives: Iterable[TPCollective], microbatch_size: int,
                       price: Callable[[str, float], float]) -> float:
    """Seconds of ``collectives`` one after another for one microbatch of ``microbatch_size`` samples, each
    priced by ``price(kind, bytes)`` (e.g. ``lambda k, b: ring_time_s(topology, group, k, b)``)."""
    return sum(price(c.kind, c.nbytes * microbatch_size) for c in collectives)
