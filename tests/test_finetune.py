"""Stage 3 fine-tune on the tiny target: LoRA end to end, resume, finished runs, full mode, torchrun."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import ENV, REPO, SELECTOR, TARGET, TORCHRUN_TWO, TRAIN, compose
from peft import PeftModel
from safetensors.torch import load_file

from quality_gate.errors import ConfigError
from quality_gate.io import default_file_mode
from quality_gate.models import load_target
from quality_gate.stages.evaluate import heldout_loss
from quality_gate.stages.finetune import check_resume_config, fine_tune, whole_run_loss
from quality_gate.stages.finetune import run as finetune_run

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_assets = pytest.mark.skipif(
    not (TARGET.exists() and TRAIN.exists()), reason="tiny assets missing: run `make assets`"
)
pytestmark = needs_assets

# Small but real: LoRA r=8 (the seed's r=128 is for billion-parameter targets), constant LR so that the
# loss curve of a resumed run can be compared step by step.
FAST = [
    f"training.model.name={TARGET}",
    "training.lora.r=8",
    "training.lora.alpha=16",
    "training.learning_rate=2e-3",
    "training.lr_scheduler_type=constant",
    "training.batch_size=8",
    "training.per_device_batch_size=4",
    "training.logging_steps=1",
    "training.report_to=[]",
    "dataset.max_sequence_length=128",
]


def compose_cfg(overrides: list[str]):
    return compose("finetune", overrides)


def selected_file(path: Path, n: int = 32) -> Path:
    """The first ``n`` clean records of the synthetic training set, as Stage 2 would write them."""
    rows = []
    with TRAIN.open() as f:
        for line in f:
            row = json.loads(line)
            if row["meta"].get("corruption", "none") == "none":
                rows.append(row)
            if len(rows) == n:
                break
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def curve(run_dir: Path) -> dict[int, float]:
    metrics = json.loads((run_dir / "train_metrics.json").read_text())
    return {point["step"]: point["loss"] for point in metrics["loss"]["curve"]}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One uninterrupted LoRA run: 6 steps, checkpoints at 3 and 6; keeps the trained model."""
    root = tmp_path_factory.mktemp("ft")
    data = selected_file(root / "selected_data.jsonl")
    run_dir = root / "run"
    cfg = compose_cfg(
        [
            *FAST,
            f"dataset.data_path={data}",
            f"output_dir={run_dir}",
            "training.max_steps=6",
            "training.save_steps=3",
        ]
    )
    trainer = fine_tune(cfg)
    return cfg, run_dir, trainer


