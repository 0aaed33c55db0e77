"""What a recomputed split backward holds between its BI and its BW: measured, not counted.

The executor's BI (``executor.runtime``: ``autograd.grad`` of the stage output for its input, the graph retained)
and its BW (later: for the parameters) run on layers that ``executor.recompute`` made checkpoints. The truth here is
the process's resident memory, in a fresh interpreter whose allocator maps every large block on its own
(``MALLOC_MMAP_THRESHOLD_``), so that a freed activation leaves the resident set at once: after the BI the stage
holds what its forward kept plus the input gradient, and nothing it rebuilt (each layer's rebuild lives inside its
own backward and is freed there; the BW rebuilds again). ``planner.stagememory``'s replay must hold the same.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from planner.program import Action, Kind
from planner.stagememory import StageBytes, memory_levels

LAYERS = 4

_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from torch import nn
    from executor.recompute import apply_recompute
    torch.set_num_threads(1)

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    N, W, L = 2048, 1024, {layers}  # 8 MiB per activation
    layers = [nn.Sequential(nn.Linear(W, W), nn.GELU()) for _ in range(L)]
    apply_recompute(layers, sys.argv[1])
    stage = nn.Sequential(*layers)
    params = list(stage.parameters())
    x = torch.randn(N, W).requires_grad_(True)
    g = torch.randn(N, W)
    for _ in range(2):  # the first backwards allocate for good (thread pools, kernels); measure after them
        o = stage(x)
        torch.autograd.grad(o, (x,), g, retain_graph=True)
        torch.autograd.grad(o, params, g)
        del o
    unit = N * W * 4
    r0 = rss()
    out = stage(x)  # F
    r1 = rss()
    (gx,) = torch.autograd.grad(out, (x,), g, retain_graph=True)  # BI
    r2 = rss()
    gw = torch.autograd.grad(out, params, g)  # BW
    r3 = rss()
    print(json.dumps([(r1 - r0) / unit, (r2 - r0) / unit, (r3 - r0) / unit]))
""")


def _measure(mode: str) -> list[float]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _SCRIPT.format(layers=LAYERS), mode], capture_output=True, text=True,
                         env=env, timeout=120, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(180)
def test_a_recomputed_split_backward_holds_nothing_rebuilt_between_its_bi_and_its_bw():
    """In activations of the stage's width: without recomputation the forward keeps each layer's two (the linear's
    input, the GELU's) but the stage input, which the caller holds, and the output: 2·4 = 8; full recomputation
    keeps the three inputs after the first and the output: 4. The BI adds the input gradient (1) in both, so it
    rebuilt nothing that outlives it (had it kept the rebuilt stage for its BW, full would stand at 4 + 4 + 1);
    after the BW the saved tensors are gone: the output, the input gradient and the weight gradients (2) remain."""
    none, full = _measure("none"), _measure("full")
    assert none == pytest.approx([8, 9, 4], abs=0.2)
    assert full == pytest.approx([4, 5, 4], abs=0.2)


def test_the_replay_holds_a_split_backwards_rebuild_only_while_each_pass_runs():
    """``memory_levels`` on one stage's F, BI, BW with recomputation: the BI's and the BW's start carry one layer's
    rebuild (``StageBytes.rebuilt``), their ends nothing of it, as measured above."""
    sb = StageBytes(params=0.0, saved=4.0, output=1.0, rebuilt=1.0)
    acts = [Action(1, Kind.F, 0), Action(1, Kind.BI, 0), Action(1, Kind.BW, 0)]
    initial, levels = memory_levels(acts, {1: sb}, 0.0)
    assert initial == 0.0
    assert levels == [(5.0, 5.0), (6.0, 5.0), (6.0, 0.0)]
