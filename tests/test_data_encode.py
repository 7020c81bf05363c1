"""Assistant-only labels for chat templates without generation markers, truncation, template checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerFast

from quality_gate.data import IGNORE_INDEX, EncodedSample, encode_record, encode_records, ensure_chat_template

REPO = Path(__file__).resolve().parents[1]
TINY_SELECTOR = REPO / "assets" / "models" / "tiny-qwen3-selector"
EOT = "<|im_end|>"


def _labelled_runs(sample: EncodedSample) -> list[list[int]]:
    """The maximal runs of consecutive labelled positions, as token ids."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in sample.labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def _assert_exact_masks(tokenizer: PreTrainedTokenizerFast, records: list[dict]) -> None:
    samples, stats, skipped = encode_records(records, tokenizer, 4096)
    assert (stats.total, stats.kept, skipped) == (len(records), len(records), [])
    for record, sample in zip(records, samples, strict=True):
        text = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        # Exactly what the model sees: the rendered text tokenized once, no extra BOS.
        assert sample.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(sample.input_ids) == text
        assert all(
            label in (IGNORE_INDEX, tok) for label, tok in zip(sample.labels, sample.input_ids, strict=True)
        )
        expected = [m["content"] + EOT for m in record["messages"] if m["role"] == "assistant"]
        assert [tokenizer.decode(run) for run in _labelled_runs(sample)] == expected
        assert (sample.id, sample.dataset, sample.truncated, len(sample)) == (
            record["id"],
            record["dataset"],
            False,
            len(sample.input_ids),
        )


@pytest.mark.parametrize("template", ["chatml_tokenizer", "qwen3_tokenizer"])
def test_labels_are_exactly_the_assistant_contents_and_end_of_turn(
    template: str, tiny_records: list[dict], request: pytest.FixtureRequest
) -> None:
    """Single- and multi-turn, with and without a system prompt, an answer equal to the role name."""
    _assert_exact_masks(request.getfixturevalue(template), tiny_records)


def test_template_text_is_never_labelled(chatml_tokenizer, qwen3_tokenizer, tiny_records: list[dict]) -> None:
    record = tiny_records[0]
    q3 = encode_record(record, qwen3_tokenizer, 512)
    q3_text = qwen3_tokenizer.apply_chat_template(record["messages"], tokenize=False)
    assert "<think>\n\n</think>\n\n" in q3_text
    unlabelled = [t for t, label in zip(q3.input_ids, q3.labels, strict=True) if label == IGNORE_INDEX]
    assert "<think>" in qwen3_tokenizer.decode(unlabelled)
    q25 = encode_record(record, chatml_tokenizer, 512)
    unlabelled = [t for t, label in zip(q25.input_ids, q25.labels, strict=True) if label == IGNORE_INDEX]
    assert "You are Qwen, created by Alibaba Cloud" in chatml_tokenizer.decode(unlabelled)


def test_non_ascii_and_repeated_content(qwen3_tokenizer) -> None:
    record = {
        "id": "u",
        "dataset": "d",
        "messages": [
            {"role": "user", "content": "Café? 数字 3 🙂"},
            {"role": "assistant", "content": "Oui, café 🙂 数字"},
            {"role": "user", "content": "Oui, café 🙂 数字"},
            {"role": "assistant", "content": "Oui, café 🙂 数字"},
        ],
    }
    _assert_exact_masks(qwen3_tokenizer, [record])


def test_right_truncation_is_counted_and_fully_cut_answers_are_dropped(
    chatml_tokenizer, tiny_records
) -> None:
    record = tiny_records[2]  # two assistant turns
    full = encode_record(record, chatml_tokenizer, 4096)
    starts = [
        i
        for i, label in enumerate(full.labels)
        if label != IGNORE_INDEX and full.labels[i - 1] == IGNORE_INDEX
    ]
    assert len(starts) == 2
    cut = starts[1] + 1  # the first answer whole, one token of the second
    samples, stats, skipped = encode_records([record], chatml_tokenizer, cut)
    assert (stats.truncated, stats.kept, skipped) == (1, 1, [])
    assert samples[0].truncated and len(samples[0]) == cut
    assert samples[0].input_ids == full.input_ids[:cut] and samples[0].labels == full.labels[:cut]
    # Cut before the first answer: nothing to learn, so the sample is dropped, counted and reported.
    samples, stats, skipped = encode_records([record], chatml_tokenizer, starts[0])
    assert (samples, stats.dropped_no_assistant_tokens, stats.truncated, stats.kept) == ([], 1, 0, 0)
    assert (skipped[0].file, skipped[0].dataset) == ("id=tiny_2", "tiny")
    assert "no assistant token within the first" in skipped[0].reason
    assert encode_record(record, chatml_tokenizer, starts[0]) is None


