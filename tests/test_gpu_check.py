"""The prepared GPU check (bench/gpu_check.py) runs end to end on CPU with a small configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_small_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [
        sys.executable, "bench/gpu_check.py", "--small", "--device", "cpu", "--num-samples", "24",
        "--max-len", "96", "--max-tokens-per-batch", "1024", "--warmup-batches", "1", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["config"] == "small" and figures["device"] == "cpu"
    assert figures["tokens"] > 0 and figures["tokens_per_s"] > 0
    # The floor is what the stated peak allows; a CPU is far below it.
    assert 0 < figures["fraction_of_floor"] < 1
    assert figures["gflop_per_token"] == pytest.approx(2 * figures["parameters"] / 1e9, rel=1e-3)
