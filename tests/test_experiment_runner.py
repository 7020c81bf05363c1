"""The experiment runner end to end on a very small configuration: every arm gets its row."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from quality_gate.experiment import load_stage_config, run_experiment

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "training.max_steps=2",
    "training.batch_size=8",
    "training.per_device_batch_size=8",
]


def _small_config(out: Path, **extra):
    cfg = load_stage_config(
        "experiment",
        {
            "output_dir": str(out),
            "data.num_samples": 80,
            "random_seeds": [0, 1],
            "selection_percentage": 0.25,
            "overrides.warmup": ["training.max_steps=2", "dataset.subset_ratio=1.0"],
            "overrides.finetune": [
                *SMALL,
                "training.lora.r=4",
                "training.lora.alpha=8",
                "training.learning_rate=1e-3",
            ],
            "overrides.evaluate": ["eval.max_samples=16", "eval.max_new_tokens=8"],
            **extra,
        },
    )
    return cfg


@pytest.mark.slow
def test_runner_writes_every_arm_and_consistent_summaries(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    summary = run_experiment(_small_config(tmp_path / "exp"))
    arms = summary["arms"]
    assert list(arms) == ["quality_gate", "perplexity", "ifd", "random", "full", "base (no fine-tune)"]
    for name in ("quality_gate", "perplexity", "ifd", "random"):
        row = arms[name]
        assert row["kept"] == 20  # ceil(0.25 * 80)
        assert 0.0 <= row["corrupted_kept_share"] <= 1.0
        assert 0.0 <= row["auroc_clean_vs_corrupted"] <= 1.0
        assert row["eval_loss"] > 0 and 0.0 <= row["exact_match"] <= 1.0
    assert arms["random"]["n_seeds"] == 2 and set(summary["per_seed"]) == {"random_seed0", "random_seed1"}
    assert arms["full"]["kept"] == 80 and arms["full"]["corrupted_kept_share"] == pytest.approx(24 / 80)
    assert arms["base (no fine-tune)"]["kept"] == 0

    # summary.json and summary.md say the same thing.
    run_dir = tmp_path / "exp"
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["arms"] == json.loads(json.dumps(arms))
    md = (run_dir / "summary.md").read_text()
    for name, row in arms.items():
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == f"{row['kept']:.0f}"
        assert cells[4].startswith("–" if row.get("eval_loss") is None else f"{row['eval_loss']:.4f}")
        assert cells[5].startswith(f"{row['exact_match']:.4f}")
    for verdict in summary["verdicts"]:
        assert verdict in md
    _check_report(Path(summary["report"]))
    # Every stage left its usual run dir with a manifest.
    for sub in (
        "stage_1_warmup",
        "stage_2_selection",
        "stage_3_finetune/quality_gate",
        "stage_4_evaluate/base",
    ):
        assert (run_dir / sub / "manifest.json").is_file(), sub


def _check_report(path: Path) -> None:
    """The report of the real tiny pipeline: every section, embedded images, coloured tokens."""
    from html.parser import HTMLParser

    from quality_gate.selection.report import SECTIONS

    ids, imgs = set(), []

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if "id" in a:
                ids.add(a["id"])
            if tag == "img":
                imgs.append(a.get("src", ""))

    text = path.read_text(encoding="utf-8")
    Collect().feed(text)
    assert set(SECTIONS) <= ids
    assert len(imgs) >= 5 and all(src.startswith("data:image/png;base64,") for src in imgs)
    assert "Token colouring unavailable" not in text and "coloured by gate" in text
    assert "AUROC clean vs corrupted" in text


@pytest.mark.slow
def test_runner_command_line_prints_the_table(tmp_path):
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "scripts/run_experiment.py",
        f"output_dir={out}",
        "data.num_samples=60",
        "selectors=[quality_gate,random]",
        "random_seeds=[0]",
        "include_full=false",
        "include_base=false",
        'overrides.warmup=["training.max_steps=1"]',
        'overrides.finetune=["training.max_steps=1","training.batch_size=8","training.per_device_batch_size=8"]',
        'overrides.evaluate=["eval.max_samples=8","eval.max_new_tokens=4"]',
    ]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^\| quality_gate \| 18 \|", proc.stdout, re.M)
    assert "Did selection help?" in proc.stdout
    assert (out / "summary.json").is_file()
