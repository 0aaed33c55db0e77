"""executor.netbench: the fit recovers known parameters; a real 2-process run gives a loadable topology."""
from __future__ import annotations

import json

import numpy as np
import pytest

from executor.netbench import NetbenchError, fit_latency_bandwidth, parse_sizes, run_netbench, to_topology
from pipetwin.cli import main


def test_fit_recovers_exact_latency_and_bandwidth():
    lat, bw = 40e-6, 2.5e9
    pts = [(s, lat + s / bw) for s in (1, 64, 4096, 65536, 1 << 20, 1 << 24)]
    fit = fit_latency_bandwidth(pts)
    assert fit.latency_s == pytest.approx(lat, rel=1e-6)
    assert fit.bandwidth_bytes_per_s == pytest.approx(bw, rel=1e-6)
    assert fit.rms_relative_error < 1e-9
    assert fit.predict_s(1000) == pytest.approx(lat + 1000 / bw)


def test_fit_with_noise_is_close():
    rng = np.random.default_rng(0)
    lat, bw = 80e-6, 1e9
    sizes = [4**k for k in range(13)]
    pts = [(s, (lat + s / bw) * (1 + 0.03 * rng.standard_normal())) for s in sizes for _ in range(3)]
    fit = fit_latency_bandwidth(pts)
    assert fit.latency_s == pytest.approx(lat, rel=0.1)
    assert fit.bandwidth_bytes_per_s == pytest.approx(bw, rel=0.1)


def test_fit_respects_bounds():
    assert fit_latency_bandwidth([(100, 1e-6), (1000, 1e-5)]).latency_s == pytest.approx(0, abs=1e-12)
    flat = fit_latency_bandwidth([(1, 5e-5), (1000, 5e-5), (10**6, 5e-5)])
    assert flat.latency_s == pytest.approx(5e-5, rel=1e-3) and flat.bandwidth_bytes_per_s > 1e12
    with pytest.raises(NetbenchError):
        fit_latency_bandwidth([(1, 1e-5)])


def test_parse_sizes():
    assert parse_sizes("1,4K,1M,4k") == (1, 4096, 1 << 20)
    with pytest.raises(NetbenchError, match="byte count"):
        parse_sizes("1,lots")
    with pytest.raises(NetbenchError, match="two different"):
        parse_sizes("64K")


def test_topology_dict_loads():
    topology = pytest.importorskip("topologies.topology")
    d = to_topology(3, [{"a": "d0", "b": "d1", "latency_s": 1e-5, "bandwidth_bytes_per_s": 2e9},
                        {"a": "d1", "b": "d2", "latency_s": 2e-5, "bandwidth_bytes_per_s": 1e9}])
    t = topology.Topology.from_dict(d)
    assert t.path_bandwidth("d0", "d2") == pytest.approx(1e9)
    assert t.path_latency("d0", "d2") == pytest.approx(3e-5)


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_real_two_process_run(tmp_path, capsys):
    out = tmp_path / "topo.json"
    assert main(["netbench", "--workers", "2", "--sizes", "1,64K,1M", "--repeats", "3", "--warmup", "1",
                 "--timeout", "90", "--json", "-o", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    (link,) = report["links"]
    assert (link["a"], link["b"]) == ("d0", "d1")
    assert link["latency_s"] >= 0 and link["bandwidth_bytes_per_s"] > 0
    assert [p[0] for p in link["points"]] == [1, 65536, 1 << 20] and all(p[1] > 0 for p in link["points"])
    topo = json.loads(out.read_text())
    assert topo == report["topology"] and topo["links"][0]["kind"] == "loopback"
    topology = pytest.importorskip("topologies.topology")
    assert topology.Topology.from_dict(topo).path_bandwidth("d0", "d1") == pytest.approx(link["bandwidth_bytes_per_s"])


def test_bad_worker_count_is_one_line(capsys):
    assert main(["netbench", "--workers", "1"]) == 2
    assert "--workers >= 2" in capsys.readouterr().err


@pytest.mark.dist
@pytest.mark.timeout(60)
def test_worker_failure_is_reported_not_hung(monkeypatch):
    # the rendezvous port is taken: rank 0 fails at once, rank 1 would wait; the parent reports, not hangs
    import socket
    import time

    import executor.netbench as nb

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        monkeypatch.setattr(nb, "_free_port", lambda: busy.getsockname()[1])
        t0 = time.monotonic()
        with pytest.raises(NetbenchError, match="worker 0 exited"):
            run_netbench(2, sizes=(1, 2), repeats=1, warmup=0, timeout_s=40, attempts=1)
        assert time.monotonic() - t0 < 30
