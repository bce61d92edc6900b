"""Our GLM against PaddleNLP's GLM (same weights) and against itself without the K/V cache."""
from __future__ import annotations

import numpy as np
import paddle
import pytest
from paddlenlp.transformers import GLMForConditionalGeneration as PaddleNLPGLM

from conftest import tiny_config, to_numpy
from paddle_glm.generation import DygraphStepper
from paddle_glm.inputs import generation_batch, prefill_attention_mask
from paddle_glm.models.glm import GLMForConditionalGeneration
from paddle_glm.models.layers import lm_loss, sep_to_dense_mask

B, S, V = 3, 12, 96


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = paddle.to_tensor(rng.integers(0, V, [B, S]), dtype="int64")
    sep = paddle.to_tensor([4, 7, S], dtype="int64")
    rows = [list(range(s)) + [s - 1] * (S - s) for s in (4, 7, S)]
    blocks = [[0] * s + list(range(1, S - s + 1)) for s in (4, 7, S)]
    position_ids = paddle.to_tensor(np.stack([rows, blocks], axis=1), dtype="int64")
    return ids, position_ids, sep


def test_model_state_dict_matches_paddlenlp_keys_and_shapes(twin_models):
    ours, reference = twin_models
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    reference_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours_shapes == reference_shapes
    assert ours_shapes["glm.transformer.layers.0.attention.query_key_value.weight"] == (32, 96)
    assert "glm.transformer.block_position_embeddings.weight" in ours_shapes


def test_model_logits_match_paddlenlp_dense_mask(twin_models):
    ours, reference = twin_models
    ids, position_ids, sep = _inputs()
    dense = sep_to_dense_mask(sep, S)
    dense[0, 0, :, 2] = 0.0  # a hidden key that no sep mask can express
    expected = to_numpy(reference(ids, position_ids, dense, return_dict=True).logits)
    got = to_numpy(ours(ids, position_ids, dense).logits)
    assert np.abs(got - expected).max() <= 1e-5


def test_model_logits_match_paddlenlp_sep_mask(twin_models):
    ours, reference = twin_models
    ids, position_ids, sep = _inputs(1)
    # PaddleNLP never expands 1-D masks (`attention_mask.dim == 1` compares a method with 1): give it the dense form.
    expected = to_numpy(reference(ids, position_ids, sep_to_dense_mask(sep, S), return_dict=True).logits)
    got = to_numpy(ours(ids, position_ids, sep).logits)
    assert np.abs(got - expected).max() <= 1e-5


def test_logit_index_projects_only_the_positions_asked_for(twin_models):
    """`logit_index` (flat over B * S; an exported graph's input) gives the logits of those positions alone: equal to
    the full logits there (PaddleNLP's model as the reference), in the order asked."""
    ours, reference = twin_models
    ids, position_ids, sep = _inputs(2)
    expected = to_numpy(reference(ids, position_ids, sep_to_dense_mask(sep, S), return_dict=True).logits)
    index = np.array([2 * S - 1, 3, S * B - 1])
    got = to_numpy(ours(ids, position_ids, sep, logit_index=paddle.to_tensor(index)).logits)
    assert got.shape == (3, 1, V)
    assert np.abs(got[:, 0] - expected.reshape(B * S, V)[index]).max() <= 1e-5


def test_sep_mask_expansion_matches_hand_worked_example():
    mask = sep_to_dense_mask(paddle.to_tensor([2]), query_length=4).numpy()[0, 0]
    expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype="float32")
    np.testing.assert_array_equal(mask, expected)
    with_cache = sep_to_dense_mask(paddle.to_tensor([2]), query_length=1, cache_length=3).numpy()[0, 0]
    np.testing.assert_array_equal(with_cache, [[1, 1, 1, 1]])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_model_loss_matches_paddlenlp(twin_models, label_smoothing):
    ours, reference = twin_models
    ids, position_ids, sep = _inputs(2)
    labels = paddle.to_tensor(np.random.default_rng(3).integers(0, V, [B, S]), dtype="int64")
    loss_mask = (paddle.arange(S).unsqueeze(0) >= sep.unsqueeze(1)).astype("float32")
    if label_smoothing:
        # PaddleNLP's smoothed loss only broadcasts for batch 1 ([B*S] + [B, S]); compare one sample.
        ids, position_ids, sep, labels, loss_mask = ids[:1], position_ids[:1], sep[:1], labels[:1], loss_mask[:1]
    reference.config.label_smoothing = label_smoothing
    expected = reference(ids, position_ids, sep_to_dense_mask(sep, S), labels=labels, loss_mask=loss_mask, return_dict=True).loss
    got = ours(ids, position_ids, sep, labels=labels, loss_mask=loss_mask, label_smoothing=label_smoothing).loss
    assert abs(float(got) - float(expected)) <= 1e-5 * abs(float(expected))


