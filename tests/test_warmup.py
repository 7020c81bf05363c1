"""Stage 1 warmup: one Trainer step (trl-style), the stage end to end, LoRA mode, torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import ENV, REPO, SELECTOR, TORCHRUN_TWO, tiny_causal_lm
from helpers import TRAIN as DATA
from peft import get_peft_model
from transformers import TrainingArguments

from quality_gate.config import make_config
from quality_gate.errors import NonFiniteLossError
from quality_gate.gate import (
    attach_quality_gates,
    find_quality_gates,
    freeze_backbone,
    gate_state_dict,
    record_gates,
)
from quality_gate.io import default_file_mode
from quality_gate.models import apply_stage1_weights, load_selector
from quality_gate.nll import chunked_causal_lm_loss, final_hidden_states
from quality_gate.stages.warmup import QualityGateTrainer, get_peft_config
from quality_gate.training import NonFiniteLossCallback

needs_assets = pytest.mark.skipif(
    not (SELECTOR.exists() and DATA.exists()), reason="tiny assets missing: run `make assets`"
)
VOCAB = 97
PAD = 0


def tiny_dataset(n: int = 8) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        length = int(torch.randint(5, 14, (1,), generator=gen))
        ids = torch.randint(1, VOCAB, (length,), generator=gen).tolist()
        prompt = length // 2
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "id": f"s{i}"})
    return Dataset.from_list(rows)


def pad_collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Right padding: ``input_ids`` with PAD, ``labels`` with -100, ``attention_mask`` 0 on padding."""
    width = max(len(r["input_ids"]) for r in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), PAD),
        "labels": torch.full((len(rows), width), -100),
        "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
    }
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(row["input_ids"])
        batch["labels"][i, :n] = torch.tensor(row["labels"])
        batch["attention_mask"][i, :n] = 1
    return batch


def tiny_trainer(
    model,
    tmp_path: Path,
    max_steps: int = 1,
    quality_loss_weight: float = 1.0,
    callbacks=None,
    lm_loss_chunk_tokens: int = 0,
) -> QualityGateTrainer:
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=max_steps,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
        optim="adamw_torch",
    )
    return QualityGateTrainer(
        model=model,
        args=args,
        train_dataset=tiny_dataset(),
        data_collator=pad_collate,
        callbacks=callbacks,
        quality_loss_weight=quality_loss_weight,
        quality_loss_mode="sample",
        lm_loss_chunk_tokens=lm_loss_chunk_tokens,
    )


def tiny_gated_model() -> torch.nn.Module:
    model = tiny_causal_lm("qwen3", vocab_size=VOCAB, num_layers=3)
    attach_quality_gates(model)
    freeze_backbone(model)
    return model


def test_one_step_changes_every_gate_and_no_backbone_parameter(tmp_path):
    model = tiny_gated_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = tiny_trainer(model, tmp_path, quality_loss_weight=0.25)
    trainer.train()
    for name, param in model.named_parameters():
        if "quality_gate.gate" in name:
            assert not torch.equal(param, before[name]), f"gate {name} did not change"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"
    logged = next(e for e in trainer.state.log_history if "lm_loss" in e)
    # The logged loss is LM loss + weight x quality loss, with the configured weight.
    assert logged["loss"] == pytest.approx(logged["lm_loss"] + 0.25 * logged["quality_loss"], rel=1e-4)
    assert 0 < logged["gate_mean"] < 2  # the applied gate 2 * sigmoid(w . x), 1 at init


