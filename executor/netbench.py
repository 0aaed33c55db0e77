"""Link benchmark: ping-pong between local gloo processes, fitted to latency + bytes / bandwidth.

:func:`run_netbench` starts ``workers`` local Python processes (subprocesses
running this module, so the caller's ``__main__`` is never re-imported) that
join one gloo process group on a free loopback port. For every pair of ranks
(a < b), in turn while the others wait at a barrier, rank a sends a message of
each size to b and b sends it back; the one-way time is half the round trip,
the median over ``repeats`` trips after ``warmup`` (and after about 0.3 s of
1-byte trips per pair, as the first trips after set-up are much slower). :func:`fit_latency_bandwidth`
fits ``t = latency_s + bytes / bandwidth_bytes_per_s`` by least squares on the
relative error (so small and large messages weigh alike), and the result is a
topology dict (``topologies.Topology.from_dict`` schema): devices ``d0..d{n-1}``
of kind ``cpu`` and one ``loopback`` link per pair with the fitted parameters.

Every wait has a deadline: process-group set-up and collectives time out,
the parent kills the workers when the overall ``timeout_s`` passes, and a
worker that fails ends the run with :class:`NetbenchError` naming it.
"""
from __future__ import annotations

import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from topologies.errors import InputError

__all__ = ["NetbenchError", "LinkFit", "fit_latency_bandwidth", "run_netbench", "to_topology", "DEFAULT_SIZES",
           "parse_sizes"]

#: 1 B to 16 MiB in steps of 4x.
DEFAULT_SIZES: tuple[int, ...] = tuple(4**k for k in range(13))
_RESULT_TAG = "NETBENCH-RESULT "


class NetbenchError(InputError):
    """The link benchmark could not run or got bad input; the message says what to do."""


@dataclass(frozen=True)
class LinkFit:
    """``t = latency_s + bytes / bandwidth_bytes_per_s``, and the fit's RMS relative error."""

    latency_s: float
    bandwidth_bytes_per_s: float
    rms_relative_error: float

    def predict_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s


def fit_latency_bandwidth(points) -> LinkFit:
    """Least-squares fit of (bytes, seconds) points to ``latency + bytes / bandwidth``.

    Minimises the relative residual ``(t_i - latency - bytes_i * inv_bw) / t_i``, with
    latency >= 0 and inverse bandwidth > 0 (a negative unconstrained estimate is refitted
    with that parameter at its bound).
    """
    pts = [(float(x), float(t)) for x, t in points]
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        raise NetbenchError("fitting latency and bandwidth needs points at two or more message sizes")
    if any(t <= 0 or not math.isfinite(t) or x < 0 for x, t in pts):
        raise NetbenchError("fitting latency and bandwidth needs positive finite times and sizes >= 0")
    x = np.array([p[0] for p in pts])
    t = np.array([p[1] for p in pts])
    w = 1.0 / t
    a = np.stack([w, x * w], axis=1)  # rows: [1/t, x/t] . [lat, inv_bw] ~ 1
    ones = np.ones_like(t)
    (lat, inv_bw), *_ = np.linalg.lstsq(a, ones, rcond=None)
    if lat < 0:  # through the origin
        lat = 0.0
        inv_bw = float(np.dot(a[:, 1], ones) / np.dot(a[:, 1], a[:, 1]))
    if inv_bw <= 0:  # flat: latency only
        inv_bw = 1e-15
        lat = max(0.0, float(np.dot(a[:, 0], ones - a[:, 1] * inv_bw) / np.dot(a[:, 0], a[:, 0])))
    rel = (t - (lat + x * inv_bw)) / t
    return LinkFit(float(lat), float(1.0 / inv_bw), float(np.sqrt(np.mean(rel**2))))


