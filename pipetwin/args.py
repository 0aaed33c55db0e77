"""Arguments the commands share: comma lists of words, of integers and of device counts (one spelling each), and a
fixed plan's grid (``--tp --pp --dp [--vp]``) with recomputation (``--recompute [MODE]``), the device
calibration every command that times an analytic model takes (``--device-calibration FILE``), and the program
file ``simulate`` and ``run`` take (``--program FILE``, warned about when it is not its declared family's)."""
from __future__ import annotations

import argparse
import re

__all__ = ["words", "int_list", "counts", "add_grid_flags", "add_recompute_flag", "grid_given", "grid_degrees",
           "grid_plan", "check_grid_profile", "add_device_calibration_flag", "check_calibration_kinds",
           "check_calibration_topology", "read_program"]


def words(text: str) -> tuple[str, ...]:
    """``a,b, c`` -> ("a", "b", "c"); empty is refused."""
    out = tuple(w.strip() for w in text.split(",") if w.strip())
    if not out:
        raise argparse.ArgumentTypeError("expects a comma-separated list")
    return out


def int_list(text: str) -> tuple[int, ...]:
    """``2,1,1`` -> (2, 1, 1)."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects comma-separated integers like 2,1,1, got {text!r}") from None


def counts(text: str) -> tuple[int, ...]:
    """``8,16,64``; ``8,16,...,512`` (geometric with the first two's ratio, or arithmetic when that ratio is not whole);
    ``8:64:8`` (start:stop:step, inclusive)."""
    t = text.replace(" ", "")
    try:
        if re.fullmatch(r"\d+:\d+(:\d+)?", t):
            a, b, *st = (int(x) for x in t.split(":"))
            step = st[0] if st else 1
            if step < 1 or a < 1 or b < a:
                raise ValueError
            return tuple(range(a, b + 1, step))
        parts = t.split(",")
        if "..." in parts:
            i = parts.index("...")
            head, tail = [int(x) for x in parts[:i]], [int(x) for x in parts[i + 1:]]
            if len(head) < 2 or len(tail) != 1 or head[0] < 1 or head[1] <= head[0]:
                raise ValueError
            out = list(head)
            geometric = head[1] % head[0] == 0
            while True:
                nxt = out[-1] * (head[1] // head[0]) if geometric else out[-1] + (head[1] - head[0])
                if nxt > tail[0]:
                    break
                out.append(nxt)
            if out[-1] != tail[0]:
                raise ValueError
            return tuple(out)
        vals = tuple(int(x) for x in parts if x)
        if not vals or min(vals) < 1:
            raise ValueError
        return vals
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expects positive counts like 8,16,64, 8,16,...,512 or 8:64:8, got {text!r}") from None


# --- a fixed plan: tensor x pipeline x data parallel -------------------------------------------------
def _degree(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1 or v >= 2**31:
        raise argparse.ArgumentTypeError(f"expects a whole number >= 1, got {text!r}")
    return v


def add_grid_flags(p: argparse.ArgumentParser, *, sequence_parallel: bool = True, aliases: bool = False) -> None:
    """``--tp T --pp P --dp D [--vp V]``: a fixed plan, the layers split evenly, TP ranks fastest along the devices.

    ``aliases``: ``--stages`` also names ``--pp`` and ``--chunks`` ``--vp`` (for a command with no other
    meaning for them).
    """
    g = p.add_argument_group("fixed plan (tensor x pipeline x data parallel; T*P*D = the devices)")
    g.add_argument("--tp", type=_degree, default=None, metavar="T",
                   help="tensor-parallel degree: each stage replica is T devices (consecutive: inside a server)")
    g.add_argument("--pp", *(("--stages",) if aliases else ()), dest="pp", type=_degree, default=None, metavar="P",
                   help="pipeline stages (devices along the pipeline)")
    g.add_argument("--dp", type=_degree, default=None, metavar="D", help="data-parallel replicas of every stage")
    g.add_argument("--vp", *(("--chunks",) if aliases else ()), dest="vp", type=_degree, default=None, metavar="V",
                   help="model chunks per device (interleaved 1F1B; default 2 with --schedule interleaved)")
    if sequence_parallel:
        g.add_argument("--sequence-parallel", action="store_true",
                       help="Megatron sequence parallelism inside each TP group (needs --tp > 1)")


def add_recompute_flag(p: argparse.ArgumentParser) -> None:
    """``--recompute`` (full, as it always meant) or ``--recompute none|selective|full``."""
    from planner.recompute import MODES

    p.add_argument("--recompute", nargs="?", const="full", default=None, choices=MODES, metavar="MODE",
                   help="activation recomputation: full (bare --recompute), selective (the attention core) or none "
                        "(default: none, or what a --plan file says)")


def add_zero_flag(p: argparse.ArgumentParser, note: str = "") -> None:
    """``--zero {0,1,2,3}``: ZeRO sharding of each stage's training state over its replicas (``planner.sharding``);
    ``note`` ends the help (what a command takes of it)."""
    p.add_argument("--zero", type=int, default=None, choices=[0, 1, 2, 3], metavar="STAGE",
                   help="ZeRO stage over each stage's replicas: 0 none (default, or what a --plan file says), 1 the "
                        "optimizer state, 2 also the gradients, 3 also the weights (FSDP: each layer gathered before "
                        "every pass, its gradients reduce-scattered after); flush schedules" + note)


def grid_given(args) -> bool:
    return any(getattr(args, k, None) is not None for k in ("tp", "pp", "dp", "vp"))


def grid_degrees(args, devices: int | None) -> tuple[int, int, int, int]:
    """(tp, pp, dp, vp) from the flags, the missing ones filled so that T·P·D = ``devices`` (when known)
    (``planner.plan.fill_degrees``; a PlanError, one line, when they cannot)."""
    from planner.plan import fill_degrees

    return fill_degrees(devices, *(getattr(args, k, None) for k in ("tp", "pp", "dp", "vp")))


def check_grid_profile(profile, tp: int, sequence_parallel: bool = False) -> None:
    """A grid with T > 1 needs a profile per TP rank of T (an analytic transformer built for it)."""
    from pipetwin.errors import UserError

    if profile.tensor_parallel != tp:
        raise UserError(f"--tp {tp} needs a transformer model (a preset like gpt3-13b or gpt:/bert:/llama:...) whose "
                        f"profile is split per TP rank; {profile.name!r} is not one: drop --tp or give such a model")
    if sequence_parallel and tp < 2:
        raise UserError("--sequence-parallel splits activations over the TP ranks; it needs --tp 2 or more")


def grid_plan(args, model: str, profile, devices: list[str] | None, *, schedule: str, microbatches: int | None,
              microbatch_size: int = 1, batches: int = 1, vertical_sync: bool = False, topology: str | None = None,
              lr: float | None = None):
    """The plan ``--tp --pp --dp [--vp]`` ask for (``planner.plan.plan_from_flags``) on ``devices`` (all of them)."""
    from planner.plan import plan_from_flags

    tp, pp, dp, vp = grid_degrees(args, len(devices) if devices is not None else None)
    check_grid_profile(profile, tp, getattr(args, "sequence_parallel", False))
    if schedule == "auto":
        schedule = "interleaved" if vp > 1 else "1f1b"
    return plan_from_flags(model, len(profile), pp=pp, dp=dp, tp=tp, vp=vp, schedule=schedule,
                           microbatches=microbatches, microbatch_size=microbatch_size, batches=batches,
                           vertical_sync=vertical_sync, recompute=getattr(args, "recompute", "none") or "none",
                           topology=topology, devices=devices, lr=lr,
                           sequence_parallel=getattr(args, "sequence_parallel", False))


# --- a device calibration (the compute-efficiency model fitted per device kind) ----------------------
def _calibration_file(text: str):
    """``--device-calibration FILE`` → a ``planner.efficiency.DeviceCalibration``, read when the command line is
    parsed, so a missing, malformed or out-of-range file is one line (argparse's exit 2) before anything runs."""
    from planner.efficiency import CalibrationFileError, load_device_calibration

    try:
        return load_device_calibration(text)
    except CalibrationFileError as e:
        raise argparse.ArgumentTypeError(e.args[0]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise argparse.ArgumentTypeError(f"device calibration {text!r} cannot be read ({e}); give the JSON file "
                                         f"`pipetwin groundtruth --save-calibration FILE` wrote") from None


def add_device_calibration_flag(p: argparse.ArgumentParser) -> None:
    """``--device-calibration FILE``: time analytic transformer models by the fitted efficiency model
    (``planner.efficiency``) of the file's device kind instead of a fixed fraction of peak; ``args.device_calibration``
    is the loaded ``DeviceCalibration`` or None."""
    p.add_argument("--device-calibration", type=_calibration_file, default=None, metavar="FILE",
                   help="device calibration JSON (from `pipetwin groundtruth --save-calibration FILE`): analytic "
                        "transformer models are timed by its fitted efficiency model on its device kind, at the "
                        "microbatch size used (default: a fixed fraction of the kind's peak)")


def check_calibration_kinds(calibration, kinds, where: str) -> None:
    """A UserError (one line) unless every device kind in ``kinds`` is the calibration's (``gpu-generic``, what a
    topology that names no device kind holds, takes the calibration's kind). ``where`` names what the kinds
    came from (e.g. "topology 'dgx:servers=2'"). No calibration: nothing to check."""
    if calibration is None:
        return
    from pipetwin.errors import UserError
    from topologies.devices import device_kind

    cal = calibration.kind.name
    other = sorted({device_kind(k).name for k in kinds} - {cal, "gpu-generic"})
    if other:
        raise UserError(f"the device calibration is for {cal} but {where} has {', '.join(other)} devices; give a "
                        f"calibration fitted on that kind, or devices of kind {cal}")


def check_calibration_topology(calibration, topology) -> None:
    """``check_calibration_kinds`` on the devices of ``topology``."""
    if calibration is not None:
        check_calibration_kinds(calibration, [topology.device(d).kind for d in topology.devices],
                                f"topology {topology.name!r}")


def read_program(path: str, command: str):
    """The program file ``--program FILE`` names (``simulate`` and ``run`` take it), loaded; when it keeps the laws
    but its order or placement is not what its declared family generates, one warning line on stderr says where
    (it still runs as written: ``planner.check.declared_family_differs``). A document that does not agree with
    itself (``Program.check_shape``) is refused here, in one line; one that breaks a law gets no warning: the
    command refuses it in one line."""
    import sys

    from planner.check import check, declared_family_differs
    from planner.program import Program
    from topologies.errors import InputError

    program = Program.load(path)
    program.check_shape()
    try:
        check(program)
    except InputError:
        return program
    differs = declared_family_differs(program)
    if differs:
        print(f"pipetwin {command}: warning: {path}: {differs}", file=sys.stderr)
    return program
