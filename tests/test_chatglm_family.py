"""ChatGLM-6B as a family of the toolkit: THUDM's chat template and tokenizer, cached decoding against THUDM's
semantics, fine-tuning (full, LoRA, tensor-parallel, resumed), prediction, export and every runner backend.

ice_text.model has no public plain copy: the tests train a character-level sentencepiece model with its special
pieces ([MASK], [gMASK], [sMASK], <sop>, <eop>, <pad>, <n>, blanks, ...) and an image-token offset, as small as
the rest (20 instead of the first release's 20,000; the 130k release uses 0).
"""
from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import paddle
import pytest
import sentencepiece as spm
import torch
from paddlenlp.peft import LoRAConfig
from paddlenlp.transformers import ChatGLMTokenizer as PaddleNLPChatGLMTokenizer

from chatglm_reference_torch import chatglm_logits, random_thudm_state, thudm_batch
from test_chatglm import to_ours
from test_fastdeploy import fastdeploy_decode
from test_parallel import launch
from export.exporter import main as export_main
from infer.runner import GLMRunner
from paddle_glm.data import Sample
from paddle_glm.decoding import DecodingConfig, generate as decode
from paddle_glm.demo_data import demo_texts, write_demo_splits
from paddle_glm.finetune import main as finetune
from paddle_glm.generation import generate
from paddle_glm.inputs import generation_batch, prefill_attention_mask
from paddle_glm.lora import GLMLoRAModel
from paddle_glm.models import family_of, load_template
from paddle_glm.models.chatglm import FAMILY, ChatGLMConfig, ChatGLMForCausalLM, ChatGLMTemplate, ChatGLMTokenizer
from paddle_glm.predict import main as predict
from paddle_glm.stepper import CachedStepper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]  # ice_text's order
WHITESPACE = ["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)]
IMAGE_TOKENS = 20
LAYERS, HIDDEN, HEADS, INNER = 2, 128, 4, 512
HISTORY = (("3加4等于多少？", "3加4等于7。"),)


def train_ice_text(path: str, texts, specials=SPECIALS) -> spm.SentencePieceProcessor:
    """A character-level stand-in for ice_text.model: <unk> <s> </s> <pad> at 0-3 as there, the special pieces
    as control symbols (never produced from text), <n>, <|tab|> and the blanks as pieces of their own, and
    sentencepiece's default NFKC normalisation as ice_text has it ("，" is read as ",")."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="char", vocab_size=4000, hard_vocab_limit=False,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        pad_piece="<pad>", control_symbols=specials, user_defined_symbols=WHITESPACE, minloglevel=2)
    with open(path, "wb") as handle:
        handle.write(model.getvalue())
    return spm.SentencePieceProcessor(model_file=path)


def _flags(tiny, output_dir, **overrides):
    flags = dict(model_name_or_path=tiny["base"], task_name="belle", train_file=tiny["belle"]["train"],
                 dev_file=tiny["belle"]["dev"], output_dir=output_dir, src_length=96, tgt_length=24, min_tgt_length=0,
                 num_beams=2, max_steps=80, per_device_train_batch_size=8, per_device_eval_batch_size=16,
                 learning_rate=3e-3, warmup_steps=10, do_train=True, do_eval=True, eval_steps=100000,
                 save_strategy="no", logging_steps=1, report_to="none", device="cpu", seed=3, disable_tqdm=True,
                 max_eval_samples=32)
    flags.update(overrides)
    return [part for key, value in flags.items() for part in (f"--{key}", str(value))]


def _results(output_dir, name="eval_results.json"):
    with open(os.path.join(output_dir, name), encoding="utf-8") as handle:
        return json.load(handle)


def _read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _losses(output_dir):
    """{step: loss} of a run logged every step."""
    history = _results(output_dir, "trainer_state.json")["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Generated BELLE dialogues, a tokenizer trained on them and a random tiny ChatGLM-6B (2 layers)."""
    root = tmp_path_factory.mktemp("chatglm")
    belle = write_demo_splits(str(root / "belle"), "belle", train=400, dev=40, seed=1)
    texts = list(demo_texts(_read_jsonl(belle["train"]))) + [ChatGLMTemplate.text("问", HISTORY), "[[训练时间]]"]
    base = root / "base"
    base.mkdir()
    sp = train_ice_text(str(root / "ice_text.model"), texts)
    ChatGLMTokenizer(str(root / "ice_text.model"), num_image_tokens=IMAGE_TOKENS).save_pretrained(str(base))
    template = FAMILY.template(FAMILY.load_tokenizer(str(base)))
    paddle.seed(0)
    # initializer_range 0.1 (not 0.02): the tied output projection then spreads the logits enough for LoRA,
    # which cannot train the embeddings, to learn from a random base in a hundred steps.
    config = ChatGLMConfig(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                           inner_hidden_size=INNER, max_sequence_length=256, initializer_range=0.1,
                           vocab_size=-(-len(template.tokenizer) // 16) * 16, bos_token_id=template.sop,
                           eos_token_id=template.eop, mask_token_id=template.mask, gmask_token_id=template.gmask,
                           pad_token_id=template.pad_id)
    ChatGLMForCausalLM(config).save_pretrained(str(base))
    return {"root": root, "base": str(base), "belle": belle, "template": template, "sp": sp}


def _piece_ids(sp, pieces):
    """The ids THUDM's tokenizer gives `pieces`: sentencepiece ids after the image tokens."""
    return [sp.piece_to_id(piece) + IMAGE_TOKENS for piece in pieces]


# ------------------------------------------------------------------------------------------ tokenizer, template


def test_chat_template_strings_and_ids_by_hand(tiny):
    template, sp = tiny["template"], tiny["sp"]
    assert template.text("你好", ()) == "你好"  # no history: the query as is
    assert template.text("再加上5呢？", HISTORY) == "[Round 0]\n问：3加4等于多少？\n答：3加4等于7。\n[Round 1]\n问：再加上5呢？\n答："
    assert (template.text("c", (("a", "b"), ("d", "e")))
            == "[Round 0]\n问：a\n答：b\n[Round 1]\n问：d\n答：e\n[Round 2]\n问：c\n答：")

    assert template.render("你好", ()) == _piece_ids(sp, ["▁", "你", "好", "[gMASK]"])
    # NFKC: the full-width colon and question mark are read as ASCII ones
    expected = (["▁", *"[Round▁0]", "<n>", *"问:3加4等于多少?", "<n>", *"答:3加4等于7。", "<n>", *"[Round▁1]", "<n>",
                 *"问:再加上5呢?", "<n>", *"答:", "[gMASK]"])
    assert template.render("再加上5呢？", HISTORY) == _piece_ids(sp, expected)
    assert template.answer_start == tuple(_piece_ids(sp, ["<sop>"]))
    assert template.stop_ids == tuple(_piece_ids(sp, ["<eop>"]))
    assert template.pad_id == sp.piece_to_id("<pad>") + IMAGE_TOKENS == 23


def test_training_and_generation_examples_by_hand(tiny):
    """你好 -> 好: `▁ 你 好 [gMASK] <sop> ▁ 好`, the prefix before <sop> bidirectional, the answer at the [gMASK]
    position with block positions 1, 2, 3; labels the answer and <eop>."""
    template, sp = tiny["template"], tiny["sp"]
    prompt = template.render("你好", ())
    example = template.training_example(prompt, template.target_ids("好"), max_target_length=8)
    assert example["input_ids"].tolist() == _piece_ids(sp, ["▁", "你", "好", "[gMASK]", "<sop>", "▁", "好"])
    assert example["position_ids"].tolist() == [[0, 1, 2, 3, 3, 3, 3], [0, 0, 0, 0, 1, 2, 3]]
    assert int(example["attention_mask"]) == 4
    assert example["labels"].tolist() == [0, 0, 0, 0] + _piece_ids(sp, ["▁", "好", "<eop>"])
    assert example["loss_mask"].tolist() == [0, 0, 0, 0, 1, 1, 1]
    opened = template.generation_example(prompt)
    assert opened["input_ids"].tolist() == _piece_ids(sp, ["▁", "你", "好", "[gMASK]", "<sop>"])
    assert opened["position_ids"].tolist() == [[0, 1, 2, 3, 3], [0, 0, 0, 0, 1]]
    assert opened["position_step"].tolist() == [0, 1]
    # a [MASK] in the text anchors the answer instead, as THUDM's tokenizer does
    masked = template.encode("你") + _piece_ids(sp, ["[MASK]"]) + template.render("好", ())
    assert template.positions(masked, len(masked) + 2)[0, -2:].tolist() == [2, 2]


def test_left_padded_batch_is_the_one_thudms_tokenizer_pads(tiny):
    """PaddleNLP's ChatGLMTokenizer pads as THUDM's (left, pads at position 0 and masked, positions counted from the
    first real token); our batch of template prompts is the same, masks included on every real row."""
    template = tiny["template"]
    texts = ["你好", template.text("再加上5呢？", HISTORY), "北京"]
    prompts = [template.generation_example(template.render(text, ())) for text in texts]
    batch = generation_batch(prompts, template.pad_id)
    theirs = PaddleNLPChatGLMTokenizer.from_pretrained(tiny["base"])(texts, padding=True)
    assert batch["input_ids"].tolist() == theirs["input_ids"]
    assert batch["position_ids"].tolist() == [p.tolist() for p in theirs["position_ids"]]
    ours = prefill_attention_mask(batch["key_mask"], batch["sep"])[:, 0]
    for row, (mask, prompt) in enumerate(zip(theirs["attention_mask"], prompts)):
        real = -len(prompt["input_ids"])
        assert np.array_equal(ours[row, real:], mask[0, real:]), row  # pad rows, which nothing reads, aside


def test_tokenizer_decodes_through_the_image_offset_and_answers_read_as_thudms_chat_shows_them(tiny, tmp_path):
    template = tiny["template"]
    text = "好的，王芳，我记住了。\n问：它  在哪？[[训练时间]]"
    ids = template.encode(text)
    assert template.decode(ids + [template.eop, template.pad_id]) == "好的,王芳,我记住了。\n问:它  在哪?[[训练时间]]"
    # THUDM's process_response: punctuation beside Chinese characters full-width again, its training date
    assert template.response(ids) == "好的，王芳，我记住了。\n问：它  在哪？2023年"
    assert template.response(template.encode(" 65更大,1,2 ")) == "65更大，1,2"  # stripped; between digits ASCII
    # PaddleNLP 2.8.1 subtracts the offset twice: every token decodes as another (THUDM's decoding wins)
    assert PaddleNLPChatGLMTokenizer.from_pretrained(tiny["base"]).decode(ids) != template.decode(ids)

    train_ice_text(str(tmp_path / "ice_text.model"), ["你好，世界"], specials=["[MASK]", "<sop>", "<eop>"])
    ChatGLMTokenizer(str(tmp_path / "ice_text.model")).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"not ChatGLM-6B's ice_text.model: it has no piece \[gMASK\]"):
        FAMILY.load_tokenizer(str(tmp_path))


def test_registry_claims_chatglm_6b_but_not_chatglm2_configs(tiny):
    assert family_of(tiny["base"]) is FAMILY and family_of("THUDM/chatglm-6b") is FAMILY
    assert family_of("THUDM/glm-10b-chinese").name == "glm"
    thudm_chatglm2 = {"model_type": "chatglm", "multi_query_attention": True, "kv_channels": 128,
                      "padded_vocab_size": 65024, "rmsnorm": True}
    assert not FAMILY.claims(thudm_chatglm2)
    assert FAMILY.claims({"model_type": "chatglm", "position_encoding_2d": True, "inner_hidden_size": 16384})
    config = ChatGLMConfig.from_pretrained(tiny["base"])
    assert FAMILY.tensor_parallel_problems(config, 2) == []
    assert "does not divide the model's 4 attention heads" in FAMILY.tensor_parallel_problems(config, 3)[0]


# ------------------------------------------------------------------------------------- cached decoding


class THUDMRecompute(CachedStepper):
    """Every step recomputes the whole sequences with the torch model of THUDM's code, from THUDM's own batch
    (positions and masks found in the tokens, left padding as its tokenizer pads): no cache, none of our positions."""

    def __init__(self, state, batch, template):
        super().__init__(batch)
        self.state, self.template, self.rows = state, template, []

    def _forward(self, input_ids, position_ids, attention_mask, prefill):
        if prefill:
            self.rows = [ids[mask > 0].tolist() for ids, mask in zip(input_ids, self.key_mask)]
        else:
            self.rows = [row + [int(token)] for row, token in zip(self.rows, input_ids[:, 0])]
        ids, positions, masks = thudm_batch(self.rows, bos=self.template.sop, gmask=self.template.gmask,
                                            pad=self.template.pad_id)
        with torch.no_grad():
            return chatglm_logits(self.state, ids, positions, masks, HEADS)[:, -1].float().numpy()

    def _reorder_cache(self, index):
        self.rows = [self.rows[i] for i in index]


@pytest.fixture(scope="module")
def random64(tiny):
    """A random ChatGLM-6B as THUDM's checkpoint names it (torch, float64) and ours with its weights, in float64:
    the two agree to ~1e-12, so the same tokens must come out."""
    template = tiny["template"]
    config = ChatGLMConfig.from_pretrained(tiny["base"])
    state = random_thudm_state(LAYERS, config.vocab_size, HIDDEN, INNER, HEADS, seed=4)
    model = ChatGLMForCausalLM(config)
    model.set_state_dict(to_ours(state))
    model.to(dtype="float64")
    model.eval()
    state64 = {name: tensor.double() if tensor.is_floating_point() else tensor for name, tensor in state.items()}
    texts = [("3加4等于多少？", ()), ("再加上5呢？", HISTORY), ("北京", ())]
    prompts = [template.generation_example(template.prompt_ids(text, history, 96)[0]) for text, history in texts]
    return model, state64, prompts


@pytest.mark.parametrize("settings", [dict(decode_strategy="greedy_search"),
                                      dict(decode_strategy="beam_search", num_beams=3, num_return_sequences=2)],
                         ids=["greedy", "beam"])
def test_cached_generation_equals_thudm_full_recompute(tiny, random64, settings):
    model, state, prompts = random64
    template = tiny["template"]
    config = DecodingConfig(eos_token_id=template.stop_ids, pad_token_id=template.pad_id, max_length=8,
                            tokenizer_size=template.tokenizer_size, **settings)
    assert len({len(p["input_ids"]) for p in prompts}) == len(prompts)  # a left-padded batch
    cached = generate(model, prompts, config)
    recompute = THUDMRecompute(state, generation_batch(prompts, template.pad_id), template)
    reference = decode(recompute, len(prompts), config)
    assert cached.sequences == reference.sequences
    assert len({tuple(s) for s in cached.sequences}) > 2  # the prompts lead to different answers
    np.testing.assert_allclose(cached.scores, reference.scores, rtol=1e-6)


def test_left_padded_short_prompt_decodes_as_alone(tiny, random64):
    model, _, prompts = random64
    template = tiny["template"]
    for settings in (dict(), dict(decode_strategy="beam_search", num_beams=3)):
        config = DecodingConfig(eos_token_id=template.stop_ids, pad_token_id=template.pad_id, max_length=8,
                                tokenizer_size=template.tokenizer_size, **settings)
        together = generate(model, [prompts[1], prompts[2]], config)  # prompts[2] is 40 tokens shorter
        assert together.sequences[1] == generate(model, [prompts[2]], config).sequences[0]


# ---------------------------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def untrained(tiny):
    finetune(_flags(tiny, tiny["root"] / "untrained", do_train=False))
    return _results(tiny["root"] / "untrained")


@pytest.fixture(scope="module")
def trained(tiny):
    """80 steps of full fine-tuning on the BELLE dialogues (multi-turn ones rendered with their history)."""
    output = tiny["root"] / "full"
    finetune(_flags(tiny, output))
    return output


def test_full_finetune_scores_far_above_the_untrained_model(tiny, untrained, trained):
    scores = _results(trained)
    assert untrained["eval_bleu4"] < 2 and untrained["eval_rougeL"] < 5
    assert scores["eval_bleu4"] > 10 and scores["eval_rougeL"] > 20, scores  # measured 21.7 and 33.8
    assert len(_read_jsonl(trained / "eval_predictions.jsonl")) == 32
    assert sum(bool(sample.history) for sample in _dev_samples(tiny)[:32]) >= 8  # multi-turn ones scored too


def test_lora_finetune_with_the_family_targets_scores_far_above_the_untrained_model(tiny, untrained, tmp_path):
    finetune(_flags(tiny, tmp_path, lora=True, lora_rank=16, lora_alpha=32, learning_rate=1e-2, max_steps=120))
    adapter = paddle.load(str(tmp_path / "lora_model_state.pdparams"))
    layer = "chatglm.transformer.layers.0."
    assert {f"{layer}{name}.lora_A" for name in ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                                                  "mlp.dense_4h_to_h")} <= set(adapter)
    scores = _results(tmp_path)
    assert scores["eval_bleu4"] > untrained["eval_bleu4"] + 8, scores  # measured 18.0 against 0.0
    assert scores["eval_rougeL"] > untrained["eval_rougeL"] + 15, scores  # measured 26.9 against 1.1


