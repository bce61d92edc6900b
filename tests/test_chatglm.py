"""ChatGLM-6B: against an independent PyTorch model of THUDM's code (exact semantics), against PaddleNLP's port
where the two agree, and against itself without the K/V cache or split over two ranks."""
from __future__ import annotations

import json

import numpy as np
import paddle
import pytest
import torch
from paddlenlp.transformers import ChatGLMConfig
from paddlenlp.transformers import ChatGLMForCausalLM as PaddleNLPChatGLM

from chatglm_reference_torch import (
    chatglm_logits, chatglm_loss, random_thudm_state, thudm_batch, thudm_inv_freq, thudm_rotary_table,
)
from conftest import to_numpy
from paddle_glm.models.chatglm import ChatGLMForCausalLM, rotary_inverse_frequencies, rotary_tables
from tp_worker import forward_backward

LAYERS, VOCAB, HIDDEN, HEADS, INNER = 2, 160, 64, 4, 256
GMASK, SOP, PAD = 150, 151, 3  # stand-ins for [gMASK], <sop> and the pad id inside the tiny vocabulary
# Against the reference both models run in float64, where the same computation agrees to ~1e-12 and any
# difference of semantics shows by orders of magnitude (in float32 these weights leave ~1e-4 of rounding noise
# on logits of ~30 in either implementation).
EXACT = 1e-9


def tiny_config(**overrides) -> ChatGLMConfig:
    values = dict(num_hidden_layers=LAYERS, vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS,
                  inner_hidden_size=INNER, max_sequence_length=64, bos_token_id=SOP, gmask_token_id=GMASK,
                  pad_token_id=PAD)
    values.update(overrides)
    return ChatGLMConfig(**values)


def to_ours(thudm_state) -> dict:
    """THUDM's checkpoint through our name mappings; what they leave out is derived (rotary) or tied (lm_head)."""
    left = {name: tensor.numpy() for name, tensor in thudm_state.items()}
    mappings = ChatGLMForCausalLM._get_name_mappings(tiny_config())
    converted = {mapping.target_name: mapping.run(left, mapping.source_name) for mapping in mappings}
    rotary = [f"transformer.layers.{i}.attention.rotary_emb.inv_freq" for i in range(LAYERS)]
    assert sorted(left) == ["lm_head.weight"] + rotary
    return converted


@pytest.fixture(scope="module")
def thudm():
    return random_thudm_state(LAYERS, VOCAB, HIDDEN, INNER, HEADS, seed=0)


@pytest.fixture(scope="module")
def thudm64(thudm):
    return {name: tensor.double() if tensor.dtype == torch.float32 else tensor for name, tensor in thudm.items()}


@pytest.fixture
def ours(thudm):
    model = ChatGLMForCausalLM(tiny_config())
    state = to_ours(thudm)
    assert sorted(state) == sorted(model.state_dict())
    model.set_state_dict(state)
    model.eval()
    return model


def in_float64(model: ChatGLMForCausalLM) -> ChatGLMForCausalLM:
    twin = ChatGLMForCausalLM(tiny_config())
    twin.set_state_dict(model.state_dict())
    twin.to(dtype="float64")
    twin.eval()
    return twin


def paddlenlp_twin(ours, thudm_frequencies: bool = True):
    """PaddleNLP's ChatGLMForCausalLM with our weights; by default given THUDM's half-precision rotary frequencies,
    the one place where their float32 forward passes differ."""
    reference = PaddleNLPChatGLM(tiny_config())
    reference.set_state_dict(ours.state_dict())
    if thudm_frequencies:
        reference.chatglm.transformer.rotary_embeddings.inv_freq = ours.chatglm.transformer.inv_freq.clone()
    reference.eval()
    return reference


def _sequences(seed: int, prompts=(5, 9, 2), answers=(3, 1, 4)):
    """`prompt [gMASK] <sop> answer` token lists of different lengths."""
    rng = np.random.default_rng(seed)
    return [rng.integers(5, 140, p).tolist() + [GMASK, SOP] + rng.integers(5, 140, a).tolist()
            for p, a in zip(prompts, answers)]


