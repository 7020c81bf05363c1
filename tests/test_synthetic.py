"""The synthetic generator: determinism, corruption shares, labels, answers, exact match, CLI."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from quality_gate.eval_metrics import exact_match, normalise_answer
from quality_gate.synthetic import (
    CORRUPTION_FAMILIES,
    CORRUPTIONS,
    HELD_OUT_FAMILIES,
    OPEN_TASKS,
    TASKS,
    WORDS,
    make_records,
    prior_records,
)

ROOT = Path(__file__).resolve().parents[1]
_ORDINAL = {"first": 0, "second": 1, "third": 2, "fourth": 3, "fifth": 4}


def solve(task: str, prompt: str) -> str:
    """An independent solver that reads the task back from the prompt text alone."""
    numbers = [int(x) for x in re.findall(r"\d+", prompt)]
    words = [w for w in re.findall(r"[a-z]+", prompt.split(":")[-1]) if w in WORDS]
    if task == "add":
        return str(sum(numbers))
    if task == "sort_digits":
        return " ".join(map(str, sorted(numbers)))
    if task == "next_in_sequence":
        return str(numbers[-1] + numbers[1] - numbers[0])
    if task == "largest_number":
        return str(max(numbers))
    if task == "count_words":
        return str(len(words))
    if task == "reverse_words":
        return " ".join(reversed(words))
    if task == "nth_word":
        ordinal = next(o for o in _ORDINAL if f" {o} " in prompt)
        return words[_ORDINAL[ordinal]]
    raise AssertionError(f"no solver for {task}")


def is_good_open_answer(task: str, prompt: str, answer: str) -> bool:
    """An open task's answer is one of its many good answers: checked against the prompt's constraints."""
    named = re.findall(r"[a-z]+", prompt)
    if task == "describe":
        subject, place = [w for w in named if w in WORDS][:2]
        return re.fullmatch(rf"(The|A|One) {subject} [a-z]+ [a-z]+ the {place}\.", answer) is not None
    if task == "pair_words":
        word, banned = [w for w in named if w in WORDS][:2]
        a, _, b = answer.partition(" and ")
        return {a, b} <= set(WORDS) and a != b and not {a, b} & {word, banned}
    if task == "list_above":
        low, high = (int(x) for x in re.findall(r"\d+", prompt))
        numbers = [int(x) for x in answer.split()]
        return len(numbers) == 3 and numbers == sorted(numbers) and all(low < x < high for x in numbers)
    raise AssertionError(task)


def test_deterministic_per_seed():
    assert make_records(300, 0.3, seed=7) == make_records(300, 0.3, seed=7)
    assert make_records(300, 0.3, seed=7) != make_records(300, 0.3, seed=8)


def test_corruption_shares_follow_noise_rate():
    records = make_records(1000, 0.3, seed=3)
    counts = Counter(r["meta"]["corruption"] for r in records)
    assert counts["none"] == 700
    kinds = [counts[k] for k in CORRUPTIONS]
    assert set(counts) == {"none", *CORRUPTIONS}
    # Kinds share the 300 corrupted records evenly; a rare collision may turn one into garbage.
    assert max(kinds) - min(kinds) <= 3
    tasks = Counter(r["meta"]["task"] for r in records)
    assert set(tasks) == set(TASKS) and max(tasks.values()) - min(tasks.values()) <= 1


@pytest.mark.parametrize("noise_rate", [0.0, 0.3, 1.0])
def test_labels_and_record_format(noise_rate):
    records = make_records(350, noise_rate, seed=11, dataset_name="synthetic_eval", id_offset=5)
    assert [r["id"] for r in records] == [f"synthetic_eval_{n}" for n in range(5, 355)]
    for r in records:
        assert r["dataset"] == "synthetic_eval"
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        content, meta = r["messages"][1]["content"], r["meta"]
        assert meta["open"] == (meta["task"] in OPEN_TASKS)
        if not meta["open"]:
            assert (meta["corruption"] == "none") == (content == meta["answer"])
            assert (meta["corruption"] == "none") == exact_match(content, meta["answer"])
        else:
            assert meta["answer"] is None
        kind = None if meta["corruption"] == "none" else CORRUPTION_FAMILIES[meta["corruption"]].kind
        assert meta["corruption_kind"] == kind
        assert content.strip(), r
    assert sum(r["meta"]["corruption"] != "none" for r in records) == round(noise_rate * 350)


def test_answers_are_correct():
    for r in make_records(700, 0.5, seed=2):
        task, prompt = r["meta"]["task"], r["messages"][0]["content"]
        if task in OPEN_TASKS:
            if r["meta"]["corruption"] == "none":
                assert is_good_open_answer(task, prompt, r["messages"][1]["content"]), r
            elif r["meta"]["corruption"] == "wrong_answer":
                assert not is_good_open_answer(task, prompt, r["messages"][1]["content"]), r
        else:
            assert r["meta"]["answer"] == solve(task, prompt), r


def test_prompts_unique_and_exclusion():
    train = make_records(500, 0.3, seed=0)
    prompts = {r["messages"][0]["content"] for r in train}
    assert len(prompts) == len(train)
    held_out = make_records(200, 0.0, seed=1, exclude_prompts=prompts)
    assert not prompts & {r["messages"][0]["content"] for r in held_out}


def is_repetition(text: str) -> bool:
    words = text.split()
    return any(len(words) % k == 0 and words == words[: len(words) // k] * k for k in range(4, 9))


def test_corruption_kinds_look_like_their_name():
    records = make_records(500, 1.0, seed=4)
    for r in records:
        content, kind, task = r["messages"][1]["content"], r["meta"]["corruption"], r["meta"]["task"]
        if kind == "repetition":
            assert is_repetition(content), content
        elif kind == "truncated":
            assert content.startswith(("the answer is", "I think")), content
        elif kind == "garbage":
            assert re.fullmatch(r"[a-z0-9#%&*+\-=?!@~]{6,16}", content), content
        elif kind == "other_task":
            # Another family's answer: never this prompt's answer, and usually not of its shape.
            assert content != r["meta"]["answer"]
        elif kind == "wrong_answer" and task not in OPEN_TASKS:
            # Same shape as the answer (a number for a number, words from the prompt for words).
            if r["meta"]["answer"].isdigit():
                assert content.isdigit(), (task, content)
            else:
                assert set(content.split()) <= set(r["messages"][0]["content"].replace("?", "").split())
        elif kind == "generic":
            assert content.startswith(("Sure!", "Of course.", "Great question!", "Happy to help.")), content
        elif kind == "refusal":
            assert "cannot" in content or "not able" in content or "can not" in content, content
        elif kind == "echo":
            assert content == r["messages"][0]["content"]


def test_families_kinds_and_held_out():
    kinds = {f.name: f.kind for f in CORRUPTION_FAMILIES.values()}
    assert {n for n, k in kinds.items() if k == "predictable"} == {"generic", "refusal", "echo"}
    assert {n for n, k in kinds.items() if k == "surprising"} == {
        "garbage",
        "wrong_answer",
        "truncated",
        "other_task",
        "repetition",
    }
    # One held-out family of each kind, never used while tuning a default.
    assert {kinds[f] for f in HELD_OUT_FAMILIES} == {"surprising", "predictable"}
    assert all(CORRUPTION_FAMILIES[f].why for f in CORRUPTIONS)
    only = make_records(200, 0.5, seed=1, families=["echo", "refusal"])
    assert Counter(r["meta"]["corruption"] for r in only) == {"none": 100, "echo": 50, "refusal": 50}
    with pytest.raises(ValueError, match="unknown corruption families"):
        make_records(10, 0.5, seed=0, families=["typo"])


def test_prior_records_are_chatter_not_answers():
    rows = prior_records(60, seed=0)
    replies = [r["messages"][1]["content"] for r in rows]
    prompts = [r["messages"][0]["content"] for r in rows]
    assert any(a == p for a, p in zip(replies, prompts))  # quotes of the prompt
    assert any(a.startswith(("Sure!", "Of course.")) for a in replies) and any("cannot" in a for a in replies)
    assert prior_records(60, seed=0) == rows


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="noise_rate"):
        make_records(10, 1.5, seed=0)
    with pytest.raises(ValueError, match="num_samples"):
        make_records(-1, 0.1, seed=0)


def test_exact_match():
    assert exact_match("  1 2  3\n", "1 2 3")
    assert exact_match("river", " river ")
    assert not exact_match("River", "river")
    assert not exact_match("1 2", "1 2 3")
    assert not exact_match("", "0")
    assert normalise_answer(" a \t b ") == "a b"


def test_make_synthetic_data_cli(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_synthetic_data", ROOT / "scripts/make_synthetic_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    module.main(["--out", str(train), "--num-samples", "100", "--noise-rate", "0.2", "--seed", "0"])
    held_args = ["--num-samples", "30", "--noise-rate", "0", "--seed", "1", "--dataset-name", "held"]
    module.main(["--out", str(held_out), *held_args, "--exclude", str(train)])
    out = capsys.readouterr().out
    assert "none=80" in out and "none=30" in out
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert rows == make_records(100, 0.2, seed=0)
    held = [json.loads(line) for line in held_out.read_text().splitlines()]
    assert held[0]["id"] == "held_0"
    assert not {r["messages"][0]["content"] for r in rows} & {r["messages"][0]["content"] for r in held}
