"""GLM inputs with the real `cog-pretrain.model` vocabulary, checked against hand-worked examples."""
from __future__ import annotations

import numpy as np
import pytest

from paddle_glm.inputs import (
    GLMCollator, GLMSpecialIds, build_source_ids, generation_batch, generation_example, training_example,
)

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
    from paddle_glm.tokenizer import load_tokenizer

    cog_tokenizer.save_pretrained(str(tmp_path))
    reloaded = load_tokenizer(str(tmp_path))
    assert (reloaded.sop_token_id, reloaded.gmask_token_id, reloaded.eop_token_id) == (SOP, GMASK, EOP)


def test_build_source_ids_places_gmask_before_eos(cog_tokenizer):
    special = GLMSpecialIds.from_tokenizer(cog_tokenizer)
    text = cog_tokenizer.encode("北京是中国的首都", add_special_tokens=False)["input_ids"]
    assert cog_tokenizer.convert_ids_to_tokens(text) == ["▁北京", "是", "中国的", "首都"]
    source = build_source_ids(text, special, max_length=32)
    assert source == [CLS] + text + [GMASK, EOS]
    assert build_source_ids(text, special, max_length=6) == [CLS] + text[:3] + [GMASK, EOS]
    assert build_source_ids(text, special, max_length=6, truncation_side="left") == [CLS] + text[1:] + [GMASK, EOS]
    with pytest.raises(ValueError, match="at least 4"):
        build_source_ids(text, special, max_length=3)


def test_training_example_matches_hand_worked_layout(cog_tokenizer):
    special = GLMSpecialIds.from_tokenizer(cog_tokenizer)
    source = [CLS, 11, 12, GMASK, EOS]  # gMASK at position 3
    example = training_example(source, [21, 22], special, max_target_length=8)
    np.testing.assert_array_equal(example["input_ids"], [CLS, 11, 12, GMASK, EOS, SOP, 21, 22])
    np.testing.assert_array_equal(example["position_ids"], [[0, 1, 2, 3, 4, 3, 3, 3], [0, 0, 0, 0, 0, 1, 2, 3]])
    assert int(example["attention_mask"]) == 5
    np.testing.assert_array_equal(example["labels"], [0, 0, 0, 0, 0, 21, 22, EOP])
    np.testing.assert_array_equal(example["loss_mask"], [0, 0, 0, 0, 0, 1, 1, 1])
    truncated = training_example(source, [21, 22, 23, 24], special, max_target_length=3)
    np.testing.assert_array_equal(truncated["labels"][5:], [21, 22, EOP])


def test_generation_example_starts_part_b_at_mask_position(cog_tokenizer):
    special = GLMSpecialIds.from_tokenizer(cog_tokenizer)
    prompt = generation_example([CLS, 11, GMASK, EOS], special)
    np.testing.assert_array_equal(prompt["input_ids"], [CLS, 11, GMASK, EOS, SOP])
    np.testing.assert_array_equal(prompt["position_ids"], [[0, 1, 2, 3, 2], [0, 0, 0, 0, 1]])
    smask_prompt = generation_example([CLS, SMASK, 11, EOS], special)
    assert smask_prompt["position_ids"][0, -1] == 1
    with pytest.raises(ValueError, match="no \\[MASK\\]"):
        generation_example([CLS, 11, EOS], special)


def test_collator_pads_only_to_longest_in_batch(cog_tokenizer):
    special = GLMSpecialIds.from_tokenizer(cog_tokenizer)
    short = training_example([CLS, GMASK, EOS], [21], special, max_target_length=160)
    long = training_example([CLS, 11, 12, 13, GMASK, EOS], [21, 22, 23], special, max_target_length=160)
    batch = GLMCollator(PAD, return_tensors="np")([short, long])
    assert batch["input_ids"].shape == (2, 10)  # not src_length + tgt_length
    np.testing.assert_array_equal(batch["input_ids"][0], [CLS, GMASK, EOS, SOP, 21] + [PAD] * 5)
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 0, 1, 1] + [0] * 5)
    np.testing.assert_array_equal(batch["attention_mask"], [3, 6])
    assert batch["position_ids"].shape == (2, 2, 10)
    padded = GLMCollator(PAD, return_tensors="np", pad_to_multiple_of=8)([short, long])
    assert padded["input_ids"].shape == (2, 16)


def test_generation_batch_left_pads_and_aligns_part_b(cog_tokenizer):
    special = GLMSpecialIds.from_tokenizer(cog_tokenizer)
    prompts = [generation_example([CLS, GMASK, EOS], special), generation_example([CLS, 11, 12, GMASK, EOS], special)]
    batch = generation_batch(prompts, PAD)
    np.testing.assert_array_equal(batch["input_ids"][0], [PAD, PAD, CLS, GMASK, EOS, SOP])
    np.testing.assert_array_equal(batch["key_mask"][0], [0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(batch["position_ids"][0], [[0, 0, 0, 1, 2, 1], [0, 0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(batch["input_ids"][:, -1], [SOP, SOP])
