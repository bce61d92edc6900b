"""ChatGLM2/3 (paddle_glm.models.chatglm2) against PaddleNLP's ChatGLMv2ForCausalLM on the same weights, against an
independent PyTorch implementation of THUDM's forward pass (where THUDM is followed on purpose), against itself
without the K/V cache, and against itself over 2 tensor-parallel ranks."""
from __future__ import annotations

import json
import os

import numpy as np
import paddle
import pytest
import torch
from paddlenlp.transformers import ChatGLMv2ForCausalLM as PaddleNLPChatGLMv2
from safetensors import safe_open
from safetensors.numpy import save_file

import chatglm2_reference_torch as thudm
from chatglm2_tp_worker import run_checks
from conftest import to_numpy
from paddle_glm.models.chatglm2 import ChatGLMv2Config, ChatGLMv2ForCausalLM, RotaryEmbedding, kv_groups_per_rank
from paddle_glm.models.layers import sep_to_dense_mask
from test_parallel import launch

V = 128


def tiny_config(**overrides) -> ChatGLMv2Config:
    values = dict(num_hidden_layers=2, vocab_size=V, hidden_size=64, num_attention_heads=4, kv_channels=16,
                  multi_query_group_num=2, ffn_hidden_size=96, add_qkv_bias=True, max_sequence_length=64,
                  hidden_dropout=0.0, attention_dropout=0.0, architectures=["ChatGLMv2ForCausalLM"])
    values.update(overrides)
    return ChatGLMv2Config(**values)


def thudm_spec(config: ChatGLMv2Config) -> thudm.Spec:
    return thudm.Spec(num_layers=config.num_hidden_layers, vocab=config.vocab_size, hidden=config.hidden_size,
                      heads=config.num_attention_heads, groups=config.multi_query_group_num,
                      kv_channels=config.kv_channels, ffn=config.ffn_hidden_size, seq_length=config.max_sequence_length,
                      rope_ratio=getattr(config, "rope_ratio", 1.0))


def from_thudm(state: thudm.State, config: ChatGLMv2Config) -> dict:
    """THUDM's names and [out, in] layout to ours, by the name mapping the model class declares."""
    arrays = {key: value.numpy() for key, value in state.items()}
    mappings = ChatGLMv2ForCausalLM._get_name_mappings(config)
    converted = {m.target_name: paddle.to_tensor(m.run(arrays, m.source_name)) for m in mappings}
    assert not arrays, f"unmapped THUDM tensors: {sorted(arrays)}"
    return converted


def build(model_class, config: ChatGLMv2Config, state: dict):
    model = model_class(config)
    model.set_state_dict(state)
    model.eval()
    return model


@pytest.fixture
def models():
    """Ours and PaddleNLP's on one set of random THUDM-layout weights (non-zero QKV bias, norms away from 1)."""
    config = tiny_config()
    state = thudm.random_thudm_state(thudm_spec(config), seed=0)
    converted = from_thudm(state, config)
    return {"ours": build(ChatGLMv2ForCausalLM, config, converted),
            "paddlenlp": build(PaddleNLPChatGLMv2, tiny_config(), converted),
            "thudm": state, "spec": thudm_spec(config)}


def left_padded(lengths, total: int, seed: int):
    """Token ids (pad 0), positions (0 under the pads, then 0, 1, ... as THUDM's tokenizer pads) and the real-token
    mask [B, total] of prompts of `lengths`, left-padded."""
    rng = np.random.default_rng(seed)
    real = np.array([[0] * (total - n) + [1] * n for n in lengths], dtype="int64")
    ids = rng.integers(1, V, [len(lengths), total]) * real
    positions = np.array([[0] * (total - n) + list(range(n)) for n in lengths], dtype="int64")
    return ids, positions, real


