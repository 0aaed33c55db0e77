"""vTrain's measured rows: the two CSV files read into Rows, the calibration rule that holds the scored rows out,
and which rows pipetwin can express as a plan.

Each row of ``ground_truth_single.csv`` (2–8 A100s) and ``ground_truth_multi.csv`` (64–512)
is a Megatron-DeepSpeed GPT run: TP × DP × PP, micro and global batch, full activation
recomputation, 1F1B, and its measured iteration time.

The calibration rule (fixed before any row was scored, never changed by looking at errors):
a row is a **calibration row** iff the SHA-256 of its canonical config string
(:func:`canonical_config`), read as a big-endian integer, is 0 mod 5 — a fixed, seeded ~20%
split over both files. The efficiency model is fitted on calibration rows only and every
other row is scored; a calibration row is never scored (``validation.groundtruth``).
"""
from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from topologies.errors import InputError

#: A row is a calibration row iff sha256(canonical config) mod CALIBRATION_MODULUS == 0.
CALIBRATION_MODULUS = 5
#: The rule, in words, as reports and calibration files record it.
CALIBRATION_RULE = ("calibration iff int(sha256(canonical config string), 16) % 5 == 0 "
                    "(canonical: file|gpus|global|micro|hidden|heads|layers|seq|tp|dp|pp)")
FILES = {"single": "ground_truth_single.csv", "multi": "ground_truth_multi.csv"}
_COLUMNS = {"# GPUs": "gpus", "global batch": "global_batch", "micro batch": "micro_batch", "hidden size": "hidden",
            "attention heads": "heads", "# layers": "layers", "sequence length": "seq", "tensor parallelism": "tp",
            "data parallelism": "dp", "pipeline parallelism": "pp", "iteration time (ms)": "measured_ms"}


class GroundTruthError(InputError):
    """A ground-truth file that cannot be read; the message names file:line and what is wrong."""


def canonical_config(source: str, gpus: int, global_batch: int, micro_batch: int, hidden: int, heads: int,
                     layers: int, seq: int, tp: int, dp: int, pp: int) -> str:
    """The string a row's calibration membership is hashed from: its file stem and its configuration
    (never its measured time)."""
    return (f"{source}|gpus={gpus}|global={global_batch}|micro={micro_batch}|hidden={hidden}|heads={heads}"
            f"|layers={layers}|seq={seq}|tp={tp}|dp={dp}|pp={pp}")


def config_hash(canonical: str) -> int:
    """The SHA-256 of a canonical config string as a big-endian integer: what the calibration rule (and the
    calibration rows' cross-validation folds, ``validation.groundtruth_cv``) split rows by."""
    return int(hashlib.sha256(canonical.encode("utf-8")).hexdigest(), 16)


def is_calibration(canonical: str) -> bool:
    """True iff the row whose canonical config string is ``canonical`` belongs to the calibration set."""
    return config_hash(canonical) % CALIBRATION_MODULUS == 0


@dataclass(frozen=True)
class Row:
    """One measured run."""

    source: str  # "single" or "multi"
    line: int
    gpus: int
    global_batch: int
    micro_batch: int
    hidden: int
    heads: int
    layers: int
    seq: int
    tp: int
    dp: int
    pp: int
    measured_ms: float

    @property
    def canonical(self) -> str:
        return canonical_config(self.source, self.gpus, self.global_batch, self.micro_batch, self.hidden, self.heads,
                                self.layers, self.seq, self.tp, self.dp, self.pp)

    @property
    def calibration(self) -> bool:
        return is_calibration(self.canonical)

    @property
    def microbatches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def shape(self) -> str:
        return f"TP{self.tp}·DP{self.dp}·PP{self.pp}"

    @property
    def parallelism(self) -> str:
        """Which degrees exceed 1: "DP", "TP+PP", ...; "none" for one GPU."""
        used = [n for n, v in (("TP", self.tp), ("DP", self.dp), ("PP", self.pp)) if v > 1]
        return "+".join(used) or "none"

    @property
    def model(self) -> str:
        return f"h{self.hidden}·L{self.layers}·a{self.heads}·s{self.seq}"

    def config(self) -> dict:
        return {"source": self.source, "line": self.line, "gpus": self.gpus, "global_batch": self.global_batch,
                "micro_batch": self.micro_batch, "hidden": self.hidden, "heads": self.heads, "layers": self.layers,
                "seq": self.seq, "tp": self.tp, "dp": self.dp, "pp": self.pp}


def read_rows(path: Path, source: str) -> list[Row]:
    """The rows of one vTrain CSV (UTF-8 with or without BOM); a malformed line raises GroundTruthError naming it."""
    if not path.is_file():
        raise GroundTruthError(f"{path}: no such file; give --data the folder holding {', '.join(FILES.values())}")
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise GroundTruthError(f"{path}:1: the file is empty; expected a header with {', '.join(_COLUMNS)}") from None
        missing = [c for c in _COLUMNS if c not in header]
        if missing:
            raise GroundTruthError(f"{path}:1: the header lacks {', '.join(repr(m) for m in missing)}")
        index = {_COLUMNS[c]: header.index(c) for c in _COLUMNS}
        rows = []
        for lineno, cells in enumerate(reader, 2):
            if not cells or not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise GroundTruthError(f"{path}:{lineno}: {len(cells)} fields, the header has {len(header)}")
            vals: dict = {}
            for key, i in index.items():
                text = cells[i].strip()
                try:
                    v = float(text)
                except ValueError:
                    raise GroundTruthError(f"{path}:{lineno}: {key}={text!r} is not a number") from None
                if key != "measured_ms":
                    if v != int(v) or v < 1:
                        raise GroundTruthError(f"{path}:{lineno}: {key}={text!r} must be a positive whole number")
                    v = int(v)
                elif not (v > 0 and math.isfinite(v)):
                    raise GroundTruthError(f"{path}:{lineno}: iteration time {text!r} must be a positive number of ms")
                vals[key] = v
            rows.append(Row(source, lineno, **vals))
    return rows


def load_rows(data: str | Path) -> list[Row]:
    """Both vTrain files from the folder ``data``, single-node rows first."""
    d = Path(data)
    if not d.is_dir():
        raise GroundTruthError(f"{d}: not a folder; give --data the folder holding {', '.join(FILES.values())}")
    return [r for source, name in FILES.items() for r in read_rows(d / name, source)]


def why_not_expressible(row: Row) -> str | None:
    """None when pipetwin can express ``row`` as a plan, else why not."""
    if row.tp * row.dp * row.pp != row.gpus:
        return f"TP·DP·PP = {row.tp * row.dp * row.pp} is not the {row.gpus} GPUs"
    if row.global_batch % (row.micro_batch * row.dp):
        return f"global batch {row.global_batch} is not a multiple of micro {row.micro_batch} × DP {row.dp}"
    if row.heads % row.tp or row.hidden % row.heads:
        return f"TP {row.tp} does not divide the {row.heads} heads (or heads do not divide hidden {row.hidden})"
    if row.layers < row.pp:
        return f"{row.layers} layers cannot fill {row.pp} pipeline stages"
    return None
