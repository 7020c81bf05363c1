#!/usr/bin/env bash
# The wheels the GPU image lacks, for its Python 3.12, into .whl/ (git-ignored), for bench/gpu_run.sh:
# hydra-core, omegaconf, antlr4-python3-runtime (omegaconf's pin; source-only on PyPI, so its pure-Python
# wheel is built here), datasets and the two of its needs the image lacks (dill, multiprocess).
#   bash bench/fetch_gpu_wheels.sh        # about 1 MB in all
set -euo pipefail
PY=${PY:-.venv/bin/python}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl hydra-core==1.3.8 omegaconf==2.3.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
"$PY" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -l .whl
