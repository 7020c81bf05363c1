"""The experiment runner end to end on a very small configuration: every arm, the ablations, matched
compute, paired intervals, and the sweep; every number in the summary traced back to its stage's files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ENV, REPO
from omegaconf import OmegaConf

from quality_gate.config import make_config
from quality_gate.experiment import cell_fingerprint, run_experiment

SMALL_FT = [
    "training.batch_size=8",
    "training.per_device_batch_size=8",
    "training.lora.r=4",
    "training.lora.alpha=8",
]


def _small_config(out: Path, **extra):
    return make_config(
        "experiment",
        {
            "output_dir": str(out),
            "data.num_samples": 80,
            "seeds": [0, 1],
            "selection_percentage": 0.25,
            "compute.epochs": 1,  # ceil(1 * 20 / 8) = 3 steps per arm
            "statistics.bootstrap": 200,
            "overrides.warmup": [
                "training.max_steps=2",
                "dataset.subset_ratio=1.0",
                "training.gate_stats_samples=8",
            ],
            "overrides.finetune": [*SMALL_FT, "training.learning_rate=1e-3", "training.report_to=[]"],
            "overrides.evaluate": ["eval.max_samples=16", "eval.max_new_tokens=8"],
            **extra,
        },
    )


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_runner_every_arm_matched_compute_and_traceable_numbers(tmp_path):
    run_dir = tmp_path / "exp"
    summary = run_experiment(_small_config(run_dir))
    arms = summary["arms"]
    assert list(arms) == [
        "quality_gate",
        "quality_gate+cluster",
        "perplexity",
        "ifd",
        "random",
        "full",
        "base (no fine-tune)",
        "quality_gate (alpha=0)",
        "quality_gate (unwarmed gates)",
    ]
    pool = {r["id"]: r for r in _read_jsonl(run_dir / "data" / "train.jsonl")}
    arms_on_disk = (
        "quality_gate",
        "quality_gate+cluster",
        "perplexity",
        "ifd",
        "random_seed0",
        "random_seed1",
    )
    for arm in (*arms_on_disk, "quality_gate_alpha0"):
        kept = [r["id"] for r in _read_jsonl(run_dir / "select" / arm / "selected_data.jsonl")]
        assert len(kept) == 20  # ceil(0.25 * 80)
        # The audit in the selection's own summary is the one the runner reports (one rule, one place).
        audit = json.loads((run_dir / "select" / arm / "selection_summary.json").read_text())[
            "corruption_audit"
        ]
        selector = "random" if arm.startswith("random") else "quality_gate" if "alpha0" in arm else arm
        selector = selector.partition("+")[0]
        assert json.loads((run_dir / "select" / arm / "selection_summary.json").read_text())["diversity"][
            "mode"
        ] == ("cluster" if arm.endswith("+cluster") else "none")
        share = sum(pool[i]["meta"]["corruption"] != "none" for i in kept) / len(kept)
        assert audit["selectors"][selector]["corrupted_share_of_kept"] == pytest.approx(share)
        if arm in arms:
            assert arms[arm]["corrupted_kept_share"] == pytest.approx(share)
            assert arms[arm]["auroc"] == pytest.approx(audit["selectors"][selector]["auroc"])
    # Compute matched by steps: every fine-tuned arm, the full data included, trained 3 steps per seed.
    for arm in ("quality_gate", "quality_gate+cluster", "perplexity", "ifd", "random", "full"):
        assert arms[arm]["finetune_steps"] == 3, arm
        assert arms[arm]["finetune_tokens"] > 0 and arms[arm]["finetune_flops"] > 0
        losses = []
        for seed in (0, 1):
            results = json.loads(
                (run_dir / "evaluate" / f"{arm}_seed{seed}" / "eval_results.json").read_text()
            )
            losses.append(results["heldout"]["loss"])
            train = json.loads(
                (run_dir / "finetune" / f"{arm}_seed{seed}" / "train_metrics.json").read_text()
            )
            assert (
                train["global_step"] == 3 and train["tokens_seen"] == arms[arm]["finetune_tokens"]
            ) or seed == 1
        assert arms[arm]["eval_loss_per_seed"] == pytest.approx(losses)
        assert arms[arm]["eval_loss"] == pytest.approx(sum(losses) / 2)
        if arm != "random":
            diff = arms[arm]["vs_random"]["eval_loss"]
            assert diff["low"] <= diff["difference"] <= diff["high"]
            random_losses = arms["random"]["eval_loss_per_seed"]
            assert diff["difference"] == pytest.approx(sum(losses) / 2 - sum(random_losses) / 2)
    # The full arm is the pool; the random arm averages its two seeds' selections.
    assert arms["full"]["kept"] == 80 and arms["full"]["corrupted_kept_share"] == pytest.approx(24 / 80)
    assert arms["base (no fine-tune)"].get("finetune_steps") is None
    # Per-family AUROC for every selector and family planted in the pool.
    assert set(summary["families"]) == {
        "garbage",
        "wrong_answer",
        "truncated",
        "other_task",
        "repetition",
        "generic",
        "refusal",
        "echo",
    }
    assert set(arms["perplexity"]["per_kind"]) == set(summary["families"])
    cost = summary["selection_cost"]
    assert cost["stage1_flops"] > 0 and cost["stage2_flops"] > 0 and cost["stage2_tokens"] > 0
    assert summary["gate_movement"]["message"]
    md = (run_dir / "summary.md").read_text()
    for arm in arms:
        assert f"| {arm}" in md
    assert "data:image/png;base64," in (run_dir / "summary.html").read_text()
    for sub in ("warmup", "collect", "collect_unwarmed", "finetune/quality_gate_seed0", "evaluate/base"):
        assert (run_dir / sub / "manifest.json").is_file(), sub


@pytest.mark.slow
def test_sweep_runs_stages_1_2_once_per_noise_rate_and_plots(tmp_path):
    run_dir = tmp_path / "sweep"
    cfg = _small_config(
        run_dir,
        selectors=["quality_gate", "random"],
        seeds=[0],
        ablations=[],
        include_full=False,
        include_base=False,
        **{"sweep.noise_rates": [0.2, 0.5], "sweep.budgets": [0.25]},
    )
    sweep = run_experiment(cfg)
    assert [(c["noise_rate"], c["selection_percentage"]) for c in sweep["cells"]] == [
        (0.2, 0.25),
        (0.5, 0.25),
    ]
    assert sorted(p.name for p in run_dir.glob("noise*/warmup")) == ["warmup", "warmup"]
    for cell in sweep["cells"]:
        assert cell["corrupted_candidates"] == round(cell["noise_rate"] * 80)
    page = (run_dir / "sweep_summary.html").read_text()
    assert page.count("data:image/png;base64,") == 1 and "noise rate" in page
    assert "<td>0.5</td><td>0.25</td><td>quality_gate</td>" in page  # the table, as an HTML table
    assert "| 0.5 | 0.25 | quality_gate |" in (run_dir / "sweep_summary.md").read_text()
    assert sweep["resumed_cells"] == []

    # Resume: the run was cut short after the first cell (no sweep summary, the last cell unfinished).
    first = json.loads((run_dir / "noise0.2/k0.25/summary.json").read_text())
    (run_dir / "sweep_summary.json").unlink()
    (run_dir / "noise0.5/k0.25/summary.json").unlink()
    again = run_experiment(cfg)
    assert again["resumed_cells"] == ["noise0.2/k0.25"]
    assert again["cells"][0] == first  # read back, not rerun
    for noise in ("noise0.2", "noise0.5"):  # Stages 1-2 finished for both rates: reused, not rerun
        assert "reruns" not in json.loads((run_dir / noise / "warmup/manifest.json").read_text())
        assert "reruns" not in json.loads((run_dir / noise / "collect/manifest.json").read_text())
    rerun = json.loads((run_dir / "noise0.5/k0.25/summary.json").read_text())  # the unfinished cell ran
    assert rerun["arms"]["random"]["kept"] == sweep["cells"][1]["arms"]["random"]["kept"]
    assert rerun["selection_cost"]["stage1_wall_s"] == sweep["cells"][1]["selection_cost"]["stage1_wall_s"]
    assert "Read back from an earlier run" in (run_dir / "sweep_summary.md").read_text()

    # Cut short inside Stages 1-2 of a rate (no prepared.json): they run again into the same dirs, and
    # Stage 1's weights come out byte-identical, so Stage 2 resumes instead of refusing to mix.
    (run_dir / "noise0.5/prepared.json").unlink()
    (run_dir / "noise0.5/k0.25/summary.json").unlink()
    third = run_experiment(cfg)
    assert third["resumed_cells"] == ["noise0.2/k0.25"]
    assert "reruns" in json.loads((run_dir / "noise0.5/warmup/manifest.json").read_text())
    assert third["cells"][1]["arms"]["random"]["kept"] == sweep["cells"][1]["arms"]["random"]["kept"]

    # A changed config does not reuse a cell made with another one.
    changed = OmegaConf.merge(cfg, {"statistics": {"bootstrap": 100}})
    assert cell_fingerprint(changed, 0.25) != first["config_fingerprint"]


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
        "seeds=[0]",
        "ablations=[]",
        "include_full=false",
        "include_base=false",
        "compute.epochs=1",
        "statistics.bootstrap=100",
        'overrides.warmup=["training.max_steps=1","training.gate_stats_samples=8"]',
        'overrides.finetune=["training.batch_size=8","training.per_device_batch_size=8","training.report_to=[]"]',
        'overrides.evaluate=["eval.max_samples=8","eval.max_new_tokens=4"]',
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^\| quality_gate \| 18 \|", proc.stdout, re.M)
    assert "Did selection help?" in proc.stdout
    assert (out / "summary.json").is_file()


@pytest.mark.parametrize("truncation", ["right", "drop"])
def test_token_matching_counts_what_stage_3_trains_on(tmp_path, truncation):
    """compute.match=tokens counts the samples as Stage 3 encodes them: a record longer than
    dataset.max_sequence_length is cut (right) or not counted (drop), as build_train_dataset does."""
    from helpers import TARGET
    from transformers import AutoTokenizer

    from quality_gate.data import ensure_chat_template
    from quality_gate.experiment.runner import _mean_tokens, _target_tokenizer, finetune_plan
    from quality_gate.stages.finetune import build_train_dataset

    def row(i, answer):
        return {
            "id": f"r{i}",
            "messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": answer}],
        }

    data = tmp_path / "sel.jsonl"
    rows = [row(i, f"answer {i}") for i in range(5)] + [row(9, "three " * 200)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [
        "dataset.max_sequence_length=48",
        f"dataset.truncation={truncation}",
        "training.batch_size=2",
        "training.per_device_batch_size=2",
    ]
    exp = make_config(
        "experiment", {"compute.match": "tokens", "compute.epochs": 1, "overrides.finetune": overrides}
    )
    values = {"dataset.mode": "subset", "dataset.data_path": str(data), "training.model.name": str(TARGET)}
    ft = make_config("finetune", values, overrides)

    tokenizer = AutoTokenizer.from_pretrained(TARGET)
    ensure_chat_template(tokenizer, ft.dataset.chat_template)
    _, info = build_train_dataset(ft, tokenizer, tmp_path / "ft")
    stage3_mean = info["num_tokens"] / info["num_samples"]
    counted = _mean_tokens(ft, _target_tokenizer(ft), "arm")
    assert counted == pytest.approx(stage3_mean)
    # The long record is the one that matters: untruncated, the mean would be far larger.
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    whole = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    assert max(whole) > 48 and counted < sum(whole) / len(whole)
    assert info["num_samples"] == (5 if truncation == "drop" else 6)
    # The full pool read as Stage 3 reads it (dataset.local.datasets) counts the same samples, and the
    # plan gives the arm with the longer samples fewer steps.
    full = {
        "dataset.mode": "full",
        "dataset.local.datasets": [{"path": str(data), "dataset_name": "pool"}],
        "training.model.name": str(TARGET),
    }
    assert _mean_tokens(make_config("finetune", full, overrides), tokenizer, "full") == pytest.approx(counted)
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    plan = finetune_plan(exp, 40, {"random": {**values, "dataset.data_path": str(short)}, "long": values})
    assert plan["random"] == {"training.max_steps": 20}  # ceil(1 * 40 / 2)
    mean_short = _mean_tokens(
        make_config("finetune", {**values, "dataset.data_path": str(short)}, overrides), tokenizer, "s"
    )
    assert plan["long"] == {"training.max_steps": round(20 * mean_short / stage3_mean)}
