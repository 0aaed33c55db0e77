"""The what-if room's one bad-input error."""
from topologies.errors import InputError


class WhatIfError(InputError):
    """Bad what-if input: the message says what to change."""
