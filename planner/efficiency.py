"""Compute efficiency: achieved time of a layer's kernels from their shapes, fitted per device kind.

A fixed fraction of peak makes small models look too fast: a GEMM whose sides are a
few hundred wide, a softmax over ``b·a·s²`` scores, a layer norm — each is limited by
memory bandwidth or by the cost of launching it, not by the tensor cores. This module
times a layer's **work** (:class:`Work`: its GEMMs with their shapes, the bytes its
memory-bound kernels move, how many kernels it launches) on a device with seven
physically meaningful parameters (:class:`EfficiencyParams`):

* ``gemm_efficiency`` — the fraction of the device's dense bf16/fp16 peak a large GEMM
  reaches;
* ``memory_efficiency`` — the fraction of its memory bandwidth a streaming kernel reaches;
* ``kernel_launch_s`` — time per kernel launched (launch and the gap to the next);
* ``layer_overhead_s`` — framework time per layer per forward or backward (hooks, Python);
* ``iteration_overhead_s`` — fixed time per training iteration (data loading, timers, logging);
* ``overlap_exponent`` — how completely the host's launch work hides behind the device's
  (launches are asynchronous: a layer whose kernels are short is host-bound);
* ``loss_overhead_s`` — fixed time per microbatch at the loss, on the last pipeline stage
  (Megatron's per-microbatch loss work beyond its kernels: the vocabulary-parallel cross
  entropy's reductions, averaging the loss over the data-parallel group, the host waiting on
  them); ``planner.transformer_profile`` adds it to the output head's forward.

The device side: a GEMM of F FLOPs moving B bytes (bf16 operands and result) takes
``√(t_c² + t_m²)`` with ``t_c = F / (peak · gemm_efficiency)`` and
``t_m = B / (bandwidth · memory_efficiency)``: the compute-bound time for wide GEMMs,
the memory-bound one for skinny ones, and a smooth join near the ridge (the exponent 2 is
a fixed choice, not fitted). Memory-bound kernels take ``bytes / (bandwidth ·
memory_efficiency)``. The host side: launches × ``kernel_launch_s`` + ``layer_overhead_s``.
A layer's time joins the two by a smooth maximum (:func:`work_time_s`). Backward work (:meth:`Work.backward`) is each GEMM's two
gradient GEMMs (input and weight), twice the streamed bytes and twice the launches, after any products
it re-runs (flash attention's scores, :attr:`Work.rerun`).

:func:`fit` finds the parameters by ``scipy.optimize.least_squares`` on relative errors of
whatever prediction the caller builds from them (pipetwin's ground truth fits on a fixed
calibration subset of measured iterations); a :class:`DeviceCalibration` holds the result
with what it was fitted on and by which rule, and is saved as JSON that commands take as
``--device-calibration FILE`` (:func:`load_device_calibration`).

**Per-shape block times** (:class:`BlockTiming`): a calibration may also hold a table of
measured (or fitted) forward and backward seconds of one transformer block, keyed by its GEMM
shape (family, hidden, heads, KV heads, FFN width, sequence, TP degree, sequence parallelism,
microbatch) — what a profiler timing the user's own layer shapes on a GPU records. Where a
block's shape is in the table its times replace the smooth model's; elsewhere the seven
parameters time it. :func:`fit_shape_factors` learns the table from measured iterations: one
scale factor per shape, each a one-dimensional least-squares fit on the rows of that shape,
shrunk towards 1 (the smooth model) by ``prior_rows`` pseudo-rows, shapes with fewer than
``min_rows`` rows left out.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

from planner.profile import ProfileError
from topologies.devices import DeviceKind, device_kind
from topologies.files import output_path

__all__ = ["Gemm", "Work", "EfficiencyParams", "DeviceCalibration", "CalibrationFileError", "work_time_s",
           "optimizer_step_s", "fit", "load_device_calibration", "PARAM_BOUNDS", "DEFAULT_PARAMS",
           "OPTIMIZER_BYTES_PER_PARAM", "BYTES_PER_ELEMENT", "GRAD_ACCUM_BYTES_PER_PARAM", "FitResult", "BlockTiming",
           "BlockKey", "fit_shape_factors", "SHAPE_FACTOR_BOUNDS"]

#: bf16/fp16 operands.
BYTES_PER_ELEMENT = 2
#: HBM traffic of one fused Adam step per parameter under mixed precision: read the fp32 gradient (4),
#: read and write the fp32 master weight (8), the moments m and v (16), write the 16-bit weight (2),
#: plus reading the gradient again for the global norm (4) and zeroing it (4).
OPTIMIZER_BYTES_PER_PARAM = 38
#: Gradient accumulation traffic per weight per backward: the 16-bit weight gradient written, then added
#: into the fp32 main gradient (read 2 + 4, write 4).
GRAD_ACCUM_BYTES_PER_PARAM = 12


class CalibrationFileError(ProfileError):
    """A device calibration file that cannot be read; the message says which field is wrong."""


@dataclass(frozen=True)
class Gemm:
    """A (batched) matrix product ``[m, k] @ [k, n]`` repeated ``batch`` times.

    ``fused``: a product inside a fused attention kernel (flash attention), whose largest matrix — the
    s × s scores or probabilities, which flash attention keeps on chip — never goes through memory (taken
    as the largest of the three, which it is whenever the sequence is at least the head dimension).
    """

    m: int
    n: int
    k: int
    batch: int = 1
    fused: bool = False

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k * self.batch

    @property
    def bytes(self) -> float:
        """Operand and result bytes (16-bit), each read or written once; a ``fused`` product's largest left out."""
        sides = (self.m * self.k, self.k * self.n, self.m * self.n)
        return float(BYTES_PER_ELEMENT * self.batch * (sum(sides) - (max(sides) if self.fused else 0)))


