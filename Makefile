# Two commands: `make demo` and `make test`. Everything installs into .venv on first use.
# `make test` lints (ruff check, ruff format --check; config in pyproject.toml) before pytest, so CI
# fails on a lint error; `$(VENV)/bin/pre-commit install` runs the same checks on every commit.
PRESET ?= toy
ONLY ?=
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KERNEL := pruning-lab

.PHONY: demo test lint lab install bench sweeps clean-runs help

help:
	@echo "make demo [PRESET=toy|gpu] [ONLY=03,04]   build the toy world, run notebooks 01-06"
	@echo "make test                               install if needed, lint (ruff), run pytest"
	@echo "make lint                               ruff check and ruff format --check only"
	@echo "make lab                                JupyterLab on the '$(KERNEL)' kernel"
	@echo "make bench                              performance ratios (bench/)"
	@echo "make sweeps                             expert and layer sweeps on 3 toy-world seeds, findings.md"

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first: the pinned CPU wheel on this machine (a CUDA box resolves the same pin from PyPI),
# so that nothing later pulls an unpinned multi-GB build.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[gpu,eval,dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (pruning-lab)" >/dev/null
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m helpers run --preset $(PRESET) $(if $(ONLY),--only $(ONLY),)
	$(if $(filter toy,$(PRESET)),$(if $(ONLY),,$(BIN)/python -m helpers sweep experts --preset toy))
	$(if $(filter toy,$(PRESET)),$(if $(ONLY),,$(BIN)/python -m helpers sweep layers --preset toy))

# The 3-seed repetition of the toy sweeps (worlds built with seeds 0, 1, 2; notebooks 01-02 for each),
# then findings.md: a difference is stated only where it holds for every seed. Reruns skip done points.
SWEEP_PRESETS ?= toy toy_seed1 toy_seed2
sweeps: $(STAMP)
	for p in $(SWEEP_PRESETS); do \
	  $(BIN)/python -m helpers run --preset $$p --only 01,02 --no-html && \
	  $(BIN)/python -m helpers sweep experts --preset $$p && \
	  $(BIN)/python -m helpers sweep layers --preset $$p || exit 1; \
	done
	$(BIN)/python -m helpers sweep-findings --presets $(shell echo $(SWEEP_PRESETS) | tr ' ' ',')

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

bench: $(STAMP)
	$(BIN)/python bench/checkpoint_copy.py
	$(BIN)/python bench/expert_prune.py
	$(BIN)/python bench/layers.py
	$(BIN)/python bench/eval.py
	$(BIN)/python bench/sweep.py

clean-runs:
	rm -rf runs/
