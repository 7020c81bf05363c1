"""Normalise one source row into a record ``{"messages", "dataset", "id", "meta"}``.

Accepted row formats (checked in this order):

- messages: ``{"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}``
- ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}``
- Alpaca: ``{"instruction": str, "input": str, "output": str}`` (user = instruction + "\\n\\n" + input)
- question/answer (e.g. GSM8K): ``{"question": str, "answer": str}`` -> one user and one assistant turn

``meta`` keeps every other key of the row; a row that already carries ``meta`` (a record written by
this project, e.g. ``selected_data.jsonl``) keeps it, merged with the other keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from quality_gate.errors import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class BadRecord(DataError):
    """A row that cannot become a training record; ``reason`` says why (one line, for reports)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to about ``limit`` characters: reasons stay one short line whatever the row."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def _check_content(content: Any, role: str, turn: int) -> str:
    if not isinstance(content, str):
        raise BadRecord(f"turn {turn} ({role}): content is {type(content).__name__}, not a string")
    # An empty system prompt is harmless; an empty user or assistant turn teaches nothing or is broken.
    if role != "system" and not content.strip():
        raise BadRecord(f"turn {turn} ({role}): empty content")
    return content


def _turns(
    items: Any, field: str, role_key: str, content_key: str, roles: dict[str, str]
) -> list[dict[str, str]]:
    """The turns of a messages / ShareGPT list: ``role_key`` names the speaker (mapped through
    ``roles``), ``content_key`` the text; ``field`` is the record's key, for the messages."""
    if not isinstance(items, list) or not items:
        raise BadRecord(f"missing or empty {field}")
    out = []
    for turn, msg in enumerate(items):
        if not isinstance(msg, dict):
            raise BadRecord(
                f"turn {turn}: {field} entry is {type(msg).__name__}, not an object with "
                f"{role_key}/{content_key}"
            )
        speaker = msg.get(role_key)
        role = roles.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise BadRecord(
                f"turn {turn}: unknown role {short_repr(speaker)} (expected one of {', '.join(roles)})"
            )
        out.append({"role": role, "content": _check_content(msg.get(content_key), role, turn)})
    return out


def _from_messages(messages: Any) -> list[dict[str, str]]:
    return _turns(messages, "messages", "role", "content", {r: r for r in ROLES})


def _from_sharegpt(conversations: Any) -> list[dict[str, str]]:
    return _turns(conversations, "conversations", "from", "value", SHAREGPT_ROLES)


def _from_alpaca(raw: dict[str, Any]) -> list[dict[str, str]]:
    instruction = _check_content(raw.get("instruction"), "user", 0)
    extra = raw.get("input")
    if extra is not None and not isinstance(extra, str):
        raise BadRecord(f"alpaca input is {type(extra).__name__}, not a string")
    user = instruction + "\n\n" + extra if extra and extra.strip() else instruction
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _check_content(raw.get("output"), "assistant", 1)},
    ]


def _from_question_answer(raw: dict[str, Any]) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": _check_content(raw.get("question"), "user", 0)},
        {"role": "assistant", "content": _check_content(raw.get("answer"), "assistant", 1)},
    ]


# Format name -> (keys it consumes, the first one identifying it; parser), in detection order.
_FORMATS: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any]], list[dict[str, str]]]]] = {
    "messages": (("messages",), lambda raw: _from_messages(raw["messages"])),
    "sharegpt": (("conversations",), lambda raw: _from_sharegpt(raw["conversations"])),
    "alpaca": (("instruction", "input", "output"), _from_alpaca),
    "question_answer": (("question", "answer"), _from_question_answer),
}
_FORMAT_KEYS = frozenset(k for keys, _ in _FORMATS.values() for k in keys)


def detect_format(raw: dict[str, Any]) -> str | None:
    """The name of the row's format (``messages``, ``sharegpt``, ``alpaca``, ``question_answer``) or None.

    A null column counts as absent: Hub datasets fill the columns of other formats with None.
    """
    for name, (keys, _) in _FORMATS.items():
        if raw.get(keys[0]) is not None:
            return name
    return None


def normalize_record(raw: dict[str, Any], dataset_name: str, row: int) -> dict[str, Any]:
    """One source row -> ``{"messages": [...], "dataset": dataset_name, "id": str, "meta": {...}}``.

    ``row`` is the 0-based position in the source (file or split); it makes the id
    ``<dataset_name>_<row>`` when the row has no ``id`` of its own. Raises ``BadRecord`` with a
    precise reason for rows that cannot be used.
    """
    if not isinstance(raw, dict):
        raise BadRecord(f"row is {type(raw).__name__}, not an object")
    fmt = detect_format(raw)
    if fmt is None:
        present = [short_repr(k, 30) for k in sorted(str(k) for k, v in raw.items() if v is not None)[:8]]
        raise BadRecord(
            "missing or empty messages: the row has none of `messages`, `conversations` (ShareGPT), "
            f"`instruction`/`output` (Alpaca) or `question`/`answer`; keys: [{', '.join(present)}]"
        )
    consumed, parse = _FORMATS[fmt]
    messages = parse(raw)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant turn")
    own_id = raw.get("id")
    record_id = str(own_id) if own_id is not None and str(own_id) != "" else f"{dataset_name}_{row}"
    meta = dict(raw["meta"]) if isinstance(raw.get("meta"), dict) else {}
    for key, value in raw.items():
        if key in consumed or key in ("id", "meta") or (value is None and key in _FORMAT_KEYS):
            continue
        # The configured dataset_name wins; a different original name is kept for provenance.
        if key == "dataset" and value == dataset_name:
            continue
        meta[key] = value
    return {"messages": messages, "dataset": dataset_name, "id": record_id, "meta": meta}


CLEAN_LABELS = (None, "", False, "none", "clean")


def corruption_of(record: dict[str, Any]) -> str | None:
    """The record's ``meta.corruption`` label: ``"none"`` for a clean record, the corruption kind for a
    corrupted one, None when the record carries no label. The one rule every report uses."""
    meta = record.get("meta") or {}
    if "corruption" not in meta:
        return None
    value = meta["corruption"]
    return "none" if value in CLEAN_LABELS else str(value)