@dataclass(frozen=True)
class Work:
    """What one forward of a layer does on one device for one microbatch.

    Attributes:
        gemms: its matrix products, with shapes.
        memory_bytes: bytes moved by its memory-bound kernels (norms, softmax, dropout, bias and
            activation functions, residual adds, layout copies).
        kernels: kernels launched (GEMMs included).
        weight_gemms: how many of ``gemms`` (the first ones) multiply by a weight, so their backward has a
            weight gradient; the rest (attention's score and value products) have two input gradients.
        input_grad: False where the backward needs no gradient of the layer's input (an embedding).
        weight_elements: weights whose gradients the backward accumulates into fp32 main gradients
            (``GRAD_ACCUM_BYTES_PER_PARAM`` streamed per weight per backward).
        rerun: products the backward runs again before its gradients (flash attention recomputes its
            scores QKᵀ inside its backward kernel, since it kept none).
    """

    gemms: tuple[Gemm, ...] = ()
    memory_bytes: float = 0.0
    kernels: int = 0
    weight_gemms: int | None = None
    input_grad: bool = True
    weight_elements: float = 0.0
    rerun: tuple[Gemm, ...] = ()

    @property
    def flops(self) -> float:
        return sum(g.flops for g in self.gemms)

    def backward(self) -> "Work":
        """The backward's work: the ``rerun`` products, then per GEMM ``Y = X W``, ``dX = dY Wᵀ``
        ([m, n] @ [n, k]) and ``dW = Xᵀ dY`` ([k, m] @ [m, n]) (fused as the GEMM was); twice the
        streamed bytes and the launches, plus the accumulation of the weight gradients."""
        out: list[Gemm] = list(self.rerun)
        nw = len(self.gemms) if self.weight_gemms is None else self.weight_gemms
        for i, g in enumerate(self.gemms):
            if self.input_grad or i >= nw:
                out.append(Gemm(g.m, g.k, g.n, g.batch, g.fused))
            out.append(Gemm(g.k, g.n, g.m, g.batch, g.fused))
        accumulate = GRAD_ACCUM_BYTES_PER_PARAM * self.weight_elements
        return Work(tuple(out), 2.0 * self.memory_bytes + accumulate, 2 * self.kernels, None, True, 0.0)


@dataclass(frozen=True)
class EfficiencyParams:
    """The fitted parameters of one device kind (see the module docstring)."""

    gemm_efficiency: float = 0.70
    memory_efficiency: float = 0.70
    kernel_launch_s: float = 5e-6
    layer_overhead_s: float = 50e-6
    iteration_overhead_s: float = 10e-3
    overlap_exponent: float = 4.0
    loss_overhead_s: float = 0.0

    def as_vector(self) -> list[float]:
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def from_vector(cls, x: Sequence[float]) -> "EfficiencyParams":
        return cls(*[float(v) for v in x])


