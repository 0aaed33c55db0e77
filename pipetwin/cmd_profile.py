"""`pipetwin profile`: measure a model's layers (times, activation, saved and parameter bytes) into a profile, or
(``--blocks``) time transformer blocks per shape into a device calibration's ``block_timings`` table."""
from __future__ import annotations

import json
import sys

from pipetwin.args import add_device_calibration_flag, counts


def register(sub) -> None:
    p = sub.add_parser("profile", help="measure a model's per-layer costs into a profile JSON, or time "
                                       "transformer blocks per shape into a device calibration",
                       description="--model: measure each chain layer of a model on this CPU (one thread) or GPU: "
                                   "forward and backward seconds (median after warm-up), output activation bytes, "
                                   "bytes saved for backward and parameter bytes, per sample. --blocks: time one "
                                   "transformer block of each model (the executor's gpt or llama block, sliced to "
                                   "one TP rank, TP collectives left out) per TP degree and microbatch size, and "
                                   "write the times into a device calibration's block_timings table (-o), which every "
                                   "--device-calibration command then uses for those block shapes. The forward is "
                                   "timed as training runs it, autograd recording (the forward of a run without "
                                   "recomputation, and the one a recomputing backward re-runs); the backward is timed "
                                   "on its own, after the forward's clock stops, without any recomputation: the two "
                                   "quantities the efficiency model reads (forward_s, backward_s). Full recomputation's "
                                   "first forward runs without autograd and is charged the same forward_s.")
    p.add_argument("--model",
                   help="model spec: mlp:layers=8,width=512 | gpt:layers=4,hidden=256,heads=4,seq=128,vocab=512 | "
                        "llama:layers=4,hidden=256,heads=4,kv_heads=2,ffn=512,seq=128,vocab=512 | "
                        "cnn:blocks=4,channels=32,size=32,classes=10 | uniform:layers=8,fwd=1e-3,bwd=2e-3,act=B,"
                        "params=B | package.module:function | path/file.py:function")
    p.add_argument("--blocks", action="append", metavar="MODEL",
                   help="time one block of this transformer into a device calibration (-o): a preset "
                        "(gpt3-1.3b, llama3-8b; several: gpt3-350m,gpt3-1.3b), gpt:layers=L,hidden=H,heads=A,seq=S,"
                        "vocab=V or llama:layers=L,hidden=H,heads=A,kv_heads=G,ffn=F,seq=S,vocab=V; repeat the flag "
                        "for several specs")
    p.add_argument("--microbatch-size", type=counts, default=(1,),
                   help="samples per microbatch (default 1); with --blocks a list, e.g. 1,2,4")
    p.add_argument("--tp", type=counts, default=(1,), metavar="T",
                   help="--blocks: tensor-parallel degrees to time the block at (one TP rank's shard), e.g. 1,2 "
                        "(default 1)")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="--blocks: the blocks run sequence-parallel (each TP rank holds 1/T of the sequence)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="--blocks: weights and activations (default float32 on cpu, bfloat16 on cuda)")
    add_device_calibration_flag(p)
    p.add_argument("--new-table", action="store_true",
                   help="--blocks: drop the input calibration's block_timings (e.g. the ones groundtruth fitted on "
                        "vTrain's rows) and keep only the blocks measured now; its smooth parameters stay")
    p.add_argument("--device-kind", metavar="KIND",
                   help="--blocks: the device kind the blocks are timed as (default cpu on --device cpu, else "
                        "guessed from the GPU's name); it must be the --device-calibration's kind, and without one "
                        "it is the new calibration's (default smooth parameters)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per layer; the median is kept (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per layer first (default 2)")
    p.add_argument("--seed", type=int, default=0, help="weights and data seed (default 0)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="measure on the CPU (one thread, wall clock) or the GPU (CUDA events); default cpu")
    p.add_argument("-o", "--output", metavar="JSON", help="write the profile (ModelProfile JSON) here; with --blocks "
                                                          "the device calibration (the input's, block times merged)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON instead of a table")
    p.set_defaults(func=run)


def human_bytes(n: float) -> str:
    """Bytes in binary units: 512 B, 1.5 KiB, 3.2 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def run(args) -> int:
    from executor.models import ModelSpecError
    from executor.profiler import profile_model
    from pipetwin.errors import UserError

    if (args.model is None) == (args.blocks is None):
        raise UserError("give --model SPEC (a per-layer profile) or --blocks MODEL (block times into a device "
                        "calibration), one of the two")
    if args.repeats < 1 or args.warmup < 0:
        raise ModelSpecError("--repeats must be >= 1 and --warmup >= 0")
    if args.blocks is not None:
        return run_blocks(args)
    block_flags = [f for f, v in (("--tp", args.tp != (1,)), ("--sequence-parallel", args.sequence_parallel),
                                  ("--dtype", args.dtype), ("--device-calibration", args.device_calibration),
                                  ("--device-kind", args.device_kind), ("--new-table", args.new_table)) if v]
    if block_flags:
        raise UserError(f"{', '.join(block_flags)} go with --blocks, not --model")
    if len(args.microbatch_size) != 1:
        raise UserError("--model profiles at one --microbatch-size; give a single number")
    args.microbatch_size = args.microbatch_size[0]
    _check_device(args.device)
    profile = profile_model(args.model, microbatch_size=args.microbatch_size, repeats=args.repeats,
                            warmup=args.warmup, seed=args.seed, device=args.device)
    if args.output:
        profile.save(args.output)
    if args.json:
        json.dump(profile.to_dict(), sys.stdout, indent=1)
        print()
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{profile.name} — microbatch {profile.microbatch_size}",
                  caption=f"times per microbatch ({profile.device}{', 1 thread' if args.device == 'cpu' else ''}, "
                          f"median of {args.repeats}); "
                          f"bytes per sample")
    for col in ("layer", "fwd ms", "bwd ms", "act", "saved", "params"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for l in profile.layers:
        table.add_row(l.name, f"{l.forward_s * 1e3:.3f}", f"{l.backward_s * 1e3:.3f}", human_bytes(l.activation_bytes),
                      human_bytes(l.saved_bytes), human_bytes(l.param_bytes))
    table.add_section()
    table.add_row("total", f"{sum(l.forward_s for l in profile.layers) * 1e3:.3f}",
                  f"{sum(l.backward_s for l in profile.layers) * 1e3:.3f}", "",
                  human_bytes(sum(l.saved_bytes for l in profile.layers)),
                  human_bytes(sum(l.param_bytes for l in profile.layers)))
    console = Console()
    console.print(table)
    if args.output:
        console.print(f"wrote {args.output}")
    return 0


def _check_device(device: str) -> None:
    if device == "cuda":
        import torch

        from pipetwin.errors import UserError

        if not torch.cuda.is_available():
            raise UserError("--device cuda: this machine has no GPU that torch can use; use --device cpu")


def _gpu_kind() -> str:
    """The device kind of the current GPU by its name (gpu-generic when no kind matches)."""
    import torch

    name = torch.cuda.get_device_name().lower()
    mem = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    for tag, kind in (("h200", "h200"), ("h100", "h100"), ("v100", "v100" if mem > 20e9 else "v100-16gb"),
                      ("a100", "a100-80gb" if mem > 50e9 else "a100-40gb")):
        if tag in name:
            return kind
    return "gpu-generic"


def block_shapes(specs: list[str], tps: tuple[int, ...], microbatches: tuple[int, ...], sequence_parallel: bool):
    """Every (spec, TransformerConfig, TP, microbatch) ``--blocks`` asks for, checked before anything is timed:
    a model one of the executor's blocks builds (GPT/BERT: multi-head attention, a 4·hidden GELU MLP; Llama:
    grouped-query attention, SwiGLU of any width) that each TP degree divides."""
    from executor.models import BLOCK_ATTENTION, ModelSpecError, parse_spec
    from planner.analytic import transformer_config
    from pipetwin.errors import UserError

    names = []
    for text in specs:
        names += [t.strip() for t in text.split(",")] if ":" not in text else [text.strip()]
    if sequence_parallel and min(tps) < 2:
        raise UserError("--sequence-parallel splits the sequence over the TP ranks; give --tp 2 or more only")
    out = []
    for name in names:
        for t in tps:
            cfg = transformer_config(name, t)
            if cfg is None:
                raise UserError(f"--blocks {name!r} is not a transformer; give a preset like gpt3-1.3b or llama3-8b, "
                                f"or gpt:layers=L,hidden=H,heads=A,seq=S,vocab=V")
            if not cfg.llama and ((cfg.kv_heads or cfg.heads) != cfg.heads or cfg.ffn_size != 4 * cfg.hidden):
                raise UserError(f"--blocks {name!r}: the executor's {cfg.family} block has multi-head attention and a "
                                f"4·hidden GELU MLP, not kv_heads={cfg.kv_heads or cfg.heads} and ffn={cfg.ffn_size}; "
                                f"give a llama: spec for grouped-query attention or another MLP width")
            zoo = BLOCK_ATTENTION["llama" if cfg.llama else "gpt"]
            if cfg.attention != zoo:
                raise UserError(f"--blocks {name!r}: the executor's {cfg.family} block's attention is {zoo} "
                                f"(gpt: explicit softmax; llama: SDPA), not attention={cfg.attention}; drop the key")
            try:  # what else the executor's block cannot build (llama: an odd head size for rotary), in its words
                parse_spec(cfg.spec())
            except ModelSpecError as e:
                raise UserError(f"--blocks: {e}") from None
            if sequence_parallel and cfg.seq % t:
                raise UserError(f"--blocks {name!r}: sequence parallelism over --tp {t} needs it to divide "
                                f"seq={cfg.seq}; pick a divisor")
            out += [(name, cfg, t, mb) for mb in microbatches]
    return out


def run_blocks(args) -> int:
    """``profile --blocks``: time each block shape, merge the times into the device calibration, write it."""
    from dataclasses import replace

    from executor.profiler import profile_block
    from planner.transformer_profile import block_key
    from planner.efficiency import DEFAULT_PARAMS, BlockTiming, DeviceCalibration
    from pipetwin.errors import UserError
    from topologies.devices import device_kind

    if not args.output:
        raise UserError("--blocks writes a device calibration: give -o FILE (it may be the --device-calibration file)")
    shapes = block_shapes(args.blocks, args.tp, args.microbatch_size, args.sequence_parallel)
    _check_device(args.device)
    cal = args.device_calibration
    kind = device_kind(args.device_kind).name if args.device_kind else ("cpu" if args.device == "cpu" else _gpu_kind())
    if cal is None:
        cal = DeviceCalibration(kind, DEFAULT_PARAMS, rule="default smooth parameters; block times from pipetwin profile --blocks")
    elif kind != cal.kind.name:
        raise UserError(f"the blocks are timed on {kind} but the device calibration is for {cal.kind.name} (its smooth "
                        f"parameters time the other shapes); give a calibration of {kind}, none (default smooth "
                        f"parameters), or --device-kind {cal.kind.name} to mix them on purpose")
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    import torch

    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu, 1 thread"
    source = f"pipetwin profile --blocks ({where}, {dtype}, median of {args.repeats})"
    measured = {}
    for name, cfg, t, mb in shapes:
        key = block_key(cfg, t, mb, args.sequence_parallel)
        if key in measured:
            continue
        f, b = profile_block(cfg.hidden, cfg.heads, cfg.seq, mb, t, args.sequence_parallel,
                             family="llama" if cfg.llama else "gpt", kv_heads=cfg.kv_heads, ffn=cfg.ffn, dtype=dtype,
                             device=args.device, repeats=args.repeats, warmup=args.warmup, seed=args.seed)
        measured[key] = (name, BlockTiming(key, f, b, 0, source))
    kept = tuple(e for e in cal.block_timings if e.key not in measured and not args.new_table)
    cal = replace(cal, block_timings=kept + tuple(e for _, e in measured.values()))
    cal.save(args.output)
    if args.json:
        json.dump([e.to_dict() for _, e in measured.values()], sys.stdout, indent=1)
        print()
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"block times into {args.output} ({cal.kind.name})",
                  caption=f"one block on one TP rank, one microbatch, TP collectives left out; {source}")
    for col in ("model", "hidden", "heads", "kv", "ffn", "seq", "TP", "microbatch", "fwd ms", "bwd ms"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, e in measured.values():
        _, h, a, kv, f, s, t, sp, mb = e.key
        table.add_row(name, str(h), str(a), str(kv), str(f), str(s), f"{t}{' SP' if sp else ''}", str(mb),
                      f"{e.forward_s * 1e3:.3f}", f"{e.backward_s * 1e3:.3f}")
    console = Console()
    console.print(table)
    console.print(f"wrote {args.output}: {len(measured)} shapes measured, {len(kept)} kept from before, smooth "
                  f"parameters {'from the input' if args.device_calibration else 'the defaults'}")
    return 0
