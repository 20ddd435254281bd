# `make demo` and `make test` create .venv if missing and install the project with its extras.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mfl fit --config recipes/demo_gaussians.yaml
	@echo "demo finished: metrics and checkpoint under runs/demo_gaussians/"

test: $(STAMP)
	$(PY) -m ruff check mflightning tests
	$(PY) -m pytest -m "not slow" --timeout=600

test-slow: $(STAMP)
	$(PY) -m pytest -m slow --timeout=3600

lint: $(STAMP)
	$(PY) -m ruff check mflightning tests
	$(PY) -m ruff format --check mflightning tests
	$(PY) -m mypy mflightning

clean:
	rm -rf runs lightning_logs wandb .pytest_cache
