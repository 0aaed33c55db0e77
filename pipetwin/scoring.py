"""The simulator handed to the what-if room: the face's wiring of sim into whatif (whatif never imports sim).

``sweep_figures`` and ``search_trace`` are module-level so a process pool can send them to its workers.
``run_sweep`` and ``search`` are ``whatif``'s, with them passed in.
"""
from __future__ import annotations

from planner.costmodel import OPTIMIZER_STATE
from planner.plan import Plan
from planner.profile import ModelProfile
from sim import SimParams, simulate_plan
from sim.extrapolate import long_run_figures
from topologies.topology import Topology
import whatif

__all__ = ["sweep_figures", "search_trace", "run_sweep", "search"]


def sweep_figures(plan: Plan, profile: ModelProfile, topology: Topology, optimizer: str) -> dict:
    """A sweep point's simulated figures (no link lanes; long runs extrapolated from short ones)."""
    params = SimParams(optimizer_state_factor=OPTIMIZER_STATE.get(optimizer, 1.0), link_events=False)
    return long_run_figures(plan, profile, topology, params)


def search_trace(plan: Plan, profile: ModelProfile, topology: Topology, optimizer: str):
    """A search candidate's simulated trace, link lanes included (the explanation reads them)."""
    params = SimParams(optimizer_state_factor=OPTIMIZER_STATE.get(optimizer, 1.0), link_events=True)
    return simulate_plan(plan, profile, topology, params=params)


def run_sweep(config: whatif.SweepConfig, **kwargs) -> whatif.SweepResult:
    """``whatif.run_sweep`` scored by the simulator."""
    return whatif.run_sweep(config, simulate=sweep_figures, **kwargs)


def search(model: str, topology: str, **kwargs) -> whatif.SearchResult:
    """``whatif.search`` re-ranked by the simulator."""
    return whatif.search(model, topology, simulate=search_trace, **kwargs)
