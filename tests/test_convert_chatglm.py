"""paddle_glm.convert for ChatGLM-6B and ChatGLM2/3-6B: tiny checkpoints in the shapes of THUDM's Hugging Face
releases (sharded .bin or safetensors with an index, fp16, with or without the `transformer.` wrapper), converted and
compared against independent PyTorch implementations of THUDM's forward pass (tests/chatglm_reference_torch.py,
tests/chatglm2_reference_torch.py) and back to THUDM's layout bit for bit."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file, save_file

from paddle_glm.convert import main
from test_convert import conversion_refused
from paddle_glm.models import load_template, load_tokenizer
from paddle_glm.models.chatglm import ChatGLMForCausalLM
from paddle_glm.models.chatglm2 import ChatGLMv2ForCausalLM

torch = pytest.importorskip("torch")
import chatglm2_reference_torch as thudm2  # noqa: E402  (needs torch)
import chatglm_reference_torch as thudm1  # noqa: E402
from conftest import SHARED_ASSETS  # noqa: E402

REPO = os.path.join(os.path.dirname(__file__), "..")
CHATGLM3_TOKENIZER = os.path.join(SHARED_ASSETS, "chatglm3-tokenizer.model")
THUDM_MODEL_CODE = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}

# ChatGLM-6B, tiny: the architecture of THUDM/chatglm-6b with its special ids inside a small vocabulary.
LAYERS, VOCAB, HIDDEN, HEADS, INNER = 2, 160, 64, 4, 256
GMASK, SOP, PAD = 150, 151, 3
CHATGLM6B_CONFIG = {  # THUDM/chatglm-6b's config.json, shrunk
    "_name_or_path": "THUDM/chatglm-6b", "architectures": ["ChatGLMModel"], "auto_map": THUDM_MODEL_CODE,
    "bos_token_id": SOP, "eos_token_id": 152, "mask_token_id": 149, "gmask_token_id": GMASK, "pad_token_id": PAD,
    "hidden_size": HIDDEN, "inner_hidden_size": INNER, "layernorm_epsilon": 1e-05, "max_sequence_length": 64,
    "model_type": "chatglm", "num_attention_heads": HEADS, "num_layers": LAYERS, "position_encoding_2d": True,
    "torch_dtype": "float16", "transformers_version": "4.23.1", "use_cache": True, "vocab_size": VOCAB,
}
SPEC = thudm2.Spec()  # ChatGLM2/3, tiny: 2 layers, vocabulary 128, hidden 64, 4 heads over 2 K/V groups of 16


def chatglm2_config(spec: thudm2.Spec = SPEC, **extra) -> dict:
    """THUDM/chatglm3-6b's config.json for `spec`."""
    return {
        "_name_or_path": "THUDM/chatglm3-6b", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "auto_map": {**THUDM_MODEL_CODE, "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification"},
        "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "ffn_hidden_size": spec.ffn,
        "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": spec.hidden,
        "kv_channels": spec.kv_channels, "layernorm_epsilon": spec.eps, "multi_query_attention": True,
        "multi_query_group_num": spec.groups, "num_attention_heads": spec.heads, "num_layers": spec.num_layers,
        "original_rope": True, "padded_vocab_size": spec.vocab, "post_layer_norm": True, "rmsnorm": True,
        "seq_length": spec.seq_length, "use_cache": True, "torch_dtype": "float16", "transformers_version": "4.30.2",
        "tie_word_embeddings": False, "eos_token_id": 2, "pad_token_id": 0, **extra,
    }