def test_predict_generation_gives_what_evaluation_decoded(tiny, trained, tmp_path):
    evaluated = zip(_dev_samples(tiny), _read_jsonl(trained / "eval_predictions.jsonl"))
    predictions = [p for sample, p in evaluated if not sample.history][:3]  # --text has no history
    texts = [part for p in predictions for part in ("--text", p["source"])]
    predict(["--model_name_or_path", str(trained), "--tgt_length", "24", "--num_beams", "2",
             "--output_file", str(tmp_path / "out.json"), *texts])
    assert [r["prediction"] for r in _read_jsonl(tmp_path / "out.json")] == [p["prediction"] for p in predictions]


# ---------------------------------------------------------------------------------------- export and runners

DECODINGS = {
    "greedy": dict(decode_strategy="greedy_search"),
    "beam": dict(decode_strategy="beam_search", num_beams=3, num_return_sequences=2),
    "sampling": dict(decode_strategy="sampling", top_k=8, top_p=0.9, temperature=0.9, seed=5),
}


@pytest.fixture(scope="module")
def chatglm_export(tiny, trained):
    output = tiny["root"] / "export"
    export_main(["--model_name_or_path", str(trained), "--output_path", str(output), "--tgt_length", "16", "--onnx"])
    template = load_template(str(output))
    prompts = [template.generation_example(template.prompt_ids(s.source, s.history, 96)[0])
               for s in _belle_samples(tiny, 4)]
    model = ChatGLMForCausalLM.from_pretrained(str(trained))
    configs = {name: DecodingConfig(eos_token_id=template.stop_ids, pad_token_id=template.pad_id, max_length=16,
                                    tokenizer_size=template.tokenizer_size, **settings)
               for name, settings in DECODINGS.items()}
    dygraph = {name: generate(model, prompts, config).sequences for name, config in configs.items()}
    batch = generation_batch(prompts, template.pad_id)
    feeds = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
             "attention_mask": prefill_attention_mask(batch["key_mask"], batch["sep"])}
    with paddle.no_grad():
        logits = model(*(paddle.to_tensor(feeds[name]) for name in ("input_ids", "position_ids", "attention_mask")))
    return {"dir": str(output), "template": template, "prompts": prompts, "configs": configs, "dygraph": dygraph,
            "feeds": feeds, "logits": logits.logits[:, -1].numpy()}


