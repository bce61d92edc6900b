"""Our decoding over the K/V cache against PaddleNLP's `generate` on the same weights.

Where the semantics agree (greedy, beam search with GNMT length penalty, min length) the tokens
must be identical. Where they differ by design they are not compared here: `no_repeat_ngram_size`
and `repetition_penalty` look only at generated tokens in ours (PaddleNLP also counts the prompt,
so a question could never reuse a phrase of its context); those are tested in test_decoding.py.
"""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from paddle_glm.decoding import DecodingConfig
from paddle_glm.generation import generate
from paddle_glm.models.glm import GLMSpecialIds, GLMTemplate

PAD, EOP = 90, 94


# GLM's template over the tiny test vocabulary: [CLS] 91, eos = pad 90, <sop> 93, <eop> 94, [gMASK] 95.
TEMPLATE = GLMTemplate(None, GLMSpecialIds(pad=PAD, cls=91, eos=PAD, sop=93, eop=EOP, gmask=95, mask_ids=(95,)))


def _prompts():
    rng = np.random.default_rng(21)
    return [TEMPLATE.generation_example([91] + rng.integers(1, 90, length).tolist() + [95, 90])
            for length in (6, 2, 10)]


def _paddlenlp_generate(reference, prompt, max_new: int, **kwargs):
    """PaddleNLP's generate on one prompt, with full-length positions and mask as its tokenizer builds them."""
    n = len(prompt["input_ids"]) - 1  # source length (without sop)
    total = n + max_new + 1
    rows = list(prompt["position_ids"][0][:n]) + [prompt["position_ids"][0][n]] * (max_new + 1)
    blocks = [0] * n + list(range(1, max_new + 2))
    mask = np.tril(np.ones([total, total], dtype="float32"))
    mask[:, :n] = 1.0
    with paddle.no_grad():
        ids, _ = reference.generate(
            input_ids=paddle.to_tensor(prompt["input_ids"][None], dtype="int64"),
            position_ids=paddle.to_tensor([[rows, blocks]], dtype="int64"),
            attention_mask=paddle.to_tensor(mask[None, None]),
            max_new_tokens=max_new, eos_token_id=EOP, pad_token_id=PAD, use_cache=True, **kwargs,
        )
    sequences = []
    for row in ids.numpy().tolist():
        sequences.append(row[: row.index(EOP)] if EOP in row else row)
    return sequences


@pytest.mark.parametrize("min_length", [0, 4])
def test_greedy_equals_paddlenlp_generate(twin_models, min_length):
    ours, reference = twin_models
    prompts = _prompts()
    config = DecodingConfig(max_length=8, min_length=min_length, eos_token_id=EOP, pad_token_id=PAD)
    got = generate(ours, prompts, config).sequences
    expected = [
        _paddlenlp_generate(reference, p, 8, decode_strategy="greedy_search", min_new_tokens=min_length)[0]
        for p in prompts
    ]
    assert got == expected
    assert all(len(seq) >= min_length for seq in got)


@pytest.mark.parametrize("num_beams,num_return,length_penalty,early_stopping", [
    (3, 1, 1.0, False), (4, 2, 0.7, False), (2, 2, 1.5, True),
])
def test_beam_search_equals_paddlenlp_generate(twin_models, num_beams, num_return, length_penalty, early_stopping):
    ours, reference = twin_models
    prompts = _prompts()
    config = DecodingConfig(
        decode_strategy="beam_search", num_beams=num_beams, num_return_sequences=num_return, max_length=7,
        length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=EOP, pad_token_id=PAD,
    )
    got = generate(ours, prompts, config).sequences
    expected = []
    for p in prompts:
        expected += _paddlenlp_generate(
            reference, p, 7, decode_strategy="beam_search", num_beams=num_beams, num_return_sequences=num_return,
            length_penalty=length_penalty, early_stopping=early_stopping,
        )
    assert got == expected


def test_generate_restores_training_mode(twin_models):
    ours, _ = twin_models
    ours.train()
    generate(ours, _prompts()[:1], DecodingConfig(max_length=2, eos_token_id=EOP, pad_token_id=PAD))
    assert ours.training
