"""`pipetwin profile --blocks`: real block timings into a device calibration's per-shape table, which `simulate`
then runs for those shapes (the table is the truth there) and the smooth model elsewhere."""
from __future__ import annotations

import json

import pytest
import torch

from executor.models import GPTBlock, LlamaBlock
from executor.profiler import tp_block
from pipetwin.cli import main
from planner.analytic import load_model
from planner.transformer import TransformerConfig
from planner.transformer_profile import block_key
from planner.efficiency import DeviceCalibration, EfficiencyParams, load_device_calibration

SPEC = "gpt:layers=2,hidden=64,heads=4,seq=16,vocab=128"
CFG = TransformerConfig(2, 64, 4, seq=16, vocab=128)
FAST = ["--repeats", "3", "--warmup", "1"]
LLAMA = "llama:layers=2,hidden=64,heads=4,kv_heads=2,ffn=96,seq=16,vocab=128"


def _profile(tmp_path, *extra) -> int:
    return main(["profile", "--blocks", SPEC, *FAST, *extra])


def _block_durations_us(trace, workers) -> dict[str, list[float]]:
    """Durations (µs) of the F and B events of ``workers`` in a simulated Chrome trace."""
    doc = json.loads(trace.read_text())
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    out: dict[str, list[float]] = {"F": [], "B": []}
    for e in events:
        if e.get("ph") == "X" and e["tid"] in workers and e["cat"] in out:
            out[e["cat"]].append(e["dur"])
    return out


def _simulate(cal, trace, mb, tp, sp=False, model=SPEC) -> None:
    grid = ["--topology", "ideal:4", "--stages", "4"] if tp == 1 else \
        ["--topology", f"ideal:{4 * tp}", "--tp", str(tp), "--pp", "4", "--dp", "1"] + ["--sequence-parallel"] * sp
    assert main(["simulate", "--model", model, *grid, "--schedule", "1f1b", "--microbatches", "2",
                 "--microbatch-size", str(mb), "--device-calibration", str(cal), "--steps", "1",
                 "--trace", str(trace)]) == 0


def test_simulate_runs_the_profiled_block_times_for_listed_shapes_and_the_smooth_model_elsewhere(tmp_path):
    """4 chain layers (embedding, 2 blocks, head) on 4 stages: stages 1 and 2 are one block each, so on ideal links
    (TP collectives take no time there) each F / B event lasts exactly the table entry the profiler measured."""
    cal = tmp_path / "cal.json"
    assert _profile(tmp_path, "--tp", "1,2", "--microbatch-size", "2", "-o", str(cal)) == 0
    assert _profile(tmp_path, "--tp", "2", "--microbatch-size", "2", "--sequence-parallel", "--device-calibration",
                    str(cal), "-o", str(cal)) == 0
    table = load_device_calibration(cal)
    assert table.device_kind == "cpu" and len(table.block_timings) == 3
    for tp, sp, workers in ((1, False, {1, 2}), (2, False, {2, 3, 4, 5}), (2, True, {2, 3, 4, 5})):
        entry = table.block_timing(block_key(CFG, tp, 2, sp))
        assert entry is not None and entry.rows == 0 and "profile --blocks" in entry.source
        trace = tmp_path / f"t{tp}{sp}.json"
        _simulate(cal, trace, 2, tp, sp)
        got = _block_durations_us(trace, workers)
        n = 2 * len(workers)  # 2 microbatches on every block worker
        assert got["F"] == pytest.approx([entry.forward_s * 1e6] * n, rel=1e-9)
        assert got["B"] == pytest.approx([entry.backward_s * 1e6] * n, rel=1e-9)
    # microbatch 4 is not in the table: the smooth model (the same calibration without its table, as load_model
    # builds it at the reference microbatch 4) times it
    doc = json.loads(cal.read_text())
    doc["block_timings"] = []
    smooth = tmp_path / "smooth.json"
    smooth.write_text(json.dumps(doc))
    _simulate(cal, tmp_path / "m4.json", 4, 1)
    _simulate(smooth, tmp_path / "s4.json", 4, 1)
    assert _block_durations_us(tmp_path / "m4.json", {1, 2}) == _block_durations_us(tmp_path / "s4.json", {1, 2})
    want = load_model(SPEC, calibration=load_device_calibration(smooth), microbatch_size=4).layers[1]
    assert _block_durations_us(tmp_path / "m4.json", {1})["F"] == pytest.approx([want.forward_s * 1e6] * 2, rel=1e-9)


