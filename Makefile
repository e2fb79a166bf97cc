# xdpflow. `make demo` and `make test` install what is missing, then run.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup venv demo test lint typecheck unit kernel interop bench soak fuzz clean

setup venv:
	@bash tools/setup.sh

demo: setup
	@$(PY) -m tools.demo

lint: setup
	$(VENV)/bin/ruff check exporter xdp collectors tools tests

typecheck: setup
	$(VENV)/bin/mypy

test: setup lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

kernel: setup
	$(PY) -m pytest tests/kernel $(PYTEST_ARGS)

# Benchmarks: timing lives here, never in pass/fail tests (see docs/benchmarks.md).
bench: setup
	$(PY) -m tools.bench all --short

# Long runs kept out of `make test`.
soak: setup
	$(PY) -m tools.soak --minutes 10

fuzz: setup
	XDPFLOW_FUZZ_EXAMPLES=20000 $(PY) -m pytest tests/kernel/test_parser.py tests/kernel/test_capture_replay.py \
		tests/unit/test_collector_decoder.py tests/unit/test_biflow.py \
		tests/unit/test_config_fuzz.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
