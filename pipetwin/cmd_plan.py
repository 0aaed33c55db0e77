"""`pipetwin plan`: partition, place and schedule a model on a cluster; show why; write the plan."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from planner.plan import Plan, StagePlan
from planner.profile import ModelProfile, ProfileError, load_profile, read_pipedream_graph
from planner.program import FAMILIES
from pipetwin.args import (add_device_calibration_flag, add_zero_flag, add_grid_flags, add_recompute_flag, check_calibration_topology,
                           grid_degrees, grid_given)
from pipetwin.errors import UserError

#: Where PipeDream's shipped profiles live, relative to the repository root.


def register(sub) -> None:
    p = sub.add_parser("plan", help="find the best pipeline plan for a model on a topology",
                       description="Partition a model into stages, replicate and place them on a topology, pick a "
                                   "schedule, and explain the choice.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--profile", metavar="PATH", help="a profile file (.json, or PipeDream graph.txt)")
    src.add_argument("--model", metavar="NAME",
                     help="uniform:layers=L,fwd=S,bwd=S,act=B,params=B, a profile path, or a PipeDream profile name (vgg16, resnet50, gnmt, ...)")
    from topologies.presets import presets_help

    p.add_argument("--topology", metavar="PRESET|FILE", help="the cluster: " + presets_help().replace("%", "%%"))
    p.add_argument("--schedule", default="auto", choices=["auto", *FAMILIES], help="schedule family, or auto to score them all (default)")
    p.add_argument("--microbatch-size", type=int, default=None, metavar="N",
                   help="samples per microbatch (default: a PipeDream profile's profiled batch, as PipeDream plans "
                        "it, e.g. 128 for vgg16; otherwise 1)")
    p.add_argument("--global-batch", type=int, default=None, metavar="N", help="samples per batch (fixes the microbatch count)")
    p.add_argument("--microbatches", type=int, default=None, metavar="M", help="microbatches per batch (default: try several)")
    p.add_argument("--memory-limit", type=_bytes, default=None, metavar="BYTES", help="per-device memory limit, e.g. 16e9 or 16GiB (default: each device's memory)")
    p.add_argument("--stages", type=int, default=None, metavar="P", help="fix the pipeline depth (no replication)")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "none"], help="optimizer state to count: sgd (momentum, 1x params), adam (2x)")
    add_recompute_flag(p)
    add_zero_flag(p)
    add_grid_flags(p)
    p.add_argument("--no-overlap", action="store_true", help="communication does not overlap compute")
    add_device_calibration_flag(p)
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="candidates to list (default 5)")
    p.add_argument("--target-throughput", type=float, default=None, metavar="X", help="find the fewest devices reaching X samples/s")
    p.add_argument("--cost-model", default="pipetwin", choices=["pipetwin", "pipedream"], help="pipetwin (schedule-aware, default) or PipeDream's optimizer")
    p.add_argument("--levels", default=None, metavar="N:BW,...", help="PipeDream model: workers:bandwidth per level, innermost first, e.g. 4:10e9,4:1.25e9 (default: from --topology)")
    p.add_argument("--activation-compression-ratio", type=float, default=None, metavar="R", help="PipeDream model: count activation transfers, compressed R times")
    p.add_argument("--memory-size", type=float, default=None, metavar="BYTES", help="PipeDream model: per-worker memory")
    p.add_argument("--straight", action="store_true", help="PipeDream model: no replication (straight pipelines)")
    p.add_argument("--compare", choices=["dp"], default=None,
                   help="dp: also the same cluster's best pure data-parallel plan under the same cost model, and the speedup")
    p.add_argument("--dp-overlap", action="store_true",
                   help="with --compare dp: the data-parallel all-reduce overlaps backward (as DDP's gradient buckets do)")
    p.add_argument("--json", action="store_true", help="print the plan and its prediction as JSON; throughputs are "
                   "samples per second, and predicted.samples_per_batch says the batch they assume")
    p.add_argument("-o", "--output", metavar="PLAN.json", help="write the plan (what `pipetwin simulate --plan` and `run --plan` read)")
    p.set_defaults(func=run)


def run(args) -> int:
    spec = args.profile or args.model
    if args.cost_model == "pipedream":
        if grid_given(args):
            raise UserError("--tp/--pp/--dp fix the plan; PipeDream's optimizer searches its own: drop them or use --cost-model pipetwin")
        if args.zero:
            raise UserError("--zero is the pipetwin cost model's; PipeDream's optimizer shards nothing: drop it or use "
                            "--cost-model pipetwin")
        # PipeDream's optimizer reads graph.txt as it is: times per profiled minibatch
        return _run_pipedream(args, spec, resolve_model(spec, raw=True))
    if not args.topology:
        raise UserError("--topology is required (a preset such as ideal:4, dgx:servers=2, pipedream-b, or a YAML/JSON file)")
    from topologies.presets import load_topology
    from planner.search import capacity, plan_model

    topology = load_topology(args.topology)
    topology.validate()
    check_calibration_topology(args.device_calibration, topology)
    grid = None
    if grid_given(args):
        if args.stages is not None or args.target_throughput is not None:
            raise UserError("--tp/--pp/--dp fix the plan's shape; drop --stages and --target-throughput")
        from pipetwin.args import check_grid_profile

        grid = grid_degrees(args, len(topology.devices))
    tp = grid[0] if grid else 1
    profile = resolve_model(spec, tensor_parallel=tp, sequence_parallel=args.sequence_parallel,
                            calibration=args.device_calibration, microbatch_size=args.microbatch_size or 1)
    if grid:
        check_grid_profile(profile, tp, args.sequence_parallel)
    # a PipeDream profile is planned at its profiled batch unless told otherwise (PipeDream's convention)
    mb = args.microbatch_size or profile.microbatch_size
    kw = dict(schedule=args.schedule, microbatch_size=mb, global_batch=args.global_batch,
              microbatches=args.microbatches, memory_limit_bytes=args.memory_limit, top_k=args.top_k,
              overlap_comm=not args.no_overlap, recompute=args.recompute, optimizer=args.optimizer,
              stages=args.stages, model_name=spec, zero_stage=args.zero or 0, **({"grid": grid} if grid else {}))
    if args.target_throughput is not None:
        cap = capacity(profile, topology, args.target_throughput, **kw)
        return _show_capacity(args, cap)
    result = plan_model(profile, topology, **kw)
    best = result.best_candidate
    dp = None
    if args.compare == "dp":
        from planner.search import best_data_parallel

        dp = best_data_parallel(profile, topology, microbatch_size=mb, memory_limit_bytes=args.memory_limit,
                                optimizer=args.optimizer, recompute=args.recompute, overlap_comm=not args.no_overlap,
                                overlap_allreduce=args.dp_overlap, model_name=spec, zero_stage=args.zero or 0)
    if args.output:
        result.best.save(args.output)
    if args.json:
        doc = _candidate_json(best)
        doc.update(model=spec, topology=topology.name, cost_model="pipetwin", explanation=result.explanation,
                   candidates=[_candidate_summary(c) for c in result.candidates], elapsed_s=result.elapsed_s)
        if args.output:
            doc["plan_file"] = args.output
        if dp is not None:
            doc["compare"] = _compare_json(best, dp, args.dp_overlap)
        print(json.dumps(doc))
        return 0
    _print_result(result, spec, topology.name)
    if dp is not None:
        _console().print(_compare_text(best, dp, args.dp_overlap), highlight=False)
    if args.output:
        print(f"plan written to {args.output}")
    return 0


# --- model names -----------------------------------------------------------------------------
def _pipedream_graph(spec: str) -> Path | None:
    """The graph.txt PipeDream's profile name ``spec`` names, None where it is not on disk (or ``spec`` is no name)."""
    from planner.cnn import pipedream_profiles_dir

    d = pipedream_profiles_dir()
    if d is None or spec.startswith("uniform") or Path(spec).exists() or not (d / f"{spec}.graph.txt").is_file():
        return None
    return d / f"{spec}.graph.txt"