def test_loss_label_smoothing_matches_hand_computation():
    logits = np.array([[[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]]], dtype="float32")
    labels = np.array([[0, 1]])
    mask = np.array([[1.0, 0.0]], dtype="float32")  # only the first position counts
    eps = 0.2
    log_p = logits[0, 0] - np.log(np.exp(logits[0, 0]).sum())
    expected = (1 - eps) * -log_p[0] + eps * -log_p.mean()
    got = lm_loss(paddle.to_tensor(logits), paddle.to_tensor(labels), paddle.to_tensor(mask), eps)
    assert abs(float(got) - expected) < 1e-6


def test_model_fused_attention_matches_plain_path(twin_models):
    ours, _ = twin_models
    fused = GLMForConditionalGeneration(tiny_config(use_flash_attention=True))
    fused.set_state_dict(ours.state_dict())
    fused.eval()
    ids, position_ids, sep = _inputs(4)
    np.testing.assert_allclose(
        to_numpy(fused(ids, position_ids, sep).logits), to_numpy(ours(ids, position_ids, sep).logits), atol=1e-5
    )


def _full_sequence_inputs(batch, generated):
    """The whole left-padded prompt + generated tokens as one sequence, with GLM's dense mask."""
    prompt_len = batch["input_ids"].shape[1]
    steps = generated.shape[1]
    total = prompt_len + steps
    ids = np.concatenate([batch["input_ids"], generated], axis=1)
    mask_pos = batch["position_ids"][:, 0, -1:]
    rows = np.concatenate([batch["position_ids"][:, 0], np.repeat(mask_pos, steps, axis=1)], axis=1)
    blocks = np.concatenate(
        [batch["position_ids"][:, 1], np.tile(np.arange(2, steps + 2), (len(ids), 1))], axis=1
    )
    mask = np.zeros([len(ids), total, total], dtype="float32")
    mask[:, :, : prompt_len - 1] = batch["key_mask"][:, None, : prompt_len - 1]
    causal = np.tril(np.ones([steps + 1, steps + 1], dtype="float32"))
    mask[:, prompt_len - 1:, prompt_len - 1:] = causal
    mask[:, np.arange(total), np.arange(total)] = 1.0
    return ids, np.stack([rows, blocks], axis=1), mask[:, None]


def _prompts():
    """Three prompts of different lengths in GLM generation layout (vocab ids < 90, specials above)."""
    rng = np.random.default_rng(7)
    prompts = []
    for length in (5, 9, 3):
        source = [91] + rng.integers(1, 90, length).tolist() + [95, 90]  # cls ... gmask eos
        n = len(source)
        prompts.append({
            "input_ids": np.array(source + [93]),
            "position_ids": np.array([list(range(n)) + [n - 2], [0] * n + [1]]),
            "attention_mask": np.array(n),  # part A
            "position_step": np.array([0, 1]),
        })
    return prompts


def test_cache_decode_matches_full_recompute_with_paddlenlp(twin_models):
    ours, reference = twin_models
    batch = generation_batch(_prompts(), pad_token_id=90)
    stepper = DygraphStepper(ours, batch)
    rng = np.random.default_rng(11)
    generated = np.zeros([3, 0], dtype="int64")
    with paddle.no_grad():
        logits = stepper.prefill(expand=1)
        for _ in range(5):
            ids, positions, mask = _full_sequence_inputs(batch, generated)
            expected = to_numpy(reference(paddle.to_tensor(ids), paddle.to_tensor(positions), paddle.to_tensor(mask), return_dict=True).logits)
            assert np.abs(logits - expected[:, -1]).max() <= 1e-5
            tokens = rng.integers(0, V, [3])
            generated = np.concatenate([generated, tokens[:, None]], axis=1)
            logits = stepper.step(tokens)


def test_cache_reorder_matches_full_recompute(twin_models):
    ours, _ = twin_models
    batch = generation_batch(_prompts(), pad_token_id=90)
    stepper = DygraphStepper(ours, batch)
    beams = 2
    rows = np.repeat(np.arange(3), beams)
    expanded = {k: v[rows] for k, v in batch.items()}
    rng = np.random.default_rng(5)
    generated = np.zeros([6, 0], dtype="int64")
    with paddle.no_grad():
        stepper.prefill(expand=beams)
        for step in range(4):
            tokens = rng.integers(0, V, [6])
            generated = np.concatenate([generated, tokens[:, None]], axis=1)
            logits = stepper.step(tokens)
            order = np.array([1, 1, 2, 3, 5, 4]) if step % 2 == 0 else np.array([0, 0, 3, 2, 4, 4])
            stepper.reorder(order)
            generated, logits = generated[order], logits[order]
            ids, positions, mask = _full_sequence_inputs(expanded, generated)
            recomputed = ours(paddle.to_tensor(ids), paddle.to_tensor(positions), paddle.to_tensor(mask))
            assert np.abs(logits - to_numpy(recomputed.logits)[:, -1]).max() <= 1e-5
            # the next step after a reorder must attend to the reordered cache
            tokens = rng.integers(0, V, [6])
            generated = np.concatenate([generated, tokens[:, None]], axis=1)
            logits = stepper.step(tokens)
            ids, positions, mask = _full_sequence_inputs(expanded, generated)
            recomputed = ours(paddle.to_tensor(ids), paddle.to_tensor(positions), paddle.to_tensor(mask))
            assert np.abs(logits - to_numpy(recomputed.logits)[:, -1]).max() <= 1e-5


