"""The GPU paths: stages computing on CUDA (gloo staged through host memory, or NCCL), CUDA-event timing, GPU memory.

Skipped where torch sees no GPU (CI has none); run on a GPU machine with
``pytest -q tests/test_gpu.py``. NCCL refuses two ranks on one GPU, so the
NCCL pipeline cases need a GPU per worker and are skipped on a single-GPU
machine; a one-worker NCCL run still exercises its process group, device
placement and CUDA timing there.
"""
from __future__ import annotations

import pytest
import torch

from executor.launch import run_plan
from executor.profiler import profile_model
from executor.reference import reference_weights
from planner.plan import even_plan
from planner.trace import summary
from tests.test_executor_parity import _assert_weights_equal as _assert_cpu_weights_equal

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU that torch can use")

from tests.test_executor_parity import CASES as CPU_CASES
from tests.test_executor_parity import MODEL

CASES = {k: v for k, v in CPU_CASES.items() if k != "pipedream-replicas-1,2"}


def _plan(stages: int, schedule: str, replicas=None, microbatches: int = 4, batches: int = 3, model=MODEL,
          layers: int = 6, microbatch_size: int = 3, **kw):
    return even_plan(model, layers, stages, replicas, schedule=schedule, microbatches=microbatches, batches=batches,
                     microbatch_size=microbatch_size, lr=0.05, **kw)


def _assert_weights_equal(got: dict, want: dict) -> None:
    assert all(t.device.type == "cpu" for t in got.values())
    _assert_cpu_weights_equal(got, want)


@pytest.mark.dist
@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_stages_compute_what_the_reference_update_rule_says(case):
    """Workers sharing the GPU (gloo, host-staged messages and all-reduces) give the CPU reference's weights."""
    plan = _plan(**CASES[case])
    result = run_plan(plan, dtype="float64", timeout_s=60, backend="gloo", device="cuda")
    assert set(result.trace.meta["devices"].values()) == {"cuda:0"} or torch.cuda.device_count() > 1
    assert result.summary()["device"] == "cuda"
    _assert_weights_equal(result.weights, reference_weights(plan, dtype="float64"))


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_nccl_one_worker_run_matches_the_reference_and_times_with_cuda_events():
    plan = _plan(stages=1, schedule="1f1b", microbatches=4, batches=3)
    result = run_plan(plan, dtype="float64", timeout_s=60, backend="auto")
    assert result.backend == "nccl"
    _assert_weights_equal(result.weights, reference_weights(plan, dtype="float64"))
    computes = [e for e in result.trace.events if e.kind in ("F", "B")]
    assert len(computes) == 2 * 4 * 3
    assert all(e.end_s > e.start_s >= 0.0 for e in computes)
    # CUDA events of one stream: compute intervals never overlap
    computes.sort(key=lambda e: e.start_s)
    assert all(a.end_s <= b.start_s + 1e-6 for a, b in zip(computes, computes[1:]))


@pytest.mark.dist
@pytest.mark.timeout(180)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per worker")
@pytest.mark.parametrize("case", ["1f1b-3", "pipedream-3", "2bw-2"])
def test_nccl_pipeline_matches_the_reference(case):
    plan = _plan(**CASES[case])
    if sum(plan.replicas) > torch.cuda.device_count():
        pytest.skip("more workers than GPUs")
    result = run_plan(plan, dtype="float64", timeout_s=60, backend="nccl")
    _assert_weights_equal(result.weights, reference_weights(plan, dtype="float64"))


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_gpu_peak_memory_holds_at_least_the_weights_and_activations_the_cpu_count_finds():
    """max_memory_allocated on the GPU against the exact byte count of the same run on the CPU.

    The GPU figure also holds the allocator's rounding, the input batches and
    library workspaces, so it may only be larger; the CPU count is exact.
    """
    plan = _plan(stages=2, schedule="1f1b", microbatches=4, batches=2, model="mlp:layers=4,width=512", layers=4,
                 microbatch_size=64)
    cpu = summary(run_plan(plan, timeout_s=60, device="cpu", backend="gloo").trace)["per_device"]
    gpu = summary(run_plan(plan, timeout_s=60, device="cuda", backend="gloo").trace)["per_device"]
    for w in cpu:
        assert gpu[w]["peak_memory_bytes"] >= 0.95 * cpu[w]["peak_memory_bytes"], w