def write_release(directory, state: dict, config: dict, weights: str = "bin", shards: int = 1,
                  wrapped: bool = True) -> str:
    """A Hugging Face release folder as THUDM's: config.json, the weights in state order cut into (at most)
    `shards` files of about equal bytes, named and indexed as transformers does; `wrapped=False`: the base model
    saved alone (no `transformer.`)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    named = {(key if wrapped else key.replace("transformer.", "", 1)): tensor for key, tensor in state.items()}
    stem, extension = ("pytorch_model", "bin") if weights == "bin" else ("model", "safetensors")
    total = sum(tensor.numel() * tensor.element_size() for tensor in named.values())
    groups = [[]]  # consecutive tensors, cut when a shard would pass its share of the bytes
    for key, tensor in named.items():
        size = sum(named[k].numel() * named[k].element_size() for k in groups[-1])
        if groups[-1] and size + tensor.numel() * tensor.element_size() > total / shards and len(groups) < shards:
            groups.append([])
        groups[-1].append(key)
    weight_map = {}
    for number, group in enumerate(groups, 1):
        name = f"{stem}.{extension}" if shards == 1 else f"{stem}-{number:05d}-of-{len(groups):05d}.{extension}"
        part = {key: named[key] for key in group}
        if weights == "bin":
            torch.save(part, directory / name)
        else:
            save_file({key: tensor.numpy() for key, tensor in part.items()}, str(directory / name),
                      metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
    if shards > 1:
        (directory / f"{stem}.{extension}.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return str(directory)


def hf_state(directory) -> dict:
    """All tensors of a Hugging Face folder (sharded or not) as numpy."""
    state = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith(".safetensors"):
            state.update(load_file(path))
        elif name.endswith(".bin"):
            state.update({k: v.numpy() for k, v in torch.load(path, weights_only=True).items()})
    return state


def our_state(directory, model_class) -> dict:
    model = model_class.from_pretrained(str(directory))
    return {k: v.numpy() for k, v in model.state_dict().items()}


def assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys(), sorted(set(got) ^ set(expected))
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name


@pytest.fixture(scope="module")
def chatglm6b():
    """THUDM's chatglm-6b layout, fp16 as released (rotary buffers and the tied lm_head included)."""
    return {k: v.half() for k, v in thudm1.random_thudm_state(LAYERS, VOCAB, HIDDEN, INNER, HEADS, seed=0).items()}


@pytest.fixture(scope="module")
def chatglm2():
    return thudm2.random_thudm_state(SPEC, seed=1)


# ------------------------------------------------------------------------------------------- ChatGLM-6B

@pytest.mark.parametrize("wrapped", [True, False])
def test_chatglm6b_release_converts_to_the_reference_logits(chatglm6b, tmp_path, wrapped):
    """The release's form: 8 fp16 .bin shards with an index (or the base model's names, without `transformer.`).
    Our model on the converted files (in float64, where the two implementations agree to ~1e-11; float32 leaves
    ~4e-5 of rounding on these logits of ~30) against THUDM's forward on the source's weights."""
    source = write_release(tmp_path / "hf", chatglm6b, CHATGLM6B_CONFIG, "bin", shards=8, wrapped=wrapped)
    assert len([name for name in os.listdir(source) if name.endswith(".bin")]) == 8
    main(["--from", "hf", source, str(tmp_path / "ours")])
    assert sorted(os.listdir(tmp_path / "ours")) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (config["model_type"], config["dtype"], config["num_hidden_layers"], config["inner_hidden_size"],
            config["gmask_token_id"]) == ("chatglm", "float16", LAYERS, INNER, GMASK)

    model = ChatGLMForCausalLM.from_pretrained(str(tmp_path / "ours"))
    model.to(dtype="float64")
    model.eval()
    sequences = [[7, 30, 99, GMASK, SOP, 12, 40], [55, 8, 3, 21, 17, GMASK, SOP, 90, 5, 71]]
    ids, positions, masked = thudm1.thudm_batch(sequences, bos=SOP, gmask=GMASK, pad=PAD)
    with paddle.no_grad():
        got = model(paddle.to_tensor(ids.numpy()), paddle.to_tensor(positions.numpy()),
                    paddle.to_tensor((~masked).numpy().astype("float64"))).logits.numpy()
    with torch.no_grad():
        expected = thudm1.chatglm_logits({k: v.double() for k, v in chatglm6b.items()}, ids, positions, masked,
                                         num_heads=HEADS).numpy()
    assert np.abs(expected).max() > 5.0  # logits that tell weights apart
    assert np.abs(got - expected).max() <= 1e-9


