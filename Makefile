# Two entry points: `make demo` (main job) and `make test` (the suite CI runs).
# Both create .venv idempotently. Override TORCH_SPEC on GPU machines, e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH_SPEC)
	$(VENV)/bin/pip install -q -e '.[test,latent]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/biflow run pipelines/digits.yaml

# lint-imports: the layer contract of docs/ARCHITECTURE.md (pyproject's [tool.importlinter]), in a second;
# --durations=20: the suite ends with its 20 slowest tests, to keep CI time in view
test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest -q --durations=20 tests

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench.py --out benchmarks/results.json

.PHONY: setup demo test bench