@pytest.mark.timeout(120)
def test_cuda_profile_has_the_cpu_profiles_bytes_and_event_times_that_add_up():
    spec = "gpt:layers=2,hidden=128,heads=4,seq=64,vocab=256"
    gpu = profile_model(spec, microbatch_size=8, repeats=5, warmup=3, device="cuda")
    cpu = profile_model(spec, microbatch_size=8, repeats=1, warmup=0, device="cpu")
    assert "cpu" not in gpu.device
    assert len(gpu.layers) == len(cpu.layers)
    for g, c in zip(gpu.layers, cpu.layers):
        assert g.param_bytes == c.param_bytes
        assert g.activation_bytes == c.activation_bytes
        assert g.saved_bytes == pytest.approx(c.saved_bytes, rel=0.05), g.name
        assert g.forward_s > 0 and g.backward_s > 0
    # the layers' event times add up to a timed whole forward of the same model (within launch noise)
    from executor.models import build_layers, make_batch

    layers = [m.cuda() for m in build_layers(spec, 0)]
    x, _ = make_batch(spec, 8, 0, 0)
    x = x.cuda()
    with torch.no_grad():
        for _ in range(3):
            h = x
            for m in layers:
                h = m(h)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(5):
            e0.record()
            h = x
            for m in layers[:-1]:
                h = m(h)
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
    whole = sorted(times)[2]
    parts = sum(l.forward_s for l in gpu.layers[:-1])
    assert 0.3 * whole <= parts <= 3.0 * whole, (parts, whole)


@pytest.mark.dist
@pytest.mark.timeout(420)
def test_validation_on_the_gpu_profiles_and_runs_there():
    """`validate --device cuda` for two quick configurations: every profile, calibration run and scored run
    computes on the GPU (NCCL where there is a GPU per worker, else gloo with the workers sharing it)."""
    import math

    from validation.measure import accumulate_s_per_byte
    from validation.configs import QUICK
    from validation.matrix import run_matrix

    # an add of 1 MB of gradients on a GPU: well under a millisecond, so between 0 and 1e-9 s per byte
    assert 0 < accumulate_s_per_byte("mlp:layers=4,width=256", 8, repeats=3, device="cuda") < 1e-9
    configs = [c for c in QUICK if c.model == "mlp"][:2]
    res = run_matrix(configs=configs, repeats=1, device="cuda")
    assert len(res.rows) == 2
    for r in res.rows:
        assert r["device"] == "cuda", r["name"]
        # one backend for the whole matrix: NCCL when its widest run (2 workers here) has a GPU per worker
        assert r["backend"] == ("nccl" if torch.cuda.device_count() >= 2 else "gloo"), r["name"]
        assert math.isfinite(r["error"]["throughput_samples_per_s"]) and r["measured"]["throughput_samples_per_s"] > 0
    assert not res.calibrations["mlp"].profile.device.startswith("cpu")  # the GPU's name, from the CUDA profile


TP_MODELS = ["gpt:layers=2,hidden=16,heads=2,seq=8,vocab=32",
             "llama:layers=2,hidden=32,heads=4,kv_heads=2,ffn=48,seq=8,vocab=32"]


def _tp_plan(schedule: str = "1f1b", pp: int = 2, tp: int = 2, recompute: str = "none", model: str = TP_MODELS[0]):
    from executor.models import num_layers
    from planner.plan import plan_from_flags

    return plan_from_flags(model, num_layers(model), pp=pp, tp=tp, schedule=schedule, microbatches=4, batches=2,
                           microbatch_size=2, lr=0.1, recompute=recompute)


@pytest.mark.dist
@pytest.mark.timeout(180)
@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("model", TP_MODELS, ids=["gpt", "llama"])
def test_gpu_tensor_parallel_workers_sharing_the_gpu_match_the_reference(sequence_parallel, model):
    """2 stages x 2 TP ranks on CUDA with gloo: TP collectives staged through host memory (llama: GQA by SDPA)."""
    from dataclasses import replace

    plan = replace(_tp_plan(model=model), sequence_parallel=sequence_parallel)
    result = run_plan(plan, dtype="float64", timeout_s=60, backend="gloo", device="cuda")
    _assert_weights_equal(result.weights, reference_weights(plan, dtype="float64"))


