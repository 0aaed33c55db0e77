"""Output files a user names: their folder is made on the way, so ``-o out/plan.json`` works in a fresh clone.

It lives on the bottom floor (``topologies/`` imports nothing of ours), so every writer of every package
— plans, programs, traces, profiles, topologies, calibrations, charts, weights, caches — calls this one
function before it writes.
"""
from __future__ import annotations

from pathlib import Path

from topologies.errors import InputError

__all__ = ["output_path"]


def output_path(path: str | Path) -> Path:
    """``path`` as a Path whose parent folder exists (made, with its own parents, when missing).

    A folder on the way that exists as a file is bad input: one line naming it (the CLI's exit 2).
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((a for a in reversed(p.parents) if a.exists() and not a.is_dir()), p.parent)
        raise InputError(f"cannot write {str(p)!r}: {str(blocker)!r} is a file, not a folder; "
                         f"move it or give another path") from None
    return p
