# Quality-Gate: `make install`, `make test`, `make lint`, `make demo`.
# TORCH picks the PyTorch build. The default, torch==2.13.0, is PyPI's wheel: a CUDA build on
# Linux x86-64 GPU machines (a CPU build on machines whose index serves one). For another CUDA:
#   make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast test-cluster lint format demo assets bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

# More than one machine and real shapes (docs/cluster.md, docs/real_shape.md): also part of `make test`.
test-cluster: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/test_cluster.py tests/test_stage2_parts.py tests/test_real_shape.py

test-fast: install
	$(PY) -m pytest -q tests -m "not slow and not dist"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: install
	$(PY) scripts/run_experiment.py --config-name experiment

assets: install
	$(PY) scripts/make_synthetic_data.py --out assets/data/synthetic_train.jsonl --num-samples 2000 --noise-rate 0.3 --seed 0
	$(PY) scripts/make_synthetic_data.py --out assets/data/synthetic_eval.jsonl --num-samples 200 --noise-rate 0 --seed 1 --dataset-name synthetic_eval --exclude assets/data/synthetic_train.jsonl
	$(PY) scripts/make_tiny_models.py --out-dir assets/models --seed 0

clean:
	rm -rf outputs .pytest_cache
