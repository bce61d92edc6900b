"""JSON-lines reading (errors name file, line and field) and tokenizing pairs into GLM examples."""
from __future__ import annotations

import json
import logging

import pytest

from paddle_glm.data import DataError, read_json_lines, read_pairs, tokenize_pairs
from paddle_glm.models.glm import GLMTemplate
from tasks import belle, dureader_qg


def write_lines(tmp_path, *lines, name="data.json") -> str:
    path = tmp_path / name
    path.write_bytes(b"".join(line if isinstance(line, bytes) else line.encode("utf-8") for line in lines))
    return str(path)


def qg(answer, context, question) -> str:
    return json.dumps({"context": context, "answer": answer, "question": question}, ensure_ascii=False) + "\n"


# --- read_json_lines ---------------------------------------------------------------------------


def test_read_json_lines_missing_file(tmp_path):
    path = str(tmp_path / "nope.json")
    with pytest.raises(DataError, match="no such data file") as error:
        list(read_json_lines(path))
    assert path in str(error.value)


@pytest.mark.parametrize("content", [b"", b"\n  \n\t\r\n"])
def test_read_json_lines_file_without_records_is_an_error(tmp_path, content):
    path = write_lines(tmp_path, content)
    with pytest.raises(DataError, match="the file has no examples"):
        list(read_json_lines(path))


def test_read_json_lines_invalid_json_names_line(tmp_path):
    path = write_lines(tmp_path, '{"a": 1}\n', '{"a": 2}\n', '{"a": 3,}\n', '{"a": 4}\n')
    with pytest.raises(DataError) as error:
        list(read_json_lines(path))
    assert f"{path}:3: invalid JSON" in str(error.value)


def test_read_json_lines_non_object_names_line_and_type(tmp_path):
    path = write_lines(tmp_path, '{"a": 1}\n', '["a", 2]\n')
    with pytest.raises(DataError, match="expected a JSON object per line, got list") as error:
        list(read_json_lines(path))
    assert f"{path}:2:" in str(error.value)


def test_read_json_lines_accepts_bom_on_first_line(tmp_path):
    path = write_lines(tmp_path, b"\xef\xbb\xbf" + '{"问": "答"}\n'.encode("utf-8"))
    assert list(read_json_lines(path)) == [(f"{path}:1", {"问": "答"})]


def test_read_json_lines_invalid_utf8_names_line(tmp_path):
    path = write_lines(tmp_path, '{"a": 1}\n', b'{"a": "\xff\xfe"}\n')
    with pytest.raises(DataError, match="UTF-8") as error:
        list(read_json_lines(path))
    assert f"{path}:2:" in str(error.value)


def test_read_json_lines_skips_blank_lines_keeping_line_numbers(tmp_path):
    path = write_lines(tmp_path, "\n", '{"n": 1}\r\n', "   \n", "\n", '{"n": 2}')  # CRLF, no final newline
    assert list(read_json_lines(path)) == [(f"{path}:2", {"n": 1}), (f"{path}:5", {"n": 2})]


