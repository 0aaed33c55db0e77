"""The ``pipetwin`` command line: one subcommand module per command, wired here, no logic of its own.

Each ``pipetwin/cmd_<name>.py`` exposes ``register(subparsers)`` which adds its
parser and sets ``func`` to a callable ``(args) -> int``. Bad input of any kind
(the ``*Error`` value errors of the packages and ``UserError``) ends in one line
on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("schedule", "plan", "simulate", "run", "profile", "netbench", "validate", "calibrate", "whatif", "search", "demo",
            "groundtruth", "compare_schedules")


def _bad_input_types() -> tuple[type, ...]:
    from pipetwin.errors import UserError
    from planner.profile import ProfileError
    from planner.plan import PlanError

    # an input path that is missing, a directory, unreadable, or not text
    types: list[type] = [UserError, ProfileError, PlanError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
                         PermissionError, UnicodeDecodeError]
    for mod, name in (("planner.check", "ProgramError"), ("planner.schedules", "ScheduleError"),
                      ("topologies.topology", "TopologyError"), ("sim.params", "SimError"), ("executor.errors", "ExecutorError"), ("executor.models", "ModelSpecError"), ("executor.netbench", "NetbenchError"),
                      ("validation.calibrate", "CalibrationError"), ("whatif.errors", "WhatIfError")):
        try:
            types.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(types)


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