def resolve_model(spec: str, raw: bool = False, tensor_parallel: int = 1, sequence_parallel: bool = False,
                  calibration=None, microbatch_size: int = 1) -> ModelProfile:
    """Any model spec every command accepts → ModelProfile (one grammar: ``planner.analytic.load_model``).

    Analytic presets (gpt3-13b, gpt:..., bert-large), PipeDream profile names
    (per sample, scaled from their profiled batch size), profile paths and
    uniform: specs. ``raw`` reads a PipeDream profile as its file states it
    (per profiled minibatch), as PipeDream's own optimizer does. A device
    ``calibration`` (``--device-calibration``) times an analytic transformer by
    its efficiency model at ``microbatch_size`` (which is ignored without one).
    """
    graph = _pipedream_graph(spec) if raw else None
    if graph is not None:
        return read_pipedream_graph(graph, name=spec)
    from planner.analytic import ModelSpecError, load_model

    try:
        return load_model(spec, tensor_parallel=tensor_parallel, sequence_parallel=sequence_parallel,
                          calibration=calibration, microbatch_size=microbatch_size)
    except ModelSpecError as e:
        raise ProfileError(str(e)) from None


def _bytes(text: str) -> float:
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "b": 1}
    t = text.strip().lower()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            try:
                v = float(t[: -len(u)]) * units[u]
                break
            except ValueError:
                v = math.nan
                break
    else:
        try:
            v = float(t)
        except ValueError:
            v = math.nan
    if not v > 0 or math.isinf(v):
        import argparse

        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of bytes (e.g. 16e9 or 16GiB)")
    return v


