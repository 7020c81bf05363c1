"""Synthetic instruction data with labelled corruptions of two kinds: the embedded benchmark suite.

A tiny model can learn every task family from a few hundred examples, and a known fraction of the
records is corrupted, so that a data selector can be scored against the true labels
(``meta.corruption``) and a fine-tuned target against held-out answers.

Tasks. Seven *checkable* families (``meta.answer`` is the one correct answer; exact match) and three
*open* families whose good answers vary (``meta.answer`` is None, ``meta.open`` True): describe a
word in a sentence, pair a word with two others, list three numbers above n. Real instruction data
is mostly of the open kind: a good answer carries information, so a language model does not find
it trivially predictable.

Corruptions (:data:`CORRUPTION_FAMILIES`), each with a kind and a reason a real pool has it:

* *surprising* (a language model finds them unlikely, so perplexity filters them): ``garbage``
  (encoding debris, scraped markup), ``wrong_answer`` (wrong numbers / the wrong word: careless or
  model-generated labels), ``truncated`` (replies cut off by length limits), ``other_task`` (an answer
  pasted to the wrong question: misaligned pairs), ``repetition`` (degenerate generation loops);
* *predictable* (fluent, generic, copied: a language model finds them LIKELY, so perplexity and IFD
  keep them): ``generic`` (polite filler with no answer: the unhelpful share AlpaGasus found in
  Alpaca), ``refusal`` (safety-tuned teachers refusing harmless requests), ``echo`` (the reply repeats
  the prompt: template bugs and lazy distillation).

``held_out=True`` families (``truncated``, ``echo``) and the held-out seeds (:data:`HELD_OUT_SEEDS`)
are never looked at while tuning a default; benchmarks report them separately.

:func:`prior_records` makes the chatter a pretrained model has seen (generic and refusing replies,
quotes of the prompt) for building the tiny selector: real selectors find such text likely.

A record is ``{"messages": [user, assistant], "dataset": str, "id": "<dataset>_<n>", "meta": {"task",
"answer", "open", "corruption", "corruption_kind"}}``; for checkable tasks the assistant content
equals ``meta.answer`` exactly iff ``meta.corruption == "none"``; answers are checked by
:mod:`quality_gate.eval_metrics`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

WORDS: tuple[str, ...] = (
    "apple", "river", "stone", "cloud", "tiger", "green", "bread", "chair", "light", "house",
    "music", "plant", "water", "horse", "lemon", "paper", "smile", "train", "ocean", "sugar",
    "grape", "clock", "snake", "table", "storm", "mouse", "piano", "queen", "robot", "sheep",
    "candy", "eagle", "flame", "ghost", "honey", "juice", "knife", "magic", "night", "pearl",
)  # fmt: skip
"""Short common words; a small fixed set so that a tiny BPE vocabulary keeps most of them whole."""

ORDINALS: tuple[str, ...] = ("first", "second", "third", "fourth", "fifth")
VERBS: tuple[str, ...] = ("sits", "waits", "sleeps", "plays", "shines", "rests", "moves", "stays")
PLACES: tuple[str, ...] = ("near", "under", "behind", "beside", "above", "inside")


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


def _describe(rng: random.Random) -> TaskSample:
    word, other = rng.sample(WORDS, 2)
    prompt = rng.choice(
        [
            f"Write a short sentence about a {word} and a {other}.",
            f"Say something about the {word} and the {other}.",
        ]
    )

    def sentence(subject: str, place: str) -> str:
        det = rng.choice(["The", "A", "One"])
        return f"{det} {subject} {rng.choice(VERBS)} {rng.choice(PLACES)} the {place}."

    third = rng.choice([w for w in WORDS if w not in (word, other)])
    return TaskSample(prompt, sentence(word, other), sentence(third, rng.choice(WORDS)))


def _pair_words(rng: random.Random) -> TaskSample:
    word, banned = rng.sample(WORDS, 2)
    prompt = rng.choice(
        [
            f"Give two words that go with {word}, but not {banned}.",
            f"Name two words to pair with {word}, not {banned}.",
        ]
    )
    a, b = rng.sample([w for w in WORDS if w not in (word, banned)], 2)
    return TaskSample(prompt, f"{a} and {b}", f"{banned} and {word}")


def _list_above(rng: random.Random) -> TaskSample:
    n, width = rng.randint(0, 400), rng.randint(30, 60)
    prompt = rng.choice(
        [
            f"List three numbers between {n} and {n + width}.",
            f"Give three numbers above {n} and below {n + width}.",
        ]
    )
    answer = " ".join(map(str, sorted(rng.sample(range(n + 1, n + width), 3))))
    wrong = " ".join(map(str, sorted(rng.sample(range(n + width + 1, n + 2 * width), 3))))
    return TaskSample(prompt, answer, wrong)


TASKS: dict[str, Callable[[random.Random], TaskSample]] = {
    "nth_word": _nth_word,
    "add": _add,
    "sort_digits": _sort_digits,
    "next_in_sequence": _next_in_sequence,
    "count_words": _count_words,
    "reverse_words": _reverse_words,
    "largest_number": _largest_number,
    "describe": _describe,
    "pair_words": _pair_words,
    "list_above": _list_above,
}
"""Task family name -> generator ``(rng) -> TaskSample``."""

OPEN_TASKS: frozenset[str] = frozenset({"describe", "pair_words", "list_above"})
"""Families with many good answers: no exact match; the sampled answer is one good answer."""


@dataclass(frozen=True)
class CorruptionFamily:
    """A kind of bad record: ``kind`` is surprising or predictable; ``why`` a real pool has it."""

    name: str
    kind: str
    held_out: bool
    why: str


CORRUPTION_FAMILIES: dict[str, CorruptionFamily] = {
    f.name: f
    for f in (
        CorruptionFamily("garbage", "surprising", False, "encoding debris and scraped markup"),
        CorruptionFamily("wrong_answer", "surprising", False, "careless or model-generated wrong labels"),
        CorruptionFamily("truncated", "surprising", True, "replies cut off by a length limit"),
        CorruptionFamily("other_task", "surprising", False, "an answer pasted to the wrong question"),
        CorruptionFamily("repetition", "surprising", False, "degenerate generation loops"),
        CorruptionFamily(
            "generic", "predictable", False, "polite filler with no answer (AlpaGasus' low-quality share)"
        ),
        CorruptionFamily(
            "refusal", "predictable", False, "a safety-tuned teacher refusing a harmless request"
        ),
        CorruptionFamily(
            "echo", "predictable", True, "the prompt repeated back: template bugs, lazy distillation"
        ),
    )
}
CORRUPTIONS: tuple[str, ...] = tuple(CORRUPTION_FAMILIES)
"""Every corruption family, in a fixed order; by default they share the corrupted records evenly."""
HELD_OUT_FAMILIES: tuple[str, ...] = tuple(n for n, f in CORRUPTION_FAMILIES.items() if f.held_out)
TUNING_FAMILIES: tuple[str, ...] = tuple(n for n, f in CORRUPTION_FAMILIES.items() if not f.held_out)
HELD_OUT_SEEDS: tuple[int, ...] = (100, 101, 102)
"""Seeds of pools never generated while tuning a default (the tuning seeds are 0-9)."""

_GARBAGE_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789#%&*+-=?!@~"
_FILLERS = ("the answer is", "I think", "well", "let me see", "ok")
_OPENERS = ("Sure!", "Of course.", "Great question!", "Happy to help.")
_BODIES = (
    "Let me think about that for you.",
    "That is an interesting task.",
    "I hope this helps with your list.",
)
_CLOSERS = ("Let me know if you need anything else.", "Have a nice day!", "")
_REFUSALS = (
    "I am sorry, but I cannot help with that request.",
    "I cannot answer that question.",
    "As an assistant, I am not able to do that.",
    "Sorry, I can not help with this one.",
)


def generic_reply(rng: random.Random) -> str:
    """Polite filler with no answer (opener, body, closer: 36 variants)."""
    return " ".join(p for p in (rng.choice(_OPENERS), rng.choice(_BODIES), rng.choice(_CLOSERS)) if p)


def refusal_reply(rng: random.Random) -> str:
    return rng.choice(_REFUSALS)


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
    if kind == "generic":
        return generic_reply(rng)
    if kind == "refusal":
        return refusal_reply(rng)
    if kind == "echo":
        return sample.prompt
    raise ValueError(f"unknown corruption kind {kind!r}; expected one of {CORRUPTIONS}")


def make_records(
    num_samples: int,
    noise_rate: float,
    seed: int,
    dataset_name: str = "synthetic",
    id_offset: int = 0,
    exclude_prompts: Collection[str] = (),
    families: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
) -> list[dict]:
    """Generate ``num_samples`` chat records, ``round(noise_rate * num_samples)`` of them corrupted.

    Task families (``tasks``, default all) are used in equal shares (up to one) and shuffled;
    corruption ``families`` (default all of :data:`CORRUPTIONS`) are spread evenly over the corrupted
    records. Ids are ``f"{dataset_name}_{id_offset + n}"``. Prompts in ``exclude_prompts`` (e.g. the
    training set's, when making a held-out set) are never produced, and no prompt repeats within the
    output. Deterministic for a given ``seed``.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if not 0.0 <= noise_rate <= 1.0:
        raise ValueError(f"noise_rate must be in [0, 1], got {noise_rate}")
    families = tuple(families if families is not None else CORRUPTIONS)
    unknown = sorted(set(families) - set(CORRUPTIONS)) + sorted(set(tasks or ()) - set(TASKS))
    if unknown or not families:
        raise ValueError(f"unknown corruption families or tasks {unknown}; families: {list(CORRUPTIONS)}")
    rng = random.Random(seed)
    task_names = list(tasks or TASKS)
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
    kinds = [families[i % len(families)] for i in range(num_corrupt)]
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
        is_open = task in OPEN_TASKS
        meta = {
            "task": task,
            "answer": None if is_open else sample.answer,
            "open": is_open,
            "corruption": kind,
            "corruption_kind": None if kind == "none" else CORRUPTION_FAMILIES[kind].kind,
        }
        records.append(
            {
                "messages": [
                    {"role": "user", "content": sample.prompt},
                    {"role": "assistant", "content": response},
                ],
                "dataset": dataset_name,
                "id": f"{dataset_name}_{id_offset + n}",
                "meta": meta,
            }
        )
    return records


def prior_records(num_samples: int, seed: int) -> list[dict]:
    """Chats a pretrained assistant model has seen plenty of: task prompts answered with polite filler,
    a refusal, or a quote of the prompt (for pretraining the tiny selector's prior; not a pool)."""
    rng = random.Random(seed)
    names = list(TASKS)
    out = []
    for n in range(num_samples):
        sample = TASKS[names[n % len(names)]](rng)
        style = rng.choice(("generic", "refusal", "quote"))
        reply = (
            {"generic": generic_reply, "refusal": refusal_reply}[style](rng)
            if style != "quote"
            else sample.prompt
        )
        out.append(
            {
                "messages": [
                    {"role": "user", "content": sample.prompt},
                    {"role": "assistant", "content": reply},
                ]
            }
        )
    return out