def test_prefill_mask_hides_left_padding_so_padded_rows_equal_unpadded(twin_models):
    ours, _ = twin_models
    prompts = _prompts()
    alone = [DygraphStepper(ours, generation_batch([p], 90)).prefill(1)[0] for p in prompts]
    with paddle.no_grad():
        together = DygraphStepper(ours, generation_batch(prompts, 90)).prefill(1)
    np.testing.assert_allclose(together, np.stack(alone), atol=1e-5)
    mask = prefill_attention_mask(np.array([[0.0, 1.0, 1.0]]), np.array([2]))[0, 0]
    np.testing.assert_array_equal(mask, [[1, 1, 0], [0, 1, 0], [0, 1, 1]])  # GLM: part A = columns < 2
    causal = prefill_attention_mask(np.array([[0.0, 1.0, 1.0]]), np.array([0]))[0, 0]  # ChatGLM2: causal
    np.testing.assert_array_equal(causal, [[1, 0, 0], [0, 1, 0], [0, 1, 1]])


def test_recompute_gives_same_loss_and_gradients_with_dropout(twin_models):
    """With dropout on, the recomputed forward pass must draw the dropout masks of the first pass (recompute saves
    and restores the RNG state): otherwise the gradients belong to another network than the loss."""
    dropout = 0.3
    ours = GLMForConditionalGeneration(tiny_config(embedding_dropout_prob=dropout, attention_dropout_prob=dropout,
                                                   output_dropout_prob=dropout))
    ours.set_state_dict(twin_models[0].state_dict())
    ids, position_ids, sep = _inputs(6)
    labels = paddle.to_tensor(np.random.default_rng(8).integers(0, V, [B, S]), dtype="int64")
    ours.train()

    def loss_and_grad(seed):
        ours.clear_gradients()
        paddle.seed(seed)
        loss = ours(ids, position_ids, sep, labels=labels).loss
        loss.backward()
        return float(loss), ours.glm.transformer.layers[0].attention.query_key_value.weight.grad.numpy().copy()

    plain_loss, plain_grad = loss_and_grad(11)
    assert loss_and_grad(12)[0] != pytest.approx(plain_loss, rel=1e-3)  # dropout acts: other masks, other loss
    ours.recompute_enable()
    assert ours.glm.transformer.enable_recompute
    recomputed_loss, recomputed_grad = loss_and_grad(11)
    assert recomputed_loss == pytest.approx(plain_loss, rel=1e-6)
    np.testing.assert_allclose(recomputed_grad, plain_grad, atol=1e-6)


def test_checkpoint_round_trips_with_paddlenlp(twin_models, tmp_path):
    ours, reference = twin_models
    ids, position_ids, sep = _inputs(9)
    dense = sep_to_dense_mask(sep, S)
    ours.save_pretrained(str(tmp_path / "ours"))
    loaded_in_paddlenlp = PaddleNLPGLM.from_pretrained(str(tmp_path / "ours"))
    loaded_in_paddlenlp.eval()
    np.testing.assert_allclose(
        to_numpy(loaded_in_paddlenlp(ids, position_ids, dense, return_dict=True).logits), to_numpy(ours(ids, position_ids, sep).logits),
        atol=1e-5,
    )
    reference.save_pretrained(str(tmp_path / "paddlenlp"))
    loaded_in_ours = GLMForConditionalGeneration.from_pretrained(str(tmp_path / "paddlenlp"))
    loaded_in_ours.eval()
    np.testing.assert_allclose(
        to_numpy(loaded_in_ours(ids, position_ids, sep).logits), to_numpy(reference(ids, position_ids, dense, return_dict=True).logits),
        atol=1e-5,
    )


def test_loss_positions_only_gives_the_same_loss_and_gradients(twin_models):
    ours, _ = twin_models
    ids, position_ids, sep = _inputs(12)
    labels = paddle.to_tensor(np.random.default_rng(13).integers(0, V, [B, S]), dtype="int64")
    loss_mask = (paddle.arange(S).unsqueeze(0) >= sep.unsqueeze(1)).astype("float32")

    def loss_and_grad(only):
        ours.clear_gradients()
        output = ours(ids, position_ids, sep, labels=labels, loss_mask=loss_mask, label_smoothing=0.1,
                      loss_positions_only=only)
        output.loss.backward()
        return output, ours.glm.word_embeddings.weight.grad.numpy().copy()

    (full, full_grad), (sparse, sparse_grad) = loss_and_grad(False), loss_and_grad(True)
    assert float(sparse.loss) == pytest.approx(float(full.loss), rel=1e-6)
    np.testing.assert_allclose(sparse_grad, full_grad, atol=1e-6)
    selected = int(loss_mask.sum())
    assert sparse.logits.shape == [selected, V] and selected < B * S  # the projection ran on fewer rows
