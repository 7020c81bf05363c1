# Quality-Gate: `make install`, `make test`, `make lint`, `make demo`.
# TORCH picks the PyTorch build. The default, torch==2.13.0, is PyPI's wheel: a CUDA build on
# Linux x86-64 GPU machines (a CPU build on machines whose index serves one). For another CUDA:
#   make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint format demo sweep assets bench clean wheel-test

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q tests -m "not slow and not dist"

# Build the wheel, install it non-editable into a fresh virtualenv, run `quality-gate warmup` from /tmp.
wheel-test: install
	bash scripts/check_wheel.sh $(PY) "$(TORCH)"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: install
	$(PY) -m quality_gate experiment

# The experiment over noise rates x budgets (see README for its run time).
sweep: install
	$(PY) -m quality_gate experiment_sweep

assets: install
	$(PY) scripts/make_synthetic_data.py --out assets/data/synthetic_train.jsonl --num-samples 2000 --noise-rate 0.3 --seed 0
	$(PY) scripts/make_synthetic_data.py --out assets/data/synthetic_eval.jsonl --num-samples 200 --noise-rate 0 --seed 1 --dataset-name synthetic_eval --exclude assets/data/synthetic_train.jsonl
	$(PY) scripts/make_tiny_models.py --out-dir assets/models --seed 0

clean:
	rm -rf outputs .pytest_cache
