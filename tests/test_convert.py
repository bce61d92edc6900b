"""paddle_glm.convert: THUDM and Hugging Face PyTorch checkpoints to ours and back, against an independent
PyTorch GLM (tests/glm_reference_torch.py) on tiny checkpoints built here in the reference's layouts."""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys

import numpy as np
import paddle
import pytest
from paddlenlp.transformers import GLMForConditionalGeneration as PaddleNLPGLM
from safetensors.numpy import load_file, save_file

from paddle_glm.convert import ConversionError, build_parser, main
from paddle_glm.models.glm import GLMConfig, GLMForConditionalGeneration
from paddle_glm.models.glm import glm_tensor_specs

LAYERS, VOCAB, HIDDEN, HEADS, POSITIONS = 2, 64, 32, 4, 32
SHAPE_FLAGS = ["--num_attention_heads", str(HEADS)]  # THUDM checkpoints show everything else in their tensors
HF_CONFIG = {  # as the release's config.json spells it (THUDM/glm-large-chinese), shrunk
    "architectures": ["GLMModel"], "attention_dropout_prob": 0.1, "attention_scale": 1.0,
    "auto_map": {"AutoConfig": "configuration_glm.GLMConfig", "AutoModel": "modeling_glm.GLMModel"},
    "block_position_encoding": True, "checkpoint_activations": False, "checkpoint_num_layers": 1,
    "embedding_dropout_prob": 0.1, "hidden_size": HIDDEN, "initializer_range": 0.02,
    "max_sequence_length": POSITIONS, "model_type": "glm", "num_attention_heads": HEADS, "num_layers": LAYERS,
    "output_dropout_prob": 0.1, "output_predict": True, "parallel_output": True, "pool_token": "cls",
    "relative_encoding": False, "spell_func": "lstm", "spell_length": None, "torch_dtype": "float32",
    "vocab_size": VOCAB,
}


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def reference(torch):
    """The unsplit THUDM-named state dict and the reference GLM's logits on a GLM-shaped batch."""
    import glm_reference_torch as ref

    state = ref.random_thudm_state(LAYERS, VOCAB, HIDDEN, POSITIONS, seed=3)
    inputs = _inputs()
    # In float64: the reference is then exact to our float32 tolerance.
    state64 = {k: v.double() for k, v in state.items()}
    logits = ref.glm_logits(state64, *(torch.from_numpy(x) for x in inputs), num_heads=HEADS).numpy()
    return {"state": state, "inputs": inputs, "logits": logits, "ref": ref}


def _inputs():
    """Two samples, part A of 4 and 10 tokens; part B tokens sit at their mask's position, block positions 1, 2..."""
    rng = np.random.default_rng(0)
    length, seps = 10, [4, 10]
    ids = rng.integers(0, VOCAB, [2, length]).astype("int64")
    rows = [list(range(s)) + [s - 1] * (length - s) for s in seps]
    blocks = [[0] * s + list(range(1, length - s + 1)) for s in seps]
    return ids, np.stack([rows, blocks], axis=1).astype("int64"), np.array(seps, dtype="int64")


def _our_logits(directory: str, model_class=GLMForConditionalGeneration) -> np.ndarray:
    model = model_class.from_pretrained(directory)
    model.eval()
    ids, positions, sep = (paddle.to_tensor(x) for x in _inputs())
    return model(ids, positions, sep).logits.numpy()


def _state_of(directory: str) -> dict:
    model = GLMForConditionalGeneration.from_pretrained(directory)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def write_thudm(root, shards, torch, iteration: int = 3000, extra=None, legacy: bool = False) -> str:
    """A THUDM training checkpoint folder, with the non-tensor objects its checkpoints carry."""
    directory = root / str(iteration)
    directory.mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    for rank, shard in enumerate(shards):
        torch.save({
            "iteration": iteration, "module": shard, "mp_world_size": len(shards),
            "args": argparse.Namespace(num_layers=LAYERS, hidden_size=HIDDEN),
            "np_rng_state": np.random.get_state(), "random_rng_state": random.getstate(),
            "torch_rng_state": torch.get_rng_state(), "csr_tensor_module_names": set(), "ds_version": "0.3.16",
            **(extra or {}),
        }, directory / f"mp_rank_{rank:02d}_model_states.pt", _use_new_zipfile_serialization=not legacy)
    return str(root)


