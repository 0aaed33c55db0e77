"""`pipetwin profile`: measure a model's layers (times, activation, saved and parameter bytes) into a profile."""
from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser("profile", help="measure a model's per-layer costs into a profile JSON",
                       description="Measure each chain layer of a model on this CPU (one thread): forward and "
                                   "backward seconds (median after warm-up), output activation bytes, bytes saved "
                                   "for backward and parameter bytes, per sample.")
    p.add_argument("--model", required=True,
                   help="model spec: mlp:layers=8,width=512 | gpt:layers=4,hidden=256,heads=4,seq=128,vocab=512 | "
                        "cnn:blocks=4,channels=32,size=32,classes=10 | uniform:layers=8,fwd=1e-3,bwd=2e-3,act=B,"
                        "params=B | package.module:function | path/file.py:function")
    p.add_argument("--microbatch-size", type=int, default=1, help="samples per microbatch (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per layer; the median is kept (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per layer first (default 2)")
    p.add_argument("--seed", type=int, default=0, help="weights and data seed (default 0)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="measure on the CPU (one thread, wall clock) or the GPU (CUDA events); default cpu")
    p.add_argument("-o", "--output", metavar="JSON", help="write the profile (ModelProfile JSON) here")
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

    if args.microbatch_size < 1:
        raise ModelSpecError("--microbatch-size must be >= 1")
    if args.repeats < 1 or args.warmup < 0:
        raise ModelSpecError("--repeats must be >= 1 and --warmup >= 0")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ModelSpecError("--device cuda: this machine has no GPU that torch can use; use --device cpu")
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