def test_chatglm6b_round_trip_is_bit_exact(chatglm6b, tmp_path):
    """HF -> ours -> HF gives back every tensor of the release (the rotary buffers and the tied lm_head, which ours
    derives, regenerated), its config fields, and ours -> HF -> ours gives back ours."""
    source = write_release(tmp_path / "hf", chatglm6b, CHATGLM6B_CONFIG, "bin", shards=8)
    main(["--from", "hf", source, str(tmp_path / "ours")])
    main(["--from", "paddle", "--to", "hf", "--format", "bin", "--max_shard_size", "100KB", str(tmp_path / "ours"),
          str(tmp_path / "back")])
    files = sorted(os.listdir(tmp_path / "back"))
    assert "pytorch_model.bin.index.json" in files and "pytorch_model-00001-of-00003.bin" in files, files
    assert_same(hf_state(tmp_path / "back"), {k: v.numpy() for k, v in chatglm6b.items()})
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert {k: v for k, v in written.items() if k != "transformers_version"} == {
        k: v for k, v in CHATGLM6B_CONFIG.items() if k != "transformers_version"} | {
        "quantization_bit": 0, "pre_seq_len": None, "prefix_projection": False}  # THUDM's defaults, spelled out
    main(["--from", "hf", str(tmp_path / "back"), str(tmp_path / "again")])
    assert_same(our_state(tmp_path / "again", ChatGLMForCausalLM), our_state(tmp_path / "ours", ChatGLMForCausalLM))


def test_chatglm6b_modified_rotary_buffer_is_refused(chatglm6b, tmp_path):
    """Ours computes the rotary frequencies: a release whose stored ones differ would change on conversion."""
    state = dict(chatglm6b, **{"transformer.layers.1.attention.rotary_emb.inv_freq":
                               chatglm6b["transformer.layers.1.attention.rotary_emb.inv_freq"] * 2})
    source = write_release(tmp_path / "hf", state, CHATGLM6B_CONFIG, "bin", shards=2)
    conversion_refused(["--from", "hf", source, tmp_path / "out"], "pytorch_model-00002-of-00002.bin",
           "transformer.layers.1.attention.rotary_emb.inv_freq", "differs")


def test_chatglm6b_tensor_parallel_shards_merge_back(chatglm6b, tmp_path):
    source = write_release(tmp_path / "hf", chatglm6b, CHATGLM6B_CONFIG, "bin", shards=8)
    main(["--from", "hf", source, str(tmp_path / "whole")])
    main(["--from", "hf", source, str(tmp_path / "tp"), "--tensor_parallel_degree", "2"])
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    _assert_shards_merge(tmp_path / "tp", whole, ChatGLMForCausalLM, degree=2)
    qkv = "chatglm.transformer.layers.0.attention.query_key_value.weight"
    shard = load_file(str(tmp_path / "tp" / "model.tp01.safetensors"))[qkv]
    assert np.array_equal(shard, whole[qkv][:, 3 * HIDDEN // 2:])  # per-head [q_h|k_h|v_h]: whole heads per rank


def test_chatglm6b_tokenizer_is_converted_so_that_the_family_loads_it(chatglm6b, tmp_path):
    source = write_release(tmp_path / "hf", chatglm6b, CHATGLM6B_CONFIG, "bin", shards=2)
    _ice_text_like(tmp_path / "hf" / "ice_text.model")
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({  # THUDM's, as chatglm-6b-v1.1 has it
        "name_or_path": "THUDM/chatglm-6b", "bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>",
        "gmask_token": "[gMASK]", "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>",
        "remove_space": False, "do_lower_case": False, "tokenizer_class": "ChatGLMTokenizer", "num_image_tokens": 0,
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}))
    main(["--from", "hf", source, str(tmp_path / "ours")])
    tokenizer = load_tokenizer(str(tmp_path / "ours"))
    assert type(tokenizer).__name__ == "ChatGLMTokenizer" and tokenizer.num_image_tokens == 0
    assert tokenizer.convert_tokens_to_ids("[gMASK]") == tokenizer.gmask_token_id != tokenizer.unk_token_id
    assert load_template(str(tmp_path / "ours")).stop_ids == (tokenizer.convert_tokens_to_ids("<eop>"),)
    main(["--from", "paddle", "--to", "hf", str(tmp_path / "ours"), str(tmp_path / "back")])
    assert (tmp_path / "back" / "ice_text.model").read_bytes() == (tmp_path / "hf" / "ice_text.model").read_bytes()
    settings = json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())
    assert settings["tokenizer_class"] == "ChatGLMTokenizer" and settings["auto_map"]["AutoTokenizer"][0] == \
        "tokenization_chatglm.ChatGLMTokenizer" and settings["num_image_tokens"] == 0