def write_hf(directory, state, torch, weights: str = "bin", prefix: str = "glm.") -> str:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(HF_CONFIG))
    named = {prefix + name: tensor for name, tensor in state.items()}
    if weights == "bin":
        torch.save(named, directory / "pytorch_model.bin")
    else:
        save_file({k: v.numpy() for k, v in named.items()}, str(directory / "model.safetensors"),
                  metadata={"format": "pt"})
    return str(directory)


def test_tensor_table_matches_our_model():
    config = GLMConfig(num_layers=LAYERS, vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS,
                       max_sequence_length=POSITIONS)
    ours = {k: tuple(v.shape) for k, v in GLMForConditionalGeneration(config).state_dict().items()}
    assert {s.name: s.shape for s in glm_tensor_specs(config)} == ours


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_thudm_checkpoint_converts_to_the_reference_logits(reference, torch, tmp_path, ranks):
    shards = reference["ref"].split_model_parallel(reference["state"], ranks)
    if ranks > 1:  # the stride-3 QKV split is not a plain cut: merging it as one would give other logits
        qkv = "transformer.layers.0.attention.query_key_value.weight"
        assert not torch.equal(torch.cat([s[qkv] for s in shards]), reference["state"][qkv])
    source = write_thudm(tmp_path / "thudm", shards, torch)
    main(["--from", "thudm", "--to", "paddle", source, str(tmp_path / "out"), *SHAPE_FLAGS])

    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["num_layers"], config["vocab_size"], config["hidden_size"], config["max_sequence_length"]) == (
        LAYERS, VOCAB, HIDDEN, POSITIONS)
    got = _our_logits(str(tmp_path / "out"))
    assert np.abs(got - reference["logits"]).max() <= 1e-5
    assert np.abs(reference["logits"]).max() > 1.0  # logits that tell weights apart
    # PaddleNLP loads the same file into the same weights.
    theirs = PaddleNLPGLM.from_pretrained(str(tmp_path / "out"))
    ours = _state_of(str(tmp_path / "out"))
    assert all(np.array_equal(ours[k], v.numpy()) for k, v in theirs.state_dict().items())


@pytest.mark.parametrize("weights,prefix", [("bin", "glm."), ("safetensors", "glm."), ("safetensors", "")])
def test_hf_release_converts_to_the_reference_logits(reference, torch, tmp_path, weights, prefix):
    source = write_hf(tmp_path / "hf", reference["state"], torch, weights, prefix)
    main(["--from", "hf", source, str(tmp_path / "out"), "--format", "pdparams"])
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model_state.pdparams"]
    assert np.abs(_our_logits(str(tmp_path / "out")) - reference["logits"]).max() <= 1e-5


def test_ours_to_hf_and_back_is_bit_exact(reference, torch, tmp_path):
    source = write_hf(tmp_path / "hf", reference["state"], torch, "safetensors")
    main(["--from", "hf", source, str(tmp_path / "ours")])
    original = _state_of(str(tmp_path / "ours"))
    for weights in ("safetensors", "bin"):
        hf_dir, back = tmp_path / f"hf_{weights}", tmp_path / f"back_{weights}"
        main(["--from", "paddle", "--to", "hf", "--format", weights, str(tmp_path / "ours"), str(hf_dir)])
        hf_file = hf_dir / ("model.safetensors" if weights == "safetensors" else "pytorch_model.bin")
        hf_state = load_file(str(hf_file)) if weights == "safetensors" else {
            k: v.numpy() for k, v in torch.load(hf_file, weights_only=True).items()}
        # The Hugging Face layout: the release's names under glm., torch's [out, in] weights.
        assert hf_state.keys() == {"glm." + k for k in reference["state"]}
        assert all(np.array_equal(hf_state["glm." + k], v.numpy()) for k, v in reference["state"].items())
        hf_config = json.loads((hf_dir / "config.json").read_text())
        assert {k: hf_config[k] for k in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                                          "max_sequence_length", "model_type")} == {
            k: HF_CONFIG[k] for k in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                                      "max_sequence_length", "model_type")}
        main(["--from", "hf", str(hf_dir), str(back)])
        again = _state_of(str(back))
        assert again.keys() == original.keys()
        for name, value in original.items():
            assert again[name].dtype == value.dtype and np.array_equal(again[name], value), name


def _paddle_checkpoint(directory) -> str:
    """A random checkpoint of ours (no PyTorch involved)."""
    paddle.seed(5)
    config = GLMConfig(num_layers=LAYERS, vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS,
                       max_sequence_length=POSITIONS)
    GLMForConditionalGeneration(config).save_pretrained(str(directory))
    return str(directory)


