"""The one error type the CLI turns into a clear line and exit code 2."""


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do."""
