# vlpcache: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATASET ?= demo
ARGS ?=
# An embedded Ray stays on loopback with no token (DESIGN.md); a real cluster keeps its own settings.
ifeq ($(RAY_ADDRESS),)
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := disabled
else
export RAY_ADDRESS
endif
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: help install sysdeps demo extract test test-slow test-faults bench-decode bench-store bench-scale bench-pipeline bench-train ablation clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

install: $(STAMP) ## build .venv with pinned requirements (and h5dump/ffprobe via apt if missing)

$(STAMP): requirements-torch.txt requirements.txt constraints.txt setup.cfg pyproject.toml
	$(MAKE) sysdeps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-torch.txt
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

sysdeps: ## h5dump and ffprobe for the foreign-reader tests (apt, skipped when present)
	@if ! command -v h5dump >/dev/null || ! command -v ffprobe >/dev/null; then \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq hdf5-tools ffmpeg >/dev/null; \
	  else echo "h5dump/ffprobe missing and no apt-get: install hdf5-tools and ffmpeg"; fi; \
	fi

# make demo: the first run (configs/datasets/demo_detector.yaml; docs/demo.md)
DEMO_CORPUS := data/demo600
DEMO_DETECTOR := data/detector/demo_shapes.pt
DEMO_FEATURES := data/features/demo_detector
DEMO_RUN := runs/demo

demo: $(STAMP) ## corpus, fine-tuned detector, extraction, training, test figures, a show PNG (goal: 8 min, 2 cores)
	@$(call demo_step,corpus) $(PY) -m pipeline demo-data $(DEMO_CORPUS) --videos 600 --val-videos 100 --test-videos 100 --seed 0
	@$(call demo_step,detector) $(PY) -m pipeline finetune-detector $(DEMO_CORPUS) --out $(DEMO_DETECTOR) --reuse
	rm -rf $(DEMO_FEATURES)  # extract resumes an existing store whatever config made it: a stale store would be kept
	@$(call demo_step,extract) $(PY) -m pipeline extract --dataset demo_detector --no-progress
	rm -rf $(DEMO_RUN)
	@$(call demo_step,train) $(PY) -m pipeline train --features $(DEMO_FEATURES) --out $(DEMO_RUN) --config configs/train/demo.yaml
	@$(call demo_step,eval) $(PY) -m pipeline eval --checkpoint $(DEMO_RUN) --features $(DEMO_FEATURES) --split test
	@$(call demo_step,show) $(PY) -m pipeline show $(DEMO_FEATURES) demo000500 --checkpoint $(DEMO_RUN) --png $(DEMO_RUN)/show.png
	@echo "figures: $(DEMO_RUN)/eval_test.json; boxes and attention: $(DEMO_RUN)/show.png"

# bash's `time` per step: wall, and CPU (user + sys, child processes included) that docs/demo.md budgets
demo_step = echo "== demo: $(1)"; TIMEFORMAT="== demo: $(1) took %R s wall, %U s user + %S s sys CPU"; time

extract: $(STAMP) ## extract DATASET (default demo) per configs/datasets/$(DATASET).yaml
	$(PY) -m pipeline extract --dataset $(DATASET) $(ARGS)

test: $(STAMP) ## fast test suite (under 10 minutes on 2 cores)
	$(PY) -m pytest -q $(ARGS)

test-slow: $(STAMP) ## heavier tests (kill -9 sweeps, long runs)
	$(PY) -m pytest -q -m slow $(ARGS)

test-faults: $(STAMP) ## fault suite: kill -9, poison video, hung actor, disk full, damaged files...; prints a table
	$(PY) -m pytest -q -m "slow or not slow" tests/test_faults.py tests/test_faults_slow.py \
	  tests/test_pipeline_ray.py -k "faults or kill" $(ARGS)

bench-decode: $(STAMP) ## CPU cost of sparse decoding (pyav, torchcodec, decord backends) vs torchcodec / decord / full decode / limit
	$(PY) -m extractors.bench $(ARGS)

bench-store: $(STAMP) ## read speed and size of the store layouts vs memmap / npz peers
	$(PY) -m stores.bench $(ARGS)

bench-scale: $(STAMP) ## store open / status / lookups / pickled reader, extract driver RSS / task bytes, at 1M vs before, projected to 10M
	$(PY) -m stores.bench_scale $(ARGS)
	$(PY) -m pipeline.bench_scale $(DRIVER_ARGS)

bench-pipeline: $(STAMP) ## end-to-end throughput vs the sum-of-stages limit and a plain loop
	$(PY) -m pipeline.bench $(ARGS)

bench-train: $(STAMP) ## training from the cache vs from pixels, loader vs step, RSS vs store size
	$(PY) -m benchmarks.bench_train $(ARGS)

ablation: $(STAMP) ## objective ablation over 3 seeds on the demo corpus, 2 worker processes (at most 30 CPU minutes)
	$(PY) -m train.ablation $(ARGS)

clean: ## remove generated data and runs (keeps .venv)
	rm -rf data runs
