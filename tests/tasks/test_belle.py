"""BELLE records (instruction/input/output, conversations, Human:/Assistant: text) -> pairs."""
from __future__ import annotations

import pytest

from paddle_glm.data import DataError, Sample
from tasks import belle

WHERE = "belle.json:5"


def test_to_pairs_keeps_nonempty_input_after_instruction():
    record = {"instruction": "翻译成英文", "input": "你好", "output": "Hello"}
    assert belle.to_pairs(record, WHERE) == [("翻译成英文\n你好", "Hello")]


@pytest.mark.parametrize("extra", ["", " \n "])
def test_to_pairs_blank_input_leaves_instruction_alone(extra):
    record = {"instruction": "写一首诗", "input": extra, "output": "床前明月光"}
    assert belle.to_pairs(record, WHERE) == [("写一首诗", "床前明月光")]


def test_to_pairs_without_input_key():
    assert belle.to_pairs({"instruction": "写一首诗", "output": "床前明月光"}, WHERE) == [("写一首诗", "床前明月光")]


def test_to_pairs_non_string_input_is_an_error():
    with pytest.raises(DataError, match=r"belle\.json:5: field 'input' must be a string, got NoneType"):
        belle.to_pairs({"instruction": "写一首诗", "input": None, "output": "床前明月光"}, WHERE)


def test_to_pairs_conversations_give_one_pair_per_assistant_turn():
    record = {"conversations": [
        {"from": "human", "value": "你好"},
        {"from": "gpt", "value": "你好！有什么可以帮你？"},
        {"from": "human", "value": "讲个笑话"},
        {"from": "gpt", "value": "好的。"},
    ]}
    assert belle.to_pairs(record, WHERE) == [
        Sample("你好", "你好！有什么可以帮你？"),
        Sample("讲个笑话", "好的。", (("你好", "你好！有什么可以帮你？"),)),
    ]


def test_to_pairs_conversations_accept_role_content_and_user_assistant():
    aliased = {"conversations": [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "User", "content": "q2"}, {"role": "Assistant", "content": "a2"},
    ]}
    plain = {"conversations": [
        {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
        {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"},
    ]}
    assert belle.to_pairs(aliased, WHERE) == belle.to_pairs(plain, WHERE)
    assert [pair.target for pair in belle.to_pairs(aliased, WHERE)] == ["a1", "a2"]


def test_to_pairs_unknown_role_names_the_turn():
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": "system", "value": "s"}]}
    with pytest.raises(DataError, match=r"belle\.json:5: field 'conversations\[1\]\.from' is 'system'"):
        belle.to_pairs(record, WHERE)


@pytest.mark.parametrize("conversations", [[], {"from": "human", "value": "q"}, "Human: q"])
def test_to_pairs_conversations_must_be_nonempty_list(conversations):
    with pytest.raises(DataError, match=r"belle\.json:5: field 'conversations' must be a non-empty list"):
        belle.to_pairs({"conversations": conversations}, WHERE)


def test_to_pairs_conversation_turn_missing_value_names_the_turn():
    record = {"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}
    with pytest.raises(DataError, match=r"belle\.json:5: conversations\[0\]: missing field 'value'"):
        belle.to_pairs(record, WHERE)


def test_to_pairs_text_dialogue_gives_pair_per_assistant_turn():
    record = {"instruction": "Human: q1\nAssistant: a1\nHuman: q2", "input": "", "output": "a2"}
    assert belle.to_pairs(record, WHERE) == [
        Sample("q1", "a1"),
        Sample("q2", "a2", (("q1", "a1"),)),
    ]


def test_to_pairs_text_dialogue_with_open_assistant_turn():
    # BelleGroup/multiturn_chat_0.8M ends every instruction with an open "Assistant:" that `output` answers.
    record = {"instruction": "Human:你好\nAssistant:你好！\nHuman:今天天气如何\nAssistant:", "input": "", "output": "晴天"}
    assert belle.to_pairs(record, WHERE) == [
        Sample("你好", "你好！"),
        Sample("今天天气如何", "晴天", (("你好", "你好！"),)),
    ]


def test_to_pairs_text_dialogue_accepts_full_width_colon():
    record = {"instruction": "Human：q1\nAssistant：a1\nHuman：q2", "output": "a2"}
    assert belle.to_pairs(record, WHERE) == belle.to_pairs(
        {"instruction": "Human: q1\nAssistant: a1\nHuman: q2", "output": "a2"}, WHERE
    )


def test_to_pairs_text_dialogue_empty_inner_turn_is_an_error():
    record = {"instruction": "Human: q1\nAssistant:\nHuman: q2", "output": "a2"}
    with pytest.raises(DataError, match=r"belle\.json:5: field 'instruction' has an empty"):
        belle.to_pairs(record, WHERE)


@pytest.mark.parametrize("turns", [
    [{"from": "human", "value": "q1"}, {"from": "human", "value": "q2"}],
    [{"from": "gpt", "value": "a0"}],
])
def test_to_pairs_dialogue_without_assistant_after_human_is_an_error(turns):
    with pytest.raises(DataError, match=r"belle\.json:5: the dialogue has no assistant turn after a human turn"):
        belle.to_pairs({"conversations": turns}, WHERE)
