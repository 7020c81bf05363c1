"""Selector loading, the converted directory format and Stage 1 weights, on a tiny offline Qwen3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_causal_lm
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from quality_gate.gate import find_quality_gates, gate_state_dict, record_gates
from quality_gate.io import atomic_torch_save, default_file_mode
from quality_gate.models import (
    GATE_CONFIG_FILE,
    GATE_WEIGHTS_FILE,
    apply_stage1_weights,
    is_converted_dir,
    load_selector,
    load_target,
    resolve_dtype,
    save_converted,
)

REPO = Path(__file__).resolve().parents[1]
LAYERS = 2


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on a few words; no pad token, so loading must fall back to eos."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["hello world, the quality gate scales the FFN output"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A plain (ungated) tiny Qwen3 saved with save_pretrained, like a downloaded base model."""
    out = tmp_path_factory.mktemp("base")
    tokenizer = tiny_tokenizer()
    tiny_causal_lm("qwen3", vocab_size=len(tokenizer), num_layers=LAYERS).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def gate_logits(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad(), record_gates(model) as rec:
        out = model(input_ids=ids).logits
        return out, rec.logits()


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


IDS = torch.tensor([[5, 17, 42, 8, 99, 3], [7, 7, 120, 64, 2, 11]])


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16") == torch.float16
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype("int8", "cpu")


def test_plain_base_is_converted_on_load(base_dir):
    model, tokenizer = load_selector(str(base_dir), device="cpu", gate_init_std=0.02)
    assert len(find_quality_gates(model)) == LAYERS
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert next(model.parameters()).dtype == torch.float32
    target, _ = load_target(str(base_dir), device="cpu")
    assert not find_quality_gates(target)


def test_converted_round_trip(base_dir, tmp_path):
    torch.manual_seed(3)
    model, tokenizer = load_selector(str(base_dir), device="cpu", gate_init_std=0.3)
    expected_out, expected_gates = gate_logits(model, IDS)

    out_dir = save_converted(model, tokenizer, tmp_path / "converted")
    assert is_converted_dir(out_dir) and not is_converted_dir(base_dir)
    assert find_quality_gates(model), "save_converted must leave the gates in place"
    # The base files are those of the original architecture: no wrapper or gate names inside.
    config = json.loads((out_dir / "config.json").read_text())
    assert config["model_type"] == "qwen3" and "auto_map" not in config
    base_keys = load_file(str(out_dir / "model.safetensors")).keys()
    assert not any("quality_gate" in k or "base_layer" in k for k in base_keys)
    assert sorted(load_file(str(out_dir / GATE_WEIGHTS_FILE))) == sorted(gate_state_dict(model))
    assert json.loads((out_dir / GATE_CONFIG_FILE).read_text())["num_layers"] == LAYERS
    modes = {p.name: p.stat().st_mode & 0o777 for p in out_dir.iterdir()}
    assert modes["model.safetensors"] == modes[GATE_WEIGHTS_FILE] == default_file_mode() == 0o666 & ~_umask()

    loaded, _ = load_selector(str(out_dir), device="cpu", trust_remote_code=False)
    out, gates = gate_logits(loaded, IDS)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    torch.testing.assert_close(gates, expected_gates, rtol=0, atol=0)


def test_apply_full_rank_weights(base_dir, tmp_path):
    trained, _ = load_selector(str(base_dir), device="cpu", gate_init_std=0.5)
    state = gate_state_dict(trained)
    atomic_torch_save({"model_state_dict": state, "tokenizer_name": str(base_dir)}, tmp_path / "w.pt")
    atomic_torch_save(
        {"model_state_dict": state, "tokenizer_name": str(base_dir)},
        tmp_path / "run" / "full_rank_weights.pt",
    )

    for source in (tmp_path / "w.pt", tmp_path / "run"):
        fresh, _ = load_selector(str(base_dir), device="cpu")
        info = apply_stage1_weights(fresh, str(source))
        assert info["kind"] == "full_rank" and len(info["sha256"]) == 64
        assert info["num_gate_tensors"] == LAYERS
        for name, value in gate_state_dict(fresh).items():
            torch.testing.assert_close(value, state[name])

    bad = {"model_state_dict": {k.replace("layers.1", "layers.7"): v for k, v in state.items()}}
    atomic_torch_save(bad, tmp_path / "bad.pt")
    fresh, _ = load_selector(str(base_dir), device="cpu")
    with pytest.raises(ValueError, match=r"layers\.7"):
        apply_stage1_weights(fresh, str(tmp_path / "bad.pt"))
    with pytest.raises(FileNotFoundError, match="model_checkpoint_path"):
        apply_stage1_weights(fresh, str(tmp_path / "missing"))


def test_apply_lora_checkpoint_merges_into_the_gate(base_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, _ = load_selector(str(base_dir), device="cpu")
    before = gate_state_dict(model)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["quality_gate.gate"])
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # lora_B starts at zero: make the adapter non-trivial
    _, expected_gates = gate_logits(peft_model, IDS)
    peft_model.save_pretrained(tmp_path / "checkpoint-final")

    fresh, _ = load_selector(str(base_dir), device="cpu")
    for name, value in before.items():  # gate init is random: start from the adapter's base gates
        dict(fresh.named_parameters())[name].data.copy_(value)
    info = apply_stage1_weights(fresh, str(tmp_path))
    assert info["kind"] == "lora" and info["path"].endswith("checkpoint-final")
    assert not any("lora" in n for n, _ in fresh.named_parameters())
    _, gates = gate_logits(fresh, IDS)
    torch.testing.assert_close(gates, expected_gates, rtol=1e-5, atol=1e-5)


def test_convert_script(base_dir, tmp_path):
    out = tmp_path / "converted"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "convert_qwen_to_quality_gate.py"),
            "--model",
            str(base_dir),
            "--save-path",
            str(out),
            "--init-std",
            "0.1",
        ],
        capture_output=True,
        text=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert GATE_WEIGHTS_FILE in result.stdout + result.stderr
    assert json.loads((out / GATE_CONFIG_FILE).read_text())["init_std"] == 0.1
    model, _ = load_selector(str(out), device="cpu")
    assert len(find_quality_gates(model)) == LAYERS


def test_atomic_torch_save_gives_the_same_bytes_for_the_same_object(tmp_path):
    """The sha256 of Stage 1 weights fingerprints Stage 2: rewriting the same weights must not change it
    (``torch.save`` to a path would name the zip's inner folder after the random temporary file)."""
    import hashlib

    obj = {"model_state_dict": {"layers.0.weight": torch.arange(6.0).reshape(2, 3)}, "tokenizer_name": "t"}
    digests = set()
    for name in ("a.pt", "b.pt", "a.pt"):
        atomic_torch_save(obj, tmp_path / name)
        digests.add(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert len(digests) == 1
    loaded = torch.load(tmp_path / "a.pt", weights_only=True)["model_state_dict"]
    assert torch.equal(loaded["layers.0.weight"], obj["model_state_dict"]["layers.0.weight"])
