# `make demo` and `make test` create .venv if missing and install the project with its extras.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-gpu test-slow lint docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# width sweep with limit tracking on synthetic data (CPU, W&B offline): report + figures
demo: $(STAMP)
	$(VENV)/bin/mfl sweep --config recipes/demo_gaussians.yaml --out runs/demo

test: $(STAMP)
	$(PY) -m ruff check mflightning tests benchmarks
	$(PY) -m mypy mflightning
	$(PY) -m pytest -m "not slow" -n auto --dist loadfile --timeout=600

# on a GPU machine (see docs/benchmarks.md for the device set-up)
test-gpu: $(STAMP)
	$(PY) -m pytest tests/gpu -m gpu

test-slow: $(STAMP)
	$(PY) -m pytest -m slow --timeout=3600

lint: $(STAMP)
	$(PY) -m ruff check mflightning tests
	$(PY) -m ruff format --check mflightning tests
	$(PY) -m mypy mflightning

# the site is built into site/ (git-ignored); --strict turns every warning into an error
docs: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,docs]'
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:
	rm -rf runs lightning_logs wandb .pytest_cache
