"""Argument types the commands share: comma lists of words, of integers, and of device counts (one spelling each)."""
from __future__ import annotations

import argparse
import re

__all__ = ["words", "int_list", "counts"]


def words(text: str) -> tuple[str, ...]:
    """``a,b, c`` -> ("a", "b", "c"); empty is refused."""
    out = tuple(w.strip() for w in text.split(",") if w.strip())
    if not out:
        raise argparse.ArgumentTypeError("expects a comma-separated list")
    return out


def int_list(text: str) -> tuple[int, ...]:
    """``2,1,1`` -> (2, 1, 1)."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects comma-separated integers like 2,1,1, got {text!r}") from None


def counts(text: str) -> tuple[int, ...]:
    """``8,16,64``; ``8,16,...,512`` (geometric with the first two's ratio, or arithmetic when that ratio is not whole);
    ``8:64:8`` (start:stop:step, inclusive)."""
    t = text.replace(" ", "")
    try:
        if re.fullmatch(r"\d+:\d+(:\d+)?", t):
            a, b, *st = (int(x) for x in t.split(":"))
            step = st[0] if st else 1
            if step < 1 or a < 1 or b < a:
                raise ValueError
            return tuple(range(a, b + 1, step))
        parts = t.split(",")
        if "..." in parts:
            i = parts.index("...")
            head, tail = [int(x) for x in parts[:i]], [int(x) for x in parts[i + 1:]]
            if len(head) < 2 or len(tail) != 1 or head[0] < 1 or head[1] <= head[0]:
                raise ValueError
            out = list(head)
            geometric = head[1] % head[0] == 0
            while True:
                nxt = out[-1] * (head[1] // head[0]) if geometric else out[-1] + (head[1] - head[0])
                if nxt > tail[0]:
                    break
                out.append(nxt)
            if out[-1] != tail[0]:
                raise ValueError
            return tuple(out)
        vals = tuple(int(x) for x in parts if x)
        if not vals or min(vals) < 1:
            raise ValueError
        return vals
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expects positive counts like 8,16,64, 8,16,...,512 or 8:64:8, got {text!r}") from None