def _batch(sequences):
    """THUDM's left-padded batch: torch (ids, positions, bool mask True = masked) and ours (0/1, 1 = visible)."""
    ids, positions, masked = thudm_batch(sequences, bos=SOP, gmask=GMASK, pad=PAD)
    ours = (paddle.to_tensor(ids.numpy()), paddle.to_tensor(positions.numpy()),
            paddle.to_tensor((~masked).numpy().astype("float32")))
    return (ids, positions, masked), ours


def _reference_logits(thudm64, torch_inputs) -> np.ndarray:
    with torch.no_grad():
        return chatglm_logits(thudm64, *torch_inputs, num_heads=HEADS).numpy()  # float64


def _logits(model, *inputs) -> np.ndarray:
    with paddle.no_grad():
        return model(*inputs).logits.numpy()


def _sep(sequences) -> paddle.Tensor:
    return paddle.to_tensor([sequence.index(SOP) for sequence in sequences])


def test_state_dict_matches_paddlenlp_keys_and_shapes(ours):
    reference = paddlenlp_twin(ours)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items() if k != "lm_head.decoder_weight"}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == expected
    assert got["chatglm.transformer.layers.0.attention.query_key_value.weight"] == (HIDDEN, 3 * HIDDEN)
    assert reference.lm_head.decoder_weight is reference.chatglm.transformer.word_embeddings.weight  # tied there too


def test_logits_match_thudm_reference_with_left_padding(ours, thudm64):
    torch_inputs, inputs = _batch(_sequences(0))
    expected = _reference_logits(thudm64, torch_inputs)
    assert np.abs(expected).max() > 5.0  # logits spread out: mistakes show
    # every row, the padding ones included: fully masked rows attend uniformly (filled, not biased, scores)
    assert np.abs(_logits(in_float64(ours), *inputs) - expected).max() <= EXACT
    # and float32 within its rounding
    assert np.abs(_logits(ours, *inputs) - expected).max() <= 1e-5 * np.abs(expected).max()


def test_sep_mask_equals_thudm_dense_mask(ours, thudm64):
    sequences = _sequences(1, prompts=(6, 3, 8), answers=(4, 7, 2))  # equal lengths: no padding
    torch_inputs, (ids, positions, _) = _batch(sequences)
    got = _logits(in_float64(ours), ids, positions, _sep(sequences))
    assert np.abs(got - _reference_logits(thudm64, torch_inputs)).max() <= EXACT


def test_gelu_spelled_out_for_export_matches_thudm(ours, thudm64):
    model = in_float64(ours)
    for layer in model.chatglm.transformer.layers:
        layer.mlp.gelu_as_formula = True
    torch_inputs, inputs = _batch(_sequences(14))
    assert np.abs(_logits(model, *inputs) - _reference_logits(thudm64, torch_inputs)).max() <= EXACT


def test_logits_match_paddlenlp_given_thudm_frequencies(ours):
    _, inputs = _batch(_sequences(2))
    got = _logits(ours, *inputs)
    assert np.abs(got - to_numpy(paddlenlp_twin(ours)(*inputs, return_dict=True).logits)).max() <= 1e-5
    # PaddleNLP's own float32 frequencies are not THUDM's: they move the logits well beyond rounding
    unchanged = to_numpy(paddlenlp_twin(ours, thudm_frequencies=False)(*inputs, return_dict=True).logits)
    assert np.abs(unchanged - got).max() > 1e-4


def test_rotary_tables_match_thudm_in_float32_and_float16():
    head_dim, length = 128, 2048  # ChatGLM-6B's heads and positions
    inv_freq = rotary_inverse_frequencies(head_dim)
    np.testing.assert_array_equal(inv_freq.numpy(), thudm_inv_freq(head_dim).float().numpy())
    # token positions count up (first half of the head), block positions down (second half)
    positions = paddle.to_tensor(np.stack([np.arange(length), np.arange(length)[::-1].copy()])[None])  # [1, 2, L]
    half = head_dim // 2
    tables = {}
    for dtype, torch_dtype in ((paddle.float32, torch.float32), (paddle.float16, torch.float16)):
        cos, sin = (to_numpy(table)[0, :, 0] for table in rotary_tables(positions, inv_freq, dtype))
        for got, expected in zip((cos, sin), thudm_rotary_table(head_dim, length, torch_dtype)):
            expected = expected.float().numpy()
            np.testing.assert_allclose(got[:, :half], expected, atol=1e-6)
            np.testing.assert_allclose(got[:, half:], expected[::-1], atol=1e-6)
        tables[dtype] = cos
    # half-precision angles (a float16 table, as THUDM's `.half()` model has) are far from float32 ones
    assert np.abs(tables[paddle.float16] - tables[paddle.float32]).max() > 0.1