@pytest.mark.dist
@pytest.mark.timeout(180)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per worker")
def test_nccl_tensor_parallel_group_matches_the_reference():
    """One stage x 2 TP ranks on NCCL (2 GPUs), full recomputation re-running the TP all-reduces in backward."""
    plan = _tp_plan(pp=1, recompute="full")
    result = run_plan(plan, dtype="float64", timeout_s=60, backend="nccl")
    _assert_weights_equal(result.weights, reference_weights(plan, dtype="float64"))


@pytest.mark.timeout(120)
def test_profile_blocks_on_cuda_fills_the_calibration_table_that_simulate_then_runs(tmp_path):
    """`profile --blocks --device cuda`: bf16 CUDA-event block times for a GPT-3 350M block at TP 1 and 2; the
    kind is the GPU's, no block runs above the kind's peak FLOP/s (launch-only times would), and `simulate` with
    the file gives each block stage exactly the table's times (ideal links: the TP collectives take no time)."""
    import json

    from pipetwin.cli import main
    from planner.closedforms import block_flops
    from planner.transformer import PRESETS
    from planner.transformer_profile import block_key
    from planner.efficiency import load_device_calibration

    cal = tmp_path / "cal.json"
    assert main(["profile", "--blocks", "gpt3-350m", "--tp", "1,2", "--microbatch-size", "1,2", "--device", "cuda",
                 "-o", str(cal)]) == 0
    c = load_device_calibration(cal)
    assert len(c.block_timings) == 4 and all("bfloat16" in t.source for t in c.block_timings)
    cfg = PRESETS["gpt3-350m"]
    for t in c.block_timings:
        _, _, _, _, _, _, tp, _, mb = t.key
        if c.kind.name != "gpu-generic":
            assert block_flops(cfg) * mb / tp / t.forward_s < c.kind.peak_flops, t
        assert t.backward_s > 0
    entry = c.block_timing(block_key(cfg, 2, 2))
    spec = "gpt3-350m:layers=2"
    trace = tmp_path / "t.json"
    assert main(["simulate", "--model", spec, "--topology", "ideal:8", "--tp", "2", "--pp", "4", "--dp", "1",
                 "--schedule", "1f1b", "--microbatches", "2", "--microbatch-size", "2", "--device-calibration",
                 str(cal), "--steps", "1", "--trace", str(trace)]) == 0
    events = json.loads(trace.read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    fwd = [e["dur"] for e in events if e.get("ph") == "X" and e["tid"] in (2, 3, 4, 5) and e["cat"] == "F"]
    assert fwd == pytest.approx([entry.forward_s * 1e6] * 8, rel=1e-9)


@pytest.mark.timeout(300)
def test_profile_blocks_on_cuda_times_a_llama3_8b_block_below_the_kind_s_peak(tmp_path):
    """`profile --blocks llama3-8b --device cuda`: the executor's Llama block (GQA through SDPA, SwiGLU) in bf16 at
    TP 1 and 2, seq 8192; no block runs above the kind's peak FLOP/s, and the analytic profile with the file takes
    its block times from the table."""
    from pipetwin.cli import main
    from planner.analytic import load_model
    from planner.closedforms import block_flops
    from planner.transformer import PRESETS
    from planner.transformer_profile import block_key
    from planner.efficiency import load_device_calibration

    cal = tmp_path / "llama.json"
    assert main(["profile", "--blocks", "llama3-8b", "--tp", "1,2", "--device", "cuda", "--repeats", "3",
                 "-o", str(cal)]) == 0
    c = load_device_calibration(cal)
    cfg = PRESETS["llama3-8b"]
    assert {t.key for t in c.block_timings} == {block_key(cfg, 1, 1), block_key(cfg, 2, 1)}
    for t in c.block_timings:
        tp = t.key[6]
        if c.kind.name != "gpu-generic":
            assert block_flops(cfg) / tp / t.forward_s < c.kind.peak_flops, t
        assert t.backward_s > t.forward_s
    prof = load_model("llama3-8b", calibration=c, tensor_parallel=2)
    assert prof.layers[1].forward_s == c.block_timing(block_key(cfg, 2, 1)).forward_s
