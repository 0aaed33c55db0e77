"""Transformer blocks measured against the efficiency model: the executor's gpt and llama blocks, timed on this device.

Not a test. Run ``python benchmarks/bench_blocks.py`` (CPU, one thread, small shapes, a few seconds) or, on a GPU,
``python benchmarks/bench_blocks.py --device cuda [--device-calibration out/a100.json]`` (bf16; GPT-3 6.7B and
Llama 3 8B blocks, both hidden 4096, at TP 1, 2, 4, 8). Each shape is timed as ``pipetwin profile --blocks``
times it (``executor.profiler.profile_block``: one TP rank's shard, TP collectives left out, the median of
``--repeats`` after ``--warmup``) and set beside what the smooth efficiency model (``planner.efficiency``; the
calibration's parameters, or the defaults, never its per-shape table) predicts for the same block on the same
device kind. The table prints measured and modelled forward and backward milliseconds, their ratio and the
achieved fraction of the kind's peak, so one run on a GPU says whether the model costs Llama blocks (SwiGLU,
grouped-query attention, rotary) as well as GPT blocks.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: (spec, TP degrees) per device: small shapes on one CPU thread, production shapes on a GPU.
SHAPES = {
    "cpu": [("gpt:layers=1,hidden=512,heads=8,seq=128,vocab=512", (1, 2)),
            ("llama:layers=1,hidden=512,heads=8,kv_heads=2,ffn=1408,seq=128,vocab=512", (1, 2))],
    "cuda": [("gpt3-6.7b", (1, 2, 4, 8)), ("llama3-8b", (1, 2, 4, 8))],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--blocks", action="append", metavar="MODEL", help="a transformer spec instead of the defaults "
                    "(repeat for several), timed at --tp")
    ap.add_argument("--tp", default=None, help="TP degrees for --blocks, e.g. 1,2 (default 1)")
    ap.add_argument("--microbatch-size", type=int, default=1)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--device-calibration", metavar="FILE", help="its smooth parameters model the blocks (its "
                    "kind must be this device's); default: the default parameters on this device's kind")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()

    import torch

    from executor.profiler import profile_block
    from pipetwin.cmd_profile import _gpu_kind
    from planner.analytic import load_model, transformer_config
    from planner.closedforms import block_flops
    from planner.efficiency import DEFAULT_PARAMS, DeviceCalibration, load_device_calibration

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no GPU here; run on a GPU machine or use --device cpu", file=sys.stderr)
        return 2
    kind = "cpu" if args.device == "cpu" else _gpu_kind()
    given = load_device_calibration(args.device_calibration)
    if given is not None and given.kind.name != kind:
        print(f"the calibration is for {given.kind.name} but the blocks run on {kind}", file=sys.stderr)
        return 2
    smooth = DeviceCalibration(kind, given.params if given else DEFAULT_PARAMS)  # no per-shape table: the model
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    tps = tuple(int(t) for t in args.tp.split(",")) if args.tp else (1,)
    shapes = [(b, tps) for b in args.blocks] if args.blocks else SHAPES[args.device]
    mb = args.microbatch_size
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu, 1 thread"
    print(f"{where}, {dtype}, microbatch {mb}, median of {args.repeats}; model: "
          f"{'the parameters of ' + args.device_calibration if given else 'default parameters'} on {kind} "
          f"(peak {smooth.kind.peak_flops / 1e12:.3g} TFLOP/s)")
    print(f"{'block':<34}{'TP':>3}{'fwd ms':>10}{'model':>9}{'ratio':>8}{'bwd ms':>10}{'model':>9}{'ratio':>8}"
          f"{'fwd peak':>10}")
    start = time.perf_counter()
    for spec, degrees in shapes:
        for t in degrees:
            cfg = transformer_config(spec, t)
            f, b = profile_block(cfg.hidden, cfg.heads, cfg.seq, mb, t, family="llama" if cfg.llama else "gpt",
                                 kv_heads=cfg.kv_heads, ffn=cfg.ffn, dtype=dtype, device=args.device,
                                 repeats=args.repeats, warmup=args.warmup)
            layer = load_model(spec, calibration=smooth, tensor_parallel=t, microbatch_size=mb).layers[1]
            peak = block_flops(cfg) * mb / t / f / smooth.kind.peak_flops
            name = spec if ":" not in spec else (f"{cfg.family} h{cfg.hidden} a{cfg.heads} "
                                                 f"kv{cfg.kv_heads or cfg.heads} f{cfg.ffn_size} s{cfg.seq}")
            print(f"{name:<34}{t:>3}{f * 1e3:>10.3f}{layer.forward_s * 1e3:>9.3f}{f / layer.forward_s:>8.2f}"
                  f"{b * 1e3:>10.3f}{layer.backward_s * 1e3:>9.3f}{b / layer.backward_s:>8.2f}{peak:>10.1%}")
    print(f"\n{time.perf_counter() - start:.1f} s; ratio = measured / modelled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