def test_loss_and_gradients_match_thudm_and_paddlenlp(ours, thudm64):
    sequences = _sequences(3)
    torch_inputs, inputs = _batch(sequences)
    ids = torch_inputs[0]
    # THUDM: labels are the input ids, -100 on the prompt and padding, shifted inside the model
    thudm_labels = ids.clone()
    for row, sequence in enumerate(sequences):
        thudm_labels[row, : ids.shape[1] - len(sequence) + sequence.index(SOP) + 1] = -100
    # ours: the target of position t at t, and a loss mask
    last = np.zeros([len(ids), 1], "int64")
    labels = paddle.to_tensor(np.concatenate([ids.numpy()[:, 1:], last], axis=1))
    loss_mask = paddle.to_tensor(np.concatenate([thudm_labels.numpy()[:, 1:] != -100, last], 1).astype("float32"))

    params = {name: tensor.clone().requires_grad_(tensor.dtype == torch.float64) for name, tensor in thudm64.items()}
    params["lm_head.weight"] = params["transformer.word_embeddings.weight"]  # tied
    expected = chatglm_loss(chatglm_logits(params, *torch_inputs, num_heads=HEADS), thudm_labels)
    expected.backward()
    model = in_float64(ours)
    loss = model(*inputs, labels=labels, loss_mask=loss_mask).loss
    loss.backward()
    # our loss is computed in float32 (from float64 logits here): agreement to float32 rounding
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    for ours_param, name, transpose in (
        (model.chatglm.transformer.layers[0].attention.query_key_value.weight,
         "layers.0.attention.query_key_value.weight", True),
        (model.chatglm.transformer.layers[1].mlp.dense_4h_to_h.bias, "layers.1.mlp.dense_4h_to_h.bias", False),
        (model.chatglm.transformer.word_embeddings.weight, "word_embeddings.weight", False),  # input and output
    ):
        reference_grad = params["transformer." + name].grad.numpy()
        reference_grad = reference_grad.T if transpose else reference_grad
        np.testing.assert_allclose(ours_param.grad.numpy(), reference_grad, atol=1e-6 * np.abs(reference_grad).max())

    # PaddleNLP's loss (-100 = ignored) divides by every position, the ignored ones included (Paddle's
    # cross_entropy mean); THUDM's and ours by the counted ones
    paddlenlp_labels = paddle.where(loss_mask > 0, labels, paddle.full_like(labels, -100))
    paddlenlp_loss = float(paddlenlp_twin(ours)(*inputs, labels=paddlenlp_labels, return_dict=True).loss)
    counted = float(loss_mask.sum())
    assert counted < loss_mask.size
    ours_fp32 = float(ours(*inputs, labels=labels, loss_mask=loss_mask).loss)
    assert paddlenlp_loss * loss_mask.size / counted == pytest.approx(ours_fp32, rel=1e-6)


def _step_mask(key_mask: np.ndarray, steps: int) -> paddle.Tensor:
    """A decode step's mask [B, 1, 1, prompt + steps]: the real prompt tokens and every generated one."""
    mask = np.concatenate([key_mask, np.ones([len(key_mask), steps])], axis=1)
    return paddle.to_tensor(mask[:, None, None].astype("float32"))