# --- the PipeDream model ---------------------------------------------------------------------
def _levels(args) -> list[tuple[int, float]]:
    if args.levels:
        out = []
        for item in args.levels.split(","):
            try:
                n, bw = item.split(":")
                out.append((int(n), float(bw)))
            except ValueError:
                raise UserError(f"--levels expects WORKERS:BANDWIDTH pairs like 4:10e9,4:1.25e9, got {item!r}") from None
            if out[-1][0] < 1 or not out[-1][1] > 0:
                raise UserError(f"--levels: {item!r} needs workers >= 1 and a positive bandwidth")
        return out
    if args.topology:
        from topologies.presets import load_topology

        return [(int(n), float(bw)) for n, bw in load_topology(args.topology).levels()]
    raise UserError("the PipeDream model needs --levels (e.g. 4:10e9,4:1.25e9) or --topology")


def _run_pipedream(args, spec: str, profile: ModelProfile) -> int:
    from planner.cnn import PIPEDREAM_BATCH
    from planner.pipedream import optimize_pipedream, to_plan

    # the profiled batch only where the graph.txt was read; without it the name is an analytic per-sample profile
    known = PIPEDREAM_BATCH.get(spec) if _pipedream_graph(spec) is not None else None
    if args.microbatch_size is not None and known is not None and args.microbatch_size != known:
        raise UserError(f"the PipeDream model costs {spec}'s profiled minibatch of {known} samples; "
                        f"drop --microbatch-size or give {known}")
    batch = known or args.microbatch_size or 1
    batch_note = (f"the profiled minibatch ({known} samples)" if known else
                  f"--microbatch-size {batch}" if args.microbatch_size else
                  "1 sample per profiled minibatch (the profile records no batch size; give --microbatch-size)")
    levels = _levels(args)
    res = optimize_pipedream(profile, levels, memory_size=args.memory_size, straight=args.straight,
                             activation_compression_ratio=args.activation_compression_ratio)
    topo_devices = None
    if args.topology:
        from topologies.presets import load_topology

        topo_devices = load_topology(args.topology).devices
    placed, chain = to_plan(res, profile, topo_devices, model=spec, microbatch_size=batch,
                            microbatches=args.microbatches, topology=args.topology)
    stages = list(placed.stages)
    workers = sum(s.replicas for s in stages)
    t_mb = res.pipeline_time_s
    # graph.txt times are per profiled minibatch, PipeDream's microbatch: throughput counts its samples
    predicted = {"cost_model": "pipedream", "seconds_per_minibatch": t_mb, "pipeline_time_s": t_mb,
                 "samples_per_minibatch": batch, "batch_assumed": batch_note,
                 "time_per_sample_s": t_mb / batch,
                 "throughput_samples_per_s": batch / t_mb if t_mb > 0 else math.inf,
                 "data_parallel_seconds_per_minibatch": res.data_parallel_time_s,
                 "speedup_over_data_parallel": res.data_parallel_time_s / t_mb if t_mb > 0 else math.inf}
    plan = replace(placed, microbatch_size=batch, predicted=predicted)
    if args.output:
        plan.save(args.output)
    reduction = getattr(res, "reduction", None)
    if args.json:
        doc = {
            "model": spec, "cost_model": "pipedream", "schedule": "pipedream",
            "levels": [[n, bw] for n, bw in levels],
            "stages": [{"layers": [s.first_layer, s.last_layer], "replicas": s.replicas, "devices": list(s.devices),
                        "states": [int(st.first_state), int(st.last_state)]} for s, st in zip(stages, res.stages)],
            "predicted": predicted, "pipeline_time_s": res.pipeline_time_s,
            "num_states": getattr(res, "num_states", None), "reduction": reduction,
            "chain_layers": len(chain), "elapsed_s": getattr(res, "elapsed_s", None),
        }
        print(json.dumps(doc, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    con = _console()
    t = Table(title=f"{spec}: PipeDream's optimizer on levels {', '.join(f'{n}@{bw:.3g} B/s' for n, bw in levels)}")
    for col in ("stage", "states", "layers", "replicas", "devices"):
        t.add_column(col, justify="right" if col != "devices" else "left")
    for i, (s, st) in enumerate(zip(stages, res.stages)):
        t.add_row(str(i), f"{st.first_state}-{st.last_state}", f"{s.first_layer}-{s.last_layer}", str(s.replicas), _devices_text(s.devices))
    con.print(t)
    con.print(f"pipeline time {_secs(t_mb)} per minibatch of {batch} samples: {predicted['throughput_samples_per_s']:.4g} "
              f"samples/s ({len(stages)} stages on {workers} workers, {getattr(res, 'num_states', '?')} states)")
    if args.compare == "dp":
        con.print(f"data parallel on all {workers} workers (PipeDream's figure: ring all-reduce of every weight, "
                  f"not overlapped, on each level's link): {_secs(res.data_parallel_time_s)} per minibatch; "
                  f"the pipeline is {predicted['speedup_over_data_parallel']:.2f}x faster")
    if reduction:
        con.print(f"the state space was reduced: {reduction}")
    if args.output:
        con.print(f"plan written to {args.output}")
    return 0


# --- output ----------------------------------------------------------------------------------
def _bound_by(c) -> str:
    """What limits a candidate, naming the link: the binding link, or the busiest one beside what binds."""
    if c.binding.startswith("communication (link"):
        return c.binding
    return c.binding + (f" (busiest link {c.binding_link})" if c.binding_link else " (no transfer crosses a link)")


def _compare_json(best, dp, overlap: bool) -> dict:
    return {"data_parallel": {"devices": len(dp.plan.devices), "samples_per_batch": dp.plan.microbatches * dp.plan.microbatch_size,
                              "throughput_samples_per_s": dp.throughput_samples_per_s,
                              "time_per_sample_s": dp.time_per_sample_s, "binding": dp.binding,
                              "binding_link": dp.binding_link, "allreduce_overlaps_backward": overlap},
            "pipeline": {"devices": len(best.plan.devices), "throughput_samples_per_s": best.throughput_samples_per_s,
                         "binding": best.binding, "binding_link": best.binding_link},
            "speedup": dp.time_per_sample_s / best.time_per_sample_s if best.time_per_sample_s > 0 else math.inf}


def _compare_text(best, dp, overlap: bool) -> str:
    speedup = dp.time_per_sample_s / best.time_per_sample_s if best.time_per_sample_s > 0 else math.inf
    how = "overlapped with backward, as DDP's buckets" if overlap else "after backward (--dp-overlap: under it, as DDP)"
    return (f"data parallel, the same cost model: {len(dp.plan.devices)} devices, {dp.throughput_samples_per_s:.4g} samples/s "
            f"(all-reduce {how}), bound by {_bound_by(dp)}. The pipeline plan: {best.throughput_samples_per_s:.4g} "
            f"samples/s on {len(best.plan.devices)} devices, bound by {_bound_by(best)}: {speedup:.2f}x data parallelism.")



def _candidate_json(c) -> dict:
    p = c.plan
    return {
        "schedule": p.schedule,
        "microbatch_size": p.microbatch_size,
        "microbatches": p.microbatches,
        "chunks": p.chunks,
        "stages": [s.to_dict() for s in c.stages],
        "predicted": c.predicted(),
        "fits": c.fits,
    }


def _candidate_summary(c) -> dict:
    return {
        "schedule": c.plan.schedule, "microbatches": c.plan.microbatches, "chunks": c.plan.chunks,
        "devices": len(c.plan.devices), "stages": len(c.stages),
        "replicas": [s.replicas for s in c.stages],
        "time_per_sample_s": c.time_per_sample_s, "throughput_samples_per_s": c.throughput_samples_per_s,
        "peak_memory_bytes": max(c.peak_memory_bytes.values()), "score": c.score,
    }


def _print_result(result, spec: str, topo_name: str) -> None:
    from rich.console import Console
    from rich.table import Table

    con = _console()
    best = result.best_candidate
    p = best.plan
    t = Table(title=f"{spec} on {topo_name}: {p.schedule}, {p.microbatches} microbatches of {p.microbatch_size}"
                    + (f", {p.chunks} chunks per device" if p.chunks > 1 else ""))
    for col in ("stage", "layers", "replicas", "devices", "compute", "comm", "all-reduce", "time/mb", "memory", "slack", "binding"):
        t.add_column(col, justify="left" if col in ("devices", "binding") else "right")
    for s in best.stages:
        t.add_row(str(s.stage), f"{s.layers[0]}-{s.layers[1]}", str(s.replicas), _devices_text(s.devices),
                  _secs(s.compute_s), _secs(s.comm_s), _secs(s.allreduce_s), _secs(s.time_s),
                  f"{_gib(s.memory_bytes)}/{_gib(s.memory_limit_bytes)}", f"{s.slack:.0%}", s.binding)
    con.print(t)
    con.print(f"predicted: {best.throughput_samples_per_s:.4g} samples/s, {_secs(best.time_per_sample_s)} per sample, "
              f"{_secs(best.time_per_batch_s)} per batch, bubble {best.bubble_fraction:.1%}, "
              f"peak memory {_gib(max(best.peak_memory_bytes.values()))} per device")
    con.print(result.explanation, highlight=False)
    if len(result.candidates) > 1:
        r = Table(title="runner-ups")
        for col in ("#", "schedule", "microbatches", "devices", "stages", "samples/s", "vs best", "peak memory") + (("score",) if best.score is not None else ()):
            r.add_column(col, justify="right")
        for i, c in enumerate(result.candidates[1:], 1):
            row = [str(i), c.plan.schedule + (f" v{c.plan.chunks}" if c.plan.chunks > 1 else ""), str(c.plan.microbatches),
                   str(len(c.plan.devices)), str(len(c.stages)), f"{c.throughput_samples_per_s:.4g}",
                   f"{c.time_per_sample_s / best.time_per_sample_s - 1:+.1%}", _gib(max(c.peak_memory_bytes.values()))]
            if best.score is not None:
                row.append("-" if c.score is None else f"{c.score:.4g}")
            r.add_row(*row)
        con.print(r)


def _show_capacity(args, cap) -> int:
    c = cap.candidate
    if args.output:
        c.plan.save(args.output)
    if args.json:
        doc = {
            "target_samples_per_s": cap.target_samples_per_s, "reachable": cap.reachable, "devices": cap.devices,
            "memory_per_device_bytes": cap.memory_per_device_bytes, "best_samples_per_s": cap.best_samples_per_s,
            **_candidate_json(c),
        }
        print(json.dumps(doc))
        return 0
    if cap.reachable:
        print(f"{cap.devices} devices reach {cap.target_samples_per_s:g} samples/s: {c.plan.schedule} with "
              f"{len(c.stages)} stages gives {c.throughput_samples_per_s:.4g} samples/s and needs "
              f"{_gib(cap.memory_per_device_bytes)} per device")
    else:
        print(f"{cap.target_samples_per_s:g} samples/s is out of reach on this topology: the best plan reaches "
              f"{cap.best_samples_per_s:.4g} samples/s on {cap.devices} devices "
              f"({_gib(cap.memory_per_device_bytes)} per device)")
    return 0


def _console():
    from rich.console import Console

    con = Console()
    return con if con.is_terminal else Console(width=150)


def _devices_text(devs: tuple[str, ...]) -> str:
    if len(devs) <= 2:
        return ",".join(devs)
    return f"{devs[0]}..{devs[-1]} ({len(devs)})"


def _secs(s: float) -> str:
    if s == 0:
        return "0"
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def _gib(b: float) -> str:
    if b >= 2**30:
        return f"{b / 2**30:.2f} GiB"
    return f"{b / 2**20:.1f} MiB"
