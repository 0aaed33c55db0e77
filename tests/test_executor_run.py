"""Measured traces, memory, the CLI and the torchrun entry point of the executor."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from executor.launch import run_plan
from planner.plan import even_plan
from planner.trace import Trace, peak_memory_bytes, summary

pytestmark = pytest.mark.dist
MODEL = "mlp:layers=6,width=32"
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(60)
def test_trace_has_every_action_timed_on_its_worker_lane():
    plan = even_plan(MODEL, 6, 3, schedule="zb-h1", microbatches=4, batches=2, microbatch_size=4)
    res = run_plan(plan)
    n_actions = sum(len(v) for v in res.program.actions.values())
    assert len(res.trace.events) == n_actions
    assert res.trace.meta["source"] == "measured" and res.trace.meta["family"] == "zb-h1"
    assert res.trace.meta["microbatch_size"] == 4
    for w, acts in res.program.actions.items():
        evs = [e for e in res.trace.events if e.lane == w]
        assert sorted(e.action for e in evs) == sorted(str(a) for a in acts)
        assert all(e.end_s >= e.start_s >= 0 for e in evs)
    sends = [e for e in res.trace.events if e.kind == "SEND"]
    assert all(e.nbytes == 4 * 32 * 4 for e in sends)  # microbatch x width x float32
    assert set(summary(res.trace)) <= set(res.summary())
    assert sorted(res.losses) == list(range(8))


@pytest.mark.timeout(120)
def test_zb_h1_on_emulated_layers_takes_the_time_the_simulator_predicts():
    """Each emulated layer's backward is spent once over BI and BW (it used to be spent in each of them)."""
    from planner.profile import parse_uniform_spec
    from sim.engine import simulate_plan
    from topologies.presets import load_topology

    fwd, bwd = 0.005, 0.02
    spec = f"uniform:layers=4,fwd={fwd},bwd={bwd},act=64,params=64"
    plan = even_plan(spec, 4, 2, schedule="zb-h1", microbatches=4, batches=1, microbatch_size=1)
    res = run_plan(plan, timeout_s=60)
    measured = summary(res.trace)["makespan_s"]
    topo = load_topology("ideal:2")
    placed = plan.with_devices([(d,) for d in topo.devices])
    predicted = summary(simulate_plan(placed, parse_uniform_spec(spec), topo))["makespan_s"]
    # the same plan if BI and BW each took the whole backward: a profile with twice the backward time
    inflated = summary(simulate_plan(placed, parse_uniform_spec(spec.replace(f"bwd={bwd}", f"bwd={2 * bwd}")),
                                     topo))["makespan_s"]
    assert 0.95 * predicted <= measured < (predicted + inflated) / 2, (measured, predicted, inflated)
    dur = {k: [e.duration_s for e in res.trace.events if e.lane == 1 and e.kind == k] for k in ("BI", "BW")}
    half = 2 * bwd / 2  # two layers on stage 1, split half and half (SimParams' default bi_fraction)
    for k, ds in dur.items():
        assert len(ds) == 4 and half <= sum(ds) / 4 < 1.5 * half, (k, ds)


@pytest.mark.timeout(60)
def test_measured_memory_follows_microbatches_in_flight():
    kw = dict(microbatches=6, batches=1, microbatch_size=8)
    gpipe = peak_memory_bytes(run_plan(even_plan(MODEL, 6, 3, schedule="gpipe", **kw)).trace)
    one_f = peak_memory_bytes(run_plan(even_plan(MODEL, 6, 3, schedule="1f1b", **kw)).trace)
    params = 2 * (32 * 32 + 32) * 4  # two layers per stage
    assert all(v > params for v in one_f.values())
    assert gpipe[0] > one_f[0]  # GPipe keeps all 6 microbatches, 1F1B's stage 0 at most 3
    assert one_f[0] > one_f[2]  # 1F1B: stage s keeps P - s


