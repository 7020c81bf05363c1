"""Shared training helpers: batch sizes, the non-finite loss stop, FSDP/DDP kwargs, last checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from helpers import tiny_causal_lm
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from quality_gate.training import (
    FSDP_CONFIG,
    NonFiniteLossCallback,
    NonFiniteLossError,
    check_finite_loss,
    fsdp_layer_classes,
    last_checkpoint,
    process_layout_kwargs,
    validate_batch_size_configuration,
)


def tiny_qwen2():
    return tiny_causal_lm("qwen2", vocab_size=64, num_layers=2)


def test_batch_size_configuration():
    assert validate_batch_size_configuration(64, 8, 2) == 4
    with pytest.raises(ValueError, match=r"training\.batch_size=10"):
        validate_batch_size_configuration(10, 4, 1)


def test_check_finite_loss():
    check_finite_loss(torch.tensor(1.5), step=3)
    with pytest.raises(NonFiniteLossError, match=r"nan at step 7.*learning_rate"):
        check_finite_loss(torch.tensor(float("nan")), step=7)
    with pytest.raises(NonFiniteLossError, match="inf at step 2"):
        check_finite_loss(torch.tensor(float("inf")), step=2)


def test_callback_raises_on_logged_nan(tmp_path):
    callback = NonFiniteLossCallback()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    state, control = TrainerState(), TrainerControl()
    state.global_step = 5
    callback.on_log(args, state, control, logs={"loss": 2.0, "learning_rate": 1e-3})
    with pytest.raises(NonFiniteLossError, match="at step 5"):
        callback.on_log(args, state, control, logs={"loss": math.nan})


def test_trainer_stops_on_nan_loss(tmp_path):
    """A model whose weights are NaN stops at the first logged step, with the step in the message."""
    model = tiny_qwen2()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    data = Dataset.from_list([{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}] * 4)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=3,
        logging_steps=1,
        logging_nan_inf_filter=False,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[NonFiniteLossCallback()])
    with pytest.raises(NonFiniteLossError, match="step 1"):
        trainer.train()


def test_fsdp_kwargs_by_layout():
    model = tiny_qwen2()
    assert process_layout_kwargs(model, 1, "cuda", shard=True) == {}
    assert process_layout_kwargs(model, 1, "cpu", shard=True) == {}
    for shard in (True, False):  # no FSDP on CPU: DDP over gloo
        assert process_layout_kwargs(model, 2, "cpu", shard=shard) == {
            "use_cpu": True,
            "ddp_backend": "gloo",
            "ddp_find_unused_parameters": False,
        }
    # Stage 1 (gates only) on several GPUs: DDP, no sharding.
    assert "fsdp" not in process_layout_kwargs(model, 4, "cuda", shard=False)
    kwargs = process_layout_kwargs(model, 4, "cuda", shard=True)
    assert kwargs["fsdp"] is True
    assert kwargs["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["Qwen2DecoderLayer"]
    assert kwargs["fsdp_config"]["version"] == 2
    # Must be accepted by this transformers' TrainingArguments (FSDP2 plugin args built in __post_init__).
    args = TrainingArguments(output_dir="unused", report_to=[], **kwargs)
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "Qwen2DecoderLayer"
    assert args.fsdp_plugin_args["fsdp_version"] == 2


def test_fsdp_layer_classes_table_peft_and_fallback():
    assert set(FSDP_CONFIG) == {"qwen2", "qwen3", "llama", "mistral"}
    peft_model = get_peft_model(tiny_qwen2(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert fsdp_layer_classes(peft_model) == ["Qwen2DecoderLayer"]
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32))
    assert fsdp_layer_classes(gpt2) == ["GPT2Block"]  # from _no_split_modules


def test_last_checkpoint(tmp_path):
    assert last_checkpoint(tmp_path / "missing") is None
    assert last_checkpoint(tmp_path) is None
    for step in (5, 20, 100):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if step != 100:  # checkpoint-100 was interrupted while saving: no trainer_state.json
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-final").mkdir()
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-20")