def dense_mask(real: np.ndarray) -> np.ndarray:
    """Ours, [B, 1, S, S]: causal, pad keys hidden."""
    length = real.shape[1]
    return (np.tril(np.ones([length, length]))[None] * real[:, None, :]).astype("float32")[:, None]


def pd(array) -> paddle.Tensor:
    return paddle.to_tensor(array)


def test_state_dict_keys_and_shapes_match_paddlenlp(models):
    ours = {k: tuple(v.shape) for k, v in models["ours"].state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in models["paddlenlp"].state_dict().items()}
    assert ours["chatglm_v2.encoder.layers.0.self_attention.query_key_value.weight"] == (64, (4 + 2 * 2) * 16)
    assert ours["chatglm_v2.encoder.layers.1.mlp.dense_h_to_4h.weight"] == (64, 2 * 96)
    assert ours["chatglm_v2.output_layer.weight"] == (64, V) and ours["chatglm_v2.rotary_pos_emb.inv_freq"] == (4,)


def test_logits_match_paddlenlp_with_positions(models):
    rng = np.random.default_rng(1)
    ids, positions = pd(rng.integers(0, V, [3, 9])), pd(rng.integers(0, 60, [3, 9]))
    expected = to_numpy(models["paddlenlp"](ids, position_ids=positions, return_dict=True).logits)
    got = to_numpy(models["ours"](ids, positions).logits)
    assert np.abs(expected).max() > 3.0  # logits spread enough to show mistakes
    assert np.abs(got - expected).max() <= 1e-5


def test_logits_match_paddlenlp_left_padded(models):
    ids, positions, real = left_padded([3, 8, 5], 8, seed=2)
    expected = to_numpy(models["paddlenlp"](pd(ids), position_ids=pd(positions), attention_mask=pd(real),
                                            return_dict=True).logits)
    got = to_numpy(models["ours"](pd(ids), pd(positions), pd(dense_mask(real))).logits)
    rows = real.astype(bool)  # pad rows are nobody's output
    assert np.abs(got[rows] - expected[rows]).max() <= 1e-5


def test_loss_matches_paddlenlp_with_ignored_labels(models):
    rng = np.random.default_rng(3)
    ids = pd(rng.integers(0, V, [2, 10]))
    labels = rng.integers(0, V, [2, 10])
    labels[0, :4] = labels[1, :7] = -100
    expected = float(models["paddlenlp"](ids, labels=pd(labels), return_dict=True).loss)
    by_label = float(models["ours"](ids, labels=pd(labels)).loss)
    by_mask = float(models["ours"](ids, labels=pd(np.maximum(labels, 0)), loss_mask=pd((labels >= 0).astype("float32"))).loss)
    assert by_label == pytest.approx(expected, rel=1e-6) and by_mask == pytest.approx(expected, rel=1e-6)


def _thudm_logits(models, ids, **kwargs):
    logits, cache = thudm.forward(models["thudm"], models["spec"], torch.from_numpy(ids), **kwargs)
    return logits.numpy(), cache


