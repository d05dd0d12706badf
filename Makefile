# Two commands set up everything on a fresh machine:
#   make demo   - create .venv, install the package with its evaluation extras, run the main job
#   make test   - create .venv, install the package with its dev extras (pinned), run lint and the whole suite
#   make digits-models - retrain the shipped digits models from scratch (about an hour on 2 cores; resumable)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := constraints.txt

.PHONY: demo test test-quick lint clean digits-models

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
	$(PY) -m ruff check src tests benchmarks studies __init__.py
	$(PY) -m ruff format --check src tests benchmarks studies __init__.py
	$(PY) -m mypy src

test: lint
	$(PY) -m pytest -q

test-quick: lint
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

# The shipped digits models (src/tcd_sampler/assets/digits), rebuilt from scikit-learn's digits with the commands
# docs/evaluation.md lists; every training run resumes from its latest checkpoint when interrupted. The package's
# manifest of shipped files (src/tcd_sampler/assets/SHA256SUMS, checked before any shipped file loads) is written last.
DIGITS := runs/digits
DIGITS_ASSETS := src/tcd_sampler/assets/digits
CLI := $(VENV)/bin/tcd-sampler
TRAIN := $(CLI) train --data $(DIGITS)/train --lora-rank 0 --resolution 8 --batch-size 128 --resume latest

digits-models: $(VENV)/.dev
	$(CLI) digits data --output $(DIGITS)/train
	$(CLI) digits init-teacher --output $(DIGITS)/init
	$(CLI) digits classifier --output $(DIGITS)/classifier
	$(TRAIN) --teacher $(DIGITS)/init --output $(DIGITS)/teacher --method diffusion --steps 6000 --lr 5e-4 \
		--ema-decay 0.999 --checkpoint-every 1000 --validation-every 2000
	$(TRAIN) --teacher $(DIGITS)/teacher --output $(DIGITS)/tcd --method tcd --steps 3000 --lr 1e-4 \
		--guidance-min 1 --guidance-max 1 --checkpoint-every 500 --validation-every 1500
	$(TRAIN) --teacher $(DIGITS)/teacher --output $(DIGITS)/lcm --method lcm --steps 3000 --lr 1e-4 \
		--guidance-min 1 --guidance-max 1 --checkpoint-every 500 --validation-every 1500
	rm -rf $(DIGITS_ASSETS) && mkdir -p $(DIGITS_ASSETS)/teacher $(DIGITS_ASSETS)/tcd $(DIGITS_ASSETS)/lcm
	cp -r $(DIGITS)/teacher/model_index.json $(DIGITS)/teacher/scheduler $(DIGITS)/teacher/unet \
		$(DIGITS)/teacher/card.json $(DIGITS_ASSETS)/teacher/
	for s in tcd lcm; do cp -r $(DIGITS)/$$s/unet $(DIGITS)/$$s/card.json $(DIGITS_ASSETS)/$$s/; done
	cp -r $(DIGITS)/classifier $(DIGITS_ASSETS)/classifier
	$(PY) -m tcd_sampler.assets --write-manifest
