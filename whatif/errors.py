"""The what-if room's one bad-input error."""


class WhatIfError(ValueError):
    """Bad what-if input: the message says what to change."""
