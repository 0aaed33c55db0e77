"""benchmarks/gpu_session.sh, the prepared GPU-machine script, checked without a GPU: it parses, its dry run lists
the steps within the device time, its pipetwin commands are ones the CLI accepts, and a failing step does not stop
the others."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from pipetwin.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
STEPS = ["versions", "test_gpu", "profile_blocks", "bench_blocks", "netbench_nccl"]


def _dry_run(**env) -> tuple[str, list[list[str]]]:
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=30,
                         env={**os.environ, **env}, check=True).stdout
    head, *rows = out.strip().splitlines()
    return head, [r.split("\t") for r in rows]


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


def test_dry_run_lists_every_step_within_eight_minutes():
    head, rows = _dry_run()
    assert [r[0] for r in rows] == STEPS
    total = sum(int(r[1]) + 5 for r in rows)  # each timeout plus its kill grace
    assert f"TOTAL_LIMIT_S={total}" in head and total <= 8 * 60
    assert all(int(r[1]) < 600 for r in rows)  # a device command's own limit


@pytest.mark.parametrize("ngpu, workers, saves", [("1", "1", False), ("4", "4", True)])
def test_pipetwin_steps_parse_with_the_real_flags(ngpu, workers, saves):
    _, rows = _dry_run(NGPU=ngpu)
    parser = build_parser()
    cmds = {r[0]: r[2] for r in rows}
    profile = shlex.split(cmds["profile_blocks"])[3:]
    args = parser.parse_args(profile)
    assert (args.command, args.device, args.tp, args.microbatch_size, args.new_table) == \
        ("profile", "cuda", (1, 2, 4, 8), (1, 2, 4), True)
    assert args.blocks == ["gpt3-1.3b", "llama3-8b"] and args.output.endswith("blocks_calibration.json")
    netbench = shlex.split(cmds["netbench_nccl"].split(">")[0])[3:]
    args = parser.parse_args(netbench)
    assert (args.mode, args.backend, args.workers, args.json) == ("allreduce", "nccl", int(workers), True)
    assert (args.output is not None) == saves  # one rank has no link to save


def test_bench_blocks_step_takes_its_flags():
    # on a CPU machine bench_blocks refuses --device cuda in one line; a wrong flag would be argparse's usage error
    _, rows = _dry_run()
    cmd = dict((r[0], r[2]) for r in rows)["bench_blocks"]
    r = subprocess.run(shlex.split(cmd.replace("python3", str(Path(os.sys.executable)), 1)), cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    import torch

    if not torch.cuda.is_available():
        assert r.returncode == 2 and "no GPU" in r.stderr and "usage" not in r.stderr


def test_a_failing_step_does_not_stop_the_rest(tmp_path):
    # PY=false makes every python step fail at once: all five still run, each with its log and summary row
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PY": "false", "OUT": str(tmp_path), "NGPU": "1"})
    assert r.returncode == 1
    rows = [line.split("\t") for line in (tmp_path / "summary.tsv").read_text().splitlines()[1:]]
    assert [row[0] for row in rows] == STEPS and all(row[1] == "1" for row in rows)
    assert all((tmp_path / f"{s}.log").exists() for s in STEPS)


def test_unknown_argument_is_one_line():
    r = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--dry-run" in r.stderr
