# Two commands set up everything on a fresh machine:
#   make demo   - create .venv, install the package with its evaluation extras, run the main job
#   make test   - create .venv, install the package with its dev extras (pinned), run lint and the whole suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := constraints.txt

.PHONY: demo test test-quick lint clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	@touch $@

# torch is installed first and pinned, so that nothing later pulls a CUDA build.
$(VENV)/.core: $(VENV)/.created pyproject.toml $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) "torch==2.13.0"
	$(PIP) install -q -c $(CONSTRAINTS) -e .
	@touch $@

$(VENV)/.eval: $(VENV)/.core
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[eval]"
	@touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev]"
	@touch $@

demo: $(VENV)/.eval
	$(VENV)/bin/tcd-sampler demo --output-dir demo_out

lint: $(VENV)/.dev
	$(PY) -m ruff check src tests benchmarks __init__.py
	$(PY) -m ruff format --check src tests benchmarks __init__.py
	$(PY) -m mypy src

test: lint
	$(PY) -m pytest -q

test-quick: lint
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