def _ice_text_like(path) -> None:
    """A small sentencepiece model with ice_text.model's special pieces (`<n>` stands for each new line)."""
    import sentencepiece as spm

    proto = io.BytesIO()
    sentences = ["问：你好 答：你好，我是人工智能助手", "the capital of france is paris"] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=proto, vocab_size=60, model_type="unigram",
        hard_vocab_limit=False, minloglevel=2,
        user_defined_symbols=["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<pad>", "<n>"])
    path.write_bytes(proto.getvalue())


# -------------------------------------------------------------------------------------------- ChatGLM2/3

@pytest.mark.parametrize("weights,shards,wrapped,extra", [
    ("bin", 7, True, {}),  # THUDM/chatglm2-6b
    ("safetensors", 7, True, {}),  # THUDM/chatglm3-6b's safetensors
    ("safetensors", 1, False, {"rope_ratio": 2.0}),  # a base model saved alone; chatglm3-6b-32k's rope_ratio
])
def test_chatglm2_release_converts_to_the_reference_logits(chatglm2, tmp_path, weights, shards, wrapped, extra):
    spec = thudm2.Spec(rope_ratio=extra.get("rope_ratio", 1.0))
    source = write_release(tmp_path / "hf", chatglm2, chatglm2_config(spec, **extra), weights, shards, wrapped)
    main(["--from", "hf", source, str(tmp_path / "ours")])
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (config["model_type"], config["vocab_size"], config["num_hidden_layers"], config["max_sequence_length"],
            config["multi_query_group_num"], config.get("rope_ratio", 1.0)) == (
        "chatglm_v2", SPEC.vocab, SPEC.num_layers, SPEC.seq_length, SPEC.groups, spec.rope_ratio)
    model = ChatGLMv2ForCausalLM.from_pretrained(str(tmp_path / "ours"))
    model.eval()
    ids = np.random.default_rng(2).integers(0, SPEC.vocab, [2, 9])
    with paddle.no_grad():
        got = model(paddle.to_tensor(ids)).logits.numpy()
    with torch.no_grad():
        expected, _ = thudm2.forward(chatglm2, spec, torch.from_numpy(ids))
    assert np.abs(expected.numpy()).max() > 3.0
    assert np.abs(got - expected.numpy()).max() <= 1e-5


def test_chatglm2_round_trip_is_bit_exact_and_paddlenlp_reads_ours(chatglm2, tmp_path):
    from paddlenlp.transformers import ChatGLMv2ForCausalLM as PaddleNLPChatGLMv2

    half = {k: v.half() for k, v in chatglm2.items()}
    config = chatglm2_config()
    source = write_release(tmp_path / "hf", half, config, "safetensors", shards=7)
    main(["--from", "hf", source, str(tmp_path / "ours")])
    ours = our_state(tmp_path / "ours", ChatGLMv2ForCausalLM)
    theirs = PaddleNLPChatGLMv2.from_pretrained(str(tmp_path / "ours"), dtype="float16")
    assert_same({k: v.numpy() for k, v in theirs.state_dict().items()}, ours)
    for weights in ("safetensors", "bin"):
        back = tmp_path / f"back_{weights}"
        main(["--from", "paddle", "--to", "hf", "--format", weights, str(tmp_path / "ours"), str(back)])
        assert_same(hf_state(back), {k: v.numpy() for k, v in half.items()})
        written = json.loads((back / "config.json").read_text())
        assert {k: v for k, v in written.items() if k != "transformers_version"} == {
            k: v for k, v in config.items() if k != "transformers_version"} | {"classifier_dropout": None}
        main(["--from", "hf", str(back), str(tmp_path / f"again_{weights}")])
        assert_same(our_state(tmp_path / f"again_{weights}", ChatGLMv2ForCausalLM), ours)