_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2, "MIB": 1024**2,
          "G": 1024**3, "GB": 1024**3, "GIB": 1024**3}


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"1,1K,64K,1M"`` -> byte counts (K, M, G are binary: 1K = 1024)."""
    out = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        num = part.rstrip("bBkKmMgGiI")
        unit = part[len(num):].upper()
        try:
            value = float(num) * _UNITS[unit]
        except (ValueError, KeyError):
            raise NetbenchError(f"message size {part!r} is not a byte count like 4096, 64K or 1M") from None
        if value < 1 or not value.is_integer():
            raise NetbenchError(f"message size {part!r} must be a whole number of bytes >= 1")
        out.append(int(value))
    if len(set(out)) < 2:
        raise NetbenchError("give at least two different message sizes, e.g. --sizes 1K,64K,1M")
    return tuple(sorted(set(out)))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pairs(world: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(world) for b in range(a + 1, world)]


def _settle(initiator: bool, peer: int, seconds: float = 0.3) -> None:
    """Small round trips for about ``seconds`` first: the first trips after set-up are much slower."""
    import torch
    import torch.distributed as dist

    buf = torch.zeros(1, dtype=torch.uint8)
    flag = torch.zeros(1, dtype=torch.uint8)
    end = time.perf_counter() + seconds
    while True:
        if initiator:
            flag[0] = 1 if time.perf_counter() < end else 0
            dist.send(flag, peer)
            if not flag[0]:
                return
            dist.recv(buf, peer)
        else:
            dist.recv(flag, peer)
            if not flag[0]:
                return
            dist.send(buf, peer)


def _worker(rank: int, world: int, port: int, sizes: list[int], repeats: int, warmup: int, timeout_s: float) -> None:
    """One benchmark process; rank 0 prints the results as one tagged JSON line."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    results = []
    try:
        for a, b in _pairs(world):
            if rank in (a, b):
                peer = b if rank == a else a
                _settle(rank == a, peer)
                points = []
                for size in sizes:
                    buf = torch.zeros(size, dtype=torch.uint8)
                    times = []
                    for i in range(warmup + repeats):
                        if rank == a:
                            t0 = time.perf_counter()
                            dist.send(buf, peer)
                            dist.recv(buf, peer)
                            if i >= warmup:
                                times.append((time.perf_counter() - t0) / 2)
                        else:
                            dist.recv(buf, peer)
                            dist.send(buf, peer)
                    if rank == a:
                        points.append([size, statistics.median(times)])
                if rank == a:
                    results.append({"a": a, "b": b, "points": points})
            dist.barrier()
        # the lower rank of each pair measured it; gather everything on rank 0
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(results, gathered, dst=0)
        if rank == 0:
            links = [r for part in gathered for r in part]
            print(_RESULT_TAG + json.dumps(links), flush=True)
    finally:
        dist.destroy_process_group()


def _child_env() -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    if "GLOO_SOCKET_IFNAME" not in env and hasattr(socket, "if_nameindex"):
        names = {n for _, n in socket.if_nameindex()}
        for lo in ("lo", "lo0"):
            if lo in names:
                env["GLOO_SOCKET_IFNAME"] = lo
                break
    return env