def test_read_json_lines_reads_enormous_line(tmp_path):
    big = "长" * (5 * 1024 * 1024 // 3) + "x" * 7
    path = write_lines(tmp_path, json.dumps({"text": big}, ensure_ascii=False) + "\n", '{"n": 2}\n')
    records = list(read_json_lines(path))
    assert [where for where, _ in records] == [f"{path}:1", f"{path}:2"]
    assert records[0][1]["text"] == big


# --- read_pairs --------------------------------------------------------------------------------


def test_read_pairs_maps_records_through_task(tmp_path):
    path = write_lines(tmp_path, qg("北京", "北京是首都。", "首都是哪里？"), "\n", qg("长江", "长江很长。", "哪条河长？"))
    assert read_pairs(path, dureader_qg.to_pairs) == [
        ("答案：北京，上下文：北京是首都。", "首都是哪里？"),
        ("答案：长江，上下文：长江很长。", "哪条河长？"),
    ]


def test_read_pairs_task_error_names_file_line(tmp_path):
    path = write_lines(tmp_path, qg("北京", "北京是首都。", "首都是哪里？"), '{"context": "c", "answer": "a"}\n')
    with pytest.raises(DataError, match="missing field 'question'") as error:
        read_pairs(path, dureader_qg.to_pairs)
    assert f"{path}:2:" in str(error.value)


def test_read_pairs_limit_counts_pairs_not_records(tmp_path):
    dialogue = {"conversations": [
        {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
        {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"},
    ]}
    path = write_lines(tmp_path, *[json.dumps(dialogue) + "\n"] * 3)
    assert len(read_pairs(path, belle.to_pairs)) == 6
    limited = read_pairs(path, belle.to_pairs, limit=3)
    assert [pair.target for pair in limited] == ["a1", "a2", "a1"]


def test_read_pairs_limit_stops_reading_early(tmp_path):
    path = write_lines(tmp_path, qg("a", "c", "q1"), qg("a", "c", "q2"), "not json\n")
    assert [target for _, target in read_pairs(path, dureader_qg.to_pairs, limit=2)] == ["q1", "q2"]
    with pytest.raises(DataError, match=":3: invalid JSON"):
        read_pairs(path, dureader_qg.to_pairs)


# --- tokenize_pairs (real GLM Chinese tokenizer) ----------------------------------------------


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_tokenize_pairs_keeps_texts_and_examples_in_order(cog_tokenizer, paddlenlp_log):
    pairs = [("答案：北京，上下文：北京是中国的首都。", "中国的首都是哪里？"), ("写一首诗", "床前明月光"), ("你好", "你好！")]
    data = tokenize_pairs(pairs, GLMTemplate(cog_tokenizer), src_length=64, tgt_length=32)
    assert len(data) == len(data.features) == len(data.prompts) == len(data.sources) == len(data.targets) == 3
    assert len(data.references) == 3
    assert data.sources == [s for s, _ in pairs] and data.targets == [t for _, t in pairs]
    for (source, target), feature, prompt in zip(pairs, data.features, data.prompts):
        source_ids, target_ids = encode(cog_tokenizer, source), encode(cog_tokenizer, target)
        sep = int(feature["attention_mask"])
        assert list(feature["input_ids"][1:sep - 2]) == source_ids
        assert list(feature["input_ids"][sep + 1:]) == target_ids
        assert list(prompt["input_ids"]) == list(feature["input_ids"][:sep + 1])
    assert not [r for r in paddlenlp_log.records if "truncated" in r.getMessage()]


def test_tokenize_pairs_truncates_source_end_keeping_answer(cog_tokenizer, paddlenlp_log):
    source = "答案：北京，上下文：" + "北京是中国的首都，有很多名胜古迹。" * 40 + "结尾标记"
    full_ids = encode(cog_tokenizer, source)
    assert len(full_ids) > 64
    data = tokenize_pairs([(source, "首都是哪里？")], GLMTemplate(cog_tokenizer), src_length=64, tgt_length=32)
    feature, prompt = data.features[0], data.prompts[0]
    sep = int(feature["attention_mask"])
    assert sep == 64 and len(prompt["input_ids"]) == 65
    special = cog_tokenizer
    assert feature["input_ids"][0] == special.cls_token_id
    assert list(feature["input_ids"][sep - 2:sep + 1]) == [special.gmask_token_id, special.eos_token_id, special.sop_token_id]
    kept = list(feature["input_ids"][1:sep - 2])
    assert kept == full_ids[:61]
    text = cog_tokenizer.decode(kept)
    assert text.startswith("答案:北京,上下文:") and "结尾标记" not in text
    assert data.sources == [source]  # the untruncated text is kept for predictions files
    messages = [r.getMessage() for r in paddlenlp_log.records if r.levelno == logging.WARNING]
    assert any("truncated 1 of 1 sources to --src_length 64" in m and "0 targets" in m for m in messages)


def test_tokenize_pairs_truncates_target_to_tgt_length(cog_tokenizer, paddlenlp_log):
    target = "北京是中国的首都，有很多名胜古迹。" * 10
    target_ids = encode(cog_tokenizer, target)
    assert len(target_ids) > 16
    data = tokenize_pairs([("介绍北京", target)], GLMTemplate(cog_tokenizer), src_length=32, tgt_length=16)
    feature = data.features[0]
    sep = int(feature["attention_mask"])
    labels = list(feature["labels"][sep:])
    assert len(labels) == 16 and labels == target_ids[:15] + [cog_tokenizer.eop_token_id]
    assert len(feature["input_ids"]) == sep + 16 and list(feature["loss_mask"][sep:]) == [1.0] * 16
    assert data.targets == [target]
    assert data.references == ["北京是中国的首都,有很多名胜古迹。北京是中国的首都,有很多"]  # 15 ids, "，" -> ","
    messages = [r.getMessage() for r in paddlenlp_log.records]
    assert any("0 of 1 sources" in m and "1 targets to --tgt_length 16" in m for m in messages)


def test_tokenize_pairs_references_are_tokenizer_round_trip(cog_tokenizer):
    # This sentencepiece model normalises full-width punctuation: "？" comes back as "?", "，" as ",".
    data = tokenize_pairs([("问", "北京是哪个国家的首都？"), ("问", "你好，世界")], GLMTemplate(cog_tokenizer), src_length=32, tgt_length=32)
    assert data.references == ["北京是哪个国家的首都?", "你好,世界"]
    assert data.targets == ["北京是哪个国家的首都？", "你好，世界"]


def test_template_decode_drops_special_ids_as_the_tokenizer_does(cog_tokenizer):
    """`Template.decode` drops special ids itself (PaddleNLP's skip_special_tokens is slow): same text as PaddleNLP's
    decode, with the GLM's specials, added tokens and text ids mixed."""
    template = GLMTemplate(cog_tokenizer)
    text = template.encode("北京是中国的首都 [MASK] ok")
    specials = cog_tokenizer.all_special_ids
    for ids in (text, specials + text, text[:3] + specials[::-1] + text[3:] + specials[:2], specials, []):
        assert template.decode(ids) == cog_tokenizer.decode(ids, skip_special_tokens=True)
    assert template.decode(specials + text) == template.decode(text) != ""

