# Every target creates and uses .venv itself: on a fresh machine `make demo` and `make test` just work.
PYTHON ?= python3
# The torch we test. Installed first and pinned so that no dependency pulls another (CUDA) build.
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo demo-flow demo-repa demo-lightning demo-fast demo-meanflow score-demo time-to-quality clean

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

# Train a nano DiT on scikit-learn's bundled 8x8 digits (offline, CPU, fp32), write a labelled grid of EMA samples
# into the run directory outputs/demo/NNN-DiT-N-2/, then score 500 DPM-Solver++ samples (20 steps) at guidance 1.0
# and 1.5 with the project's digit classifier (accuracy, pixel and feature Frechet distances).
DEMO_ARGS ?= --dataset digits --model DiT-N/2 --mixed_precision fp32 --device cpu --batch_size 128 \
	--lr 2e-3 --lr_schedule cosine --warmup_steps 100 --ema_decay 0.995 --max_steps 2000 --log_every 100 --ckpt_every 1000 --outputs outputs/demo \
	--final_samples 10 --final_cfg_scale 1.5
demo: $(STAMP)
	$(PY) scripts/dit/train.py $(DEMO_ARGS)
	@run=$$(ls -d outputs/demo/*-DiT-N-2 | tail -n 1); set -e; for cfg in 1.0 1.5; do \
	  $(PY) scripts/dit/sample_ddp.py --ckpt $$run --num_samples 500 --per_proc_batch_size 250 --device cpu \
	    --sampler dpm-solver++ --num_sampling_steps 20 --cfg_scale $$cfg --sample_dir $$run/eval/dpm20-cfg$$cfg; \
	  $(PY) scripts/dit/score_digits.py $$run/eval/dpm20-cfg$$cfg.npz | head -n 1; done

# The same budget trained as a flow (SiT objective; recipes/digits-flow.toml), as a flow with REPA aligned to the
# digits classifier's features (recipes/digits-repa.toml), or with LightningDiT's blocks and logit-normal t
# (recipes/digits-lightning.toml), or in 500 steps with Muon and a power-function EMA (recipes/digits-fast.toml), scored
# the same way with 20 model evaluations per sample (Heun on an 11-point grid) at guidance 1.0 and 1.5.
demo-flow demo-repa demo-lightning demo-fast: demo-%: $(STAMP)
	$(PY) scripts/dit/train.py --config recipes/digits-$*.toml
	@run=$$(ls -d outputs/demo-$*/*-DiT-N-2 | tail -n 1); set -e; for cfg in 1.0 1.5; do \
	  $(PY) scripts/dit/sample_ddp.py --config recipes/digits-$*.toml --ckpt $$run --cfg_scale $$cfg \
	    --sample_dir $$run/eval/heun11-cfg$$cfg; \
	  $(PY) scripts/dit/score_digits.py $$run/eval/heun11-cfg$$cfg.npz | head -n 1; done

# The same budget trained as MeanFlow (recipes/digits-meanflow.toml): one network evaluation per sample (and two),
# guidance trained in (sampled at cfg 1), scored the same way.
demo-meanflow: $(STAMP)
	$(PY) scripts/dit/train.py --config recipes/digits-meanflow.toml
	@run=$$(ls -d outputs/demo-meanflow/*-DiT-N-2 | tail -n 1); set -e; for steps in 1 2; do \
	  $(PY) scripts/dit/sample_ddp.py --config recipes/digits-meanflow.toml --ckpt $$run --num_sampling_steps $$steps \
	    --sample_dir $$run/eval/meanflow$$steps; \
	  $(PY) scripts/dit/score_digits.py $$run/eval/meanflow$$steps.npz | head -n 1; done

# Every recipe on the demo's budget, scored every 250 steps: the table in BENCHMARKS.md, docs/time_to_quality.png.
time-to-quality: $(STAMP)
	$(PY) benchmarks/time_to_quality.py

# The full quality check of the demo model: 500 samples with the published sampler (ddpm, 250 steps).
score-demo: $(STAMP)
	@run=$$(ls -d outputs/demo/*-DiT-N-2 | tail -n 1); set -e; for cfg in 1.0 1.5; do \
	  $(PY) scripts/dit/sample_ddp.py --ckpt $$run --num_samples 500 --per_proc_batch_size 250 --device cpu \
	    --sampler ddpm --num_sampling_steps 250 --cfg_scale $$cfg --sample_dir $$run/eval/ddpm250-cfg$$cfg; \
	  $(PY) scripts/dit/score_digits.py $$run/eval/ddpm250-cfg$$cfg.npz | head -n 1; done

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