def test_lora_trains_only_adapter_and_loss_falls(lora_run):
    _cfg, run_dir, trainer = lora_run
    model = trainer.model.eval()
    fresh, _ = load_target(str(TARGET), dtype="float32", device="cpu")
    fresh_state = fresh.state_dict()
    trained = {name: p.detach() for name, p in model.named_parameters()}
    lora = {n: p for n, p in trained.items() if "lora_" in n}
    assert lora and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    # Every base weight is bit-identical to the checkpoint; every lora_B moved away from its zero init.
    for name, value in trained.items():
        if "lora_" in name:
            continue
        base_name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(value, fresh_state[base_name]), name
    assert all(p.abs().max() > 0 for n, p in lora.items() if "lora_B" in n)

    # Step losses are noisy (batches differ); the loss on the whole training set must fall.
    collator = trainer.data_collator
    after = heldout_loss(model, trainer.train_dataset, collator, batch_size=8)["loss"]
    with model.disable_adapter():
        before = heldout_loss(model, trainer.train_dataset, collator, batch_size=8)["loss"]
    assert after < before - 0.05

    metrics = json.loads((run_dir / "train_metrics.json").read_text())
    assert metrics["global_step"] == 6 and metrics["peft_mode"] == "lora"
    assert metrics["loss"]["first"] > 0 and len(metrics["loss"]["curve"]) == 6
    assert metrics["num_samples"] == 32 and metrics["num_target_tokens"] < metrics["num_tokens"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["dataset_source"]["sha256"] and manifest["dataset_source"]["mode"] == "subset"
    for ckpt in ("checkpoint-3", "checkpoint-6", "checkpoint-final"):
        assert (run_dir / ckpt / "adapter_config.json").is_file()
        assert (run_dir / ckpt / "adapter_model.safetensors").is_file()
    assert (run_dir / "checkpoint-3" / "optimizer.pt").is_file()
    assert (run_dir / "checkpoint-final" / "tokenizer_config.json").is_file()


def test_final_checkpoint_reproduces_trained_logits(lora_run):
    _cfg, run_dir, trainer = lora_run
    base, _ = load_target(str(TARGET), dtype="float32", device="cpu")
    reloaded = PeftModel.from_pretrained(base, str(run_dir / "checkpoint-final")).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    saved = load_file(str(run_dir / "checkpoint-final" / "adapter_model.safetensors"))
    assert saved and all("lora_" in key for key in saved)


def killed_after_step_3(run_dir: Path, dst: Path) -> Path:
    """What a process killed between the saves at step 3 and step 6 leaves behind."""
    shutil.copytree(run_dir, dst)
    for name in ("checkpoint-6", "checkpoint-final", "train_metrics.json"):
        target = dst / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return dst


def test_resume_continues_the_same_loss_curve(lora_run, tmp_path, caplog):
    """A run killed after checkpoint-3 resumes there and logs the same losses as the uninterrupted run;
    its train_loss is the mean over all 6 steps, as the uninterrupted run's (issue 11.7)."""
    cfg, run_dir, _ = lora_run
    interrupted = killed_after_step_3(run_dir, tmp_path / "run")
    resumed_cfg = compose_cfg(
        [
            *FAST,
            f"dataset.data_path={cfg.dataset.data_path}",
            f"output_dir={interrupted}",
            "training.max_steps=6",
        ]
    )
    with caplog.at_level(logging.WARNING, logger="quality_gate.stages.finetune"):
        trainer = fine_tune(resumed_cfg)
    assert "training.save_steps: 3 -> 50" in caplog.text  # the rerun left save_steps at its default
    assert trainer.state.global_step == 6
    metrics = json.loads((interrupted / "train_metrics.json").read_text())
    assert metrics["resumed_from"] == str(interrupted / "checkpoint-3")
    full, resumed = curve(run_dir), curve(interrupted)
    assert sorted(resumed) == sorted(full) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], rel=1e-4), step
    uninterrupted = json.loads((run_dir / "train_metrics.json").read_text())["train_loss"]
    assert uninterrupted == pytest.approx(sum(full.values()) / 6, abs=1e-6)
    assert metrics["train_loss"] == pytest.approx(uninterrupted, abs=1e-6)
    assert metrics["train_loss_since_resume"] == pytest.approx(
        sum(resumed[s] for s in (4, 5, 6)) / 3, abs=1e-6
    )


def test_whole_run_loss_weights_each_logged_window_by_its_steps():
    # logging_steps=2 with logging_first_step: logs at 1, 2, 4; the checkpoint at step 5 logged too.
    history = [
        {"step": 1, "loss": 4.0},
        {"step": 2, "loss": 3.0},
        {"step": 4, "loss": 2.5},
        {"step": 5, "loss": 2.0},
    ]
    history += [{"step": 7, "loss": 1.0}, {"step": 7, "train_loss": 1.0}]  # after the resume
    expected = (4.0 + 3.0 + 2 * 2.5 + 2.0 + 2 * 1.0) / 7
    assert whole_run_loss(history, 1.0, start_step=5, end_step=7) == pytest.approx(expected, abs=1e-12)
    assert whole_run_loss(history, 1.25, start_step=0, end_step=7) == 1.25  # not resumed: the Trainer's mean


