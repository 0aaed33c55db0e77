"""The ``pipetwin`` command line: one subcommand module per command, wired here, no logic of its own.

Each ``pipetwin/cmd_<name>.py`` exposes ``register(subparsers)`` which adds its
parser and sets ``func`` to a callable ``(args) -> int``. Bad input of any kind
(every package's error type derives from ``topologies.errors.InputError``, the
face's ``UserError`` included) ends in one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys

COMMANDS = ("schedule", "plan", "simulate", "run", "profile", "netbench", "validate", "calibrate", "whatif", "search", "demo",
            "groundtruth", "compare_schedules")


def _bad_input_types() -> tuple[type, ...]:
    """What ends in one line and exit 2: every package's bad-input error (by rule: they derive from
    ``topologies.errors.InputError``) and an input path the OS refuses (missing, a directory,
    unreadable, not text)."""
    from topologies.errors import InputError

    return (InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, UnicodeDecodeError)


#: The largest integer a numeric flag takes (counts, sizes, seeds); past it a flag is refused at parse time.
INT_FLAG_MAX = 2**31 - 1


def _checked(convert):
    """``convert`` (an argparse ``type``) whose numeric results must be finite, non-negative and, for integers,
    at most INT_FLAG_MAX: the rule every numeric flag of every command keeps, checked when the command line
    is parsed, before anything runs (so a command that launches processes or a long sweep never starts on a
    NaN, an infinity, a negative or an absurd count). Non-numeric results pass through unchanged."""

    def check(text: str):
        value = convert(text)
        for v in (value if isinstance(value, (tuple, list)) else (value,)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if not math.isfinite(v):
                raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
            if v < 0:
                raise argparse.ArgumentTypeError(f"{text!r} is negative; give a number >= 0")
            if isinstance(v, int) and v > INT_FLAG_MAX:
                raise argparse.ArgumentTypeError(f"{text!r} is too large (at most {INT_FLAG_MAX})")
        return value

    check.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in "invalid int value"
    return check


def _check_numeric_flags(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _check_numeric_flags(sub)
        elif action.type is not None and not getattr(action.type, "_pipetwin_checked", False):
            action.type = _checked(action.type)
            action.type._pipetwin_checked = True


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one ``--help`` away)."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pipetwin", description="Plan, simulate, run and validate pipeline-parallel training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"pipetwin.cmd_{name}")
        except ModuleNotFoundError as e:
            if e.name == f"pipetwin.cmd_{name}":
                continue
            raise
        mod.register(sub)
    _check_numeric_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except _bad_input_types() as e:
        if isinstance(e, OSError) and e.strerror:  # raised by the OS: (errno, text, path)
            where = f" {str(e.filename)!r}" if e.filename is not None else ""
            msg = f"{e.strerror.lower()}:{where}"
        elif isinstance(e, UnicodeDecodeError):
            msg = f"a file that should be text is not ({e.reason}); give a JSON file"
        else:
            msg = e.args[0] if e.args else str(e)
        print(f"pipetwin {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pipetwin: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
