"""Link benchmark: ping-pong or ring all-reduce between local processes, fitted to latency + bytes / bandwidth.

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

:func:`run_allreduce_bench` times ``dist.all_reduce`` (a sum of float32
tensors) over all ``workers`` ranks instead, on gloo (CPU) or nccl (one CUDA
device per rank). Each size is first all-reduced once with rank-dependent
values and checked, then timed ``repeats`` times after ``warmup``, each trip
after a barrier; a trip's time is the slowest rank's, the median kept. It
reports the nccl-tests figures: algorithm bandwidth ``bytes / t`` and bus
bandwidth ``algbw * 2(n-1)/n`` (:func:`bus_bandwidth_bytes_per_s`), the rate
each rank's ring links carry, comparable across rank counts. The fit
``t = 2(n-1) * latency_s + 2(n-1)/n * bytes / bandwidth`` is
``Topology.ring_allreduce_time_s``'s own form, so the saved topology (one
link per pair, all alike) predicts the measured all-reduces.
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
           "parse_sizes", "ALLREDUCE_SIZES", "BACKENDS", "algorithm_bandwidth_bytes_per_s", "bus_bandwidth_bytes_per_s",
           "resolve_backend", "run_allreduce_bench", "allreduce_topology"]

#: 1 B to 16 MiB in steps of 4x.
DEFAULT_SIZES: tuple[int, ...] = tuple(4**k for k in range(13))
#: The all-reduce sweep: 1 MiB to 100 MiB.
ALLREDUCE_SIZES: tuple[int, ...] = (1 << 20, 4 << 20, 16 << 20, 64 << 20, 100 << 20)
#: ``--backend`` choices of the all-reduce mode (auto: nccl where CUDA is, else gloo).
BACKENDS = ("auto", "gloo", "nccl")
_FLOAT_BYTES = 4
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


def _run_once(workers: int, sizes, repeats: int, warmup: int, timeout_s: float, extra: tuple[str, ...] = ()):
    """Start the ``workers`` processes (``extra``: mode arguments), wait with a deadline, return rank 0's result."""
    port = _free_port()
    cmd = [sys.executable, "-m", "executor.netbench", "--worker", "--world", str(workers), "--port", str(port),
           "--sizes", ",".join(map(str, sizes)), "--repeats", str(repeats), "--warmup", str(warmup),
           "--timeout", str(timeout_s), *extra]
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
    _check_trips(repeats, warmup, timeout_s)
    sizes = tuple(sorted(set(int(s) for s in sizes)))
    if len(sizes) < 2 or sizes[0] < 1:
        raise NetbenchError("netbench needs at least two different message sizes >= 1 byte")
    raw = _run_with_retries(attempts, workers, sizes, repeats, warmup, timeout_s)
    links = []
    for item in sorted(raw, key=lambda r: (r["a"], r["b"])):
        fit = fit_latency_bandwidth(item["points"])
        links.append({"a": f"d{item['a']}", "b": f"d{item['b']}", "latency_s": fit.latency_s,
                      "bandwidth_bytes_per_s": fit.bandwidth_bytes_per_s,
                      "rms_relative_error": fit.rms_relative_error, "points": item["points"]})
    return {"workers": workers, "sizes_bytes": list(sizes), "repeats": repeats, "links": links,
            "topology": to_topology(workers, links)}


def _check_trips(repeats: int, warmup: int, timeout_s: float) -> None:
    if repeats < 1 or warmup < 0:
        raise NetbenchError("netbench needs repeats >= 1 and warmup >= 0")
    if timeout_s <= 0:
        raise NetbenchError("netbench needs a positive timeout")


def _run_with_retries(attempts: int, *args, **kw):
    last_error: NetbenchError | None = None
    for _ in range(max(1, attempts)):
        try:
            return _run_once(*args, **kw)
        except NetbenchError as e:  # a port taken between choosing it and binding it: try another
            last_error = e
            if "address already in use" not in str(e).lower() and "EADDRINUSE" not in str(e):
                raise
    raise last_error  # type: ignore[misc]


def algorithm_bandwidth_bytes_per_s(nbytes: float, seconds: float) -> float:
    """nccl-tests' algorithm bandwidth of a collective over an ``nbytes`` tensor that took ``seconds``."""
    return nbytes / seconds


