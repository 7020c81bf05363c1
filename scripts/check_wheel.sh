#!/usr/bin/env bash
# Build the wheel, install it (not editable) into a fresh virtualenv, and run a stage from a directory
# outside the checkout on the tiny assets shipped inside the package. `make wheel-test` runs this.
#   usage: scripts/check_wheel.sh <python of the dev venv> "<torch requirement>"
set -euo pipefail
PY="${1:-.venv/bin/python}"
TORCH="${2:-torch==2.13.0}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d /tmp/qg-wheel-XXXXXX)"
trap 'rm -rf "$WORK" "$REPO/build"' EXIT

echo "[wheel-test] building the wheel"
"$PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$REPO"
WHEEL="$(ls "$WORK"/dist/quality_gate-*.whl)"
# The listing goes to a file first: `zipfile -l | grep -q` fails under pipefail when grep stops reading
# at its first match while the listing (over 64 KB) is still being written (BrokenPipeError).
python3 -m zipfile -l "$WHEEL" > "$WORK/wheel-files.txt"
for file in quality_gate/configs/warmup.yaml quality_gate/config/stages.py \
    quality_gate/assets/models/tiny-qwen3-selector/model.safetensors; do
    grep -q "$file" "$WORK/wheel-files.txt" || { echo "[wheel-test] $file is not in the wheel"; exit 1; }
done

echo "[wheel-test] fresh virtualenv: $WORK/venv"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q --upgrade pip
# shellcheck disable=SC2086  # TORCH may carry pip options (--index-url ...)
"$WORK/venv/bin/pip" install -q $TORCH
"$WORK/venv/bin/pip" install -q "$WHEEL"

echo "[wheel-test] quality-gate warmup from $WORK/elsewhere"
mkdir "$WORK/elsewhere"
cd "$WORK/elsewhere"
"$WORK/venv/bin/quality-gate" warmup dataset.subset_ratio=0.05 training.max_steps=2 training.gate_stats_samples=8 \
    output_dir="$WORK/elsewhere/run" > "$WORK/warmup.log" 2>&1 || { tail -30 "$WORK/warmup.log"; exit 1; }
test -f "$WORK/elsewhere/run/full_rank_weights.pt"
"$WORK/venv/bin/python" - "$WORK/elsewhere/run" <<'PY'
import json, sys, pathlib
run = pathlib.Path(sys.argv[1])
metrics = json.loads((run / "warmup_metrics.json").read_text())
manifest = json.loads((run / "manifest.json").read_text())
import quality_gate
assert "site-packages" in quality_gate.__file__, quality_gate.__file__  # the installed wheel, not the checkout
assert metrics["global_step"] == 2 and manifest["stage"] == "warmup", (metrics, manifest)
print(f"[wheel-test] ok: {quality_gate.__file__}; {metrics['num_train_samples']} samples, 2 steps")
PY
"$WORK/venv/bin/python" -m quality_gate select --help > "$WORK/select-help.txt"
grep -q "selection_percentage" "$WORK/select-help.txt"
echo "[wheel-test] passed"