def test_a_llama_block_is_profiled_as_the_executor_builds_it_and_simulated_at_its_times(tmp_path):
    """The llama block (GQA, SwiGLU of width 96) is keyed by its own shape; simulate reads the entry for it."""
    cal = tmp_path / "llama.json"
    assert main(["profile", "--blocks", LLAMA, *FAST, "--tp", "1,2", "--microbatch-size", "2", "-o", str(cal)]) == 0
    table = load_device_calibration(cal)
    cfg = TransformerConfig(2, 64, 4, seq=16, vocab=128, ffn=96, family="llama", kv_heads=2)
    assert {e.key for e in table.block_timings} == {block_key(cfg, 1, 2), block_key(cfg, 2, 2)}
    assert block_key(cfg, 1, 2)[:5] == ("llama", 64, 4, 2, 96)
    for tp, workers in ((1, {1, 2}), (2, {2, 3, 4, 5})):
        entry = table.block_timing(block_key(cfg, tp, 2))
        trace = tmp_path / f"l{tp}.json"
        _simulate(cal, trace, 2, tp, model=LLAMA)
        got = _block_durations_us(trace, workers)
        assert got["F"] == pytest.approx([entry.forward_s * 1e6] * 2 * len(workers), rel=1e-9)
        assert got["B"] == pytest.approx([entry.backward_s * 1e6] * 2 * len(workers), rel=1e-9)


def test_the_profiled_llama_shard_is_a_rank_s_share_of_the_block():
    """tp_block(family="llama") is the executor's LlamaBlock sliced to one rank: at T = 2 the ranks' attention and
    SwiGLU outputs sum to the whole block's, and the shard has 1/T of the KV groups and SwiGLU columns."""
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    whole = LlamaBlock(64, 4, 2, 96)
    ranks = [tp_block(64, 4, 2, rank=r, seed=3, family="llama", kv_heads=2, ffn=96) for r in range(2)]
    with torch.no_grad():
        assert torch.allclose(sum(b.attn(x) for b in ranks), whole.attn(x), atol=1e-5)
        assert torch.allclose(sum(b.mlp(x) for b in ranks), whole.mlp(x), atol=1e-5)
    assert ranks[0].attn.kv_heads == 1 and ranks[0].mlp.down.in_features == 48


def test_profiling_into_a_calibration_keeps_its_smooth_parameters_and_its_other_shapes(tmp_path):
    params = EfficiencyParams(0.61, 0.52, 7e-6, 3e-5, 0.002, 3.0, 1e-3)
    base = tmp_path / "in.json"
    DeviceCalibration("cpu", params, fitted_on="synthetic", n_rows=9).save(base)
    first = tmp_path / "a.json"
    assert _profile(tmp_path, "--microbatch-size", "1,2", "--device-calibration", str(base), "-o", str(first)) == 0
    a = load_device_calibration(first)
    assert a.params == params and a.fitted_on == "synthetic" and a.n_rows == 9
    assert {t.key for t in a.block_timings} == {block_key(CFG, 1, 1), block_key(CFG, 1, 2)}
    second = tmp_path / "b.json"
    assert _profile(tmp_path, "--microbatch-size", "2", "--device-calibration", str(first), "-o", str(second)) == 0
    b = load_device_calibration(second)
    assert b.params == params and len(b.block_timings) == 2
    assert b.block_timing(block_key(CFG, 1, 1)) == a.block_timing(block_key(CFG, 1, 1))  # kept as it was
    assert b.block_timing(block_key(CFG, 1, 2)) is not None  # measured again
    fresh = tmp_path / "c.json"
    assert _profile(tmp_path, "--tp", "2", "--new-table", "--device-calibration", str(second), "-o", str(fresh)) == 0
    c = load_device_calibration(fresh)
    assert c.params == params and [t.key for t in c.block_timings] == [block_key(CFG, 2, 1)]