#: Starting point of a fit, and what a command uses when it is given no calibration file.
DEFAULT_PARAMS = EfficiencyParams()
#: (lower, upper) bound of each parameter in a fit, in EfficiencyParams field order.
PARAM_BOUNDS: tuple[tuple[float, float], ...] = ((0.05, 1.0), (0.05, 1.0), (0.0, 1e-4), (0.0, 5e-3), (0.0, 1.0),
                                                 (1.0, 16.0), (0.0, 0.02))
#: Parameters a calibration file written before they existed may lack, and the value that reproduces it.
OPTIONAL_PARAMS = {"loss_overhead_s": 0.0}


def work_time_s(work: Work, kind: DeviceKind, p: EfficiencyParams, layer: bool = True) -> float:
    """Seconds ``work`` takes on a device of ``kind`` (``layer``: the host also pays the per-layer overhead).

    The device time (GEMMs and streamed bytes) and the host time (launches and per-layer overhead)
    overlap, as asynchronous launches let them: ``(device^q + host^q)^(1/q)`` with ``q`` the fitted
    ``overlap_exponent`` (1: they add up; large: the longer one alone).
    """
    peak = kind.peak_flops * p.gemm_efficiency
    bw = kind.memory_bytes_per_s * p.memory_efficiency
    dev = 0.0
    for g in work.gemms:
        tc, tm = g.flops / peak, g.bytes / bw
        dev += math.sqrt(tc * tc + tm * tm)
    dev += work.memory_bytes / bw
    host = work.kernels * p.kernel_launch_s + (p.layer_overhead_s if layer else 0.0)
    q = p.overlap_exponent
    if host <= 0.0 or dev <= 0.0:
        return dev + host
    big = max(dev, host)
    return big * ((dev / big) ** q + (host / big) ** q) ** (1.0 / q)


def optimizer_step_s(params_per_device: float, kind: DeviceKind, p: EfficiencyParams) -> float:
    """Seconds of one fused mixed-precision Adam step over ``params_per_device`` parameters (memory-bound)."""
    return OPTIMIZER_BYTES_PER_PARAM * params_per_device / (kind.memory_bytes_per_s * p.memory_efficiency)


#: A transformer block's shape as the per-shape table keys it: (family, hidden, heads, kv_heads, ffn, seq,
#: tensor_parallel, sequence_parallel, microbatch); ``planner.transformer_profile.block_key`` builds it from a config.
BlockKey = tuple[str, int, int, int, int, int, int, bool, int]
_KEY_FIELDS = ("family", "hidden", "heads", "kv_heads", "ffn", "seq", "tensor_parallel", "sequence_parallel",
               "microbatch")
#: Bounds of a fitted per-shape scale factor (a block at a third to three times its smooth-model time).
SHAPE_FACTOR_BOUNDS = (1.0 / 3.0, 3.0)


@dataclass(frozen=True)
class BlockTiming:
    """Seconds of one transformer block's forward and backward (no recomputation, no TP collectives) on one
    TP rank for one microbatch of ``key``'s shape; ``rows``: how many measured iterations it was fitted on
    (0: profiled directly), ``source``: where it came from."""

    key: BlockKey
    forward_s: float
    backward_s: float
    rows: int = 0
    source: str = ""

    def to_dict(self) -> dict:
        d = dict(zip(_KEY_FIELDS, self.key))
        d.update(forward_s=self.forward_s, backward_s=self.backward_s, rows=self.rows, source=self.source)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "BlockTiming":
        if not isinstance(d, dict):
            raise CalibrationFileError(f"{where}: each block_timings entry must be an object with "
                                       f"{', '.join(_KEY_FIELDS)}, forward_s, backward_s")
        missing = [n for n in _KEY_FIELDS + ("forward_s", "backward_s") if n not in d]
        if missing:
            raise CalibrationFileError(f"{where}: a block_timings entry lacks {', '.join(missing)}")
        try:
            key = (str(d["family"]),) + tuple(int(d[n]) for n in _KEY_FIELDS[1:7]) + (
                bool(d["sequence_parallel"]), int(d["microbatch"]))
            f, b = float(d["forward_s"]), float(d["backward_s"])
        except (TypeError, ValueError) as e:
            raise CalibrationFileError(f"{where}: bad block_timings field ({e})") from None
        if not (f > 0 and b > 0 and math.isfinite(f) and math.isfinite(b)):
            raise CalibrationFileError(f"{where}: block_timings {key}: forward_s and backward_s must be positive seconds")
        return cls(key, f, b, int(d.get("rows", 0)), str(d.get("source", "")))