@pytest.mark.timeout(90)
def test_cli_run_json_trace_and_weights(tmp_path):
    trace, weights = tmp_path / "t.json", tmp_path / "w.pt"
    cmd = [sys.executable, "-m", "pipetwin", "run", "--model", MODEL, "--stages", "2", "--schedule", "pipedream",
           "--microbatches", "8", "--json", "--trace", str(trace), "--save-weights", str(weights)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    for key in ("throughput_samples_per_s", "time_per_batch_s", "makespan_s", "bubble_fraction", "per_device", "events"):
        assert key in doc
    assert set(doc["per_device"]) == {"0", "1"}
    assert Trace.load(trace).events
    w = torch.load(weights, weights_only=True)
    assert {k.split(".")[0] for k in w} == {"stage0", "stage1"} and "stage1.5.weight" in w


@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
def test_worker_runs_under_torchrun(tmp_path):
    plan = even_plan(MODEL, 6, 2, schedule="1f1b", microbatches=4, batches=2, lr=0.05)
    plan.save(tmp_path / "plan.json")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nnodes", "1", "--nproc-per-node", "2", "-m", "executor.worker",
                           str(tmp_path / "plan.json"), "--out", str(tmp_path / "out"), "--save-weights",
                           str(tmp_path / "w.pt")], capture_output=True, text=True, timeout=110, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["events"] > 0
    from executor.reference import reference_weights

    want = reference_weights(plan)
    got = torch.load(tmp_path / "w.pt", weights_only=True)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_sender_thread_priority_is_raised_for_that_thread_only():
    """The sender thread asks for SCHED_FIFO; the compute (main) thread must keep normal priority."""
    import threading

    from executor import transport

    if not hasattr(os, "sched_getscheduler"):
        pytest.skip("no POSIX scheduling policies on this platform")
    main_policy = os.sched_getscheduler(0)
    seen = {}

    def body():
        seen["raised"] = transport.raise_priority()
        seen["policy"] = os.sched_getscheduler(0)

    t = threading.Thread(target=body)
    t.start()
    t.join(10)
    assert os.sched_getscheduler(0) == main_policy
    if seen["raised"]:
        assert seen["policy"] == os.SCHED_FIFO
    else:  # not permitted here: the thread is left as it was
        assert seen["policy"] == main_policy


def test_device_warm_up_leaves_weights_buffers_and_random_state_as_they_were():
    """The GPU warm-up (run here on CPU) must not change anything a later forward or backward sees."""
    import copy

    from torch import nn

    from executor.models import build_stage, input_shape
    from executor.timing import warm_up_stage

    torch.manual_seed(3)
    layers = build_stage("cnn:blocks=2,channels=8,size=8,classes=10", 0, 2)  # conv-bn stem and residual blocks
    module = nn.Sequential(*layers, nn.Dropout(0.5))
    module.train()
    twin = copy.deepcopy(module)
    x = torch.randn(input_shape("cnn:blocks=2,channels=8,size=8,classes=10", 4))
    rng = torch.get_rng_state()
    params = [p for p in module.parameters()]
    warm_up_stage(module, params, (tuple(x.shape), x.dtype), torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in module.parameters())
    for (n, a), (_, b) in zip(module.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), n  # parameters and batch-norm statistics (num_batches_tracked too)
    torch.manual_seed(5)
    y = module(x)
    torch.manual_seed(5)
    assert torch.equal(y, twin(x))  # the same dropout mask and the same normalisation


def test_one_resolver_turns_auto_into_a_backend_and_device_by_the_stated_rules():
    """The CPU always runs gloo; NCCL is refused on the CPU; names outside the choices are refused (CPU machine rules
    here; the GPU rules are exercised by tests/test_gpu.py)."""
    from executor import ExecutorError, resolve_backend_device

    assert resolve_backend_device("auto", "cpu", 4) == ("gloo", "cpu")
    assert resolve_backend_device("gloo", "cpu", 1) == ("gloo", "cpu")
    with pytest.raises(ExecutorError, match="NCCL communicates between GPUs"):
        resolve_backend_device("nccl", "cpu", 2)
    with pytest.raises(ExecutorError, match="unknown backend"):
        resolve_backend_device("mpi", "cpu")
    with pytest.raises(ExecutorError, match="unknown device"):
        resolve_backend_device("auto", "tpu")
    if not torch.cuda.is_available():
        assert resolve_backend_device("auto", "auto", 2) == ("gloo", "cpu")
        with pytest.raises(ExecutorError, match="no GPU"):
            resolve_backend_device("auto", "cuda", 2)
    else:
        gpus = torch.cuda.device_count()
        assert resolve_backend_device("auto", "cuda", gpus) == ("nccl", "cuda")
        assert resolve_backend_device("auto", "cuda", gpus + 1) == ("gloo", "cuda")
        with pytest.raises(ExecutorError, match="one GPU per worker"):
            resolve_backend_device("nccl", "cuda", gpus + 1)


@pytest.mark.parametrize("flag", [["--tp", "2"], ["--dp", "2"], ["--vp", "2"], ["--replicas", "2,1"], ["--pp", "3"],
                                  ["--microbatches", "8"], ["--schedule", "gpipe"], ["--microbatch-size", "2"],
                                  ["--batches", "2"], ["--vertical-sync"], ["--model", MODEL]])
def test_run_refuses_a_shape_flag_beside_plan_in_one_line(tmp_path, capsys, flag):
    """A --plan file brings its own shape: a shape flag beside it was silently ignored; it is refused, exit 2,
    before any process starts."""
    from pipetwin.cli import main

    path = tmp_path / "plan.json"
    even_plan(MODEL, 6, 2, schedule="1f1b", microbatches=4).save(path)
    assert main(["run", "--plan", str(path), *flag]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag[0] in err and "--plan" in err, err
