"""Running independent pieces of a sweep: a process pool whose results come back in item order, and the resume cache.

Results are ordered by the item list, never by completion, so nothing a sweep prints depends on the
number of worker processes. The cache is a JSON-lines file, one finished piece per line keyed by its
parameters; a line an interrupted run cut short is skipped on reading and finished on opening.
"""
from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, TypeVar

from topologies.files import output_path

__all__ = ["map_in_order", "read_cache", "open_cache"]

T = TypeVar("T")
R = TypeVar("R")


def map_in_order(fn: Callable[[T], R], items: list[T], jobs: int, on_done: Callable[[int, R], None],
                 work: Callable[[T], float] | None = None) -> list[R]:
    """fn over items, in a process pool when jobs > 1; results in item order.

    ``on_done(i, result)`` is called as each item finishes. ``work`` estimates an item's cost: the pool
    is handed the largest first, so that it ends on small items instead of one worker finishing a long
    one while the other idles. Only the order of submission changes; each result is fn(item), whichever
    process computes it. ``fn`` (and what it is handed) must pickle: a module-level function.
    """
    out: list = [None] * len(items)
    if jobs <= 1 or len(items) <= 1:
        for i, it in enumerate(items):
            out[i] = fn(it)
            on_done(i, out[i])
        return out
    order = list(range(len(items)))
    if work is not None:
        order.sort(key=lambda i: -work(items[i]))  # stable: equal estimates keep item order
    with ProcessPoolExecutor(max_workers=min(jobs, len(items))) as pool:
        futures = {pool.submit(fn, items[i]): i for i in order}
        for f in as_completed(futures):
            i = futures[f]
            out[i] = f.result()
            on_done(i, out[i])
    return out


def read_cache(path: Path | None) -> dict[str, dict]:
    """Every finished piece of a cache file, by key (empty when there is no file)."""
    out: dict[str, dict] = {}
    if path is None or not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
            out[item["key"]] = item["record"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by an interrupted run
    return out


def open_cache(path: Path):
    """Open the cache for appending, finishing a line an interrupted run left cut short."""
    cut = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    sink = output_path(path).open("a")
    if cut:
        sink.write("\n")
    return sink