@pytest.mark.parametrize("overrides", [
    {},
    {"multi_query_group_num": 1},
    # THUDM: heads * kv_channels (32) != hidden_size (64), and ChatGLM3-6B-32k's rope_ratio; PaddleNLP can do neither.
    {"kv_channels": 8, "rope_ratio": 2.0},
])
def test_logits_and_cache_match_thudm_reference(overrides):
    config = tiny_config(**overrides)
    spec = thudm_spec(config)
    state = thudm.random_thudm_state(spec, seed=4)
    ours = build(ChatGLMv2ForCausalLM, config, from_thudm(state, config))
    models = {"thudm": state, "spec": spec}
    ids, positions, real = left_padded([4, 9], 9, seed=5)
    # whole prompts, THUDM's default positions and causal attention
    expected, _ = _thudm_logits(models, ids[1:])
    assert np.abs(to_numpy(ours(pd(ids[1:])).logits) - expected).max() <= 1e-5
    # left padding: THUDM's 2-D padding mask and positions; then two cached decode steps
    prompt = 7
    expected, cache = _thudm_logits(models, ids[:, :prompt], position_ids=torch.from_numpy(positions[:, :prompt]),
                                    attention_mask=torch.from_numpy(real[:, :prompt]))
    output = ours(pd(ids[:, :prompt]), pd(positions[:, :prompt]), pd(dense_mask(real)[:, :, :prompt, :prompt]))
    rows = real[:, :prompt].astype(bool)
    assert np.abs(to_numpy(output.logits)[rows] - expected[rows]).max() <= 1e-5
    for t in (prompt, prompt + 1):
        expected, cache = _thudm_logits(models, ids[:, t:t + 1], position_ids=torch.from_numpy(positions[:, t:t + 1]),
                                        attention_mask=torch.from_numpy(real[:, :t + 1]), past_key_values=cache)
        output = ours(pd(ids[:, t:t + 1]), pd(positions[:, t:t + 1]), pd(dense_mask(real)[:, :, t:t + 1, :t + 1]),
                      cache=output.past_key_values)
        assert np.abs(to_numpy(output.logits) - expected).max() <= 1e-5
    keep = real.astype(bool)  # pad positions' keys are hidden from every query (THUDM lets pad rows see all)
    for (key, value), (thudm_key, thudm_value) in zip(output.past_key_values, cache):
        assert key.shape == [2, prompt + 2, config.multi_query_group_num, config.kv_channels]  # the groups, not copies
        np.testing.assert_allclose(key.numpy()[keep], thudm_key.transpose(0, 1).numpy()[keep], atol=1e-5)
        np.testing.assert_allclose(value.numpy()[keep], thudm_value.transpose(0, 1).numpy()[keep], atol=1e-5)


def test_sep_mask_is_a_bidirectional_prefix_as_thudm_full_mask(models):
    """1-D sep: keys j < sep are seen by every query, the rest is causal (0 = causal); THUDM takes the same mask
    given as `full_attention_mask` (True = hidden)."""
    rng = np.random.default_rng(6)
    ids, sep = rng.integers(0, V, [3, 8]), np.array([3, 0, 8])
    hidden = ~sep_to_dense_mask(pd(sep), 8).numpy().astype(bool)
    assert hidden[0, 0, 0].tolist() == [False] * 3 + [True] * 5 and not hidden[2].any()  # hand-worked rows
    expected, _ = _thudm_logits(models, ids, full_attention_mask=torch.from_numpy(hidden))
    ours = models["ours"]
    got = to_numpy(ours(pd(ids), attention_mask=pd(sep)).logits)
    assert np.abs(got - expected).max() <= 1e-5
    np.testing.assert_allclose(got[1], to_numpy(ours(pd(ids[1:2])).logits)[0], atol=1e-6)  # sep 0: the causal default
    changed = ids.copy()
    changed[:, 2] = (changed[:, 2] + 1) % V  # inside row 0's prefix: its first position sees it
    again = to_numpy(ours(pd(changed), attention_mask=pd(sep)).logits)
    assert np.abs(again[0, 0] - got[0, 0]).max() > 1e-3  # row 0's prefix is bidirectional
    np.testing.assert_allclose(again[1, :2], got[1, :2], atol=1e-6)  # row 1 is causal


def test_given_cache_is_attended_without_use_cache(models):
    """THUDM concatenates a given cache whatever `use_cache` says (PaddleNLP's port drops it)."""
    ours = models["ours"]
    ids = pd(np.random.default_rng(7).integers(0, V, [2, 6]))
    cache = ours(ids[:, :5]).past_key_values
    with_flag = ours(ids[:, 5:], cache=cache)
    without = ours(ids[:, 5:], cache=cache, use_cache=False)
    assert without.past_key_values is None
    np.testing.assert_array_equal(to_numpy(without.logits), to_numpy(with_flag.logits))
    np.testing.assert_allclose(to_numpy(without.logits)[:, -1], to_numpy(ours(ids).logits)[:, -1], atol=1e-5)


