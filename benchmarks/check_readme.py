"""Run every shell command README.md shows and print a table: command, exit code, seconds, why it failed.

The project's rule is that every command the README shows must run. This script is that rule made
mechanical. It reads the fenced code blocks (plain, ``sh``, ``bash``, ``shell`` or ``console``), joins
lines ended by a backslash, and keeps each line whose command word (after any ``NAME=value``
assignments and a ``$`` prompt) is one of ``pipetwin``, ``python``, ``python3``, ``make``,
``torchrun``, ``pytest`` or a program under ``.venv/bin/``; other lines in a block (sample output,
IR listings) are not commands. A trailing ``# comment`` is not run; where it states seconds (``# 18 s``)
the table shows them beside the measured time.

A command that cannot run on an ordinary CPU machine says so in the README itself, with a trailing
comment that begins ``needs`` — ``# needs a GPU``, ``# needs two machines`` — and is listed as
skipped with that reason; there is no other list of exceptions. ``make demo`` and ``make test`` (the
README's two set-up commands) are skipped unless ``--all`` is given: they take minutes.

Commands run in README order in one shell each, from the root of a temporary copy of the tree (the
files git tracks plus the untracked ones it does not ignore), with this tree's ``.venv/bin`` first
on PATH (so ``pipetwin`` and ``python`` are the venv's; its editable install runs this tree's code) and
``.venv`` linked in. Each sees what the
earlier ones wrote (``plan -o out/plan.json`` then ``simulate --plan out/plan.json``), as a reader
following the README would. A ``../NAME`` path a command names is linked beside the copy to this
tree's ``../NAME`` (the shared data folder). Nothing is written to this tree; the copy is deleted
afterwards unless ``--keep``. ``--fresh`` links no ``.venv``: the copy is a fresh clone, ``make demo``
(the README's first command; ``--fresh`` implies ``--all``) builds its own venv, and the commands after it
use that one — the README's promise that its two commands work on a fresh machine.

Run: ``.venv/bin/python benchmarks/check_readme.py [--all] [--fresh] [--timeout S] [--only TEXT] [--exclude TEXT] [--list]``.
Exit status: 0 when every command run exited 0, 1 when any failed or timed out, 2 on bad input.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Command words that make a code-block line a command.
COMMAND_WORDS = frozenset({"pipetwin", "python", "python3", "make", "torchrun", "pytest"})
#: Fence info strings whose blocks hold shell lines ("" is a plain fence).
SHELL_FENCES = frozenset({"", "sh", "bash", "shell", "console"})
#: Commands skipped unless --all: the README's set-up commands, minutes each.
SETUP_COMMANDS = frozenset({"make demo", "make test"})

_FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")
_PARENT_PATH = re.compile(r"(?:^|[\s=])\.\./([^/\s]+)")
_STATED_SECONDS = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?) s\b")


@dataclass(frozen=True)
class Command:
    """One command of the README: its shell text (continuations joined, comment removed)."""

    line: int  #: README line (1-based) the command starts on
    text: str  #: what the shell runs
    comment: str = ""  #: the trailing comment, without '#'
    skip: str = ""  #: why it is not run ('' when it is)


@dataclass(frozen=True)
class Outcome:
    command: Command
    status: str  #: 'ok', 'failed', 'timeout' or 'skipped'
    exit_code: int | None
    seconds: float
    note: str  #: the failure's telling stderr line, or the skip reason


def split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of a shell line: the comment starts at the first '#' outside quotes that opens a word."""
    quote = ""
    escaped = False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def stated_seconds(comment: str) -> float | None:
    """The seconds a command's comment says it takes (``18 s (2026-12-04); reads ...`` → 18), or None."""
    match = _STATED_SECONDS.search(comment)
    return float(match.group(1)) if match else None


def is_command(text: str) -> bool:
    """Whether a shell line runs one of the README's programs (see COMMAND_WORDS)."""
    words = text.split()
    while words and _ASSIGNMENT.match(words[0]):
        words.pop(0)
    if not words:
        return False
    word = words[0]
    return word in COMMAND_WORDS or word.startswith(".venv/bin/")


