"""The prepared GPU check (bench/gpu_check.py) runs end to end on CPU with a small configuration."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ENV

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_small_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [
        sys.executable, "bench/gpu_check.py", "--small", "--device", "cpu", "--num-samples", "24",
        "--max-len", "96", "--max-tokens-per-batch", "1024", "--warmup-batches", "1", "--out", str(out),
        "--batch1-samples", "24", "--ft-steps", "2", "--ft-batch", "2", "--ft-len", "32", "--lora-r", "4",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["config"] == "small" and figures["device"] == "cpu"
    # Lengths are clipped to [16, --max-len 96]; the warmup batch is not timed.
    samples, tokens = figures["samples"], figures["tokens"]
    assert 0 < samples < 24 and 16 * samples <= tokens <= 96 * samples
    # The small selector counted by hand: tied embeddings 4096 x 64, per layer q 64x64, k and v 64x32,
    # o 64x64, q/k norms 2 x 16, gate/up/down 3 x 64x128, two RMSNorms 2 x 64 and the gate 64 -> 1
    # (no bias); the final norm 64.
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 2 * 16 + 3 * 64 * 128 + 2 * 64 + 64
    assert figures["parameters"] == 4096 * 64 + 2 * per_layer + 64 == 336_384
    assert figures["gflop_per_token"] == pytest.approx(2 * 336_384 / 1e9, rel=1e-3)
    # The floor is what the stated peak allows; a CPU is far below it.
    assert 0 < figures["fraction_of_floor"] < 1
    # --batch1-samples above the timed samples: the batch-1 loop scores exactly the samples Stage 2's
    # collection timed, so the speed-up is the ratio of the two measured wall times.
    batch1 = figures["batch1"]
    assert (batch1["samples"], batch1["tokens"]) == (samples, tokens)
    ratio = batch1["wall_s"] / figures["wall_s"]
    rounding = 0.005 + 1.1 * ratio * (5e-4 / batch1["wall_s"] + 5e-4 / figures["wall_s"])  # 0.01; ms walls
    assert abs(batch1["speedup_of_collect"] - ratio) <= rounding
    # Stage 3's LoRA steps with and without gradient checkpointing: the loss is finite, LoRA only trains.
    for setting in ("gradient_checkpointing=False", "gradient_checkpointing=True"):
        ft = figures["finetune"][setting]
        assert ft["steps"] == 2 and ft["median_step_s"] > 0 and ft["tokens_per_step"] == 64
        assert all(math.isfinite(x) for x in ft["loss_first_last"])
        assert 0 < ft["trainable_parameters"] < figures["parameters"]


@pytest.mark.slow
def test_gpu_pipeline_check_compares_two_runs(tmp_path):
    """The prepared pipeline check (CUDA vs CPU) run as CPU vs CPU: identical selections."""
    cmd = [
        sys.executable,
        "bench/gpu_pipeline_check.py",
        "--devices",
        "cpu",
        "cpu",
        "--small",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads((tmp_path / "pipeline_check.json").read_text())
    agreement = figures["agreement"]
    assert agreement["samples_scored_by_both"] == 80
    assert agreement["spearman_q"] == pytest.approx(1.0) and agreement["selected_overlap"] == 1.0
    assert agreement["selected"] == [20, 20]
    first, second = figures["runs"]
    assert first["quality_gate_eval_loss"] == pytest.approx(second["quality_gate_eval_loss"])