@dataclass(frozen=True)
class DeviceCalibration:
    """A device kind's fitted efficiency parameters and where they came from.

    Attributes:
        device_kind: the catalogue kind (``topologies.devices``) the parameters are for.
        params: the fitted parameters.
        fitted_on: what the fit used (e.g. "vtrain ground_truth_*.csv calibration rows").
        rule: the rule that chose the fitting rows (so nobody scores on them).
        n_rows: rows fitted on.
        rms_relative_error: root-mean-square relative error of the fit on those rows.
        gradient_bytes_per_param: bytes per parameter the data-parallel gradient all-reduce sent in the
            fitted runs (4: fp32 main gradients, 2: fp16), as the fit chose it.
        block_timings: per-shape block times (:class:`BlockTiming`) that replace the smooth model's where a
            block's shape is listed (empty: the smooth model everywhere; files without the table load so).
    """

    device_kind: str
    params: EfficiencyParams
    fitted_on: str = ""
    rule: str = ""
    n_rows: int = 0
    rms_relative_error: float = 0.0
    gradient_bytes_per_param: int = 4
    block_timings: tuple[BlockTiming, ...] = ()

    @property
    def kind(self) -> DeviceKind:
        return device_kind(self.device_kind)

    def block_timing(self, key: BlockKey) -> BlockTiming | None:
        """The table's entry for a block of shape ``key``, or None (the smooth model times it)."""
        for t in self.block_timings:
            if t.key == key:
                return t
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_timings"] = [t.to_dict() for t in self.block_timings]
        d["format"] = "pipetwin-device-calibration/1"
        return d

    def save(self, path: str | Path) -> None:
        output_path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, d: dict, where: str = "device calibration") -> "DeviceCalibration":
        if not isinstance(d, dict) or not isinstance(d.get("params"), dict):
            raise CalibrationFileError(f"{where}: expected a JSON object with 'device_kind' and 'params' "
                                       f"(write one with `pipetwin groundtruth --save-calibration FILE`)")
        names = [f.name for f in fields(EfficiencyParams)]
        missing = [n for n in names if n not in d["params"] and n not in OPTIONAL_PARAMS]
        if missing:
            raise CalibrationFileError(f"{where}: params lacks {', '.join(missing)}")
        try:
            params = EfficiencyParams(**{n: float(d["params"].get(n, OPTIONAL_PARAMS.get(n))) for n in names})
            kind = device_kind(str(d["device_kind"])).name
        except (TypeError, ValueError, KeyError) as e:
            raise CalibrationFileError(f"{where}: bad field ({e})") from None
        for (lo, hi), n in zip(PARAM_BOUNDS, names):
            v = getattr(params, n)
            if not (lo <= v <= hi):
                raise CalibrationFileError(f"{where}: {n}={v} lies outside [{lo}, {hi}]")
        grad = d.get("gradient_bytes_per_param", 4)
        if grad not in (2, 4):
            raise CalibrationFileError(f"{where}: gradient_bytes_per_param must be 2 or 4 (got {grad!r})")
        table = d.get("block_timings", [])
        if not isinstance(table, list):
            raise CalibrationFileError(f"{where}: block_timings must be a list of per-shape block times")
        timings = tuple(BlockTiming.from_dict(e, where) for e in table)
        if len({t.key for t in timings}) != len(timings):
            raise CalibrationFileError(f"{where}: block_timings lists a shape twice")
        return cls(kind, params, str(d.get("fitted_on", "")), str(d.get("rule", "")), int(d.get("n_rows", 0)),
                   float(d.get("rms_relative_error", 0.0)), int(grad), timings)