def _logical_lines(block: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Join backslash continuations: (first line number, joined line)."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, raw in block:
        line = raw.rstrip()
        start, text = pending if pending else (number, "")
        if line.endswith("\\"):
            pending = (start, text + line[:-1].rstrip() + " ")
            continue
        pending = None
        out.append((start, text + line.strip() if text else line))
    if pending:  # a block ending in a backslash: keep what there is
        out.append((pending[0], pending[1].rstrip()))
    return out


def extract_commands(markdown: str, include_setup: bool = False) -> list[Command]:
    """Every command shown in the fenced shell blocks of ``markdown``, in order (see the module docstring)."""
    commands: list[Command] = []
    block: list[tuple[int, str]] | None = None  # the open block's lines; None outside a block
    fence, shell = "", False
    for number, line in enumerate(markdown.splitlines(), start=1):
        match = _FENCE.match(line)
        if block is None:
            if match:
                block, fence, shell = [], match.group(1), match.group(2).lower() in SHELL_FENCES
            continue
        if match and match.group(1).startswith(fence) and line.strip() == match.group(1):
            if shell:
                commands += _commands_of(block, include_setup)
            block = None
            continue
        block.append((number, line))
    return commands


def _commands_of(block: list[tuple[int, str]], include_setup: bool) -> list[Command]:
    out = []
    for number, line in _logical_lines(block):
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        code, comment = split_comment(line)
        code = " ".join(code.split())
        if not is_command(code):
            continue
        skip = ""
        if re.match(r"needs\b", comment, re.IGNORECASE):
            skip = comment
        elif code in SETUP_COMMANDS and not include_setup:
            skip = "set-up command (--all runs it)"
        elif "check_readme.py" in code:
            skip = "this script (it would run itself)"
        out.append(Command(number, code, comment, skip))
    return out


def select(commands: list[Command], only: list[str], exclude: list[str]) -> list[Command]:
    """The commands containing one of ``only``'s texts (all when it is empty) and none of ``exclude``'s."""
    return [c for c in commands
            if (not only or any(t in c.text for t in only)) and not any(t in c.text for t in exclude)]


def _telling_line(stderr: str, stdout: str) -> str:
    """The line that says why a command failed: a traceback's last line, else the first stderr line that
    names an error (a warning may come first), else stderr's first line, else stdout's last."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    if any(ln.startswith("Traceback") for ln in lines):
        return lines[-1]
    errors = [ln for ln in lines if "error" in ln.lower()]
    if errors or lines:
        return (errors or lines)[0]
    out = [ln.strip() for ln in stdout.splitlines() if ln.strip()]
    return out[-1] if out else ""


def _copy_tree(source: Path, dest: Path) -> None:
    """The files git tracks under ``source`` and the untracked ones it does not ignore, mtimes kept."""
    listed = subprocess.run(["git", "-C", str(source), "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], capture_output=True, check=True).stdout
    for name in sorted(set(listed.decode().split("\0")) - {""}):
        src = source / name
        if not src.is_file():  # deleted but still in the index
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def _link_parents(commands: list[Command], source: Path, copy: Path) -> None:
    """Link each ``../NAME`` a command names beside the copy, to ``source``'s ``../NAME``."""
    for name in sorted({m for c in commands for m in _PARENT_PATH.findall(c.text)}):
        real = source.parent / name
        link = copy.parent / name
        if real.exists() and not link.exists():
            link.symlink_to(real.resolve())


def run_command(command: Command, cwd: Path, env: dict[str, str], timeout_s: float, log: Path) -> Outcome:
    """Run one command in bash from ``cwd``, its stdout and stderr written to ``log``; on timeout its whole
    process group is killed."""
    start = time.perf_counter()
    proc = subprocess.Popen(["bash", "-c", command.text], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except BaseException as e:  # a timeout, or ^C: the command's children (torchrun's workers) go too
        os.killpg(proc.pid, signal.SIGKILL)
        if not isinstance(e, subprocess.TimeoutExpired):
            raise
        stdout, stderr = proc.communicate()
        log.write_text(f"$ {command.text}\n{stdout}\n--- stderr ---\n{stderr}")
        return Outcome(command, "timeout", None, time.perf_counter() - start, f"no exit within {timeout_s:g} s")
    seconds = time.perf_counter() - start
    log.write_text(f"$ {command.text}\n{stdout}\n--- stderr ---\n{stderr}")
    if proc.returncode == 0:
        stated = stated_seconds(command.comment)
        return Outcome(command, "ok", 0, seconds, f"README says {stated:g} s" if stated is not None else "")
    return Outcome(command, "failed", proc.returncode, seconds, _telling_line(stderr, stdout))


def _print_table(outcomes: list[Outcome], readme: str, width: int | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"commands of {readme}", show_lines=False)
    for name, justify in (("line", "right"), ("command", "left"), ("exit", "right"), ("s", "right"),
                          ("note", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    colour = {"ok": "green", "failed": "red", "timeout": "red", "skipped": "yellow"}
    for o in outcomes:
        exit_text = {"timeout": "timeout", "skipped": "skip"}.get(o.status, str(o.exit_code))
        table.add_row(str(o.command.line), o.command.text, f"[{colour[o.status]}]{exit_text}[/]",
                      "" if o.status == "skipped" else f"{o.seconds:.1f}", o.note)
    counts = {s: sum(o.status == s for o in outcomes) for s in colour}
    Console(width=width).print(table)
    print(f"{counts['ok']} ok, {counts['failed']} failed, {counts['timeout']} timed out, "
          f"{counts['skipped']} skipped, {sum(o.seconds for o in outcomes):.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="the Markdown file (README.md)")
    parser.add_argument("--all", action="store_true", help="also run `make demo` and `make test`")
    parser.add_argument("--fresh", action="store_true",
                        help="no venv linked into the copy: make demo builds one there, as on a fresh clone (implies --all)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per command (600)")
    parser.add_argument("--only", action="append", default=[],
                        help="only the commands containing this text (repeatable)")
    parser.add_argument("--exclude", action="append", default=[],
                        help="leave out the commands containing this text (repeatable; after --only)")
    parser.add_argument("--list", action="store_true", help="print the commands found and run nothing")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary copy and each command's output (logs/lineNNNN.log) and say where")
    parser.add_argument("--width", type=int, default=None, help="table width in characters (the terminal's)")
    args = parser.parse_args(argv)
    if not args.readme.is_file():
        print(f"error: {args.readme} is not a file; pass --readme PATH to a Markdown file", file=sys.stderr)
        return 2
    if not args.timeout > 0:
        print(f"error: --timeout must be a positive number of seconds, not {args.timeout:g}", file=sys.stderr)
        return 2
    commands = extract_commands(args.readme.read_text(), include_setup=args.all or args.fresh)
    commands = select(commands, args.only, args.exclude)
    if args.list:
        for c in commands:
            print(f"{c.line:4d}  {c.text}" + (f"    [skip: {c.skip}]" if c.skip else ""))
        return 0
    source = ROOT  # the tree the commands run in: this script's, whichever Markdown file lists them
    venv_bin = source / ".venv" / "bin"
    if not args.fresh and not (venv_bin / "pipetwin").exists():
        print(f"error: no {venv_bin / 'pipetwin'}; run `make venv` in {source} first", file=sys.stderr)
        return 2
    stamp, pyproject = source / ".venv" / ".installed", source / "pyproject.toml"
    if not args.fresh and stamp.exists() and pyproject.exists() and stamp.stat().st_mtime < pyproject.stat().st_mtime:
        # make would reinstall into the linked venv, pointing its editable install at the temporary copy
        print(f"error: {stamp} is older than pyproject.toml; run `make venv` in {source} first", file=sys.stderr)
        return 2
    temp = Path(tempfile.mkdtemp(prefix="check_readme-"))
    copy = temp / source.name
    outcomes: list[Outcome] = []
    try:
        _copy_tree(source, copy)
        venv = copy / ".venv" if args.fresh else source / ".venv"
        if not args.fresh:
            (copy / ".venv").symlink_to(venv)
        _link_parents(commands, source, copy)
        logs = temp / "logs"
        logs.mkdir()
        env = dict(os.environ, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
                   VIRTUAL_ENV=str(venv), MPLBACKEND="Agg")
        env.pop("PYTHONPATH", None)
        for c in commands:
            if c.skip:
                outcomes.append(Outcome(c, "skipped", None, 0.0, c.skip))
                continue
            print(f"line {c.line}: {c.text}", file=sys.stderr, flush=True)
            outcomes.append(run_command(c, copy, env, args.timeout, logs / f"line{c.line:04d}.log"))
        _print_table(outcomes, args.readme.name, args.width)
    finally:
        if args.keep:
            print(f"kept the copy at {copy}, each command's output in {temp / 'logs'}", file=sys.stderr)
        else:
            shutil.rmtree(temp, ignore_errors=True)
    return 1 if any(o.status in ("failed", "timeout") for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
