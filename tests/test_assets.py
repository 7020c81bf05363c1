"""The committed assets: synthetic data files and the two tiny models (offline load, template, NLL)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from quality_gate.eval_metrics import evaluate_exact_match, exact_match
from quality_gate.synthetic import CORRUPTIONS, make_records

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "assets" / "data"
SELECTOR = ROOT / "assets" / "models" / "tiny-qwen3-selector"
TARGET = ROOT / "assets" / "models" / "tiny-qwen2-target"
SYSTEM = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
)
CHAT = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def train_records() -> list[dict]:
    return read_jsonl(DATA / "synthetic_train.jsonl")


@pytest.fixture(scope="module")
def eval_records() -> list[dict]:
    return read_jsonl(DATA / "synthetic_eval.jsonl")


@pytest.fixture(scope="module")
def selector():
    return AutoModelForCausalLM.from_pretrained(SELECTOR).eval(), AutoTokenizer.from_pretrained(SELECTOR)


def test_data_files_match_the_generator(train_records, eval_records):
    assert train_records == make_records(2000, 0.3, seed=0)
    counts = Counter(r["meta"]["corruption"] for r in train_records)
    assert counts["none"] == 1400 and all(counts[k] == 75 for k in CORRUPTIONS)  # 600 corrupted, 8 families
    assert len(eval_records) == 200
    assert [r["id"] for r in eval_records] == [f"synthetic_eval_{n}" for n in range(200)]
    assert all(r["dataset"] == "synthetic_eval" and r["meta"]["corruption"] == "none" for r in eval_records)
    checkable = [r for r in eval_records if not r["meta"]["open"]]
    assert len(checkable) == 140  # 7 of the 10 task families have one correct answer
    assert all(exact_match(r["messages"][1]["content"], r["meta"]["answer"]) for r in checkable)
    train_prompts = {r["messages"][0]["content"] for r in train_records}
    assert not train_prompts & {r["messages"][0]["content"] for r in eval_records}


@pytest.mark.parametrize("path", [SELECTOR, TARGET], ids=["selector", "target"])
def test_model_dir_is_small_and_self_contained(path):
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 5 * 2**20, f"{path.name} is {size / 2**20:.1f} MB"
    assert (path / "model.safetensors").is_file()
    config = json.loads((path / "config.json").read_text())
    assert "auto_map" not in config  # loads without trust_remote_code


@pytest.mark.parametrize(
    ("path", "arch", "full", "prompt"),
    [
        (
            SELECTOR,
            "Qwen3ForCausalLM",
            "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\n5<|im_end|>\n",
            "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n",
        ),
        (
            TARGET,
            "Qwen2ForCausalLM",
            SYSTEM + "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n",
            SYSTEM + "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n",
        ),
    ],
    ids=["selector", "target"],
)
def test_offline_load_template_and_forward(monkeypatch, path, arch, full, prompt):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == arch
    assert "{% generation %}" not in tokenizer.chat_template
    assert tokenizer.apply_chat_template(CHAT, tokenize=False) == full
    assert tokenizer.apply_chat_template(CHAT[:1], add_generation_prompt=True, tokenize=False) == prompt

    ids = tokenizer.convert_tokens_to_ids
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert tokenizer(special, add_special_tokens=False)["input_ids"] == [ids(special)]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert model.generation_config.eos_token_id == ids("<|im_end|>")
    assert model.generation_config.pad_token_id == ids("<|endoftext|>")
    assert tokenizer.decode(tokenizer(full)["input_ids"]) == full

    batch = tokenizer([full, prompt], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits  # (B, T, V)
    assert logits.shape == (2, batch["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def reply_nll(model, tokenizer, record: dict) -> float:
    """Mean NLL of the tokens after the generation prompt (reply, think block and <|im_end|>)."""
    prompt = tokenizer.apply_chat_template(record["messages"][:1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(record["messages"], tokenize=False).rstrip("\n")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]  # (R, V)
    return F.cross_entropy(logits, ids[0, len(prompt_ids) :]).item()


def test_selector_nll_separates_clean_from_corrupted(selector, train_records):
    model, tokenizer = selector
    clean = [r for r in train_records if r["meta"]["corruption"] == "none"][:50]
    corrupted = [r for r in train_records if r["meta"]["corruption"] != "none"][:50]
    clean_nll = sum(reply_nll(model, tokenizer, r) for r in clean) / len(clean)
    corrupted_nll = sum(reply_nll(model, tokenizer, r) for r in corrupted) / len(corrupted)
    assert corrupted_nll > clean_nll + 1.0, (clean_nll, corrupted_nll)


def test_selector_solves_held_out_tasks(selector, eval_records):
    # The selector was pretrained on clean task data: greedy generation through the chat template
    # (think block stripped) must recover many held-out answers; a broken template or decode would not.
    model, tokenizer = selector
    assert evaluate_exact_match(model, tokenizer, eval_records[:40], batch_size=20) >= 0.3