def test_chunked_lm_loss_equals_transformers_loss_and_its_gate_gradients():
    """training.lm_loss_chunk_tokens: the same loss and gate gradients as transformers' loss on full
    logits, computed a few positions at a time (5 here: several chunks, a partial last one)."""
    model = tiny_gated_model()
    batch = pad_collate([tiny_dataset()[i] for i in range(4)])
    gates = [p for n, p in model.named_parameters() if p.requires_grad]
    full = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss
    full_grads = torch.autograd.grad(full, gates)
    with final_hidden_states(model) as captured:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1)
    assert out.logits.shape[1] == 1  # the model's own head ran on one position only
    chunked = chunked_causal_lm_loss(captured.hidden, model.get_output_embeddings(), batch["labels"], 5)
    chunked_grads = torch.autograd.grad(chunked, gates)
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)
    for a, b in zip(full_grads, chunked_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    nothing = torch.full_like(batch["labels"], -100)
    assert torch.isnan(chunked_causal_lm_loss(captured.hidden, model.get_output_embeddings(), nothing, 5))


def test_training_with_the_chunked_lm_loss_follows_the_full_one(tmp_path):
    """Three Trainer steps with each LM-loss path from the same start: the same gates and logged loss."""
    models = {}
    for chunk in (0, 3):
        models[chunk] = model = tiny_gated_model()
        trainer = tiny_trainer(model, tmp_path / str(chunk), max_steps=3, lm_loss_chunk_tokens=chunk)
        trainer.train()
        models[chunk] = (
            gate_state_dict(model),
            [e["lm_loss"] for e in trainer.state.log_history if "lm_loss" in e],
        )
    (full_gates, full_log), (chunked_gates, chunked_log) = models[0], models[3]
    for key in full_gates:
        torch.testing.assert_close(chunked_gates[key], full_gates[key], rtol=1e-4, atol=1e-6)
    assert chunked_log == pytest.approx(full_log, rel=1e-5)


def test_quality_loss_weight_moves_the_gates(tmp_path):
    """The weight is applied: with a large weight the same steps close the gates further than the LM
    loss alone does (mean gate value on held-out token ids)."""
    probe = torch.randint(1, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))
    means = {}
    for weight in (0.0, 50.0):
        model = tiny_gated_model()
        tiny_trainer(model, tmp_path / str(weight), max_steps=4, quality_loss_weight=weight).train()
        with torch.no_grad(), record_gates(model) as rec:
            model(input_ids=probe)
            means[weight] = rec.probs().mean().item()
    assert means[50.0] < means[0.0]


def test_one_lora_step_changes_only_the_adapter(tmp_path):
    cfg = make_config("warmup")
    model = get_peft_model(tiny_gated_model(), get_peft_config(cfg))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # Two steps: lora_B starts at zero, so lora_A only receives a gradient from the second step on.
    tiny_trainer(model, tmp_path, max_steps=2).train()
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        is_lora = "quality_gate.gate.lora_" in name
        assert changed == is_lora, f"{name}: changed={changed}"


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    model = tiny_gated_model()
    with torch.no_grad():
        find_quality_gates(model)[1].quality_gate.gate.weight[0, 0] = float("nan")
    trainer = tiny_trainer(model, tmp_path, callbacks=[NonFiniteLossCallback()])
    with pytest.raises(NonFiniteLossError, match=r"training\.learning_rate"):
        trainer.train()


def test_invalid_quality_loss_mode_names_the_key():
    from quality_gate.config import make_config
    from quality_gate.errors import ConfigError

    with pytest.raises(ConfigError, match=r"training\.quality_loss_mode='batch'.*\['sample', 'token'\]"):
        make_config("warmup", {"training.quality_loss_mode": "batch"})


