"""Gate insertion on tiny random decoders of every supported architecture (built offline)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_causal_lm
from transformers import AutoConfig, AutoModelForCausalLM

from quality_gate.errors import ConfigError
from quality_gate.gate import (
    QualityGatedMLP,
    attach_quality_gates,
    find_quality_gates,
    freeze_backbone,
    gate_state_dict,
    gates_bypassed,
    record_gates,
    remove_quality_gates,
)

ARCHS = ["qwen2", "qwen3", "llama", "mistral"]
VOCAB = 64
LAYERS = 3


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    return tiny_causal_lm(model_type, vocab_size=VOCAB, num_layers=LAYERS, seed=seed).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding on the second sample
    return ids, mask


@pytest.mark.parametrize("model_type", ARCHS)
def test_attach_names_shapes_and_recorder(model_type):
    model = tiny_model(model_type)
    wrappers = attach_quality_gates(model, init_mean=0.0, init_std=0.02)
    assert len(wrappers) == LAYERS
    assert [w.layer_idx for w in find_quality_gates(model)] == list(range(LAYERS))
    names = sorted(gate_state_dict(model))
    assert names == [f"model.layers.{i}.mlp.quality_gate.gate.weight" for i in range(LAYERS)]
    for tensor in gate_state_dict(model).values():
        assert tensor.shape == (1, 16)

    # The recorded logits are the gate applied to the FFN input, layer by layer.
    ffn_inputs = {}
    hooks = [
        w.base_layer.register_forward_hook(lambda m, args, out, i=i: ffn_inputs.__setitem__(i, args[0]))
        for i, w in enumerate(wrappers)
    ]
    ids, mask = batch()
    with record_gates(model) as rec:
        model(input_ids=ids, attention_mask=mask)
        logits = rec.logits()
    for h in hooks:
        h.remove()
    assert logits.shape == (2, LAYERS, 9) and logits.dtype == torch.float32
    for i, w in enumerate(wrappers):
        expected = ffn_inputs[i] @ w.quality_gate.gate.weight[0]  # (B, T)
        torch.testing.assert_close(logits[:, i], expected)
    assert all(w._recorder is None for w in wrappers), "record_gates must unset the recorder on exit"


@pytest.mark.parametrize("model_type", ARCHS)
def test_gate_scales_the_ffn_output(model_type):
    reference = tiny_model(model_type)
    ids, mask = batch()
    with torch.no_grad():
        plain_out = reference(input_ids=ids, attention_mask=mask).logits

        # The form scale 2 with zero weights is exactly the model as released.
        identity = copy.deepcopy(reference)
        attach_quality_gates(identity, scale=2.0)
        assert {w.scale for w in find_quality_gates(identity)} == {2.0}
        torch.testing.assert_close(identity(input_ids=ids, attention_mask=mask).logits, plain_out)

        # Other weights change the output; bypassed gates give the model as released again.
        for w in find_quality_gates(identity):
            w.quality_gate.gate.weight.normal_(0, 0.5)
        moved = identity(input_ids=ids, attention_mask=mask).logits
        assert not torch.allclose(plain_out, moved, atol=1e-4), "the gate must change the output"
        with gates_bypassed(identity):
            torch.testing.assert_close(identity(input_ids=ids, attention_mask=mask).logits, plain_out)
        torch.testing.assert_close(identity(input_ids=ids, attention_mask=mask).logits, moved)

        # method.md's form (scale 1, the default): zero weights give g = 0.5 everywhere, the same as
        # halving every FFN's down projection.
        gated = copy.deepcopy(reference)
        attach_quality_gates(gated)
        assert {w.scale for w in find_quality_gates(gated)} == {1.0}
        halved = copy.deepcopy(reference)
        for layer in halved.model.layers:
            layer.mlp.down_proj.weight.mul_(0.5)
        torch.testing.assert_close(
            gated(input_ids=ids, attention_mask=mask).logits,
            halved(input_ids=ids, attention_mask=mask).logits,
        )

        assert remove_quality_gates(gated) == LAYERS
        assert not find_quality_gates(gated)
        torch.testing.assert_close(gated(input_ids=ids, attention_mask=mask).logits, plain_out)


def test_only_the_two_gate_forms_are_accepted():
    with pytest.raises(ConfigError, match=r"quality_gate\.scale=3"):
        attach_quality_gates(tiny_model(ARCHS[0]), scale=3.0)


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lm_loss_gradient_reaches_every_gate(model_type, checkpointing):
    model = tiny_model(model_type)
    attach_quality_gates(model)
    counts = freeze_backbone(model)
    assert counts["trainable"] == LAYERS * 16 and counts["frozen"] > 0
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids, mask = batch()
    with record_gates(model) as rec:
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        logits = rec.logits()
    assert logits.requires_grad
    out.loss.backward()
    for name, param in model.named_parameters():
        if "quality_gate.gate" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, f"frozen parameter {name} received a gradient"


def test_attach_twice_is_idempotent():
    model = tiny_model("qwen3")
    first = attach_quality_gates(model)
    second = attach_quality_gates(model, init_mean=1.0)
    assert [id(w) for w in first] == [id(w) for w in second]
    assert not any(isinstance(w.base_layer, QualityGatedMLP) for w in second)


def test_gate_follows_mlp_dtype():
    model = tiny_model("qwen2").to(torch.bfloat16)
    for w in attach_quality_gates(model):
        assert w.quality_gate.gate.weight.dtype == torch.bfloat16
    ids, mask = batch()
    with torch.no_grad(), record_gates(model) as rec:
        model(input_ids=ids, attention_mask=mask)
        assert rec.logits().dtype == torch.float32


def test_unsupported_architecture_names_model_type():
    config = AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="gpt2"):
        attach_quality_gates(model)


def test_record_gates_requires_gates_and_a_forward():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="attach_quality_gates"), record_gates(model):
        pass
    attach_quality_gates(model)
    with record_gates(model) as rec, pytest.raises(RuntimeError, match="forward"):
        rec.logits()


def test_lora_on_the_gate_trains_through_the_wrapper():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("qwen3")
    attach_quality_gates(model)
    freeze_backbone(model)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["quality_gate.gate"])
    )
    lora_names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(lora_names) == 2 * LAYERS and all("quality_gate.gate.lora_" in n for n in lora_names)
    ids, mask = batch()
    with record_gates(peft_model) as rec:
        out = peft_model(input_ids=ids, attention_mask=mask, labels=ids)
        assert rec.logits().shape == (2, LAYERS, 9)
    out.loss.backward()
    # lora_B starts at zero, so its gradient is the one that must be nonzero at step 0.
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            assert param.grad.abs().sum() > 0, name
