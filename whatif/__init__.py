"""pipetwin's what-if room: one model planned on many candidate clusters, their Pareto front, target queries, re-ranking.

It answers the fewest devices for a target throughput, and shows plans re-ranked by simulation with
why they moved.

    from whatif import SweepConfig, run_sweep
    result = run_sweep(SweepConfig("gpt3-13b", devices=(8, 16, 32)), simulate=my_simulator)
    result.pareto, result.to_json(target=1000.0)

It imports planner and topologies only. The simulator comes in as a function (``simulate=``), the way
``planner.search.plan_model`` takes ``score=``; ``pipetwin.scoring`` passes sim's.

Modules: ``points`` (a point, its record, the one planner call), ``sweep`` (the whole sweep),
``pool`` (process pool and cache), ``front`` (Pareto front, target queries), ``rerank`` (search
re-ranked by simulation), ``explain`` (why the simulation differs from the cost model).
"""
from whatif.errors import WhatIfError
from whatif.explain import explain_difference
from whatif.front import cost_per_sample, fewest_devices_for, pareto_front, why_nothing_fits
from whatif.points import CACHE_VERSION, SweepConfig, SweepPoint, SweepRecord, plan_point
from whatif.rerank import SearchResult, search, search_profile, simulate_candidate
from whatif.sweep import SweepResult, run_sweep, simulate_record, simulated_plan

__all__ = ["WhatIfError", "SweepConfig", "SweepPoint", "SweepRecord", "plan_point", "run_sweep", "SweepResult",
           "simulate_record", "simulated_plan", "pareto_front", "cost_per_sample", "fewest_devices_for",
           "why_nothing_fits", "search", "SearchResult", "simulate_candidate", "search_profile",
           "explain_difference", "CACHE_VERSION"]
