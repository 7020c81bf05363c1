"""Synthetic instruction data with exactly checkable answers and labelled corruptions.

This is the project's embedded benchmark: a tiny model can learn every task family from a few hundred
examples, every answer can be checked by exact match, and a known fraction of the records is
corrupted, so that a data selector can be scored against the true labels (``meta.corruption``).

A record is ``{"messages": [user, assistant], "dataset": str, "id": "<dataset>_<n>",
"meta": {"task", "answer", "corruption"}}``; ``meta.answer`` is always the correct answer, and the
assistant content equals it exactly iff ``meta.corruption == "none"``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

WORDS: tuple[str, ...] = (
    "apple", "river", "stone", "cloud", "tiger", "green", "bread", "chair", "light", "house",
    "music", "plant", "water", "horse", "lemon", "paper", "smile", "train", "ocean", "sugar",
    "grape", "clock", "snake", "table", "storm", "mouse", "piano", "queen", "robot", "sheep",
    "candy", "eagle", "flame", "ghost", "honey", "juice", "knife", "magic", "night", "pearl",
)  # fmt: skip
"""Short common words; a small fixed set so that a tiny BPE vocabulary keeps most of them whole."""

ORDINALS: tuple[str, ...] = ("first", "second", "third", "fourth", "fifth")


@dataclass(frozen=True)
class TaskSample:
    """One task instance: the user prompt, its correct answer and a plausible wrong answer."""

    prompt: str
    answer: str
    wrong: str


def _pick_words(rng: random.Random, low: int, high: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def _nth_word(rng: random.Random) -> TaskSample:
    words = _pick_words(rng, 3, 5)
    n = rng.randrange(len(words))
    text = " ".join(words)
    prompt = rng.choice(
        [
            f"What is the {ORDINALS[n]} word in: {text}?",
            f"Copy the {ORDINALS[n]} word of this list: {text}",
        ]
    )
    wrong = rng.choice([w for i, w in enumerate(words) if i != n])
    return TaskSample(prompt, words[n], wrong)


def _add(rng: random.Random) -> TaskSample:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    prompt = rng.choice([f"Add {a} and {b}.", f"What is {a} plus {b}?", f"Compute the sum of {a} and {b}."])
    offset = rng.choice([-2, -1, 1, 2])
    wrong = a + b + (offset if a + b + offset >= 0 else -offset)
    return TaskSample(prompt, str(a + b), str(wrong))


def _sort_digits(rng: random.Random) -> TaskSample:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    while len(set(digits)) == 1:
        digits[0] = rng.randint(0, 9)
    text = " ".join(map(str, digits))
    prompt = rng.choice(
        [
            f"Sort these digits from smallest to largest: {text}",
            f"Put the digits {text} in increasing order.",
        ]
    )
    answer = " ".join(map(str, sorted(digits)))
    shuffled = digits[:]
    while " ".join(map(str, shuffled)) == answer:
        rng.shuffle(shuffled)
    return TaskSample(prompt, answer, " ".join(map(str, shuffled)))


def _next_in_sequence(rng: random.Random) -> TaskSample:
    step, start, length = rng.randint(1, 5), rng.randint(0, 50), rng.randint(3, 5)
    seq = [start + step * i for i in range(length)]
    text = " ".join(map(str, seq))
    prompt = rng.choice(
        [
            f"What number comes next in the sequence {text}?",
            f"Continue the sequence with one number: {text}",
        ]
    )
    answer = start + step * length
    return TaskSample(prompt, str(answer), str(answer + rng.choice([-1, 1]) * rng.randint(1, step)))


def _count_words(rng: random.Random) -> TaskSample:
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 7))]
    text = " ".join(words)
    prompt = rng.choice([f"How many words are in: {text}?", f"Count the words in this list: {text}"])
    n = len(words)
    return TaskSample(prompt, str(n), str(n + rng.choice([-1, 1])))


def _reverse_words(rng: random.Random) -> TaskSample:
    words = _pick_words(rng, 2, 4)
    text = " ".join(words)
    prompt = rng.choice(
        [f"Reverse the order of these words: {text}", f"Write these words backwards in order: {text}"]
    )
    answer = " ".join(reversed(words))
    # The unchanged order is the natural mistake; with two words it is the only plausible one.
    return TaskSample(prompt, answer, text)


def _largest_number(rng: random.Random) -> TaskSample:
    numbers = rng.sample(range(100), rng.randint(3, 5))
    text = " ".join(map(str, numbers))
    prompt = rng.choice(
        [f"Which is the largest number: {text}?", f"Name the biggest of these numbers: {text}"]
    )
    answer = max(numbers)
    return TaskSample(prompt, str(answer), str(rng.choice([x for x in numbers if x != answer])))


TASKS: dict[str, Callable[[random.Random], TaskSample]] = {
    "nth_word": _nth_word,
    "add": _add,
    "sort_digits": _sort_digits,
    "next_in_sequence": _next_in_sequence,
    "count_words": _count_words,
    "reverse_words": _reverse_words,
    "largest_number": _largest_number,
}
"""Task family name -> generator ``(rng) -> TaskSample``."""

CORRUPTIONS: tuple[str, ...] = ("wrong_answer", "other_task", "truncated", "garbage", "repetition")
"""Corruption kinds, assigned in equal shares (up to one) to the corrupted records."""

_GARBAGE_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789#%&*+-=?!@~"
_FILLERS = ("the answer is", "I think", "well", "let me see", "ok")


def _corrupt(kind: str, sample: TaskSample, rng: random.Random, task: str) -> str:
    """Return a corrupted assistant response for ``sample``; never equal to ``sample.answer``."""
    if kind == "wrong_answer":
        return sample.wrong
    if kind == "other_task":
        other = rng.choice([name for name in TASKS if name != task])
        return TASKS[other](rng).answer
    if kind == "truncated":
        # A cut-off verbose reply: the answer never arrives, or arrives only in part.
        prefix = rng.choice(_FILLERS[:2])
        cut = sample.answer[: len(sample.answer) // 2].rstrip()
        return f"{prefix} {cut}".rstrip() if cut else prefix
    if kind == "garbage":
        return "".join(rng.choice(_GARBAGE_ALPHABET) for _ in range(rng.randint(6, 16)))
    if kind == "repetition":
        phrase = rng.choice([*_FILLERS, sample.answer])
        return " ".join([phrase] * rng.randint(4, 8))
    raise ValueError(f"unknown corruption kind {kind!r}; expected one of {CORRUPTIONS}")


def make_records(
    num_samples: int,
    noise_rate: float,
    seed: int,
    dataset_name: str = "synthetic",
    id_offset: int = 0,
    exclude_prompts: Collection[str] = (),
) -> list[dict]:
    """Generate ``num_samples`` chat records, ``round(noise_rate * num_samples)`` of them corrupted.

    Task families are used in equal shares (up to one) and shuffled; corruption kinds are spread
    evenly over the corrupted records. Ids are ``f"{dataset_name}_{id_offset + n}"``. Prompts in
    ``exclude_prompts`` (e.g. the training set's, when making a held-out set) are never produced,
    and no prompt repeats within the output. Deterministic for a given ``seed``.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if not 0.0 <= noise_rate <= 1.0:
        raise ValueError(f"noise_rate must be in [0, 1], got {noise_rate}")
    rng = random.Random(seed)
    task_names = list(TASKS)
    seen = set(exclude_prompts)
    samples: list[tuple[str, TaskSample]] = []
    for i in range(num_samples):
        task = task_names[i % len(task_names)]
        for _ in range(1000):
            sample = TASKS[task](rng)
            if sample.prompt not in seen:
                break
        else:
            raise ValueError(
                f"task {task!r} ran out of distinct prompts after {i} records; ask for fewer samples"
            )
        seen.add(sample.prompt)
        samples.append((task, sample))
    rng.shuffle(samples)

    num_corrupt = round(noise_rate * num_samples)
    kinds = [CORRUPTIONS[i % len(CORRUPTIONS)] for i in range(num_corrupt)]
    rng.shuffle(kinds)
    corrupt_at = dict(zip(sorted(rng.sample(range(num_samples), num_corrupt)), kinds))

    records = []
    for n, (task, sample) in enumerate(samples):
        kind = corrupt_at.get(n, "none")
        response = sample.answer if kind == "none" else _corrupt(kind, sample, rng, task)
        if kind != "none" and response.strip() == sample.answer:
            # Rare collisions (e.g. another task's answer equals this one): relabel as garbage.
            kind = "garbage"
            response = _corrupt(kind, sample, rng, task)
        records.append(
            {
                "messages": [
                    {"role": "user", "content": sample.prompt},
                    {"role": "assistant", "content": response},
                ],
                "dataset": dataset_name,
                "id": f"{dataset_name}_{id_offset + n}",
                "meta": {"task": task, "answer": sample.answer, "corruption": kind},
            }
        )
    return records


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
    """Fraction of ``records`` whose greedy reply exactly matches ``meta.answer``."""
    from quality_gate.generation import greedy_replies

    if not records:
        raise ValueError("evaluate_exact_match needs at least one record")
    replies = greedy_replies(model, tokenizer, records, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return sum(exact_match(p, r["meta"]["answer"]) for p, r in zip(replies, records)) / len(records)