def _run_once(workers: int, sizes, repeats: int, warmup: int, timeout_s: float) -> list[dict]:
    port = _free_port()
    cmd = [sys.executable, "-m", "executor.netbench", "--worker", "--world", str(workers), "--port", str(port),
           "--sizes", ",".join(map(str, sizes)), "--repeats", str(repeats), "--warmup", str(warmup),
           "--timeout", str(timeout_s)]
    env = _child_env()
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(workers)]
    procs = [subprocess.Popen(cmd + ["--rank", str(r)], env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                              text=True) for r, (out, err) in enumerate(files)]
    deadline = time.monotonic() + timeout_s
    timed_out = False
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                break  # one failed: the others would only wait for it
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        outputs = []
        for out, err in files:
            texts = []
            for f in (out, err):
                f.seek(0)
                texts.append(f.read())
                f.close()
            outputs.append(tuple(texts))
    if timed_out:
        raise NetbenchError(f"netbench: the {workers} workers did not finish within {timeout_s:g} s; "
                            f"raise --timeout or measure fewer sizes")
    failed = [(r, p.returncode, outputs[r][1]) for r, p in enumerate(procs) if p.returncode not in (0, -9)]
    failed = failed or [(r, p.returncode, outputs[r][1]) for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        r, rc, err = failed[0]
        last = next((line for line in reversed(err.strip().splitlines()) if line.strip()), "no message")
        raise NetbenchError(f"netbench: worker {r} exited with code {rc}: {last.strip()}")
    for line in outputs[0][0].splitlines():
        if line.startswith(_RESULT_TAG):
            return json.loads(line[len(_RESULT_TAG):])
    raise NetbenchError("netbench: worker 0 finished without results")


def run_netbench(workers: int = 2, sizes=DEFAULT_SIZES, repeats: int = 10, warmup: int = 2,
                 timeout_s: float = 120.0, attempts: int = 3) -> dict:
    """Measure every pair of ``workers`` local gloo processes; return the JSON report.

    The report has stable keys: ``workers``, ``sizes_bytes``, ``repeats``, ``links`` (one per pair:
    ``a``, ``b``, ``latency_s``, ``bandwidth_bytes_per_s``, ``rms_relative_error``, ``points``
    as ``[bytes, one_way_seconds]``) and ``topology`` (the topology dict).
    """
    if workers < 2:
        raise NetbenchError("netbench needs --workers >= 2 (it measures the link between two processes)")
    if repeats < 1 or warmup < 0:
        raise NetbenchError("netbench needs repeats >= 1 and warmup >= 0")
    if timeout_s <= 0:
        raise NetbenchError("netbench needs a positive timeout")
    sizes = tuple(sorted(set(int(s) for s in sizes)))
    if len(sizes) < 2 or sizes[0] < 1:
        raise NetbenchError("netbench needs at least two different message sizes >= 1 byte")
    last_error: NetbenchError | None = None
    for _ in range(max(1, attempts)):
        try:
            raw = _run_once(workers, sizes, repeats, warmup, timeout_s)
            break
        except NetbenchError as e:  # a port taken between choosing it and binding it: try another
            last_error = e
            if "address already in use" not in str(e).lower() and "EADDRINUSE" not in str(e):
                raise
    else:
        raise last_error  # type: ignore[misc]
    links = []
    for item in sorted(raw, key=lambda r: (r["a"], r["b"])):
        fit = fit_latency_bandwidth(item["points"])
        links.append({"a": f"d{item['a']}", "b": f"d{item['b']}", "latency_s": fit.latency_s,
                      "bandwidth_bytes_per_s": fit.bandwidth_bytes_per_s,
                      "rms_relative_error": fit.rms_relative_error, "points": item["points"]})
    return {"workers": workers, "sizes_bytes": list(sizes), "repeats": repeats, "links": links,
            "topology": to_topology(workers, links)}


def _memory_bytes_per_worker(workers: int) -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / workers
    except (ValueError, OSError, AttributeError):
        return 16e9


def to_topology(workers: int, links: list[dict], name: str = "localhost-loopback") -> dict:
    """A topology dict: devices d0..d{n-1} (kind cpu), one loopback link per measured pair."""
    try:
        from topologies.devices import device_kind

        peak = device_kind("cpu").peak_flops
    except Exception:  # the catalogue is optional here
        peak = 1e11
    mem = _memory_bytes_per_worker(workers)
    return {
        "name": name,
        "devices": [{"name": f"d{i}", "kind": "cpu", "memory_bytes": mem, "peak_flops": peak, "speed": 1.0}
                    for i in range(workers)],
        "switches": [],
        "links": [{"a": l["a"], "b": l["b"], "kind": "loopback", "bandwidth_bytes_per_s": l["bandwidth_bytes_per_s"],
                   "latency_s": l["latency_s"]} for l in links],
    }


def _main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m executor.netbench", description="one netbench worker (internal)")
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sizes", required=True)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=float, default=120.0)
    a = p.parse_args(argv)
    _worker(a.rank, a.world, a.port, [int(s) for s in a.sizes.split(",")], a.repeats, a.warmup, a.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
