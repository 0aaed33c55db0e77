"""The face's own bad-input error (flag combinations the CLI checks itself); the CLI catches every InputError."""
from __future__ import annotations

from topologies.errors import InputError


class UserError(InputError):
    """Bad input: the message says what is wrong and what to do."""