def test_rotary_half_precision_takes_cos_sin_in_float32():
    """THUDM casts the float32 [cos, sin] table to the model dtype; casting the angles first (PaddleNLP) is off by up
    to ~0.1 at position 60 in bfloat16."""
    positions = np.arange(64).reshape(1, -1)
    cos, sin = RotaryEmbedding(tiny_config())(pd(positions), "bfloat16")
    angles = positions[..., None].astype("float32") * (1.0 / 10000 ** (np.arange(0, 8, 2, dtype="float32") / 8))
    assert cos.dtype == paddle.bfloat16 and cos.shape == [1, 64, 1, 4]
    assert np.abs(cos.astype("float32").numpy()[:, :, 0] - np.cos(angles)).max() <= 2 ** -8
    assert np.abs(sin.astype("float32").numpy()[:, :, 0] - np.sin(angles)).max() <= 2 ** -8


def test_cached_decoding_equals_full_recompute_left_padded(models):
    """Prefill a left-padded batch, then decode step by step (with a beam-style reorder of the cache): every step's
    logits equal ours and PaddleNLP's recomputing the whole sequence."""
    ours, reference = models["ours"], models["paddlenlp"]
    lengths, prompt, steps = [3, 7, 5], 7, 5
    ids, positions, real = left_padded(lengths, prompt, seed=8)
    rng = np.random.default_rng(9)
    with paddle.no_grad():
        output = ours(pd(ids), pd(positions), pd(dense_mask(real)))
        logits, cache = to_numpy(output.logits)[:, -1], output.past_key_values
        for step in range(steps):
            full = to_numpy(ours(pd(ids), pd(positions), pd(dense_mask(real))).logits)[:, -1]
            again = to_numpy(reference(pd(ids), position_ids=pd(positions), attention_mask=pd(real), return_dict=True).logits)[:, -1]
            assert np.abs(logits - full).max() <= 1e-5 and np.abs(logits - again).max() <= 1e-5
            if step == 2:  # beams swap: the cache rows follow their sequences
                order = np.array([2, 0, 0])
                ids, positions, real, logits = ids[order], positions[order], real[order], logits[order]
                cache = [(paddle.index_select(k, pd(order)), paddle.index_select(v, pd(order))) for k, v in cache]
            token, position = rng.integers(1, V, [3, 1]), positions[:, -1:] + 1
            ids, positions = np.concatenate([ids, token], 1), np.concatenate([positions, position], 1)
            real = np.concatenate([real, np.ones([3, 1], "int64")], 1)
            output = ours(pd(token), pd(position), pd(dense_mask(real)[:, :, -1:]), cache=cache)
            logits, cache = to_numpy(output.logits)[:, -1], output.past_key_values
    assert cache[0][0].shape == [3, prompt + steps, 2, 16]


def test_left_padded_prompt_decodes_as_alone(models):
    ours = models["ours"]
    ids, positions, real = left_padded([3, 8], 8, seed=10)
    alone = ids[:1, -3:], positions[:1, -3:], real[:1, -3:]
    tokens = np.random.default_rng(11).integers(1, V, [3])
    results = []
    with paddle.no_grad():
        for ids_, positions_, real_ in ((ids, positions, real), alone):
            output = ours(pd(ids_), pd(positions_), pd(dense_mask(real_)))
            logits = [to_numpy(output.logits)[0, -3:]]
            for token in tokens:
                positions_ = np.concatenate([positions_, positions_[:, -1:] + 1], 1)
                real_ = np.concatenate([real_, np.ones([len(real_), 1], "int64")], 1)
                output = ours(pd(np.full([len(real_), 1], token)), pd(positions_[:, -1:]),
                              pd(dense_mask(real_)[:, :, -1:]), cache=output.past_key_values)
                logits.append(to_numpy(output.logits)[0])
            results.append(np.concatenate(logits))
    np.testing.assert_allclose(results[0], results[1], atol=1e-5)


