"""BELLE instruction data, single- and multi-turn.

- `instruction` / `input` / `output`: the source is the instruction followed by the input on a
  new line (the reference drops `input`; we keep it), the target is the output.
- `conversations`: a list of turns `{"from": "human"|"gpt", "value": ...}` (also `role`/`content`
  and `user`/`assistant`). Every assistant turn is a target; the turns before it are its source.
- BELLE's multi-turn text: `instruction` holding `Human: ... Assistant: ... Human: ...` turns (often
  ending with an open `Assistant:`) and `output` the last answer. Every assistant turn, inside the
  text or the output, is a target.

A dialogue's pairs carry their history (the earlier rounds): the model family's template renders it (GLM as
`Human: ...` / `Assistant: ...` lines, the ChatGLM families with their chat formats).
"""
from __future__ import annotations

import re
from typing import List, Tuple

from paddle_glm.data import DataError, Sample, TextPair, text_field

NAME = "belle"
DEFAULTS = {"src_length": 256, "tgt_length": 256}

HUMAN, ASSISTANT = "Human", "Assistant"
_ROLES = {"human": HUMAN, "user": HUMAN, "gpt": ASSISTANT, "assistant": ASSISTANT, "bot": ASSISTANT}
_TURN = re.compile(r"(Human|Assistant)\s*[:：]")

Turn = Tuple[str, str]  # (role, text)


def to_pairs(record: dict, where: str, args=None) -> List[TextPair]:
    if "conversations" in record:
        return _dialogue_pairs(_conversation_turns(record["conversations"], where), where)
    instruction = text_field(record, ("instruction",), where)
    output = text_field(record, ("output",), where)
    if _TURN.match(instruction.lstrip()):
        return _dialogue_pairs(_text_turns(instruction, where) + [(ASSISTANT, output)], where)
    extra = text_field(record, ("input",), where, allow_empty=True) if "input" in record else ""
    source = f"{instruction}\n{extra}" if extra.strip() else instruction
    return [(source, output)]


def _conversation_turns(conversations, where: str) -> List[Turn]:
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list of turns")
    turns = []
    for index, turn in enumerate(conversations):
        name = f"conversations[{index}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: field '{name}' must be an object with 'from' and 'value'")
        speaker = text_field(turn, ("from", "role"), f"{where}: {name}")
        if speaker.lower() not in _ROLES:
            raise DataError(f"{where}: field '{name}.from' is {speaker!r}: expected one of {', '.join(_ROLES)}")
        turns.append((_ROLES[speaker.lower()], text_field(turn, ("value", "content"), f"{where}: {name}")))
    return turns


def _text_turns(text: str, where: str) -> List[Turn]:
    pieces = _TURN.split(text)  # ['', 'Human', ' q1 ', 'Assistant', ' a1 ', ...]
    turns = [(role, body.strip()) for role, body in zip(pieces[1::2], pieces[2::2])]
    if turns and turns[-1] == (ASSISTANT, ""):
        turns.pop()  # BELLE's text ends with an open "Assistant:" that `output` answers
    if any(not body for _, body in turns):
        raise DataError(f"{where}: field 'instruction' has an empty Human:/Assistant: turn")
    return turns


def _dialogue_pairs(turns: List[Turn], where: str) -> List[TextPair]:
    """One pair per assistant turn: the human turns since the last answer are its query (joined by new lines),
    the earlier rounds its history."""
    pairs: List[TextPair] = []
    rounds: List[Tuple[str, str]] = []
    query: List[str] = []
    for role, text in turns:
        if role == HUMAN:
            query.append(text)
        elif query:
            pairs.append(Sample("\n".join(query), text, tuple(rounds)))
            rounds.append(("\n".join(query), text))
            query = []
    if not pairs:
        raise DataError(f"{where}: the dialogue has no assistant turn after a human turn")
    return pairs