def test_checkpoints_and_final_adapter_have_normal_file_modes(lora_run):
    """Issue 11.10: safetensors writes 0600; every saved file gets what a plain open() gives (0644)."""
    _cfg, run_dir, _ = lora_run
    for ckpt in ("checkpoint-3", "checkpoint-6", "checkpoint-final"):
        files = [p for p in (run_dir / ckpt).rglob("*") if p.is_file()]
        assert any(p.suffix == ".safetensors" for p in files), ckpt
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in files}
        assert set(modes.values()) == {oct(default_file_mode())}, (ckpt, modes)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.lora.r=4", "training.lora.r: 8 -> 4"),
        ("training.lora.target_modules=[q_proj,v_proj]", "training.lora.target_modules: ["),
        ("training.peft_mode=full", "training.peft_mode: 'lora' -> 'full'"),
        (f"training.model.name={SELECTOR}", f"training.model.name: '{TARGET}' -> '{SELECTOR}'"),
    ],
)
def test_resume_with_an_incompatible_change_is_refused_before_loading(
    lora_run, tmp_path, monkeypatch, override, message
):
    """Issue 11.8b: a resume that the checkpoint cannot be loaded into (another LoRA shape, model or mode)
    is a ConfigError naming the key, old -> new, before any model is loaded or anything written."""
    cfg, run_dir, _ = lora_run
    interrupted = killed_after_step_3(run_dir, tmp_path / "run")
    before = sorted(p.name for p in interrupted.iterdir()), (interrupted / "manifest.json").read_bytes()

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded although the resume must be refused first")

    monkeypatch.setattr("quality_gate.stages.finetune.load_target", no_load)
    overrides = [*FAST, f"dataset.data_path={cfg.dataset.data_path}", f"output_dir={interrupted}"]
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        fine_tune(compose_cfg([*overrides, "training.max_steps=6", override]))
    assert "checkpoint-3" in str(err.value) and "new run" in str(err.value)
    assert (
        sorted(p.name for p in interrupted.iterdir()),
        (interrupted / "manifest.json").read_bytes(),
    ) == before


def test_resume_accepts_the_same_settings_written_another_way(lora_run, tmp_path, monkeypatch, caplog):
    """The same model dir by a relative path, the LoRA modules in another order: not a change."""
    cfg, run_dir, _ = lora_run
    interrupted = killed_after_step_3(run_dir, tmp_path / "run")
    monkeypatch.chdir(TARGET.parent)
    modules = ",".join(reversed(cfg.training.lora.target_modules))
    overrides = [o for o in FAST if not o.startswith("training.model.name=")]
    same = compose_cfg(
        [
            *overrides,
            f"training.model.name=./{TARGET.name}",
            f"training.lora.target_modules=[{modules}]",
            f"dataset.data_path={cfg.dataset.data_path}",
            f"output_dir={interrupted}",
            "training.max_steps=6",
            "training.save_steps=3",
        ]
    )
    with caplog.at_level(logging.WARNING, logger="quality_gate.stages.finetune"):
        check_resume_config(same, interrupted, str(interrupted / "checkpoint-3"))
    assert "differ" not in caplog.text