def _loss_and_grads(model, *args, **kwargs):
    model.clear_gradients()
    loss = model(*args, **kwargs).loss
    loss.backward()
    return float(loss), {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_positions_only_equals_full_loss(models):
    ours = models["ours"]
    rng = np.random.default_rng(12)
    ids, labels = pd(rng.integers(0, V, [2, 10])), pd(rng.integers(0, V, [2, 10]))
    loss_mask = pd((rng.random([2, 10]) < 0.4).astype("float32"))
    full, full_grads = _loss_and_grads(ours, ids, labels=labels, loss_mask=loss_mask, label_smoothing=0.1)
    output = ours(ids, labels=labels, loss_mask=loss_mask, loss_positions_only=True)
    assert output.logits.shape == [int(loss_mask.sum()), V]
    only, only_grads = _loss_and_grads(ours, ids, labels=labels, loss_mask=loss_mask, label_smoothing=0.1,
                                       loss_positions_only=True)
    assert only == pytest.approx(full, rel=1e-6)
    for name, grad in full_grads.items():
        np.testing.assert_allclose(only_grads[name], grad, atol=1e-6, err_msg=name)


def test_recompute_gives_same_loss_and_gradients(models):
    ours = models["ours"]
    rng = np.random.default_rng(13)
    ids, labels = pd(rng.integers(0, V, [2, 9])), pd(rng.integers(0, V, [2, 9]))
    ours.train()
    plain, plain_grads = _loss_and_grads(ours, ids, labels=labels)
    ours.chatglm_v2.encoder.enable_recompute = True
    recomputed, recomputed_grads = _loss_and_grads(ours, ids, labels=labels)
    assert recomputed == pytest.approx(plain, rel=1e-6) and set(recomputed_grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        np.testing.assert_allclose(recomputed_grads[name], grad, atol=1e-6, err_msg=name)


def test_fused_attention_matches_plain_path(models):
    fused = build(ChatGLMv2ForCausalLM, tiny_config(use_flash_attention=True), models["ours"].state_dict())
    ids, positions, real = left_padded([4, 7], 7, seed=14)
    inputs = pd(ids), pd(positions), pd(dense_mask(real))
    rows = real.astype(bool)
    np.testing.assert_allclose(to_numpy(fused(*inputs).logits)[rows], to_numpy(models["ours"](*inputs).logits)[rows],
                               atol=1e-5)


def test_save_and_load_both_ways_with_paddlenlp(models, tmp_path):
    ids = pd(np.random.default_rng(15).integers(0, V, [2, 7]))
    expected = to_numpy(models["ours"](ids).logits)
    models["ours"].save_pretrained(str(tmp_path / "ours"))
    theirs = PaddleNLPChatGLMv2.from_pretrained(str(tmp_path / "ours"))
    theirs.eval()
    np.testing.assert_allclose(to_numpy(theirs(ids, return_dict=True).logits), expected, atol=1e-5)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = ChatGLMv2ForCausalLM.from_pretrained(str(tmp_path / "theirs"))
    back.eval()
    np.testing.assert_array_equal(to_numpy(back(ids).logits), expected)
    configs = [json.load(open(tmp_path / side / "config.json")) for side in ("ours", "theirs")]
    assert configs[0] == configs[1] and configs[0]["architectures"] == ["ChatGLMv2ForCausalLM"]


def test_fresh_model_initialisation():
    model = ChatGLMv2ForCausalLM(tiny_config(initializer_range=0.05))
    state = {key: value.numpy() for key, value in model.state_dict().items()}
    layer = "chatglm_v2.encoder.layers.0."
    for key in (layer + "self_attention.query_key_value.weight", layer + "mlp.dense_h_to_4h.weight",
                "chatglm_v2.output_layer.weight", "chatglm_v2.embedding.word_embeddings.weight"):
        assert abs(state[key].std() - 0.05) < 0.005 and abs(state[key].mean()) < 0.005, key
    assert not state[layer + "self_attention.query_key_value.bias"].any()
    assert (state[layer + "input_layernorm.weight"] == 1).all() and (state["chatglm_v2.encoder.final_layernorm.weight"] == 1).all()


def test_unsupported_configurations_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="multi_query_attention false"):
        ChatGLMv2ForCausalLM(tiny_config(multi_query_attention=False))
    with pytest.raises(ValueError, match="multi_query_group_num 3 does not divide num_attention_heads 4"):
        ChatGLMv2ForCausalLM(tiny_config(multi_query_group_num=3))


def _split_config(heads: int, groups: int, degree: int, rank: int = 0) -> ChatGLMv2Config:
    config = tiny_config(num_hidden_layers=1, hidden_size=8, num_attention_heads=heads, kv_channels=2,
                         multi_query_group_num=groups, ffn_hidden_size=4)
    config.tensor_parallel_degree, config.tensor_parallel_rank = degree, rank
    return config


@pytest.mark.parametrize("heads, groups, degree, expected", [
    # columns: Q 0-7 (4 heads x 2), then K and V; a rank takes its heads' Q and the K/V groups they read
    (4, 2, 2, [[0, 1, 2, 3, 8, 9, 12, 13], [4, 5, 6, 7, 10, 11, 14, 15]]),
    (4, 1, 2, [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 8, 9, 10, 11]]),  # one group, on both ranks
    (4, 2, 4, [[0, 1, 8, 9, 12, 13], [2, 3, 8, 9, 12, 13], [4, 5, 10, 11, 14, 15], [6, 7, 10, 11, 14, 15]]),
])
def test_tensor_parallel_qkv_split_rule_hand_worked(heads, groups, degree, expected, tmp_path):
    key = "encoder.layers.0.self_attention.query_key_value."
    width = (heads + 2 * groups) * 2
    weight, bias = np.arange(width, dtype="float32")[None].repeat(8, 0), np.arange(width, dtype="float32")
    save_file({"weight": weight}, str(tmp_path / "qkv.safetensors"))
    shards = []
    with safe_open(str(tmp_path / "qkv.safetensors"), framework="np") as lazy:  # as PaddleNLP's loader reads them
        for rank in range(degree):
            split = ChatGLMv2ForCausalLM._get_tensor_parallel_mappings(_split_config(heads, groups, degree, rank))
            shards.append((split[key + "weight"](weight), split[key + "bias"](paddle.to_tensor(bias)).numpy()))
            assert shards[-1][0][0].tolist() == expected[rank] and shards[-1][1].tolist() == expected[rank]
            np.testing.assert_array_equal(split[key + "weight"](lazy.get_slice("weight")), shards[-1][0])
    merge = ChatGLMv2ForCausalLM._get_tensor_parallel_mappings(_split_config(heads, groups, degree), is_split=False)
    np.testing.assert_array_equal(merge[key + "weight"]([w for w, _ in shards]), weight)
    np.testing.assert_array_equal(merge[key + "bias"]([b for _, b in shards]), bias)