@pytest.mark.parametrize("degree", [2, 4])  # 4 ranks over 2 K/V groups: each group on 2 ranks
def test_chatglm2_tensor_parallel_shards_merge_back(chatglm2, tmp_path, degree):
    source = write_release(tmp_path / "hf", chatglm2, chatglm2_config(), "safetensors", shards=3)
    main(["--from", "hf", source, str(tmp_path / "whole")])
    main(["--from", "hf", source, str(tmp_path / "tp"), "--tensor_parallel_degree", str(degree)])
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    shards = _assert_shards_merge(tmp_path / "tp", whole, ChatGLMv2ForCausalLM, degree)
    qkv = "chatglm_v2.encoder.layers.0.self_attention.query_key_value.weight"
    q, kv = SPEC.heads * SPEC.kv_channels, SPEC.groups * SPEC.kv_channels
    rank_q, rank_kv = q // degree, kv // min(degree, SPEC.groups)
    last = shards[-1][qkv]  # [Q_r | K_r | V_r]: the last heads and the last group's K and V
    assert np.array_equal(last, np.concatenate([whole[qkv][:, q - rank_q:q], whole[qkv][:, q + kv - rank_kv:q + kv],
                                                whole[qkv][:, q + 2 * kv - rank_kv:]], axis=1))


def _assert_shards_merge(directory, whole: dict, model_class, degree: int) -> list:
    names = [f"model.tp{rank:02d}.safetensors" for rank in range(degree)]
    assert sorted(os.listdir(directory)) == ["config.json"] + names
    shards = [load_file(str(directory / name)) for name in names]
    config = model_class.config_class.from_pretrained(str(directory))
    config.tensor_parallel_degree = degree
    merges = model_class.get_tensor_parallel_convert_actions(config, whole.keys(), is_split=False)
    assert len(merges) > 0
    for name, value in whole.items():
        if name in merges:
            assert shards[0][name].shape != value.shape, name
            assert np.array_equal(merges[name]([s[name] for s in shards]), value), name
        else:
            assert all(np.array_equal(s[name], value) for s in shards), name
    return shards