def _dev_samples(tiny):
    """The dev set's samples in evaluation's order: (source, target, history)."""
    from tasks import belle

    return [Sample(*pair) for i, record in enumerate(_read_jsonl(tiny["belle"]["dev"]))
            for pair in belle.to_pairs(record, f"dev:{i}")]


def _belle_samples(tiny, count):
    """Dev samples, half of them with a history."""
    samples = _dev_samples(tiny)
    with_history = [s for s in samples if s.history]
    return with_history[: count // 2] + [s for s in samples if not s.history][: count - count // 2]


def test_export_config_names_the_family_and_its_special_ids(chatglm_export):
    config = _results(chatglm_export["dir"], "export_config.json")
    template = chatglm_export["template"]
    assert config["family"] == "chatglm" and config["kv_heads"] == HEADS and config["head_dim"] == HIDDEN // HEADS
    assert config["special_ids"]["stop"] == [template.eop] and config["special_ids"]["sop"] == template.sop
    assert isinstance(template, ChatGLMTemplate) and template.tokenizer.num_image_tokens == IMAGE_TOKENS


@pytest.mark.parametrize("backend", ["paddle", "onnxruntime"])
def test_runner_gives_the_dynamic_graph_tokens(chatglm_export, backend):
    runner = GLMRunner(chatglm_export["dir"], backend=backend, device="cpu", cpu_threads=1)
    # tanh-GELU spelt out for the export: paddle2onnx would make it exact GELU (~1e-3 off)
    assert np.abs(runner.prompt_logits(**chatglm_export["feeds"]) - chatglm_export["logits"]).max() <= 1e-4
    for name, config in chatglm_export["configs"].items():
        assert runner.generate(chatglm_export["prompts"], config).sequences == chatglm_export["dygraph"][name], name
    assert len({tuple(s) for s in chatglm_export["dygraph"]["greedy"]}) == len(chatglm_export["prompts"])


@pytest.mark.timeout(300)
def test_fastdeploy_runner_gives_the_dynamic_graph_tokens(chatglm_export):
    batch = generation_batch(chatglm_export["prompts"], chatglm_export["template"].pad_id)
    configs = {name: {key: getattr(config, key) for key in ("eos_token_id", "pad_token_id", "max_length",
                                                             "tokenizer_size", *DECODINGS[name])}
               for name, config in chatglm_export["configs"].items()}
    answer = fastdeploy_decode(chatglm_export["dir"], batch, configs)
    assert np.abs(np.array(answer["prefill_logits"]) - chatglm_export["logits"]).max() <= 1e-4
    assert answer["sequences"] == chatglm_export["dygraph"]


# --------------------------------------------------------------------- tensor parallelism and exact resume

TP_FLAGS = dict(max_steps=6, per_device_train_batch_size=4, max_train_samples=40, max_eval_samples=3,
                learning_rate=3e-3, warmup_steps=0)


def _fresh_names_finetune(argv):
    """Fine-tune as a new process would: optimizer states are keyed by parameter names, numbered per process."""
    with paddle.utils.unique_name.guard():
        finetune(argv)


@pytest.mark.timeout(300)
def test_tensor_parallel_finetune_equals_one_process_and_resume_is_exact(tiny, tmp_path):
    one, two, resumed = tmp_path / "tp1", tmp_path / "tp2", tmp_path / "resumed"
    _fresh_names_finetune(_flags(tiny, one, **TP_FLAGS, save_strategy="steps", save_steps=3))
    launch(tmp_path, "finetune_generation.py", *_flags(tiny, two, **TP_FLAGS, tensor_parallel_degree=2))
    losses = _losses(one)
    assert sorted(losses) == list(range(1, 7)) and sorted(_losses(two)) == list(range(1, 7))
    assert max(abs(losses[step] - loss) / losses[step] for step, loss in _losses(two).items()) <= 1e-4
    assert _read_jsonl(one / "eval_predictions.jsonl") == _read_jsonl(two / "eval_predictions.jsonl")

    # resumed in a fresh run from the middle checkpoint: the same losses from step 4 on, the same weights
    shutil.copytree(one / "checkpoint-3", resumed / "checkpoint-3")
    _fresh_names_finetune(_flags(tiny, resumed, **TP_FLAGS, do_eval=False,
                                 resume_from_checkpoint=resumed / "checkpoint-3"))
    assert _losses(resumed) == losses
    final, again = (paddle.load(str(d / "model_state.pdparams"), return_numpy=True) for d in (one, resumed))
    assert all(np.array_equal(final[k], again[k]) for k in final)


@pytest.mark.timeout(300)
def test_lora_under_tensor_parallelism_equals_one_process(tiny, tmp_path):
    """From one starting adapter whose B are non-zero (so each rank's share of the QKV adapter must match its share
    of ChatGLM-6B's per-head QKV weight), tp=2 trains as one process and writes the same adapter whole."""
    paddle.seed(3)
    start = GLMLoRAModel(ChatGLMForCausalLM.from_pretrained(tiny["base"]),
                         LoRAConfig(target_modules=list(FAMILY.lora_targets), r=4, lora_alpha=8))
    for name, parameter in start.named_parameters():
        if name.endswith("lora_B"):
            parameter.set_value(paddle.randn(parameter.shape) * 0.05)
    start.save_pretrained(str(tmp_path / "start"))
    lora = dict(TP_FLAGS, lora=True, lora_path=tmp_path / "start", do_eval=False)
    finetune(_flags(tiny, tmp_path / "tp1", **lora))
    launch(tmp_path, "finetune_generation.py", *_flags(tiny, tmp_path / "tp2", **lora, tensor_parallel_degree=2,
                                                        merge_tensor_parallel=True))
    one, two = _losses(tmp_path / "tp1"), _losses(tmp_path / "tp2")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    assert max(abs(one[step] - loss) / one[step] for step, loss in two.items()) <= 1e-4
    trained, reference = (paddle.load(str(tmp_path / d / "lora_model_state.pdparams"), return_numpy=True)
                          for d in ("tp2", "tp1"))
    assert set(trained) == set(reference)
    assert max(float(np.abs(trained[k] - reference[k]).max()) for k in reference) <= 1e-4
