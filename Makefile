# Two set-up commands: `make demo` and `make test`. Each builds its own venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean bench

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch is pinned first: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.11"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pipetwin demo

# Two passes: the in-process tests on $(TEST_WORKERS) cores (pytest-xdist; tests handed out one by one, an idle
# worker taking another's: whole files per worker left one running the Hypothesis schedule file alone), then the
# real multi-process runs (marked dist: gloo workers, fault timeouts, measured timings) alone, so that they do not
# compete for the cores they time. Plain `pytest` runs everything serially.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -x --timeout=300 -n $(TEST_WORKERS) --dist worksteal -m "not dist"
	$(BIN)/python -m pytest -q -x --timeout=300 -m dist

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) out