@pytest.mark.parametrize("name_or_path,folder,chat_format", [
    ("THUDM/chatglm3-6b", "hf", "chatglm3"),
    ("THUDM/chatglm2-6b", "hf", "chatglm2"),
    (None, "chatglm2-6b", "chatglm2"),  # no tokenizer_config.json: the folder's name tells
])
def test_chatglm2_tokenizer_is_converted_so_that_the_family_loads_it(tmp_path, name_or_path, folder, chat_format):
    """THUDM's tokenizer.model and tokenizer_config.json (whose name says ChatGLM2 or ChatGLM3) -> ours, which the
    family loads with the right specials and template; --to hf writes THUDM's file names and tokenizer class."""
    spec = thudm2.Spec(num_layers=1, vocab=65024, hidden=16, heads=2, groups=1, kv_channels=8, ffn=16)
    source = write_release(tmp_path / folder, thudm2.random_thudm_state(spec), chatglm2_config(spec), "safetensors")
    (tmp_path / folder / "tokenizer.model").write_bytes(open(CHATGLM3_TOKENIZER, "rb").read())
    if name_or_path:
        (tmp_path / folder / "tokenizer_config.json").write_text(json.dumps({
            "name_or_path": name_or_path, "remove_space": False, "do_lower_case": False,
            "tokenizer_class": "ChatGLMTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}))
    main(["--from", "hf", source, str(tmp_path / "ours")])
    tokenizer = load_tokenizer(str(tmp_path / "ours"))
    assert (type(tokenizer).__name__, tokenizer.chat_format) == ("ChatGLMv2Tokenizer", chat_format)
    template = load_template(str(tmp_path / "ours"))
    assert type(template).__name__ == {"chatglm3": "ChatGLM3Template", "chatglm2": "ChatGLM2Template"}[chat_format]
    assert template.render("你好", [])[:2] == [64790, 64792]  # [gMASK] sop
    main(["--from", "paddle", "--to", "hf", str(tmp_path / "ours"), str(tmp_path / "back")])
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == open(CHATGLM3_TOKENIZER, "rb").read()
    settings = json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())
    assert settings["tokenizer_class"] == "ChatGLMTokenizer" and settings["chat_format"] == chat_format


# ---------------------------------------------------------------------------------------------- refusals

def test_quantized_releases_are_refused(chatglm2, tmp_path):
    quantized = dict(chatglm2)
    weight = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
    quantized[weight] = torch.randint(-8, 8, quantized[weight].shape, dtype=torch.int8)
    quantized[weight + "_scale"] = torch.ones(quantized[weight].shape[0], dtype=torch.float16)
    source = write_release(tmp_path / "int4", quantized, chatglm2_config(quantization_bit=4), "bin")
    conversion_refused(["--from", "hf", source, tmp_path / "out"], "config.json", "quantization_bit 4", "chatglm2-6b-int4",
           "float16 release")
    # weights quantized without the config saying so: the *_scale tensors name them
    source = write_release(tmp_path / "unsaid", quantized, chatglm2_config(), "bin")
    conversion_refused(["--from", "hf", source, tmp_path / "out"], "pytorch_model.bin", weight + "_scale", "quantized")
    assert not (tmp_path / "out").exists()


def test_unknown_chatglm_config_and_mismatched_weights_are_named(chatglm2, chatglm6b, tmp_path):
    # ChatGLM2 weights under a ChatGLM-6B config.json: every tensor is unexpected
    source = write_release(tmp_path / "mixed", chatglm2, CHATGLM6B_CONFIG, "safetensors")
    conversion_refused(["--from", "hf", source, tmp_path / "out"], "model.safetensors", "missing",
           "transformer.layers.0.attention.query_key_value.weight")
    # settings our model does not implement are refused with the model's own reason
    source = write_release(tmp_path / "ptuning", chatglm6b, dict(CHATGLM6B_CONFIG, pre_seq_len=8), "bin")
    conversion_refused(["--from", "hf", source, tmp_path / "out"], "config.json", "pre_seq_len")
    source = write_release(tmp_path / "mha", chatglm2, chatglm2_config(multi_query_attention=False), "bin")
    conversion_refused(["--from", "hf", source, tmp_path / "out"], "config.json", "multi_query_attention")


# ------------------------------------------------------------------------------------------------ memory

MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    from paddle_glm.convert import convert

    def status(field):
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(field + ":"))

    source, warm_up, out, max_shard_size = sys.argv[1:]
    convert("hf", "paddle", warm_up, out + "_warm_up")  # imports, first use of every kernel
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # the peak (VmHWM) counts from here
    convert("hf", "paddle", source, out, max_shard_size=max_shard_size)
    print(json.dumps({"growth": status("VmHWM") - before, "kept": status("VmRSS") - before}))
""")


def test_conversion_memory_stays_near_one_shard(chatglm2, tmp_path):
    """A ChatGLM2-shaped model of ~100 MB in 8 .bin shards, written in shards of the same size: the conversion's
    peak grows by about one source shard plus one output shard (~40 MiB here), not by the model (~120 MiB when the
    source files are kept open)."""
    spec = thudm2.Spec(num_layers=6, vocab=8192, hidden=512, heads=8, groups=2, kv_channels=64, ffn=1536)
    state = thudm2.random_thudm_state(spec, seed=3)
    total = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    source = write_release(tmp_path / "hf", state, chatglm2_config(spec), "bin", shards=8)
    del state
    warm_up = write_release(tmp_path / "tiny", chatglm2, chatglm2_config(), "bin", shards=2)
    shard = max(os.path.getsize(os.path.join(source, f)) for f in os.listdir(source) if f.endswith(".bin"))
    # A fixed malloc threshold: freed arrays go back to the system at once, so the measure is the conversion's own.
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, source, warm_up, str(tmp_path / "out"),
                             f"{shard // 1000 + 1}KB"], capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"model {total / 2**20:.1f} MiB in 8 shards of <= {shard / 2**20:.1f} MiB: peak "
          f"+{measured['growth'] / 2**20:.1f} MiB, kept +{measured['kept'] / 2**20:.1f} MiB")
    assert len([f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors")]) >= 4  # written in shards
    assert measured["growth"] < 2.5 * shard < 0.6 * total