def test_the_compute_only_tp_shard_is_the_rank_s_real_share_of_the_block():
    """The sliced block the profiler times computes its TP rank's partial: the ranks' attention and MLP outputs
    (each with the row-parallel bias added once) sum to the whole block's, with no collective run."""
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    whole = GPTBlock(64, 4)
    ranks = [tp_block(64, 4, 2, rank=r, seed=3) for r in range(2)]
    with torch.no_grad():
        attn = sum(b.attn(x) for b in ranks) - whole.attn.proj.bias
        mlp = sum(b.mlp(x) for b in ranks) - whole.mlp[2].bias
        assert torch.allclose(attn, whole.attn(x), atol=1e-5)
        assert torch.allclose(mlp, whole.mlp(x), atol=1e-5)
    assert ranks[0].attn.qkv.weight.shape == (3 * 32, 64) and ranks[0].mlp._modules["0"].weight.shape == (128, 64)
    # under sequence parallelism the rank's block takes 1/T of the sequence and gives it back, whole width
    sp = tp_block(64, 4, 2, sequence_parallel=True, seed=3)
    with torch.no_grad():
        assert sp(x[:, :8]).shape == (2, 8, 64)


@pytest.mark.parametrize("argv, says", [
    (["--blocks", "gpt9-huge"], "not a transformer"),
    (["--blocks", SPEC, "--tp", "3"], "must divide heads=4"),
    (["--blocks", "gpt:layers=2,hidden=64,heads=4,seq=16,vocab=128,ffn=100"], "4·hidden GELU MLP"),
    (["--blocks", LLAMA, "--tp", "4"], "kv_heads=2"),
    (["--blocks", "llama:layers=2,hidden=36,heads=4,seq=16,vocab=128"], "head size hidden/heads = 9 must be even"),
    (["--blocks", SPEC, "--sequence-parallel"], "--tp 2 or more"),
    (["--blocks", SPEC, "--model", SPEC], "one of the two"),
    (["--model", SPEC, "--tp", "2"], "go with --blocks"),
    (["--blocks", SPEC, "--device", "cuda"], "no GPU"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, says):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "x.json"
    rc = main(["profile", *argv, "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and says in err and "Traceback" not in err
    assert not out.exists()


def test_a_calibration_of_another_kind_is_refused_unless_the_kind_is_named(tmp_path, capsys):
    """Block times from this CPU into an A100 calibration would mix two devices' times; --device-kind says it is
    meant."""
    base = tmp_path / "a100.json"
    DeviceCalibration("a100-80gb", EfficiencyParams()).save(base)
    out = tmp_path / "out.json"
    assert _profile(tmp_path, "--device-calibration", str(base), "-o", str(out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "timed on cpu but the device calibration is for a100-80gb" in err
    assert _profile(tmp_path, "--device-calibration", str(base), "--device-kind", "a100", "-o", str(out)) == 0
    assert load_device_calibration(out).device_kind == "a100-80gb"


def test_blocks_without_an_output_file_is_refused(capsys):
    assert main(["profile", "--blocks", SPEC]) == 2
    assert "-o FILE" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_the_block_forward_is_timed_recording_autograd_and_the_backward_on_its_own(monkeypatch, family):
    """What the efficiency model reads: each timed pass is mark, a forward with autograd recording (its output
    needs a gradient), mark, the block's backward, mark; and both medians are positive seconds."""
    from executor import profiler

    log: list = []

    class LoggingClock(profiler.Clock):
        def mark(self):
            log.append("mark")
            return super().mark()

    def hooked_block(*args, **kwargs):
        block = tp_block(*args, **kwargs)
        block.register_forward_hook(lambda m, i, out: log.append(("F", torch.is_grad_enabled(), out.requires_grad)))
        block.register_full_backward_hook(lambda m, gin, gout: log.append("B"))
        return block

    monkeypatch.setattr(profiler, "Clock", LoggingClock)
    monkeypatch.setattr(profiler, "tp_block", hooked_block)
    forward_s, backward_s = profiler.profile_block(64, 4, 16, repeats=2, warmup=1, family=family, kv_heads=2)
    assert log == ["mark", ("F", True, True), "mark", "B", "mark"] * 3
    assert forward_s > 0 and backward_s > 0
