# Two commands on a fresh machine: `make demo` and `make test`. Both create (or refresh) .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE ?= offline

.PHONY: setup test demo lint clean-demo

# torch first and pinned, so that no later step lets pip resolve an unpinned (multi-GB CUDA) torch.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev,wandb,sweep,export,sa2va]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check distill tests scripts
	$(PY) -m ruff format --check distill tests scripts

demo: setup
	bash scripts/demo.sh $(PY)

clean-demo:
	rm -rf data/synthetic teacher_cache/frangi_synthetic students/demo
