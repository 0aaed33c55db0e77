"""pipetwin's SimPy cluster model: runs a program on a topology and predicts its trace.

Public API: ``simulate`` (a program), ``simulate_plan`` (a plan), ``SimParams``,
``SimError``; ``bytes_per_link`` (a metric of a simulated trace's link lanes); ``peak_memory``
(a program's per-worker peak bytes, exactly what ``simulate`` reports, without simulating).
"""
from sim.engine import peak_memory, simulate, simulate_plan
from sim.network import bytes_per_link
from sim.params import SimError, SimParams

__all__ = ["simulate", "simulate_plan", "peak_memory", "SimParams", "SimError", "bytes_per_link"]
