"""The experiment runner end to end on a very small configuration: every arm gets its row."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO as ROOT

from quality_gate.config import make_config
from quality_gate.experiment import run_experiment

SMALL = [
    "training.max_steps=2",
    "training.batch_size=8",
    "training.per_device_batch_size=8",
]


def _small_config(out: Path, **extra):
    cfg = make_config(
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
    run_dir = tmp_path / "exp"
    pool = {r["id"]: r for r in map(json.loads, (run_dir / "data" / "train.jsonl").read_text().splitlines())}
    for name in ("quality_gate", "perplexity", "ifd", "random_seed0", "random_seed1"):
        row = summary["per_seed"][name] if name.startswith("random") else arms[name]
        kept = [json.loads(line)["id"] for line in (run_dir / "select" / name / "selected_data.jsonl").open()]
        assert row["kept"] == len(kept) == 20  # ceil(0.25 * 80)
        # The row's share is the share of corrupted records in that arm's selected_data.jsonl ...
        share = sum(pool[i]["meta"]["corruption"] != "none" for i in kept) / len(kept)
        assert row["corrupted_kept_share"] == pytest.approx(share)
        # ... its AUROC is the one the selection's own summary (and report) computed ...
        audit = json.loads((run_dir / "select" / name / "selection_summary.json").read_text())[
            "corruption_audit"
        ]
        selector = "random" if name.startswith("random") else name
        assert row["auroc_clean_vs_corrupted"] == pytest.approx(audit["selectors"][selector]["auroc"])
        # ... and its held-out numbers are that arm's Stage 4 results.
        results = json.loads((run_dir / "evaluate" / name / "eval_results.json").read_text())
        assert row["eval_loss"] == pytest.approx(results["heldout"]["loss"])
        assert row["exact_match"] == pytest.approx(results["exact_match"]["accuracy"])
    # The tiny selector was pretrained on clean data: perplexity alone separates the planted corruptions.
    assert arms["perplexity"]["auroc_clean_vs_corrupted"] > 0.8
    assert arms["perplexity"]["corrupted_kept_share"] < arms["full"]["corrupted_kept_share"]
    seeds = [summary["per_seed"][f"random_seed{s}"]["eval_loss"] for s in (0, 1)]
    assert arms["random"]["n_seeds"] == 2 and arms["random"]["eval_loss"] == pytest.approx(sum(seeds) / 2)
    assert arms["full"]["kept"] == 80 and arms["full"]["corrupted_kept_share"] == pytest.approx(24 / 80)
    assert arms["base (no fine-tune)"]["kept"] == 0

    # summary.json and summary.md say the same thing.
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
    for sub in ("warmup", "collect", "finetune/quality_gate", "evaluate/base"):
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
        "-m",
        "quality_gate",
        "experiment",
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
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^\| quality_gate \| 18 \|", proc.stdout, re.M)
    assert "Did selection help?" in proc.stdout
    assert (out / "summary.json").is_file()
