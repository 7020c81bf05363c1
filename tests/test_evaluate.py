"""Stage 4 evaluate on the tiny target: held-out loss, exact match, adapter checks, lm-eval local task."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import EVAL, TARGET, compose
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Qwen2Config

from quality_gate.data import SFTDataCollator
from quality_gate.errors import AdapterError
from quality_gate.models import load_target
from quality_gate.stages.evaluate import (
    checkable_answer,
    heldout_loss,
    is_correct,
)
from quality_gate.stages.evaluate import run as evaluate_run

needs_assets = pytest.mark.skipif(
    not (TARGET.exists() and EVAL.exists()), reason="tiny assets missing: run `make assets`"
)
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def compose_cfg(run_dir: Path, overrides: list[str]):
    return compose(
        "evaluate",
        [
            f"model.name={TARGET}",
            f"eval.data_path={EVAL}",
            "eval.max_samples=16",
            "eval.max_new_tokens=8",
            f"output_dir={run_dir}",
            *overrides,
        ],
    )


def save_adapter(path: Path, *, zero: bool, base: Path = TARGET) -> Path:
    """A LoRA adapter on ``base``: as initialised (lora_B = 0, a no-op) or with random lora_B."""
    model, _ = load_target(str(base), dtype="float32", device="cpu")
    peft_model = get_peft_model(model, LORA)
    if not zero:
        torch.manual_seed(0)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
    peft_model.save_pretrained(path)
    return path


def test_checkable_answers_and_matching():
    synthetic = {"messages": [{"role": "assistant", "content": "81"}], "meta": {"answer": "81"}}
    gsm8k = {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "9*2=18\n#### 1,018"}]
    }
    free = {"messages": [{"role": "assistant", "content": "Paris is the capital."}], "meta": {}}
    assert checkable_answer(synthetic) == ("exact", "81")
    assert checkable_answer(gsm8k) == ("number", "1,018")
    assert checkable_answer(free) is None
    assert is_correct(" 81\n", "exact", "81")  # whitespace is forgiven ...
    assert is_correct("1  2\t3", "exact", "1 2 3")
    assert not is_correct("River", "exact", "river")  # ... case is not
    assert not is_correct("81 apples", "exact", "81")
    assert not is_correct("", "exact", "0")
    assert is_correct("so she makes 1018 dollars\n#### 1018", "number", "1,018")
    assert is_correct("the total is 1018.0", "number", "1,018")
    assert not is_correct("#### 18", "number", "1,018")
    assert not is_correct("no number", "number", "18")


def test_exact_match_accuracy_counts_hand_written_replies(monkeypatch):
    """Stage 4's exact match over replies written by hand (the model's generation replaced): spacing is
    forgiven, case and extra words are not, GSM8K answers compare as numbers, and a record without a
    single answer is not counted."""
    import quality_gate.stages.evaluate as evaluate

    def record(sid: str, answer: str | None, task: str, reply: str = "r") -> dict:
        turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}]
        return {"id": sid, "messages": turns, "meta": {"answer": answer, "task": task}}

    gsm8k = {"id": "d", "dataset": "gsm8k", "messages": [{"role": "user", "content": "q"}]}
    gsm8k["messages"].append({"role": "assistant", "content": "18 + 1000 = 1,018\n#### 1,018"})
    records = [
        record("a", "81", "add"),
        record("b", "river", "word"),
        record("c", "1 2 3", "add"),
        gsm8k,
        record("e", None, "open", reply="Paris is the capital."),
        record("f", "7", "word"),
    ]
    replies = {"a": " 81\n", "b": "River", "c": "1  2\t3", "d": "she earns 1018.0 dollars", "f": "7 apples"}
    monkeypatch.setattr(
        evaluate, "greedy_replies", lambda _m, _t, recs, **_: [replies[r["id"]] for r in recs]
    )
    cfg = OmegaConf.create(
        {"eval": {"batch_size": 2, "max_new_tokens": 8, "max_sequence_length": 64, "num_examples": 2}}
    )
    em = evaluate.exact_match_accuracy(None, None, records, cfg)
    assert em["correct"] == {"a": True, "b": False, "c": True, "d": True, "f": False}
    assert em["accuracy"] == pytest.approx(3 / 5) and em["num_samples"] == 5
    assert em["per_task"] == {
        "add": {"accuracy": 1.0, "num_samples": 2},
        "word": {"accuracy": 0.0, "num_samples": 2},
        "gsm8k": {"accuracy": 1.0, "num_samples": 1},
    }
    assert [(e["id"], e["answer"], e["correct"]) for e in em["examples"]] == [
        ("a", "81", True),
        ("b", "river", False),
    ]


@needs_assets
def test_heldout_loss_matches_model_loss():
    """One sample: the stage's token-mean NLL equals the model's own shifted cross-entropy."""
    model, tokenizer = load_target(str(TARGET), dtype="float32", device="cpu")
    ids = list(range(5, 25))
    labels = [-100] * 12 + ids[12:]
    sample = {"input_ids": ids, "labels": labels}
    out = heldout_loss(model.eval(), [sample], SFTDataCollator(tokenizer.pad_token_id), batch_size=1)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
    assert out["loss"] == pytest.approx(expected, rel=1e-5)
    assert out["num_tokens"] == 8 and out["perplexity"] == pytest.approx(torch.tensor(expected).exp().item())


@needs_assets
def test_base_model_results(tmp_path):
    evaluate_run(compose_cfg(tmp_path, []))
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert results["evaluated"] == "base model (no fine-tune)" and results["model"]["adapter_path"] is None
    assert 0 < results["heldout"]["loss"] < 20 and results["heldout"]["num_samples"] == 16
    em = results["exact_match"]
    rows = [json.loads(line) for line in EVAL.read_text().splitlines()[:16]]
    checkable = [r for r in rows if r["meta"]["answer"] is not None]  # open tasks have no single answer
    assert em["num_samples"] == len(checkable) and set(em["per_task"]) == {
        r["meta"]["task"] for r in checkable
    }
    assert sum(t["num_samples"] for t in em["per_task"].values()) == len(checkable) < 16
    per_sample = [json.loads(line) for line in (tmp_path / "eval_per_sample.jsonl").read_text().splitlines()]
    correct = {r["id"]: r["correct"] for r in per_sample}
    assert {i for i, c in correct.items() if c is not None} == {r["id"] for r in checkable}
    assert em["accuracy"] == pytest.approx(sum(correct[r["id"]] for r in checkable) / len(checkable))
    for example in em["examples"]:  # an answer is matched word for word, whatever the spacing
        assert example["correct"] == correct[example["id"]]
        assert example["correct"] == (example["prediction"].split() == example["answer"].split())
    assert results["lm_eval"] is None
    markdown = (tmp_path / "eval_results.md").read_text()
    assert "none (base model, no fine-tune)" in markdown and "| exact match |" in markdown


@needs_assets
def test_zero_adapter_is_rejected(tmp_path):
    adapter = save_adapter(tmp_path / "zero-adapter", zero=True)
    with pytest.raises(AdapterError, match="adapter does not change the outputs"):
        evaluate_run(compose_cfg(tmp_path / "run", [f"adapter_path={adapter}"]))


@needs_assets
def test_trained_adapter_is_evaluated(tmp_path):
    adapter = save_adapter(tmp_path / "adapter", zero=False)
    evaluate_run(compose_cfg(tmp_path / "base", ["eval.max_new_tokens=1"]))
    evaluate_run(compose_cfg(tmp_path / "tuned", [f"adapter_path={adapter}", "eval.max_new_tokens=1"]))
    base = json.loads((tmp_path / "base" / "eval_results.json").read_text())
    tuned = json.loads((tmp_path / "tuned" / "eval_results.json").read_text())
    assert tuned["evaluated"] == "base + adapter" and tuned["model"]["adapter_max_logit_change"] > 0
    assert tuned["heldout"]["loss"] != pytest.approx(base["heldout"]["loss"], rel=1e-6)


@needs_assets
def test_adapter_of_another_base_is_rejected(tmp_path):
    other = tmp_path / "other-base"
    config = Qwen2Config(
        vocab_size=300, hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(other), LORA).save_pretrained(adapter)
    with pytest.raises(AdapterError, match="hidden_size"):
        evaluate_run(compose_cfg(tmp_path / "run1", [f"adapter_path={adapter}"]))
    # Without the recorded base path the weights themselves do not fit.
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    adapter_cfg["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_cfg))
    with pytest.raises(AdapterError, match="does not fit"):
        evaluate_run(compose_cfg(tmp_path / "run2", [f"adapter_path={adapter}"]))


@needs_assets
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm_eval not installed")
def test_lm_eval_local_task(tmp_path):
    """An lm-eval multiple-choice task defined by local YAML + a local JSONL file (offline)."""
    data = tmp_path / "tasks" / "arith.jsonl"
    data.parent.mkdir()
    rows = [
        {"question": f"Add {a} and {b}.", "choices": [str(a + b), str(a + b + 1)], "label": 0}
        for a, b in [(1, 2), (3, 4), (5, 1), (2, 2)]
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks" / "qg_arith.yaml").write_text(
        "task: qg_arith\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    adapter = save_adapter(tmp_path / "adapter", zero=False)
    cfg = compose_cfg(
        tmp_path / "run",
        [
            f"adapter_path={adapter}",
            "eval.max_samples=4",
            "eval.max_new_tokens=1",
            "eval.lm_eval_tasks=[qg_arith]",
            f"eval.lm_eval_include_path={tmp_path / 'tasks'}",
            "eval.lm_eval_include_defaults=false",
        ],
    )
    evaluate_run(cfg)
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    acc = results["lm_eval"]["tasks"]["qg_arith"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert "lm-eval qg_arith" in (tmp_path / "run" / "eval_results.md").read_text()
