"""Ground truth on real GPUs: vTrain's published A100 runs expressed as pipetwin plans, predicted and scored.

The calibration rule (fixed before any row was scored, never changed by looking at
errors): a row is a **calibration row** iff the SHA-256 of its canonical config string
(:func:`canonical_config`), read as a big-endian integer, is 0 mod 5 — a fixed, seeded
~20% split over both files. The efficiency model is fitted on calibration rows only and
every other row is scored; a calibration row is never scored.
"""
from __future__ import annotations

import hashlib

#: A row is a calibration row iff sha256(canonical config) mod CALIBRATION_MODULUS == 0.
CALIBRATION_MODULUS = 5
#: The rule, in words, as reports and calibration files record it.
CALIBRATION_RULE = ("calibration iff int(sha256(canonical config string), 16) % 5 == 0 "
                    "(canonical: file|gpus|global|micro|hidden|heads|layers|seq|tp|dp|pp)")


def canonical_config(source: str, gpus: int, global_batch: int, micro_batch: int, hidden: int, heads: int,
                     layers: int, seq: int, tp: int, dp: int, pp: int) -> str:
    """The string a row's calibration membership is hashed from: its file stem and its configuration
    (never its measured time)."""
    return (f"{source}|gpus={gpus}|global={global_batch}|micro={micro_batch}|hidden={hidden}|heads={heads}"
            f"|layers={layers}|seq={seq}|tp={tp}|dp={dp}|pp={pp}")


def is_calibration(canonical: str) -> bool:
    """True iff the row whose canonical config string is ``canonical`` belongs to the calibration set."""
    return int(hashlib.sha256(canonical.encode("utf-8")).hexdigest(), 16) % CALIBRATION_MODULUS == 0
