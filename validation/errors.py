"""The validation room's bad-input error."""
from __future__ import annotations

from topologies.errors import InputError


class CalibrationError(InputError):
    """Calibration input that cannot be fitted; the message says what to measure or change."""

