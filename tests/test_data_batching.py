"""Token-budget batches, right padding, the Trainer collator and the HF dataset view."""

from __future__ import annotations

import random

import pytest
import torch

from quality_gate.data import (
    IGNORE_INDEX,
    EncodedSample,
    SFTDataCollator,
    pad_batch,
    to_hf_dataset,
    token_budget_batches,
)


def _sample(i: int, n: int) -> EncodedSample:
    ids = [10 + i] * n
    return EncodedSample(
        id=f"s{i}", dataset="d", input_ids=ids, labels=[IGNORE_INDEX, *ids[1:]], truncated=False
    )


@pytest.mark.parametrize("sort_by_length", [True, False])
def test_batches_respect_the_budget_and_cover_every_index_once(sort_by_length: bool) -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(500)] + [1000]  # one sample over the budget
    batches = token_budget_batches(lengths, max_tokens=1024, max_batch_size=16, sort_by_length=sort_by_length)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert 1 <= len(batch) <= 16
        assert len(batch) * max(lengths[i] for i in batch) <= 1024
    assert batches == token_budget_batches(lengths, 1024, 16, sort_by_length)
    if sort_by_length:
        flat = [lengths[i] for b in batches for i in b]
        assert flat == sorted(flat, reverse=True) and batches[0] == [len(lengths) - 1]
    else:
        assert [i for b in batches for i in b] == list(range(len(lengths)))


def test_batches_are_greedy_and_oversized_samples_stand_alone() -> None:
    assert token_budget_batches([5, 5, 5, 5], max_tokens=10, max_batch_size=8) == [[0, 1], [2, 3]]
    assert token_budget_batches([3, 50, 3], max_tokens=10, max_batch_size=8) == [[1], [0, 2]]
    assert token_budget_batches([3, 50, 3], max_tokens=10, max_batch_size=8, sort_by_length=False) == [
        [0],
        [1],
        [2],
    ]
    assert token_budget_batches([1] * 5, max_tokens=100, max_batch_size=2) == [[0, 1], [2, 3], [4]]
    assert token_budget_batches([], 10, 2) == []
    with pytest.raises(ValueError, match=r"data_process\.max_tokens_per_batch"):
        token_budget_batches([1], 0, 2)


def test_pad_batch_right_pads_ids_mask_and_labels() -> None:
    batch = pad_batch([_sample(0, 3), _sample(1, 5)], pad_token_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.shape == (2, 5) and t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[10, 10, 10, 0, 0], [11] * 5]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["labels"].tolist() == [[-100, 10, 10, -100, -100], [-100, 11, 11, 11, 11]]
    with pytest.raises(ValueError, match="empty batch"):
        pad_batch([], 0)


def test_collator_and_hf_dataset_agree_with_pad_batch() -> None:
    samples = [_sample(0, 4), _sample(1, 2), _sample(2, 6)]
    dataset = to_hf_dataset(samples)
    assert dataset.column_names == ["input_ids", "labels", "id"]
    assert dataset["id"] == ["s0", "s1", "s2"]
    collated = SFTDataCollator(pad_token_id=7)([dataset[i] for i in range(3)])
    expected = pad_batch(samples, 7)
    assert collated.keys() == expected.keys()
    for key in expected:
        assert torch.equal(collated[key], expected[key])
    with pytest.raises(ValueError, match="pad token"):
        SFTDataCollator(None)