@pytest.mark.parametrize("weights,names", [("safetensors", ["model.tp00.safetensors", "model.tp01.safetensors"]),
                                           ("pdparams", ["model_state.tp00.pdparams", "model_state.tp01.pdparams"])])
def test_tensor_parallel_shards_merge_back_with_paddlenlp_rules(tmp_path, weights, names):
    source = _paddle_checkpoint(tmp_path / "ours")
    whole = _state_of(source)
    main(["--from", "paddle", source, str(tmp_path / "tp"), "--tensor_parallel_degree", "2", "--format", weights])
    assert sorted(os.listdir(tmp_path / "tp")) == ["config.json"] + names
    shards = [load_file(str(tmp_path / "tp" / n)) if weights == "safetensors"
              else paddle.load(str(tmp_path / "tp" / n), return_numpy=True) for n in names]

    config = GLMConfig.from_pretrained(str(tmp_path / "tp"))
    config.tensor_parallel_degree = 2
    merges = GLMForConditionalGeneration.get_tensor_parallel_convert_actions(config, whole.keys(), is_split=False)
    assert len(merges) == 1 + 6 * LAYERS  # embeddings; per layer QKV w/b, dense w, h_to_4h w/b, 4h_to_h w
    qkv = "glm.transformer.layers.0.attention.query_key_value.weight"
    assert shards[0][qkv].shape == (HIDDEN, 3 * HIDDEN // 2)
    assert not np.array_equal(shards[0][qkv], whole[qkv][:, : 3 * HIDDEN // 2])  # per-head layout, not a plain cut
    for name, value in whole.items():
        merged = merges[name]([s[name] for s in shards]) if name in merges else shards[0][name]
        assert np.array_equal(merged, value), name
        if name not in merges:
            assert np.array_equal(shards[1][name], value), name


def test_big_models_are_written_in_shards_that_both_loaders_read(tmp_path):
    source = _paddle_checkpoint(tmp_path / "ours")
    main(["--from", "paddle", source, str(tmp_path / "sharded"), "--max_shard_size", "40KB"])
    files = sorted(os.listdir(tmp_path / "sharded"))
    assert "model.safetensors.index.json" in files and "model-00001-of-00004.safetensors" in files, files
    whole, sharded = _state_of(source), _state_of(str(tmp_path / "sharded"))
    assert all(np.array_equal(sharded[k], v) for k, v in whole.items())
    theirs = PaddleNLPGLM.from_pretrained(str(tmp_path / "sharded"))
    assert all(np.array_equal(whole[k], v.numpy()) for k, v in theirs.state_dict().items())


def test_glm_10b_chinese_preset_copies_the_embedding_row_as_thudm_release_does(reference, torch, tmp_path):
    vocab = 50048  # the preset's vocabulary, on a tiny model
    state = reference["ref"].random_thudm_state(LAYERS, vocab, HIDDEN, POSITIONS, seed=4)
    source = write_thudm(tmp_path / "thudm", reference["ref"].split_model_parallel(state, 2), torch)
    shape = ["--num_layers", LAYERS, "--hidden_size", HIDDEN, "--num_attention_heads", HEADS,
             "--max_sequence_length", POSITIONS]
    main(["--from", "thudm", source, str(tmp_path / "10b"), "--preset", "glm-10b-chinese", *map(str, shape)])
    main(["--from", "thudm", source, str(tmp_path / "plain"), *map(str, shape)])
    original = state["word_embeddings.weight"].numpy()
    for name, expected_50009 in (("10b", original[50007]), ("plain", original[50009])):
        embeddings = load_file(str(tmp_path / name / "model.safetensors"))["glm.word_embeddings.weight"]
        assert np.array_equal(embeddings[50009], expected_50009)
        assert np.array_equal(np.delete(embeddings, 50009, 0), np.delete(original, 50009, 0))


def test_pre_zip_torch_format_reads_the_same(reference, torch, tmp_path):
    shards = reference["ref"].split_model_parallel(reference["state"], 2)
    main(["--from", "thudm", write_thudm(tmp_path / "zip", shards, torch), str(tmp_path / "a"), *SHAPE_FLAGS])
    main(["--from", "thudm", write_thudm(tmp_path / "old", shards, torch, legacy=True), str(tmp_path / "b"),
          *SHAPE_FLAGS])
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_float16_source_keeps_its_type_unless_asked(reference, torch, tmp_path):
    half = {k: v.half() for k, v in reference["state"].items()}
    source = write_thudm(tmp_path / "thudm", [half], torch)
    main(["--from", "thudm", source, str(tmp_path / "half"), *SHAPE_FLAGS])
    assert json.loads((tmp_path / "half" / "config.json").read_text())["dtype"] == "float16"
    assert load_file(str(tmp_path / "half" / "model.safetensors"))["glm.word_embeddings.weight"].dtype == np.float16
    main(["--from", "thudm", source, str(tmp_path / "full"), *SHAPE_FLAGS, "--dtype", "float32"])
    assert GLMConfig.from_pretrained(str(tmp_path / "full")).dtype == "float32"  # the default: not written
    assert {v.dtype for v in load_file(str(tmp_path / "full" / "model.safetensors")).values()} == {np.dtype("float32")}
    assert np.abs(_our_logits(str(tmp_path / "full")) - reference["logits"]).max() < 0.05  # fp16 rounding only


def test_dtype_float16_casts_a_float32_source(reference, torch, tmp_path):
    source = write_thudm(tmp_path / "thudm", [reference["state"]], torch)
    main(["--from", "thudm", source, str(tmp_path / "half"), *SHAPE_FLAGS, "--dtype", "float16"])
    assert json.loads((tmp_path / "half" / "config.json").read_text())["dtype"] == "float16"
    weights = load_file(str(tmp_path / "half" / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {np.dtype("float16")}
    name = "transformer.layers.0.attention.query_key_value.weight"  # THUDM [out, in] -> ours [in, out]
    np.testing.assert_array_equal(weights["glm." + name], reference["state"][name].numpy().T.astype("float16"))


def test_shape_flags_override_what_the_tensors_show(reference, torch, tmp_path):
    """--vocab_size (any shape flag) is the model's: a checkpoint that does not have it is refused, naming both."""
    source = write_thudm(tmp_path / "thudm", [reference["state"]], torch)
    conversion_refused(["--from", "thudm", source, tmp_path / "out", *SHAPE_FLAGS, "--vocab_size", 2 * VOCAB],
           "word_embeddings.weight", f"[{VOCAB}, {HIDDEN}]", f"[{2 * VOCAB}, {HIDDEN}]")
    main(["--from", "thudm", source, str(tmp_path / "same"), *SHAPE_FLAGS, "--vocab_size", str(VOCAB)])
    assert json.loads((tmp_path / "same" / "config.json").read_text())["vocab_size"] == VOCAB


def _tiny_sentencepiece(path) -> str:
    import sentencepiece as spm

    proto = io.BytesIO()
    sentences = ["the capital of france is paris", "a tiny vocabulary for a tiny model"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=proto, vocab_size=30,
                                   model_type="unigram", hard_vocab_limit=False, minloglevel=2)
    path.write_bytes(proto.getvalue())
    return str(path)


def test_tokenizer_found_next_to_the_source_or_given(reference, torch, tmp_path):
    from paddle_glm.models import load_tokenizer

    source = write_thudm(tmp_path / "thudm", [reference["state"]], torch)
    spm_file = _tiny_sentencepiece(tmp_path / "thudm" / "cog-pretrain.model")
    main(["--from", "thudm", source, str(tmp_path / "found"), *SHAPE_FLAGS])
    main(["--from", "thudm", source + "/3000", str(tmp_path / "given"), *SHAPE_FLAGS, "--spm", spm_file])
    for directory in ("found", "given"):
        assert "tokenizer_config.json" in os.listdir(tmp_path / directory)
        tokenizer = load_tokenizer(str(tmp_path / directory))
        assert tokenizer.convert_ids_to_tokens(tokenizer.gmask_token_id) == "[gMASK]"
    main(["--from", "paddle", "--to", "hf", str(tmp_path / "found"), str(tmp_path / "hf")])
    copied = (tmp_path / "hf" / "cog-pretrain.model").read_bytes()
    assert copied == (tmp_path / "found" / "cog-pretrain.model").read_bytes()


# ------------------------------------------------------------------------------------------- refusals

def conversion_refused(argv, *fragments) -> str:
    """Run `python -m paddle_glm.convert argv...`, expect it to stop with a message holding every fragment."""
    with pytest.raises(SystemExit) as caught:
        main([str(a) for a in argv])
    message = str(caught.value.code)
    for fragment in fragments:
        assert str(fragment) in message, message
    return message


def test_truncated_file_is_named(reference, torch, tmp_path):
    source = write_thudm(tmp_path / "thudm", reference["ref"].split_model_parallel(reference["state"], 2), torch)
    rank1 = tmp_path / "thudm" / "3000" / "mp_rank_01_model_states.pt"
    rank1.write_bytes(rank1.read_bytes()[: rank1.stat().st_size // 2])
    conversion_refused(["--from", "thudm", source, tmp_path / "out", *SHAPE_FLAGS], rank1, "unreadable")
    hf = write_hf(tmp_path / "hf", reference["state"], torch, "safetensors")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    conversion_refused(["--from", "hf", hf, tmp_path / "out2"], weights, "unreadable")


def test_missing_tensor_is_named_with_its_rank_file(reference, torch, tmp_path):
    shards = reference["ref"].split_model_parallel(reference["state"], 2)
    del shards[1]["transformer.layers.1.mlp.dense_h_to_4h.bias"]
    source = write_thudm(tmp_path / "thudm", shards, torch)
    conversion_refused(["--from", "thudm", source, tmp_path / "out", *SHAPE_FLAGS],
           "mp_rank_01_model_states.pt", "missing", "transformer.layers.1.mlp.dense_h_to_4h.bias")
    assert not (tmp_path / "out").exists()


def test_wrong_shapes_are_named_with_file_and_tensor(reference, torch, tmp_path):
    # A preset that does not fit the checkpoint: glm-large-chinese's 24 layers, its vocabulary and hidden size.
    source = write_thudm(tmp_path / "thudm", [reference["state"]], torch)
    conversion_refused(["--from", "thudm", source, tmp_path / "out", "--preset", "glm-large-chinese"],
           "mp_rank_00_model_states.pt", "missing", "24-layer", "transformer.layers.2.input_layernorm.weight")
    conversion_refused(["--from", "thudm", source, tmp_path / "out", "--preset", "glm-large-chinese", "--num_layers", LAYERS],
           "mp_rank_00_model_states.pt", "word_embeddings.weight", "[64, 32]", "[50048, 1024]")
    # One rank's slice of the wrong size.
    shards = reference["ref"].split_model_parallel(reference["state"], 2)
    dense = "transformer.layers.0.attention.dense.weight"
    shards[1][dense] = shards[1][dense][:, :-1].clone()
    source = write_thudm(tmp_path / "thudm2", shards, torch)
    conversion_refused(["--from", "thudm", source, tmp_path / "out", *SHAPE_FLAGS], "mp_rank_01_model_states.pt", dense,
           "[32, 15]", "[32, 16]")
    # A Hugging Face tensor that contradicts its config.json.
    state = dict(reference["state"], **{"transformer.layers.1.mlp.dense_4h_to_h.weight": torch.zeros(HIDDEN, 100)})
    hf = write_hf(tmp_path / "hf", state, torch, "safetensors")
    conversion_refused(["--from", "hf", hf, tmp_path / "out", "--max_shard_size", "20KB"], tmp_path / "hf" / "model.safetensors",
           "transformer.layers.1.mlp.dense_4h_to_h.weight", "[32, 100]", "[32, 128]")
    assert os.listdir(tmp_path / "out") == []  # the shards written before the bad tensor are removed


def test_thudm_needs_the_head_count(reference, torch, tmp_path):
    source = write_thudm(tmp_path / "thudm", [reference["state"]], torch)
    conversion_refused(["--from", "thudm", source, tmp_path / "out"], "--num_attention_heads", "--preset")


def test_checkpoint_that_would_run_code_is_refused_without_running_it(reference, torch, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    source = write_thudm(tmp_path / "thudm", [reference["state"]], torch, extra={"payload": Payload()})
    conversion_refused(["--from", "thudm", source, tmp_path / "out", *SHAPE_FLAGS], "mp_rank_00_model_states.pt", "system")
    assert not marker.exists()


def test_output_with_weights_is_not_mixed_with_new_ones(tmp_path):
    source = _paddle_checkpoint(tmp_path / "ours")
    main(["--from", "paddle", source, str(tmp_path / "out"), "--format", "pdparams"])
    conversion_refused(["--from", "paddle", source, tmp_path / "out"], "model_state.pdparams", "--overwrite")
    main(["--from", "paddle", source, str(tmp_path / "out"), "--overwrite"])
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]


def test_help_explains_every_flag():
    parser = build_parser()
    assert all(action.help for action in parser._actions)
    result = subprocess.run([sys.executable, "-m", "paddle_glm.convert", "--help"], capture_output=True, text=True,
                            cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert result.returncode == 0 and "--tensor_parallel_degree" in result.stdout


def test_conversion_error_is_raised_by_the_api(tmp_path):
    from paddle_glm.convert import convert

    with pytest.raises(ConversionError, match="no config.json"):
        convert("hf", "paddle", str(tmp_path), str(tmp_path / "out"))
