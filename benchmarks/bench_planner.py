"""Benchmark: pipetwin's PipeDream-compatible optimizer on PipeDream's profiles and a 4,096-device chain.

    .venv/bin/python benchmarks/bench_planner.py [--repeat N]

Each case runs N times (default 3); the table shows the median wall and CPU (process) seconds, since a
shared machine makes single wall timings noisy.

Profiles are read from ../shared/data/pipedream_profiles (beside the repo) or $PIPETWIN_PIPEDREAM_PROFILES;
missing ones are skipped. Bandwidths (bytes/s): two-level "AxB" runs use A workers per server over 10e9
(PCIe-class) and B servers over 1.25e9 (10 Gb/s Ethernet), as PipeDream's Cluster-A; PipeDream's own
optimizer on these sizes takes 37 s (resnet50 4x4) to > 12 min (gnmt_large 4x4).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.pipedream import optimize_pipedream  # noqa: E402
from planner.profile import Layer, ModelProfile, read_pipedream_graph  # noqa: E402

INTRA, INTER = 10e9, 1.25e9
NVLINK, IB, ETH = 300e9, 25e9, 1.25e9


def profiles_dir() -> Path:
    env = os.environ.get("PIPETWIN_PIPEDREAM_PROFILES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "pipedream_profiles"


def chain_1000(seed: int = 0) -> ModelProfile:
    """A 1,000-layer chain with seeded random costs (1-3 ms forward, 2x backward, 1-8 MB out, 1-30 MB params)."""
    rng = np.random.default_rng(seed)
    f = rng.uniform(1e-3, 3e-3, 1000)
    a = rng.uniform(1e6, 8e6, 1000)
    p = rng.uniform(1e6, 3e7, 1000)
    return ModelProfile("chain1000", tuple(Layer(f"l{i}", float(f[i]), float(2 * f[i]), float(a[i]), float(a[i]),
                                                  float(p[i])) for i in range(1000)))


CASES = [
    # (label, model, levels, keyword arguments)
    ("vgg16 (acr 1)", "vgg16", [(4, 1e9)], {"activation_compression_ratio": 1.0}),
    ("vgg16 straight (acr 1)", "vgg16", [(4, 1e9)], {"activation_compression_ratio": 1.0, "straight": True}),
    ("resnet50", "resnet50", [(4, INTRA), (4, INTER)], {}),
    ("resnet50", "resnet50", [(8, INTRA), (8, INTER)], {}),
    ("resnet50", "resnet50", [(16, INTRA), (16, INTER)], {}),
    ("resnet101", "resnet101", [(4, INTRA), (4, INTER)], {}),
    ("gnmt_large (GNMT-16)", "gnmt_large", [(4, INTRA), (4, INTER)], {}),
    ("inception_v3", "inception_v3", [(4, INTRA), (4, INTER)], {}),
    ("nasnetalarge", "nasnetalarge", [(4, INTRA), (4, INTER)], {}),
    ("chain, 1,000 layers", "chain1000", [(8, NVLINK), (32, IB), (16, ETH)], {}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the median is shown (default 3)")
    args = ap.parse_args()
    console = Console(width=max(140, Console().width))
    d = profiles_dir()
    table = Table(title=f"PipeDream optimizer (pipetwin), median of {args.repeat}")
    for col in ("model", "workers", "bandwidths B/s", "states", "reduction", "wall s", "cpu s", "pipeline_time_s",
                "stages"):
        table.add_column(col, justify="right" if col not in ("model", "reduction") else "left")
    for label, model, levels, kw in CASES:
        if model == "chain1000":
            prof = chain_1000()
        else:
            path = d / f"{model}.graph.txt"
            if not path.exists():
                console.print(f"[yellow]skip {label}: {path} not found[/yellow]")
                continue
            prof = read_pipedream_graph(path)
        walls, cpus = [], []
        for _ in range(max(1, args.repeat)):
            t, c = time.perf_counter(), time.process_time()
            r = optimize_pipedream(prof, levels, **kw)
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
        table.add_row(
            label,
            "x".join(str(w) for w, _ in levels),
            ", ".join(f"{b:.3g}" for _, b in levels),
            str(r.num_states),
            r.reduction or "-",
            f"{statistics.median(walls):.2f}",
            f"{statistics.median(cpus):.2f}",
            f"{r.pipeline_time_s:.10g}",
            str(len(r.stages)),
        )
        if r.reduction:
            console.print(f"[dim]{label}: {r.message}[/dim]")
    console.print(table)


if __name__ == "__main__":
    main()
