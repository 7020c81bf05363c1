"""Exact match: when a model's reply counts as the answer, and the share of replies that do.

One definition for everyone who checks answers: Stage 4 (:mod:`quality_gate.stages.evaluate`, which
adds GSM8K's numeric answers on top), the tiny-model builder (``scripts/make_tiny_models.py``) and
the asset tests. The data generator (:mod:`quality_gate.synthetic`) only writes ``meta.answer``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def normalise_answer(text: str) -> str:
    """Strip and collapse internal whitespace: the form compared by :func:`exact_match`."""
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> bool:
    """True iff ``prediction`` equals ``answer`` after whitespace normalisation (case-sensitive)."""
    return normalise_answer(prediction) == normalise_answer(answer)


def evaluate_exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    batch_size: int = 50,
    max_new_tokens: int = 24,
) -> float:
    """Fraction of ``records`` (those with a checkable ``meta.answer``) whose greedy reply matches it."""
    from quality_gate.generation import greedy_replies

    records = [r for r in records if r["meta"].get("answer") is not None]
    if not records:
        raise ValueError("evaluate_exact_match needs at least one record")
    replies = greedy_replies(model, tokenizer, records, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return sum(exact_match(p, r["meta"]["answer"]) for p, r in zip(replies, records)) / len(records)
