"""netbench --mode allreduce: nccl-tests' bandwidth arithmetic, the ring fit, and a real 2-process gloo run whose
saved topology loads and predicts the measured all-reduces."""
from __future__ import annotations

import json

import pytest

from executor.netbench import (NetbenchError, algorithm_bandwidth_bytes_per_s, allreduce_fit, allreduce_topology,
                               bus_bandwidth_bytes_per_s, resolve_backend)
from pipetwin.cli import main
from planner.sharding import ring_bytes_per_rank
from topologies.topology import Topology


def test_bus_bandwidth_closed_forms():
    # 100 MB in 1 s: algbw 1e8 B/s whatever the rank count; busbw 1e8 * 2(n-1)/n
    assert algorithm_bandwidth_bytes_per_s(1e8, 1.0) == pytest.approx(1e8)
    assert bus_bandwidth_bytes_per_s(1e8, 1.0, 2) == pytest.approx(1e8)        # 2·1/2 = 1
    assert bus_bandwidth_bytes_per_s(1e8, 1.0, 4) == pytest.approx(1.5e8)      # 2·3/4
    assert bus_bandwidth_bytes_per_s(1e8, 0.5, 8) == pytest.approx(3.5e8)      # 2e8 · 2·7/8
    assert bus_bandwidth_bytes_per_s(1e8, 1.0, 1) == 0.0


@pytest.mark.parametrize("n", [2, 3, 8])
def test_bus_bandwidth_is_what_each_rank_sends_per_second(n):
    # a ring all-reduce is a reduce-scatter then an all-gather: each rank sends 2 * (n-1)/n of the tensor
    nbytes, seconds = 3 << 20, 0.02
    sent = 2 * ring_bytes_per_rank(nbytes, n)
    assert bus_bandwidth_bytes_per_s(nbytes, seconds, n) == pytest.approx(sent / seconds)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_saved_topology_reproduces_the_ring_it_was_fitted_on(n):
    lat, bw = 30e-6, 4e9  # per ring step; bus bandwidth
    sizes = [1 << 20, 4 << 20, 16 << 20, 100 << 20]
    points = [(b, 2 * (n - 1) * lat + 2 * (n - 1) / n * b / bw) for b in sizes]
    fit = allreduce_fit(n, points)
    assert fit.latency_s == pytest.approx(lat, rel=1e-6)
    assert fit.bandwidth_bytes_per_s == pytest.approx(bw, rel=1e-6)
    topo = Topology.from_dict(allreduce_topology(n, {"latency_s": fit.latency_s,
                                                     "bandwidth_bytes_per_s": fit.bandwidth_bytes_per_s}, "gloo"))
    assert len(list(topo.links())) == n * (n - 1) // 2
    devices = [f"d{i}" for i in range(n)]
    for order in (devices, devices[::-1]):
        for b, t in points:
            assert topo.ring_allreduce_time_s(order, b) == pytest.approx(t, rel=1e-6)
    with pytest.raises(NetbenchError, match="one rank"):
        allreduce_fit(1, points)


def test_nccl_topology_names_the_gpu():
    d = allreduce_topology(2, {"latency_s": 1e-5, "bandwidth_bytes_per_s": 1e11}, "nccl", "NVIDIA H200", 143e9)
    t = Topology.from_dict(d)
    assert {x["kind"] for x in d["devices"]} == {"h200"} and d["links"][0]["kind"] == "nvlink"
    assert t.path_bandwidth("d0", "d1") == pytest.approx(1e11)


@pytest.mark.dist
@pytest.mark.timeout(150)
def test_real_two_process_gloo_allreduce(tmp_path, capsys):
    out = tmp_path / "topo.json"
    assert main(["netbench", "--mode", "allreduce", "--backend", "gloo", "--workers", "2", "--sizes", "64K,1M,4M",
                 "--repeats", "3", "--warmup", "1", "--timeout", "120", "--json", "-o", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["mode"], report["backend"], report["workers"]) == ("allreduce", "gloo", 2)
    assert [p["bytes"] for p in report["points"]] == [1 << 16, 1 << 20, 4 << 20]
    for p in report["points"]:
        assert p["seconds"] > 0
        assert p["algbw_bytes_per_s"] == pytest.approx(p["bytes"] / p["seconds"])
        assert p["busbw_bytes_per_s"] == pytest.approx(2 * ring_bytes_per_rank(p["bytes"], 2) / p["seconds"])
    saved = json.loads(out.read_text())
    assert saved == report["topology"]
    topo = Topology.from_dict(saved)
    fit = report["fit"]
    assert topo.path_bandwidth("d0", "d1") == pytest.approx(fit["bandwidth_bytes_per_s"])
    # the loaded topology predicts each measured all-reduce as the fit does: within its own rms error, wide
    predicted = [topo.ring_allreduce_time_s(["d0", "d1"], p["bytes"]) for p in report["points"]]
    rel = [(p["seconds"] - q) / p["seconds"] for p, q in zip(report["points"], predicted)]
    assert (sum(r * r for r in rel) / len(rel)) ** 0.5 == pytest.approx(fit["rms_relative_error"], rel=1e-6, abs=1e-9)


@pytest.mark.dist
@pytest.mark.timeout(90)
def test_one_rank_sanity_run_has_no_link(capsys):
    assert main(["netbench", "--mode", "allreduce", "--backend", "gloo", "--workers", "1", "--sizes", "4K,64K",
                 "--repeats", "1", "--warmup", "0", "--timeout", "60", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fit"] is None and report["topology"] is None
    assert all(p["busbw_bytes_per_s"] == 0 and p["algbw_bytes_per_s"] > 0 for p in report["points"])


def test_bad_allreduce_input_is_one_line(capsys):
    assert main(["netbench", "--mode", "allreduce", "--workers", "1", "-o", "x.json"]) == 2
    assert "drop -o" in capsys.readouterr().err
    assert main(["netbench", "--backend", "nccl"]) == 2
    assert "--mode allreduce only" in capsys.readouterr().err
    assert main(["netbench", "--mode", "allreduce", "--backend", "mpi"]) == 2
    assert "unknown backend" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(NetbenchError, match="use --backend gloo"):
            resolve_backend("nccl", 2)
        assert resolve_backend("auto", 2) == "gloo"