def bus_bandwidth_bytes_per_s(nbytes: float, seconds: float, world: int) -> float:
    """nccl-tests' bus bandwidth of an all-reduce: algbw * 2(n-1)/n. A ring all-reduce sends (and receives)
    2(n-1)/n of the tensor per rank, so this is the rate each rank's links carried; 0 for one rank."""
    return algorithm_bandwidth_bytes_per_s(nbytes, seconds) * 2 * (world - 1) / world


def resolve_backend(backend: str, workers: int) -> str:
    """``auto`` -> nccl where CUDA and nccl are, else gloo; refuse nccl without a GPU per rank."""
    if backend not in BACKENDS:
        raise NetbenchError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and dist.is_available() and dist.is_nccl_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl":
        if not cuda:
            raise NetbenchError("--backend nccl needs CUDA GPUs and a torch built with nccl; use --backend gloo")
        if workers > torch.cuda.device_count():
            raise NetbenchError(f"--backend nccl runs one rank per GPU; {workers} workers but "
                                f"{torch.cuda.device_count()} GPU(s): give --workers {torch.cuda.device_count()} or fewer")
    return backend


def _allreduce_worker(rank: int, world: int, port: int, sizes: list[int], repeats: int, warmup: int,
                      timeout_s: float, backend: str) -> None:
    """One all-reduce benchmark process; rank 0 prints ``[bytes, seconds]`` per size as one tagged JSON line."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        points = []
        for size in sizes:
            buf = torch.full((size // _FLOAT_BYTES,), float(rank + 1), dtype=torch.float32, device=device)
            dist.all_reduce(buf)  # checked: every element is 1 + 2 + ... + world
            want = world * (world + 1) / 2
            if not bool(torch.all(buf == want)):
                raise RuntimeError(f"all-reduce of {size} bytes gave a wrong sum on rank {rank} (want {want:g})")
            buf.zero_()  # the timed trips sum zeros: values stay finite however many
            times = torch.zeros(repeats, dtype=torch.float64, device=device)
            for i in range(warmup + repeats):
                dist.barrier()
                sync()
                t0 = time.perf_counter()
                dist.all_reduce(buf)
                sync()
                if i >= warmup:
                    times[i - warmup] = time.perf_counter() - t0
            dist.all_reduce(times, op=dist.ReduceOp.MAX)  # a trip ends when its slowest rank's does
            points.append([buf.numel() * _FLOAT_BYTES, statistics.median(times.cpu().tolist())])
        if rank == 0:
            info = {"points": points, "device": "cpu", "memory_bytes": None}
            if device.type == "cuda":
                props = torch.cuda.get_device_properties(device)
                info.update(device=props.name, memory_bytes=float(props.total_memory))
            print(_RESULT_TAG + json.dumps(info), flush=True)
    finally:
        dist.destroy_process_group()


def run_allreduce_bench(workers: int = 2, sizes=ALLREDUCE_SIZES, repeats: int = 5, warmup: int = 1,
                        timeout_s: float = 300.0, backend: str = "auto", attempts: int = 3) -> dict:
    """Time a ring all-reduce (``dist.all_reduce``, float32 sum) over ``workers`` local ranks; the JSON report.

    The report has stable keys: ``mode`` (``allreduce``), ``backend``, ``workers``, ``sizes_bytes`` (rounded
    down to whole float32 elements), ``repeats``, ``device``, ``points`` (per size: ``bytes``, ``seconds``,
    ``algbw_bytes_per_s``, ``busbw_bytes_per_s``), ``fit`` (``latency_s`` per ring step,
    ``bandwidth_bytes_per_s``: the fitted bus bandwidth, ``rms_relative_error``; None for one rank) and
    ``topology`` (one link per pair with the fit, None for one rank).
    """
    if workers < 1:
        raise NetbenchError("netbench --mode allreduce needs --workers >= 1")
    _check_trips(repeats, warmup, timeout_s)
    sizes = tuple(sorted(set(int(s) // _FLOAT_BYTES * _FLOAT_BYTES for s in sizes)))
    if not sizes or sizes[0] < _FLOAT_BYTES:
        raise NetbenchError(f"all-reduce message sizes must be at least {_FLOAT_BYTES} bytes (one float32)")
    if workers > 1 and len(sizes) < 2:
        raise NetbenchError("netbench needs at least two different message sizes to fit latency and bandwidth")
    backend = resolve_backend(backend, workers)
    raw = _run_with_retries(attempts, workers, sizes, repeats, warmup, timeout_s,
                            extra=("--mode", "allreduce", "--backend", backend))
    points = [{"bytes": b, "seconds": t, "algbw_bytes_per_s": algorithm_bandwidth_bytes_per_s(b, t),
               "busbw_bytes_per_s": bus_bandwidth_bytes_per_s(b, t, workers)} for b, t in raw["points"]]
    fit = topology = None
    if workers > 1:
        fit = allreduce_fit(workers, [(p["bytes"], p["seconds"]) for p in points])
        link = {"latency_s": fit.latency_s, "bandwidth_bytes_per_s": fit.bandwidth_bytes_per_s}
        topology = allreduce_topology(workers, link, backend, raw.get("device", "cpu"), raw.get("memory_bytes"))
        fit = {**link, "rms_relative_error": fit.rms_relative_error}
    return {"mode": "allreduce", "backend": backend, "workers": workers, "sizes_bytes": list(sizes),
            "repeats": repeats, "device": raw.get("device", "cpu"), "points": points, "fit": fit,
            "topology": topology}


def allreduce_fit(workers: int, points) -> LinkFit:
    """Fit (bytes, seconds) all-reduce points to ``2(n-1) * latency_s + 2(n-1)/n * bytes / bandwidth``:
    the ring form ``Topology.ring_allreduce_time_s`` predicts with; ``bandwidth`` is the bus bandwidth."""
    if workers < 2:
        raise NetbenchError("an all-reduce over one rank moves nothing between ranks; there is no link to fit")
    share = 2 * (workers - 1) / workers
    line = fit_latency_bandwidth([(share * b, t) for b, t in points])
    return LinkFit(line.latency_s / (2 * (workers - 1)), line.bandwidth_bytes_per_s, line.rms_relative_error)


def _gpu_kind(name: str, memory_bytes: float | None) -> str:
    """A catalogue device kind for a CUDA device name (gpu-generic when none matches)."""
    n = name.lower()
    if "h200" in n:
        return "h200"
    if "h100" in n:
        return "h100"
    if "a100" in n:
        return "a100-40gb" if memory_bytes and memory_bytes < 60e9 else "a100-80gb"
    if "v100" in n:
        return "v100-16gb" if memory_bytes and memory_bytes < 24e9 else "v100"
    return "gpu-generic"


def allreduce_topology(workers: int, link: dict, backend: str, device: str = "cpu",
                       memory_bytes: float | None = None) -> dict:
    """The topology of an all-reduce run: ``workers`` devices, every pair joined by a link with ``link``'s
    ``latency_s`` and ``bandwidth_bytes_per_s`` (loopback on gloo; nvlink on nccl), so a ring over them in
    any order takes the measured time."""
    links = [{"a": f"d{a}", "b": f"d{b}", **link} for a, b in _pairs(workers)]
    if backend != "nccl":
        return to_topology(workers, links, name="localhost-allreduce")
    kind = _gpu_kind(device, memory_bytes)
    return to_topology(workers, links, name=f"local-{kind}-nccl", device_kind_name=kind,
                       memory_bytes=memory_bytes, link_kind="nvlink")


def _memory_bytes_per_worker(workers: int) -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / workers
    except (ValueError, OSError, AttributeError):
        return 16e9


def to_topology(workers: int, links: list[dict], name: str = "localhost-loopback", device_kind_name: str = "cpu",
                memory_bytes: float | None = None, link_kind: str = "loopback") -> dict:
    """A topology dict: devices d0..d{n-1} (kind ``device_kind_name``, cpu by default, with this host's memory
    shared among them unless ``memory_bytes`` is given), one ``link_kind`` link per measured pair."""
    try:
        from topologies.devices import device_kind

        peak = device_kind(device_kind_name).peak_flops
    except Exception:  # the catalogue is optional here
        peak = 1e11
    mem = memory_bytes if memory_bytes else _memory_bytes_per_worker(workers)
    return {
        "name": name,
        "devices": [{"name": f"d{i}", "kind": device_kind_name, "memory_bytes": mem, "peak_flops": peak,
                     "speed": 1.0} for i in range(workers)],
        "switches": [],
        "links": [{"a": l["a"], "b": l["b"], "kind": link_kind, "bandwidth_bytes_per_s": l["bandwidth_bytes_per_s"],
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
    p.add_argument("--mode", choices=("pingpong", "allreduce"), default="pingpong")
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    a = p.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")]
    if a.mode == "allreduce":
        _allreduce_worker(a.rank, a.world, a.port, sizes, a.repeats, a.warmup, a.timeout, a.backend)
    else:
        _worker(a.rank, a.world, a.port, sizes, a.repeats, a.warmup, a.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