def load_device_calibration(path: str | Path | None) -> DeviceCalibration | None:
    """The calibration in ``path`` (None → None): the one loader every ``--device-calibration`` flag uses."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise CalibrationFileError(f"device calibration {str(p)!r} does not exist; "
                                   f"write one with `pipetwin groundtruth --save-calibration FILE`")
    try:
        return DeviceCalibration.from_dict(json.loads(p.read_text()), where=f"device calibration {str(p)!r}")
    except json.JSONDecodeError as e:
        raise CalibrationFileError(f"device calibration {str(p)!r} is not valid JSON ({e})") from None


@dataclass(frozen=True)
class FitResult:
    """A fit's parameters, its relative residuals and whether the optimiser converged."""

    params: EfficiencyParams
    residuals: tuple[float, ...] = field(repr=False)
    success: bool = True

    @property
    def rms_relative_error(self) -> float:
        r = self.residuals
        return math.sqrt(sum(x * x for x in r) / len(r)) if r else 0.0


def fit(predict: Callable[[EfficiencyParams], Sequence[float]], measured: Sequence[float],
        start: EfficiencyParams = DEFAULT_PARAMS, fixed: dict[str, float] | None = None) -> FitResult:
    """Least-squares fit of the parameters so that ``predict(params)`` (one time per measured row)
    matches ``measured`` in relative terms. ``fixed`` holds parameters that are not fitted."""
    import numpy as np
    from scipy.optimize import least_squares

    names = [f.name for f in fields(EfficiencyParams)]
    fixed = dict(fixed or {})
    free = [i for i, n in enumerate(names) if n not in fixed]
    meas = np.asarray(measured, dtype=float)
    base = start.as_vector()
    # scale each free parameter to its bound width so the optimiser sees comparable steps
    lo = np.array([PARAM_BOUNDS[i][0] for i in free])
    hi = np.array([PARAM_BOUNDS[i][1] for i in free])
    width = hi - lo

    def params_of(z) -> EfficiencyParams:
        x = list(base)
        for n, v in fixed.items():
            x[names.index(n)] = v
        for j, i in enumerate(free):
            x[i] = lo[j] + width[j] * z[j]
        return EfficiencyParams.from_vector(x)

    def residual(z):
        return np.asarray(predict(params_of(z)), dtype=float) / meas - 1.0

    z0 = np.clip((np.array([base[i] for i in free]) - lo) / width, 1e-6, 1 - 1e-6)
    res = least_squares(residual, z0, bounds=(0.0, 1.0), x_scale="jac", diff_step=1e-4, max_nfev=400)
    return FitResult(params_of(res.x), tuple(float(v) for v in res.fun), bool(res.success))


def fit_shape_factors(groups: dict, prior_rows: float = 1.0, min_rows: int = 2) -> dict:
    """Per shape, the block-time scale factor that best fits its rows: ``groups`` maps a shape key to
    ``(predict, measured)``, ``predict(c)`` giving that shape's rows' times with its blocks' times scaled by
    ``c``. Each factor minimises ``Σ (predict(c)/measured − 1)² + prior_rows · (c − 1)²`` (the shrinkage: as
    if ``prior_rows`` more rows agreed with the smooth model) within ``SHAPE_FACTOR_BOUNDS``; a shape with
    fewer than ``min_rows`` rows gets no factor (the smooth model stays). Shapes are independent (a row has
    one block shape), so each is a one-dimensional fit."""
    import numpy as np
    from scipy.optimize import minimize_scalar

    out = {}
    lo, hi = SHAPE_FACTOR_BOUNDS
    for key, (predict, measured) in groups.items():
        meas = np.asarray(measured, dtype=float)
        if len(meas) < min_rows:
            continue

        def loss(c: float) -> float:
            r = np.asarray(predict(c), dtype=float) / meas - 1.0
            return float(r @ r) + prior_rows * (c - 1.0) ** 2

        # the loss may have a kink where the slowest stage changes: bracket on a grid, then refine
        grid = np.exp(np.linspace(math.log(lo), math.log(hi), 41))
        i = int(np.argmin([loss(c) for c in grid]))
        a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        res = minimize_scalar(loss, bounds=(a, b), method="bounded", options={"xatol": 1e-6})
        out[key] = float(res.x)
    return out