def test_cached_decoding_equals_full_recompute_with_left_padding(ours, thudm64):
    """In float64: the cached steps, our full recompute and THUDM's agree exactly."""
    model = in_float64(ours)
    prompts = _sequences(4, answers=(0, 0, 0))  # each ends in [gMASK] <sop>
    _, (ids, positions, mask) = _batch(prompts)
    key_mask = np.stack([[0.0] * (ids.shape[1] - len(p)) + [1.0] * len(p) for p in prompts])
    rng = np.random.default_rng(5)
    generated = [[] for _ in prompts]
    with paddle.no_grad():
        output = model(ids, positions, mask)
        for step in range(1, 5):
            logits = output.logits.numpy()[:, -1]
            torch_inputs, full_inputs = _batch([p + g for p, g in zip(prompts, generated)])
            np.testing.assert_allclose(logits, model(*full_inputs).logits.numpy()[:, -1], atol=EXACT)
            np.testing.assert_allclose(logits, _reference_logits(thudm64, torch_inputs)[:, -1], atol=EXACT)
            tokens = rng.integers(5, 140, len(prompts))
            for row, token in enumerate(tokens):
                generated[row].append(int(token))
            # a generated token keeps the [gMASK] position and counts the block position up
            step_positions = np.stack([[p.index(GMASK), 1 + step] for p in prompts])[:, :, None]
            cache = output.past_key_values
            assert [tuple(t.shape) for t in cache[0]] == [(3, ids.shape[1] + step - 1, HEADS, HIDDEN // HEADS)] * 2
            output = model(paddle.to_tensor(tokens[:, None]), paddle.to_tensor(step_positions),
                           _step_mask(key_mask, step), cache=cache)


def test_left_padded_prompt_gives_the_same_logits_as_alone(ours):
    long, short = _sequences(6, prompts=(11, 2), answers=(2, 3))
    together = _logits(ours, *_batch([long, short])[1])
    alone = _logits(ours, *_batch([short])[1])
    np.testing.assert_allclose(together[1, -len(short):], alone[0], atol=1e-5)


def _labels(seed: int, shape):
    rng = np.random.default_rng(seed)
    return paddle.to_tensor(rng.integers(0, VOCAB, shape)), paddle.to_tensor((rng.random(shape) < 0.4).astype("float32"))


def test_loss_positions_only_gives_the_same_loss_and_gradients(ours):
    _, inputs = _batch(_sequences(7))
    labels, loss_mask = _labels(8, inputs[0].shape)

    def loss_and_grad(only):
        ours.clear_gradients()
        output = ours(*inputs, labels=labels, loss_mask=loss_mask, label_smoothing=0.1, loss_positions_only=only)
        output.loss.backward()
        return output, ours.chatglm.transformer.word_embeddings.weight.grad.numpy().copy()

    (full, full_grad), (sparse, sparse_grad) = loss_and_grad(False), loss_and_grad(True)
    assert float(sparse.loss) == pytest.approx(float(full.loss), rel=1e-6)
    np.testing.assert_allclose(sparse_grad, full_grad, atol=1e-6)
    assert sparse.logits.shape == [int(loss_mask.sum()), VOCAB]


def test_recompute_gives_same_loss_and_gradients(ours):
    _, inputs = _batch(_sequences(9))
    labels, loss_mask = _labels(10, inputs[0].shape)
    ours.train()

    def loss_and_grad():
        ours.clear_gradients()
        loss = ours(*inputs, labels=labels, loss_mask=loss_mask).loss
        loss.backward()
        return float(loss), ours.chatglm.transformer.layers[0].attention.query_key_value.weight.grad.numpy().copy()

    plain_loss, plain_grad = loss_and_grad()
    ours.recompute_enable()
    assert ours.chatglm.transformer.enable_recompute
    recomputed_loss, recomputed_grad = loss_and_grad()
    assert recomputed_loss == pytest.approx(plain_loss, rel=1e-6)
    np.testing.assert_allclose(recomputed_grad, plain_grad, atol=1e-6 * np.abs(plain_grad).max())


def test_fused_attention_matches_plain_path(ours):
    fused = ChatGLMForCausalLM(tiny_config(use_flash_attention=True))
    fused.set_state_dict(ours.state_dict())
    fused.eval()
    sequences = _sequences(11, prompts=(6, 3), answers=(2, 5))  # no padding: no fully masked rows
    ids, positions, _ = _batch(sequences)[1]
    np.testing.assert_allclose(_logits(fused, ids, positions, _sep(sequences)),
                               _logits(ours, ids, positions, _sep(sequences)), atol=1e-5)


def test_checkpoint_round_trips_with_paddlenlp(ours, tmp_path):
    _, inputs = _batch(_sequences(12))
    expected = _logits(ours, *inputs)
    ours.save_pretrained(str(tmp_path / "ours"))
    in_paddlenlp = PaddleNLPChatGLM.from_pretrained(str(tmp_path / "ours"))
    in_paddlenlp.chatglm.transformer.rotary_embeddings.inv_freq = ours.chatglm.transformer.inv_freq.clone()
    in_paddlenlp.eval()
    np.testing.assert_allclose(to_numpy(in_paddlenlp(*inputs, return_dict=True).logits), expected, atol=1e-5)
    in_paddlenlp.save_pretrained(str(tmp_path / "paddlenlp"))
    config = lambda name: json.load(open(tmp_path / name / "config.json"))  # noqa: E731
    assert config("ours") == config("paddlenlp")
    np.testing.assert_allclose(_logits(ChatGLMForCausalLM.from_pretrained(str(tmp_path / "paddlenlp")), *inputs),
                               expected, atol=1e-5)
    # a state saved whole (with PaddleNLP's tied head) or carrying THUDM's rotary buffers loads too
    weights = tmp_path / "paddlenlp" / "model_state.pdparams"
    state = paddle.load(str(weights))
    state["lm_head.decoder_weight"] = state["chatglm.transformer.word_embeddings.weight"]
    state["chatglm.transformer.layers.0.attention.rotary_emb.inv_freq"] = ours.chatglm.transformer.inv_freq
    paddle.save(state, str(weights))
    np.testing.assert_allclose(_logits(ChatGLMForCausalLM.from_pretrained(str(tmp_path / "paddlenlp")), *inputs),
                               expected, atol=1e-5)


def test_unsupported_config_names_every_problem():
    with pytest.raises(ValueError, match="position_encoding_2d=False.*pre_seq_len.*quantization_bit"):
        ChatGLMForCausalLM(tiny_config(position_encoding_2d=False, pre_seq_len=8, quantization_bit=4))


@pytest.mark.timeout(600)
def test_tensor_parallel_two_ranks_equal_one_process(thudm, tmp_path):
    from test_parallel import launch

    model = ChatGLMForCausalLM(tiny_config())
    model.set_state_dict(to_ours(thudm))
    model.save_pretrained(str(tmp_path / "ckpt"))
    _, (ids, positions, mask) = _batch(_sequences(13))  # left padded, dense masks
    labels, loss_mask = _labels(14, ids.shape)
    inputs = dict(input_ids=ids.numpy(), position_ids=positions.numpy(), attention_mask=mask.numpy(),
                  labels=labels.numpy(), loss_mask=loss_mask.numpy())
    np.savez(tmp_path / "ckpt" / "inputs.npz", **inputs)
    expected = forward_backward(model, inputs)

    launch(tmp_path, "tests/chatglm_tp_worker.py", tmp_path / "ckpt", tmp_path)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in (0, 1)]
    scale = np.abs(expected["logits"]).max()  # ~30: float32 sums in another order differ by ~3e-6 of it
    for result in ranks:
        assert np.abs(result["logits"] - expected["logits"]).max() <= 1e-5 * scale
        assert float(result["loss"]) == pytest.approx(expected["loss"], rel=1e-6)
    # the shards' gradients, merged by PaddleNLP's rules (QKV in whole heads, embeddings by rows), are the whole ones
    merge = ChatGLMForCausalLM._get_tensor_parallel_mappings(tiny_config(tensor_parallel_degree=2), is_split=False)
    assert len(expected["grads"]) == len(model.state_dict())
    for name, grad in expected["grads"].items():
        parts = [result[f"grad:{name}"] for result in ranks]
        action = merge.get(name.split(".", 1)[1])
        got = action(parts) if action else parts[0]
        np.testing.assert_allclose(got, grad, atol=1e-5 * np.abs(grad).max(), err_msg=name)
