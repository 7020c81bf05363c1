"""normalize_record: every accepted format, every kind of bad row, ids and meta."""

from __future__ import annotations

import pytest

from quality_gate.data import BadRecord, normalize_record


def test_messages_format_keeps_other_keys_in_meta() -> None:
    raw = {
        "messages": [
            {"role": "system", "content": ""},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ],
        "source": "web",
        "score": 3,
    }
    rec = normalize_record(raw, "ds", 7)
    assert rec == {
        "messages": raw["messages"],
        "dataset": "ds",
        "id": "ds_7",
        "meta": {"source": "web", "score": 3},
    }


def test_own_id_is_stringified_and_existing_meta_is_merged() -> None:
    raw = {
        "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        "id": 12,
        "dataset": "other",
        "meta": {"corruption": "none"},
        "task": "sum",
    }
    rec = normalize_record(raw, "ds", 0)
    assert rec["id"] == "12"
    assert rec["dataset"] == "ds"
    # The configured name wins; the row's own dataset name is kept for provenance.
    assert rec["meta"] == {"corruption": "none", "dataset": "other", "task": "sum"}


def test_a_record_of_this_project_round_trips() -> None:
    rec = {
        "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        "dataset": "synthetic",
        "id": "synthetic_3",
        "meta": {"task": "sort_digits"},
    }
    assert normalize_record(rec, "synthetic", 3) == rec


def test_sharegpt_roles_are_mapped() -> None:
    raw = {
        "id": "identity_0",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Who are you?"},
            {"from": "gpt", "value": "Vicuna."},
        ],
    }
    rec = normalize_record(raw, "sharegpt", 0)
    assert rec["id"] == "identity_0"
    assert rec["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "Vicuna."},
    ]
    assert rec["meta"] == {}


@pytest.mark.parametrize(
    ("extra", "user"),
    [
        ("Expectant Mothers", "Design a plan\n\nExpectant Mothers"),
        ("", "Design a plan"),
        ("  ", "Design a plan"),
    ],
)
def test_alpaca_joins_instruction_and_input(extra: str, user: str) -> None:
    rec = normalize_record({"instruction": "Design a plan", "input": extra, "output": "Plan."}, "alpaca", 4)
    assert rec["messages"] == [{"role": "user", "content": user}, {"role": "assistant", "content": "Plan."}]
    assert rec["id"] == "alpaca_4"


def test_question_answer_rows_become_one_exchange() -> None:
    rec = normalize_record({"question": "1+1?", "answer": "2\n#### 2"}, "gsm8k", 0)
    assert rec["messages"] == [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2\n#### 2"},
    ]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"messages": []}, "missing or empty messages"),
        ({"text": "no conversation here"}, "missing or empty messages"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
        (
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": 3}]},
            "not a string",
        ),
        (
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": None}]},
            "not a string",
        ),
        (
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": " \n"}]},
            "empty content",
        ),
        (
            {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "A"}]},
            "empty content",
        ),
        ({"instruction": "Do it", "input": "", "output": ""}, "empty content"),
        ({"instruction": "Do it", "input": ""}, "assistant): content is NoneType"),
        ({"question": "Q?", "answer": 4}, "content is int"),
        ({"messages": ["user: hi"]}, "not an object"),
    ],
)
def test_bad_rows_raise_with_a_precise_reason(raw: dict, reason: str) -> None:
    with pytest.raises(BadRecord) as info:
        normalize_record(raw, "ds", 0)
    assert reason in info.value.reason
    assert isinstance(info.value, ValueError)


def test_non_dict_row_is_bad() -> None:
    with pytest.raises(BadRecord, match="not an object"):
        normalize_record(["a", "b"], "ds", 0)  # type: ignore[arg-type]
