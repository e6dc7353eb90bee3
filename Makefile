# Every target creates and uses .venv itself: on a fresh machine `make demo` and `make test` just work.
PYTHON ?= python3
# The torch we test. Installed first and pinned so that no dependency pulls another (CUDA) build.
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH)"
	touch $(STAMP)

# The whole suite (what CI runs).
test: $(STAMP)
	$(PY) -m pytest -q

# Skip the tests marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Train a nano DiT on scikit-learn's bundled 8x8 digits (offline, CPU, fp32), then write a labelled grid of
# EMA samples (DPM-Solver++ 20 steps, guidance 1.5) into the run directory outputs/demo/NNN-DiT-N-2/.
DEMO_ARGS ?= --dataset digits --model DiT-N/2 --mixed_precision fp32 --device cpu --batch_size 128 --lr 1e-3 \
	--ema_decay 0.995 --max_steps 2000 --log_every 100 --ckpt_every 1000 --outputs outputs/demo \
	--final_samples 10 --final_cfg_scale 1.5
demo: $(STAMP)
	$(PY) scripts/dit/train.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
