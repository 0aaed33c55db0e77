"""Bad input by rule: every package's error type derives from one base, and no numeric flag value ends in a traceback."""
from __future__ import annotations

import argparse
import ast
import contextlib
import io
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pipetwin.cli import INT_FLAG_MAX, build_parser, main
from topologies.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("topologies", "planner", "sim", "executor", "validation", "pipetwin", "whatif")

#: Commands the property test runs to the end (each on a tiny input, so one run takes well under a second).
#: Every other command launches processes or a long sweep: its flags are refused at parse time, and the
#: test only parses its command line, never runs it.
RUNS = {
    "schedule": ["schedule", "--kind", "1f1b", "--stages", "2", "--microbatches", "2"],
    "plan": ["plan", "--model", "uniform:layers=4,fwd=1e-3,bwd=2e-3,act=1e3,params=1e3", "--topology", "ideal:2"],
    "simulate": ["simulate", "--model", "uniform:layers=4,fwd=1e-3,bwd=2e-3,act=1e3,params=1e3", "--topology",
                 "ideal:2", "--steps", "1"],
}
#: What every numeric flag is fed: zero, negatives, NaN, infinities and a huge value, as text.
BAD = ("0", "-1", "-1e12", "nan", "inf", "-inf", "1e12", "1000000000000", "0,1", "-1,1", "nan,1")


def _error_classes():
    """(module path, class name, base names) of every class named *Error defined in the packages."""
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                    yield path.relative_to(ROOT), node.name


def test_every_package_error_type_derives_from_the_one_base():
    import importlib

    found = []
    for path, name in _error_classes():
        mod = importlib.import_module(".".join(path.with_suffix("").parts))
        cls = getattr(mod, name)
        found.append(name)
        assert issubclass(cls, InputError), f"{path}:{name} must derive from topologies.errors.InputError"
        assert issubclass(cls, ValueError)
    assert {"TopologyError", "PlanError", "ProfileError", "PipeDreamError", "ScheduleError", "UserError"} <= set(found)


def test_there_is_one_model_spec_error():
    from executor.modelspec import ModelSpecError as A
    from planner.analytic import ModelSpecError as B

    assert A is B


def test_pipedream_error_is_one_line_not_a_traceback(capsys):
    rc = main(["plan", "--model", "vgg16", "--cost-model", "pipedream", "--levels", "4:1e9",
               "--activation-compression-ratio", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "activation" in err and "Traceback" not in err


def _numeric_flags() -> list[tuple[str, str]]:
    """(command, flag) for every option whose type turns "1" into a number (or numbers)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for name, sp in sorted(sub.choices.items()):
        for a in sp._actions:
            if a.type is None or not a.option_strings:
                continue
            try:
                v = a.type("1")
            except (argparse.ArgumentTypeError, ValueError, TypeError):
                continue
            vs = v if isinstance(v, (tuple, list)) else (v,)
            if vs and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vs):
                out.append((name, a.option_strings[-1]))
    return out


FLAGS = _numeric_flags()


def test_the_property_sees_every_command_with_numeric_flags():
    commands = {c for c, _ in FLAGS}
    assert {"schedule", "plan", "simulate", "run", "netbench", "whatif"} <= commands
    assert len(FLAGS) > 40


def _argv_for(command: str, flag: str, value: str) -> list[str]:
    if command in RUNS:
        return [*RUNS[command], f"{flag}={value}"]
    return [command, f"{flag}={value}"]


@pytest.mark.timeout(240)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FLAGS), st.sampled_from(BAD))
def test_no_numeric_flag_value_ends_in_a_traceback(flag, value):
    command, option = flag
    argv = _argv_for(command, option, value)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        if command in RUNS:
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse refused it
                rc = e.code
        else:
            try:
                ns = build_parser().parse_args(argv)
                rc = None  # parsed: the value is acceptable at parse time (the command is not run)
            except SystemExit as e:
                rc = e.code
    text = err.getvalue()
    assert "Traceback" not in text
    if rc is None:
        # a value the parser let through for a command it does not run must be a sane one
        dest = option.lstrip("-").replace("-", "_")
        got = getattr(ns, dest)
        for v in got if isinstance(got, (tuple, list)) else (got,):
            assert math.isfinite(v) and v >= 0 and (not isinstance(v, int) or v <= INT_FLAG_MAX), argv
        return
    assert rc in (0, 2), (argv, rc, text)
    if rc == 2:
        lines = [l for l in text.splitlines() if l.strip()]
        # a required argument the test did not give is also one line; either way: one line, no traceback
        assert len(lines) == 1, (argv, text)
