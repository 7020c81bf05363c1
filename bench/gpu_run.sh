#!/usr/bin/env bash
# Issue 13's one-shot GPU run: the Stage 2 / batch-1 / Stage 3 figures at the real shapes, then the tiny
# pipeline on CUDA against CPU. Writes gpu_check.json and pipeline_check.json into ${OUT:-outputs/gpu}.
#   bash bench/gpu_run.sh            # about 6-10 minutes on one H100
# A machine without hydra-core / omegaconf / datasets installs them from wheels in .whl/, into /tmp/site
# (`bash bench/fetch_gpu_wheels.sh` fetches them here; carry .whl with the run).
set -euo pipefail
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
if ! python3 -c "import hydra, omegaconf, datasets" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, accelerate, datasets, pyarrow, hydra, omegaconf as o; print({m.__name__: m.__version__ for m in (torch, transformers, peft, accelerate, datasets, pyarrow, hydra, o)})" | tee -a "$OUT/gpu.txt"
python3 bench/gpu_check.py --out "$OUT/gpu_check.json"
python3 bench/gpu_pipeline_check.py --out "$OUT/pipeline"
cp "$OUT/pipeline/pipeline_check.json" "$OUT/pipeline_check.json"
