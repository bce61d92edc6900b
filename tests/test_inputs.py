"""GLM's template and the shared batching, with the real `cog-pretrain.model` vocabulary, checked against
hand-worked examples."""
from __future__ import annotations

import numpy as np
import pytest

from paddle_glm.inputs import Collator, generation_batch
from paddle_glm.models.glm import GLMTemplate

# Hand-checked ids of GLM's Chinese special tokens on the 50,000-piece cog-pretrain vocabulary.
PAD = EOS = 50000
CLS, SOP, EOP, SMASK, GMASK = 50002, 50006, 50007, 50008, 50009


def test_tokenizer_registers_glm_special_tokens(cog_tokenizer):
    t = cog_tokenizer
    assert (t.pad_token_id, t.eos_token_id, t.sep_token_id, t.cls_token_id, t.mask_token_id) == (
        PAD, EOS, 50001, CLS, 50003,
    )
    assert (t.sop_token_id, t.eop_token_id, t.smask_token_id, t.gmask_token_id) == (SOP, EOP, SMASK, GMASK)
    assert len(t) == 50010  # fits the 50,048-row embeddings of glm-large-chinese


def test_tokenizer_from_saved_directory_keeps_special_ids(cog_tokenizer, tmp_path):
    from paddle_glm.models import load_tokenizer

    cog_tokenizer.save_pretrained(str(tmp_path))
    reloaded = load_tokenizer(str(tmp_path))
    assert (reloaded.sop_token_id, reloaded.gmask_token_id, reloaded.eop_token_id) == (SOP, GMASK, EOP)


def test_prompt_places_gmask_before_eos_and_cuts_the_end_of_long_texts(cog_tokenizer):
    template = GLMTemplate(cog_tokenizer)
    text = cog_tokenizer.encode("北京是中国的首都", add_special_tokens=False)["input_ids"]
    assert cog_tokenizer.convert_ids_to_tokens(text) == ["▁北京", "是", "中国的", "首都"]
    assert template.prompt_ids("北京是中国的首都", (), 32) == ([CLS] + text + [GMASK, EOS], False)
    assert template.prompt_ids("北京是中国的首都", (), 6) == ([CLS] + text[:3] + [GMASK, EOS], True)
    with pytest.raises(ValueError, match="leaves no room for text"):
        template.prompt_ids("北京是中国的首都", (), 3)


def test_dialogue_history_renders_as_human_assistant_lines_and_goes_first_when_too_long(cog_tokenizer):
    template = GLMTemplate(cog_tokenizer)
    history = [("你好", "你好！"), ("北京在哪", "中国")]
    ids, cut = template.prompt_ids("上海呢", history, 200)
    expected = "Human: 你好\nAssistant: 你好！\nHuman: 北京在哪\nAssistant: 中国\nHuman: 上海呢\nAssistant:"
    assert not cut and ids == [CLS] + cog_tokenizer.encode(expected, add_special_tokens=False)["input_ids"] + [GMASK, EOS]
    one_round = template.render("上海呢", history[1:])
    ids, cut = template.prompt_ids("上海呢", history, len(one_round))
    assert cut and ids == one_round  # the oldest round went first
    assert template.prompt_ids("上海呢", history, 12)[0] == template.render("上海呢", [])


def test_training_example_matches_hand_worked_layout(cog_tokenizer):
    template = GLMTemplate(cog_tokenizer)
    source = [CLS, 11, 12, GMASK, EOS]  # gMASK at position 3
    example = template.training_example(source, [21, 22], max_target_length=8)
    np.testing.assert_array_equal(example["input_ids"], [CLS, 11, 12, GMASK, EOS, SOP, 21, 22])
    np.testing.assert_array_equal(example["position_ids"], [[0, 1, 2, 3, 4, 3, 3, 3], [0, 0, 0, 0, 0, 1, 2, 3]])
    assert int(example["attention_mask"]) == 5
    np.testing.assert_array_equal(example["labels"], [0, 0, 0, 0, 0, 21, 22, EOP])
    np.testing.assert_array_equal(example["loss_mask"], [0, 0, 0, 0, 0, 1, 1, 1])
    truncated = template.training_example(source, [21, 22, 23, 24], max_target_length=3)
    np.testing.assert_array_equal(truncated["labels"][5:], [21, 22, EOP])


def test_generation_example_starts_part_b_at_mask_position(cog_tokenizer):
    template = GLMTemplate(cog_tokenizer)
    prompt = template.generation_example([CLS, 11, GMASK, EOS])
    np.testing.assert_array_equal(prompt["input_ids"], [CLS, 11, GMASK, EOS, SOP])
    np.testing.assert_array_equal(prompt["position_ids"], [[0, 1, 2, 3, 2], [0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(prompt["position_step"], [0, 1])  # generated tokens keep the mask position
    assert int(prompt["attention_mask"]) == 4
    smask_prompt = template.generation_example([CLS, SMASK, 11, EOS])
    assert smask_prompt["position_ids"][0, -1] == 1
    with pytest.raises(ValueError, match="no \\[MASK\\]"):
        template.generation_example([CLS, 11, EOS])


def test_collator_pads_only_to_longest_in_batch(cog_tokenizer):
    template = GLMTemplate(cog_tokenizer)
    short = template.training_example([CLS, GMASK, EOS], [21], max_target_length=160)
    long = template.training_example([CLS, 11, 12, 13, GMASK, EOS], [21, 22, 23], max_target_length=160)
    batch = Collator(PAD, return_tensors="np")([short, long])
    assert batch["input_ids"].shape == (2, 10)  # not src_length + tgt_length
    np.testing.assert_array_equal(batch["input_ids"][0], [CLS, GMASK, EOS, SOP, 21] + [PAD] * 5)
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 0, 1, 1] + [0] * 5)
    np.testing.assert_array_equal(batch["attention_mask"], [3, 6])
    assert batch["position_ids"].shape == (2, 2, 10)
    padded = Collator(PAD, return_tensors="np", pad_to_multiple_of=8)([short, long])
    assert padded["input_ids"].shape == (2, 16)


def test_generation_batch_left_pads_and_aligns_part_b(cog_tokenizer):
    template = GLMTemplate(cog_tokenizer)
    prompts = [template.generation_example([CLS, GMASK, EOS]), template.generation_example([CLS, 11, 12, GMASK, EOS])]
    batch = generation_batch(prompts, PAD)
    np.testing.assert_array_equal(batch["input_ids"][0], [PAD, PAD, CLS, GMASK, EOS, SOP])
    np.testing.assert_array_equal(batch["key_mask"][0], [0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(batch["position_ids"][0], [[0, 0, 0, 1, 2, 1], [0, 0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(batch["input_ids"][:, -1], [SOP, SOP])
    np.testing.assert_array_equal(batch["sep"], [5, 5])  # part A ends before <|startofpiece|> in both rows
    np.testing.assert_array_equal(batch["position_step"], [[0, 1], [0, 1]])