def test_drop_policy_skips_over_long_samples(chatml_tokenizer, tiny_records) -> None:
    lengths = [len(encode_record(r, chatml_tokenizer, 4096)) for r in tiny_records]
    limit = sorted(lengths)[2]
    samples, stats, skipped = encode_records(tiny_records, chatml_tokenizer, limit, "drop")
    too_long = [r["id"] for r, n in zip(tiny_records, lengths, strict=True) if n > limit]
    assert [s.id for s in samples] == [
        r["id"] for r, n in zip(tiny_records, lengths, strict=True) if n <= limit
    ]
    assert stats.as_dict() == {
        "total": 5,
        "truncated": 0,
        "dropped_too_long": len(too_long),
        "dropped_no_assistant_tokens": 0,
        "kept": 5 - len(too_long),
    }
    assert [s.file for s in skipped] == [f"id={i}" for i in too_long]
    assert all("dataset.truncation=drop" in s.reason for s in skipped)


def test_unknown_truncation_policy_names_the_config_key(chatml_tokenizer, tiny_records) -> None:
    with pytest.raises(ValueError, match=r"dataset\.truncation='left'"):
        encode_records(tiny_records, chatml_tokenizer, 64, "left")
    with pytest.raises(ValueError, match=r"dataset\.truncation"):
        encode_record(tiny_records[0], chatml_tokenizer, 64, "keep")


def test_missing_chat_template_and_slow_tokenizers_are_clear_errors(chatml_tokenizer, tiny_records) -> None:
    template = chatml_tokenizer.chat_template
    chatml_tokenizer.chat_template = None
    with pytest.raises(ValueError, match=r"dataset\.chat_template"):
        encode_records(tiny_records, chatml_tokenizer, 64)
    ensure_chat_template(chatml_tokenizer, template)
    assert chatml_tokenizer.chat_template == template
    assert encode_record(tiny_records[0], chatml_tokenizer, 64) is not None
    slow = ByT5Tokenizer()
    slow.chat_template = template
    with pytest.raises(ValueError, match="not a fast tokenizer"):
        ensure_chat_template(slow)


def test_reasoning_is_labelled_where_the_template_keeps_it(qwen3_tokenizer) -> None:
    # Qwen3 keeps "<think>...</think>" in the last turn but drops it from turns before the last
    # user message; there only the answer after "</think>" is rendered, and labelled.
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nfirst thought\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "<think>\nsecond thought\n</think>\n\nA2"},
    ]
    sample = encode_record({"id": "t", "dataset": "d", "messages": messages}, qwen3_tokenizer, 512)
    text = qwen3_tokenizer.apply_chat_template(messages, tokenize=False)
    assert "first thought" not in text
    runs = [qwen3_tokenizer.decode(run) for run in _labelled_runs(sample)]
    assert runs == ["A1" + EOT, messages[3]["content"] + EOT]


@pytest.mark.skipif(
    not (TINY_SELECTOR / "tokenizer.json").is_file(), reason="assets/models/tiny-qwen3-selector absent"
)
def test_the_tiny_selector_tokenizer_and_synthetic_data(tiny_records) -> None:
    tokenizer = AutoTokenizer.from_pretrained(TINY_SELECTOR)
    ensure_chat_template(tokenizer)
    _assert_exact_masks(tokenizer, tiny_records)
    path = REPO / "assets" / "data" / "synthetic_train.jsonl"
    if path.is_file():
        with path.open() as fh:
            records = [json.loads(next(fh)) for _ in range(50)]
        _assert_exact_masks(tokenizer, records)


def test_backend_tokenization_equals_the_tokenizer_call(chatml_tokenizer, tiny_records):
    """The encoder calls the Rust tokenizer directly; ids and offsets equal tokenizer(texts, ...) even when
    the tokenizer.json carries truncation and padding defaults."""
    tok = chatml_tokenizer
    tok.backend_tokenizer.enable_truncation(max_length=5)
    tok.backend_tokenizer.enable_padding(length=64)
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in tiny_records]
    expected = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    tok.backend_tokenizer.enable_truncation(max_length=5)
    tok.backend_tokenizer.enable_padding(length=64)
    from quality_gate.data.encode import _render_and_tokenize

    got = list(_render_and_tokenize(tiny_records, tok))
    assert [ids for _, ids, _ in got] == expected["input_ids"]
    assert [[tuple(o) for o in offs] for _, _, offs in got] == [
        [tuple(o) for o in offs] for offs in expected["offset_mapping"]
    ]
