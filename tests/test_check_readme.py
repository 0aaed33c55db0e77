"""benchmarks/check_readme.py's extractor on a synthetic README: which lines are commands, joined how, skipped why.

The truth is written by hand in each test: the commands a reader sees in the Markdown below. The run
itself (a temporary copy, a timeout) is exercised by running the script, not here.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_readme", ROOT / "benchmarks" / "check_readme.py")
check_readme = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("check_readme", check_readme)  # dataclasses look their module up
_spec.loader.exec_module(check_readme)

README = """\
# tool

```
make demo     # the demo
make test
```

Prose with `pipetwin plan --model M` inline is not a command.

```
pipetwin plan --model vgg16 --topology ideal:4      # scored
.venv/bin/pipetwin simulate --model uniform:layers=2 \\
    --topology ideal:2 \\
    --json
0F0  0SEND0a>w1  0B0
PYTHONPATH=. python benchmarks/bench_sim.py
pipetwin run --model gpt --device cuda   # needs a GPU
pipetwin echo "a # b" # not a skip: needs no GPU
torchrun --nnodes 2 -m executor.worker plan.json   # Needs two machines
```

```python
python = 3   # python code, not shell
```

~~~bash
$ python -m validation.groundtruth_cv ../shared/data
python benchmarks/check_readme.py --list
~~~
"""


def test_commands_are_found_in_order_with_their_first_line():
    found = check_readme.extract_commands(README)
    assert [(c.line, c.text) for c in found] == [
        (4, "make demo"),
        (5, "make test"),
        (11, "pipetwin plan --model vgg16 --topology ideal:4"),
        (12, ".venv/bin/pipetwin simulate --model uniform:layers=2 --topology ideal:2 --json"),
        (16, "PYTHONPATH=. python benchmarks/bench_sim.py"),
        (17, "pipetwin run --model gpt --device cuda"),
        (18, 'pipetwin echo "a # b"'),
        (19, "torchrun --nnodes 2 -m executor.worker plan.json"),
        (27, "python -m validation.groundtruth_cv ../shared/data"),
        (28, "python benchmarks/check_readme.py --list"),
    ]


def test_needs_comments_and_setup_commands_are_skipped_with_their_reason():
    skips = {c.text.split()[0] + " " + c.text.split()[1]: c.skip for c in check_readme.extract_commands(README)}
    assert skips["make demo"].startswith("set-up")
    assert skips["make test"].startswith("set-up")
    assert skips["pipetwin run"] == "needs a GPU"
    assert skips["torchrun --nnodes"] == "Needs two machines"
    assert skips["pipetwin echo"] == ""  # 'needs' not at the start of the comment
    assert skips["pipetwin plan"] == ""
    assert skips["python benchmarks/check_readme.py"].startswith("this script")  # never runs itself
    with_setup = {c.text: c.skip for c in check_readme.extract_commands(README, include_setup=True)}
    assert with_setup["make demo"] == "" and with_setup["make test"] == ""


def test_comment_splitting_respects_quotes_and_words():
    assert check_readme.split_comment('echo "a # b" x  # c d') == ('echo "a # b" x', "c d")
    assert check_readme.split_comment("echo a#b 'c # d'") == ("echo a#b 'c # d'", "")
    assert check_readme.split_comment(r"echo \# x") == (r"echo \# x", "")


def test_seconds_a_comment_states_are_read_and_nothing_else():
    assert check_readme.stated_seconds("18 s (2026-12-04); reads calibration rows only") == 18
    assert check_readme.stated_seconds("about 2.5 s") == 2.5
    assert check_readme.stated_seconds("needs a GPU") is None
    assert check_readme.stated_seconds("v1.5 s3") is None


def test_only_and_exclude_select_by_text():
    found = check_readme.extract_commands(README)
    texts = lambda cs: [c.text for c in cs]  # noqa: E731
    assert check_readme.select(found, [], []) == found
    # --exclude drops every command containing the text, wherever it is in the line
    assert texts(check_readme.select(found, [], ["groundtruth", "make "])) == [
        "pipetwin plan --model vgg16 --topology ideal:4",
        ".venv/bin/pipetwin simulate --model uniform:layers=2 --topology ideal:2 --json",
        "PYTHONPATH=. python benchmarks/bench_sim.py",
        "pipetwin run --model gpt --device cuda",
        'pipetwin echo "a # b"',
        "torchrun --nnodes 2 -m executor.worker plan.json",
        "python benchmarks/check_readme.py --list",
    ]
    # --only keeps, then --exclude removes from what it kept
    assert texts(check_readme.select(found, ["pipetwin"], ["--json", "echo"])) == [
        "pipetwin plan --model vgg16 --topology ideal:4",
        "pipetwin run --model gpt --device cuda",
    ]


def test_exclude_on_the_command_line_leaves_the_commands_out_of_the_list(tmp_path, capsys):
    readme = tmp_path / "R.md"
    readme.write_text(README)
    assert check_readme.main(["--readme", str(readme), "--list", "--exclude", "pipetwin", "--exclude", "make"]) == 0
    listed = [line.split(None, 1)[1].split("    [skip:")[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == ["PYTHONPATH=. python benchmarks/bench_sim.py",
                      "torchrun --nnodes 2 -m executor.worker plan.json",
                      "python -m validation.groundtruth_cv ../shared/data",
                      "python benchmarks/check_readme.py --list"]