def warmup(out_dir: Path, *overrides: str, launcher: list[str] | None = None) -> dict:
    cmd = [*(launcher or [sys.executable]), "src/main.py", "--config-name", "stage_1_warmup", *overrides]
    cmd += [f"output_dir={out_dir}", f"hydra.run.dir={out_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out_dir / "warmup_metrics.json").read_text())


@needs_assets
@pytest.mark.slow
def test_stage1_full_rank_end_to_end(tmp_path):
    metrics = warmup(tmp_path, "dataset.subset_ratio=0.05", "training.epochs=1")
    payload = torch.load(tmp_path / "full_rank_weights.pt", map_location="cpu", weights_only=True)
    assert payload["tokenizer_name"] == str(SELECTOR)
    model, _ = load_selector(str(SELECTOR), device="cpu")
    expected = gate_state_dict(model)
    assert sorted(payload["model_state_dict"]) == sorted(expected)
    for name, tensor in payload["model_state_dict"].items():
        assert tensor.shape == expected[name].shape
    assert not torch.equal(
        torch.cat(list(payload["model_state_dict"].values())), torch.cat(list(expected.values()))
    )
    info = apply_stage1_weights(model, str(tmp_path))
    assert info["kind"] == "full_rank"

    layers = len(find_quality_gates(model))
    assert metrics["num_train_samples"] == 100
    assert len(metrics["gates_after"]["mean_per_layer"]) == layers
    assert metrics["gates_after"]["mean"] < metrics["gates_before"]["mean"], (
        "the quality loss must close gates"
    )
    assert metrics["history"] and {"lm_loss", "quality_loss", "gate_mean"} <= set(metrics["history"][-1])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["stage"] == "warmup" and manifest["stage1_weights"].endswith("full_rank_weights.pt")
    # The default gate (scale 1, weights 0) is method.md's: 0.5 everywhere at init, not the model as
    # released (on the random tiny model the loss need not be higher).
    loss = metrics["lm_loss"]
    assert payload["gate_scale"] == 1.0 and metrics["gate_scale"] == 1.0
    assert abs(loss["at_init"] - loss["released"]) > 1e-3
    assert loss["after_warmup"] != loss["at_init"]
    assert loss["cost_after_warmup"] == pytest.approx(loss["after_warmup"] - loss["released"], abs=1e-5)


@needs_assets
@pytest.mark.slow
def test_stage1_with_the_identity_gate_records_its_form(tmp_path):
    """quality_gate.scale=2 starts as the identity: the LM loss at init is the model's own; Stage 2
    rebuilds the gates with scale 2 from the weights even when its own config says 1 (the default)."""
    metrics = warmup(
        tmp_path,
        "quality_gate.scale=2",
        "dataset.subset_ratio=0.02",
        "training.max_steps=1",
    )
    loss = metrics["lm_loss"]
    assert loss["at_init"] == pytest.approx(loss["released"], abs=1e-6)
    model, _ = load_selector(str(SELECTOR), device="cpu")  # the default form, scale 1
    assert {w.scale for w in find_quality_gates(model)} == {1.0}
    info = apply_stage1_weights(model, str(tmp_path))
    assert info["gate_scale"] == 2.0 and {w.scale for w in find_quality_gates(model)} == {2.0}


@needs_assets
@pytest.mark.slow
def test_stage1_lora_writes_an_adapter_that_merges(tmp_path):
    warmup(tmp_path, "training.peft_mode=lora", "dataset.subset_ratio=0.02", "training.max_steps=2")
    adapter = json.loads((tmp_path / "checkpoint-final" / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and adapter["lora_alpha"] == 64
    model, _ = load_selector(str(SELECTOR), device="cpu")
    before = gate_state_dict(model)
    info = apply_stage1_weights(model, str(tmp_path))
    assert info["kind"] == "lora"
    after = gate_state_dict(model)
    assert sorted(after) == sorted(before)
    assert any(not torch.equal(after[k], before[k]) for k in after), "merging must change the gate weights"
    # The adapter dir carries the gates it was trained on: a load under another seed (other random
    # gates before the merge) ends with the same merged gates.
    assert (tmp_path / "checkpoint-final" / "quality_gate_base.safetensors").is_file()
    torch.manual_seed(12345)
    other, _ = load_selector(str(SELECTOR), device="cpu", gate_init_std=0.02)  # other, random gates
    assert any(not torch.equal(v, before[k]) for k, v in gate_state_dict(other).items())
    apply_stage1_weights(other, str(tmp_path / "checkpoint-final"))
    for k, v in gate_state_dict(other).items():
        torch.testing.assert_close(v, after[k])
    # Issue 11.10: the adapter's files have the mode a plain open() gives (safetensors writes 0600).
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "checkpoint-final").iterdir()}
    assert "adapter_model.safetensors" in modes and set(modes.values()) == {default_file_mode()}, modes


@needs_assets
@pytest.mark.slow
@pytest.mark.dist
def test_stage1_torchrun_two_processes(tmp_path):
    """Two DDP processes, with transformers' LM loss and with the chunked one: the same gates."""
    launcher = TORCHRUN_TWO
    states = []
    for chunk in (0, 64):
        out = tmp_path / f"chunk{chunk}"
        metrics = warmup(
            out,
            "dataset.subset_ratio=0.02",
            "training.batch_size=8",
            "training.per_device_batch_size=4",
            "training.max_steps=2",
            f"training.lm_loss_chunk_tokens={chunk}",
            launcher=launcher,
        )
        assert metrics["world_size"] == 2 and metrics["global_step"] == 2
        payload = torch.load(out / "full_rank_weights.pt", map_location="cpu", weights_only=True)
        assert all("quality_gate.gate" in k for k in payload["model_state_dict"])
        states.append(payload["model_state_dict"])
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=1e-4, atol=1e-6)


def test_lm_loss_report_warns_past_the_margin():
    from quality_gate.stages.warmup import lm_loss_report

    ok = lm_loss_report(released=2.10, at_init=2.10, after=2.15, margin=0.1)
    assert ok["warning"] is None and ok["cost_after_warmup"] == pytest.approx(0.05)
    bad = lm_loss_report(released=2.10, at_init=5.50, after=5.20, margin=0.1)
    assert "3.100 nats" in bad["warning"] and "training.lm_loss_margin=0.1" in bad["warning"]
