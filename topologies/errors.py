"""The one base of every bad-input error the project's packages raise; the CLI catches it by rule.

It lives on the bottom floor (``topologies/`` imports nothing of ours and every package may import it).
A package's error type says *which* input was bad (``TopologyError``, ``PlanError``, ...) and derives
from :class:`InputError`; its message is one line: what is wrong and what to do. ``InputError`` is a
``ValueError``, so code that catches ``ValueError`` keeps working. The topologies package's own,
:class:`TopologyError`, is here too: every room of the package below ``topology.py`` raises it.
"""
from __future__ import annotations

__all__ = ["InputError", "TopologyError"]


class InputError(ValueError):
    """Bad input (a flag, a file, a spec, a plan): the message is one line saying what is wrong and what to do."""


class TopologyError(InputError):
    """Bad topology input; the message is one line: what is wrong and what to do."""