def test_finished_run_is_reported_not_retrained(lora_run, caplog):
    cfg, run_dir, _ = lora_run
    final = run_dir / "checkpoint-final" / "adapter_model.safetensors"
    before = (final.stat().st_mtime_ns, (run_dir / "train_metrics.json").read_text())
    with caplog.at_level(logging.INFO, logger="quality_gate.stages.finetune"):
        assert fine_tune(cfg) is None
    assert "already finished" in caplog.text and "new run" in caplog.text
    assert (final.stat().st_mtime_ns, (run_dir / "train_metrics.json").read_text()) == before


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data absent")
def test_full_mode_sharegpt_and_alpaca_full_finetune(tmp_path):
    """dataset.mode=full from local ShareGPT + Alpaca files, every parameter trained."""
    run_dir = tmp_path / "run"
    cfg = compose_cfg(
        [
            *FAST,
            "dataset.mode=full",
            "dataset.subset_ratio=0.01",
            "training.peft_mode=full",
            "training.learning_rate=1e-4",
            "training.max_steps=2",
            "training.save_steps=100",
            "dataset.local.datasets=["
            f"{{path: {SHARED / 'sharegpt_dummy_conversation.json'}, dataset_name: sharegpt}},"
            f"{{path: {SHARED / 'alpaca_cherry_5pct.json'}, dataset_name: alpaca}}]",
            f"output_dir={run_dir}",
        ]
    )
    finetune_run(cfg)
    metrics = json.loads((run_dir / "train_metrics.json").read_text())
    assert metrics["source"]["mode"] == "full" and metrics["num_samples"] >= 30
    assert metrics["global_step"] == 2 and metrics["peft_mode"] == "full"
    assert (run_dir / "checkpoint-final" / "model.safetensors").is_file()
    assert not (run_dir / "checkpoint-final" / "adapter_config.json").exists()
    base, _ = load_target(str(TARGET), dtype="float32", device="cpu")
    tuned, _ = load_target(str(run_dir / "checkpoint-final"), dtype="float32", device="cpu")
    changed = [
        n
        for (n, a), (_, b) in zip(base.named_parameters(), tuned.named_parameters(), strict=True)
        if not torch.equal(a, b)
    ]
    assert changed  # full fine-tuning moved the base weights


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_two_processes_cpu(tmp_path):
    """The seed's command under torchrun: DDP with gloo on CPU, one final adapter; with transformers'
    loss and with the chunked one (training.lm_loss_chunk_tokens), the same losses."""
    data = selected_file(tmp_path / "selected_data.jsonl", n=16)
    losses = []
    for chunk in (0, 7):
        run_dir = tmp_path / f"run{chunk}"
        cmd = [
            *TORCHRUN_TWO,
            str(REPO / "src" / "main.py"),
            "--config-name",
            "stage_3_finetune",
            *FAST,
            f"dataset.data_path={data}",
            f"output_dir={run_dir}",
            "training.max_steps=2",
            "training.save_steps=100",
            f"training.lm_loss_chunk_tokens={chunk}",
        ]
        proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-4000:]
        metrics = json.loads((run_dir / "train_metrics.json").read_text())
        assert metrics["world_size"] == 2 and metrics["distributed"] == "ddp"
        assert metrics["global_step"] == 2
        assert (run_dir / "checkpoint-final" / "adapter_model.safetensors").is_file()
        assert not list(run_dir.glob(".checkpoint-final*"))  # neither rank's temporary dir is left
        losses.append([curve(run_dir)[s] for s in (1, 2)])
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_chunked_lm_loss_trains_like_transformers_loss(tmp_path, mode):
    """training.lm_loss_chunk_tokens: 3 steps with gradient accumulation (8 = 4 x 2: the Trainer's
    num_items_in_batch path) give the same loss curve and weights as transformers' loss on full logits."""
    data = selected_file(tmp_path / "selected_data.jsonl", n=24)
    runs = {}
    for chunk in (0, 7):
        run_dir = tmp_path / f"chunk{chunk}"
        cfg = compose_cfg(
            [
                *FAST,
                f"training.peft_mode={mode}",
                *(["training.learning_rate=1e-4"] if mode == "full" else []),
                f"dataset.data_path={data}",
                f"output_dir={run_dir}",
                "training.max_steps=3",
                "training.save_steps=100",
                f"training.lm_loss_chunk_tokens={chunk}",
            ]
        )
        trainer = fine_tune(cfg)
        trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        runs[chunk] = (curve(run_dir), trained)
    (full_curve, full_weights), (chunked_curve, chunked_weights) = runs[0], runs[7]
    assert sorted(full_curve) == [1, 2, 3]
    assert [chunked_curve[s] for s in (1, 2, 3)] == pytest.approx(
        [full_curve[s] for s in (1, 2, 3)], rel=1e-4
    )
    assert full_weights.keys() == chunked_weights.keys() and full_weights
    for name, weight in full_weights.items():
        torch.testing.assert_close(chunked_weights[name], weight, rtol=1e-3, atol=1e-5, msg=name)