def test_tensor_parallel_gate_up_split_and_bad_degrees():
    gate_up = np.arange(8, dtype="float32")[None]  # [gate 0-3 | up 4-7]
    shards = [ChatGLMv2ForCausalLM._get_tensor_parallel_mappings(_split_config(4, 2, 2, rank))[
        "encoder.layers.0.mlp.dense_h_to_4h.weight"](gate_up) for rank in (0, 1)]
    assert [s[0].tolist() for s in shards] == [[0, 1, 4, 5], [2, 3, 6, 7]]  # matching gate and up halves
    with pytest.raises(ValueError, match="does not divide the 4 attention heads"):
        kv_groups_per_rank(_split_config(4, 2, 3))
    with pytest.raises(ValueError, match="must divide one another"):
        kv_groups_per_rank(_split_config(6, 3, 2))


@pytest.mark.timeout(600)
def test_tensor_parallel_two_ranks_equal_one_process(tmp_path):
    """2 ranks (gloo) against 1 process: K/V groups split (2 groups) and replicated (1 group, degree 2). Logits,
    loss, merged gradients and cached decoding agree; the shards merge back into the checkpoint bit for bit, by our
    rule offline and by PaddleNLP's `merge_tensor_parallel` save."""
    ids, positions, real = left_padded([6, 10], 10, seed=16)
    rng = np.random.default_rng(17)
    inputs = dict(input_ids=ids, position_ids=positions, attention_mask=dense_mask(real),
                  labels=rng.integers(0, V, ids.shape), loss_mask=(real * (rng.random(ids.shape) < 0.6)).astype("float32"))
    expected, directories = {}, []
    for groups in (2, 1):
        config = tiny_config(multi_query_group_num=groups)
        model = build(ChatGLMv2ForCausalLM, config, from_thudm(thudm.random_thudm_state(thudm_spec(config), groups), config))
        directory = tmp_path / f"groups{groups}"
        model.save_pretrained(str(directory))
        np.savez(directory / "inputs.npz", **inputs)
        expected[groups] = run_checks(model, inputs)
        directories.append(directory)
    (tmp_path / "out").mkdir()
    launch(tmp_path, "tests/chatglm2_tp_worker.py", tmp_path / "out", *directories)

    for groups, directory in zip((2, 1), directories):
        ranks = [np.load(tmp_path / "out" / f"groups{groups}-rank{r}.npz") for r in (0, 1)]
        one = expected[groups]
        for result in ranks:
            assert np.abs(result["logits"] - one["logits"]).max() <= 1e-5
            assert np.abs(result["decoded"] - one["decoded"]).max() <= 1e-5
            assert float(result["loss"]) == pytest.approx(one["loss"], rel=1e-6)
        config = tiny_config(multi_query_group_num=groups)
        config.tensor_parallel_degree = 2
        merge = ChatGLMv2ForCausalLM._get_tensor_parallel_mappings(config, is_split=False)
        for name, grad in one["grads"].items():
            parts = [result[f"grad:{name}"] for result in ranks]
            action = merge.get(name.split(".", 1)[1])
            if action is None:  # whole on every rank
                np.testing.assert_allclose(parts[1], parts[0], atol=1e-7, err_msg=name)
            elif groups == 1 and "query_key_value" in name:  # K/V columns after 2 heads x 16: the same sum on both
                np.testing.assert_array_equal(parts[0][..., 32:], parts[1][..., 32:], err_msg=name)
            np.testing.assert_allclose(action(parts) if action else parts[0], grad, atol=1e-6, err_msg=name)

        original = paddle.load(str(directory / "model_state.pdparams"), return_numpy=True)
        shards = [paddle.load(str(tmp_path / "out" / f"groups{groups}-shards" / f"model_state.tp0{r}.pdparams"),
                              return_numpy=True) for r in (0, 1)]
        assert set(shards[0]) == set(original)
        for key, value in original.items():
            action = merge.get(key.split(".", 1)[1])
            joined = action([s[key] for s in shards]) if action else shards[0][key]
            np.testing.assert_array_equal(joined, value, err_msg=key)
        merged_dir = tmp_path / "out" / f"groups{groups}-merged"
        merged = paddle.load(str(merged_dir / "model_state.pdparams"), return_numpy=True)
        assert set(merged) == set(original) and all(np.array_equal(merged[k], original[k]) for k in original)
        assert json.load(open(merged_dir / "config.json"))["tensor_parallel_degree"] == 1
        assert os.path.isfile(tmp_path / "out" / f"groups{groups}-shards" / "config.json")
