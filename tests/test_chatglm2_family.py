"""ChatGLM2-6B / ChatGLM3-6B through the whole toolkit (the family section of paddle_glm.models.chatglm2): chat
templates and token ids against THUDM's, cached decoding against full recompute, stop tokens, fine-tuning (full and
LoRA) that learns a generated dialogue set, prediction, export and the runner on every backend, tensor parallelism
(full and LoRA) and exact resume. Models are tiny ChatGLM2 architectures over the real 65,024-row vocabulary."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest
from paddlenlp.peft import LoRAConfig
from paddlenlp.transformers import AutoTokenizer

from conftest import SHARED_ASSETS
from test_fastdeploy import fastdeploy_decode
from test_parallel import launch
from paddle_glm.args import GenerationArguments
from paddle_glm.data import tokenize_pairs
from paddle_glm.decoding import DecodingConfig, generate as decode
from paddle_glm.demo_data import write_demo_splits
from paddle_glm.finetune import main as finetune
from paddle_glm.generation import generate
from paddle_glm.inputs import generation_batch
from paddle_glm.lora import GLMLoRAModel, load_with_adapter
from paddle_glm.models import family_of, load_template
from paddle_glm.models.chatglm2 import (
    FAMILY, ChatGLM2Template, ChatGLM3Template, ChatGLMv2Config, ChatGLMv2ForCausalLM, load_chatglm2_tokenizer,
)
from paddle_glm.stepper import CachedStepper
from tasks import belle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_MODEL = os.path.join(SHARED_ASSETS, "chatglm3-tokenizer.model")
pytestmark = [
    pytest.mark.skipif(not os.path.isfile(TOKENIZER_MODEL),
                       reason=f"needs ChatGLM2/3's real sentencepiece model at {TOKENIZER_MODEL} (../shared/assets)"),
    pytest.mark.timeout(600),
]

GMASK, SOP, EOS = 64790, 64792, 2
SYSTEM, USER, ASSISTANT, OBSERVATION = 64794, 64795, 64796, 64797
NEWLINE = [30910, 13]  # "\n" alone: sentencepiece's "▁" then <0x0A>


@pytest.fixture(scope="module")
def templates():
    return {name: FAMILY.template(load_chatglm2_tokenizer(TOKENIZER_MODEL, name)) for name in ("chatglm2", "chatglm3")}


# ---------------------------------------------------------------- tokenizer and chat templates, hand-worked

ANSWER2 = "你好👋！我是人工智能助手 ChatGLM2-6B，很高兴见到你，欢迎问我任何问题。"
ANSWER3 = ANSWER2.replace("ChatGLM2", "ChatGLM3")
# The ids THUDM's tokenizers give (the same lists as chatglm.cpp's tests, made with THUDM's Python tokenizers).
IDS2 = [GMASK, SOP, 790, 30951, 517, 30910, 30939, 30996, 13, 13, 54761, 31211, 39701, 13, 13, 55437, 31211, 39701, 243,
        162, 148, 142, 31404, 33030, 34797, 42481, 22011, 10461, 30944, 30943, 30941, 30978, 30949, 31123, 48895, 35214,
        54622, 31123, 32616, 39905, 31901, 31639, 31155, 13, 13, 30995, 30951, 517, 30910, 30943, 30996, 13, 13, 54761,
        31211, 32820, 54266, 31876, 35153, 13, 13, 55437, 31211]
IDS3 = [GMASK, SOP, USER, 30910, 13, 36474, 54591, ASSISTANT, 30910, 13, 36474, 54591, 243, 162, 148, 142, 31404, 33030,
        34797, 42481, 22011, 10461, 30944, 30966, 30941, 30978, 30949, 31123, 48895, 35214, 54622, 31123, 32616, 39905,
        31901, 31639, 31155, USER, 30910, 13, 30910, 32820, 54266, 31876, 35153, ASSISTANT]


def test_chatglm2_template_renders_build_prompt_and_its_ids(templates):
    template = templates["chatglm2"]
    assert isinstance(template, ChatGLM2Template) and not isinstance(template, ChatGLM3Template)
    prompt = template.render("晚上睡不着应该怎么办", [("你好", ANSWER2)])
    assert prompt == IDS2
    assert template.tokenizer.decode(prompt[2:]) == (  # the string THUDM's build_prompt makes, rounds from 1
        f"[Round 1]\n\n问：你好\n\n答：{ANSWER2}\n\n[Round 2]\n\n问：晚上睡不着应该怎么办\n\n答：")
    assert template.render("你好", []) == IDS2[:17]
    assert template.stop_ids == (EOS,) and template.pad_id == 0 and len(template.tokenizer) == 64794


def test_chatglm3_template_renders_build_chat_input_and_its_ids(templates):
    template = templates["chatglm3"]
    assert isinstance(template, ChatGLM3Template)
    assert template.render("晚上睡不着应该怎么办", [("你好", ANSWER3)]) == IDS3
    assert template.render("你好", []) == [GMASK, SOP, USER, *NEWLINE, 36474, 54591, ASSISTANT]
    assert template.stop_ids == (EOS, USER, OBSERVATION) and len(template.tokenizer) == 64798


def test_chatglm3_training_example_learns_the_metadata_line_and_the_answer(templates):
    """Loss on what follows <|assistant|>: the empty metadata line, the content and </s> (THUDM's fine-tuning)."""
    template = templates["chatglm3"]
    prompt = template.render("你好", [])
    example = template.training_example(prompt, template.target_ids("你好"), 16)
    answer = [*NEWLINE, 36474, 54591]
    assert example["input_ids"].tolist() == prompt + answer
    assert example["labels"].tolist() == [0] * 7 + answer + [EOS]
    assert example["loss_mask"].tolist() == [0] * 7 + [1] * 5
    assert example["position_ids"].tolist() == [list(range(12))] and int(example["attention_mask"]) == 0
    generation = template.generation_example(prompt)
    assert generation["input_ids"].tolist() == prompt and generation["position_step"].tolist() == [1]


def test_responses_read_as_thudm_process_response(templates):
    chatglm3, chatglm2 = templates["chatglm3"], templates["chatglm2"]
    assert chatglm3.response(chatglm3.target_ids("晴天。")) == "晴天。"  # metadata line dropped, content stripped
    assert chatglm3.response(chatglm3.encode("get_weather\n") + chatglm3.encode("北京")) == "get_weather\n 北京"
    # the last assistant message counts (THUDM splits the output at <|assistant|>)
    assert chatglm3.response(chatglm3.target_ids("甲") + [ASSISTANT] + chatglm3.target_ids("乙")) == "乙"
    assert chatglm2.response(chatglm2.encode("  晴天。 ")) == "晴天。"


def test_text_is_never_read_as_control_tokens(templates):
    """THUDM's tokenizers encode text with sentencepiece alone; PaddleNLP's default would make "</s>" an eos."""
    for template in templates.values():
        ids = template.encode("a </s> [gMASK] <|user|>")
        assert not set(ids) & {EOS, GMASK, USER} and template.tokenizer.decode(ids) == "a </s> [gMASK] <|user|>"


def test_decode_drops_special_ids_as_the_tokenizer_does(templates):
    """`Template.decode` drops special ids itself (PaddleNLP's skip_special_tokens is slow): the same text."""
    for template in templates.values():
        tokenizer, text = template.tokenizer, template.encode("你好👋！ChatGLM3-6B <|user|>")
        controls = tokenizer.all_special_ids + [EOS, 0]  # none listed here: THUDM's specials live in SPTokenizer
        for ids in (text, controls + text, text[:2] + controls + text[2:], controls, []):
            assert template.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)


def test_tokenizers_register_specials_load_both_ways_and_tell_chatglm2_from_chatglm3(templates, tmp_path):
    for name, template in templates.items():
        directory = tmp_path / name
        template.tokenizer.save_pretrained(str(directory))
        assert type(load_template(str(directory))) is type(template)  # the format survives saving
        paddlenlp = AutoTokenizer.from_pretrained(str(directory))  # PaddleNLP's class reads our files
        assert paddlenlp("你好")["input_ids"] == [GMASK, SOP, 36474, 54591]
    registered = {name: t.tokenizer.tokenizer.special_tokens for name, t in templates.items()}
    assert registered["chatglm2"] == {"[MASK]": 64789, "[gMASK]": GMASK, "[sMASK]": 64791, "sop": SOP, "eop": 64793}
    assert registered["chatglm3"] == {**registered["chatglm2"], "<|system|>": SYSTEM, "<|user|>": USER,
                                      "<|assistant|>": ASSISTANT, "<|observation|>": OBSERVATION}
    # THUDM's Hugging Face tokenizer files name their model; nothing said: ChatGLM3 (role tokens, as PaddleNLP's)
    for recorded, expected in (("THUDM/chatglm2-6b", ChatGLM2Template), ("THUDM/chatglm3-6b", ChatGLM3Template),
                               (None, ChatGLM3Template)):
        directory = tmp_path / f"hf-{recorded}".replace("/", "-")
        directory.mkdir()
        shutil.copy(TOKENIZER_MODEL, directory / "tokenizer.model")
        config = {"tokenizer_class": "ChatGLMTokenizer", **({"name_or_path": recorded} if recorded else {})}
        json.dump(config, open(directory / "tokenizer_config.json", "w"))
        assert type(FAMILY.template(FAMILY.load_tokenizer(str(directory)))) is expected


def test_special_tokens_that_are_not_registered_are_refused():
    from paddle_glm.models.chatglm2 import ChatGLMv2Tokenizer, _checked

    tokenizer = ChatGLMv2Tokenizer(TOKENIZER_MODEL)
    tokenizer.tokenizer.special_tokens["sop"] = 0  # as a broken file would map it
    with pytest.raises(ValueError, match="special tokens"):
        _checked(tokenizer)


def test_configs_are_claimed_by_the_right_family():
    thudm_chatglm2 = {"model_type": "chatglm", "multi_query_attention": True, "kv_channels": 128,
                      "padded_vocab_size": 65024, "rmsnorm": True}
    thudm_chatglm = {"model_type": "chatglm", "position_encoding_2d": True, "inner_hidden_size": 16384}
    assert family_of(thudm_chatglm2) is FAMILY and family_of({"model_type": "chatglm_v2"}) is FAMILY
    assert family_of(thudm_chatglm).name == "chatglm"
    assert family_of("THUDM/chatglm3-6b") is FAMILY and family_of("THUDM/chatglm2-6b-32k") is FAMILY
    assert family_of({"tokenizer_class": "ChatGLMv2Tokenizer"}) is FAMILY


def test_tensor_parallel_rules_hand_worked():
    """Degrees the model can take, and the rule a LoRA adapter split across ranks follows: its weight's."""
    from paddle_glm.lora import _weight_rule

    config = tiny_config(groups=2)
    assert FAMILY.tensor_parallel_problems(config, 2) == [] and FAMILY.tensor_parallel_problems(config, 4) == []
    assert "attention heads" in FAMILY.tensor_parallel_problems(config, 3)[0]
    assert "K/V groups" in " ".join(FAMILY.tensor_parallel_problems(tiny_config(heads=12, groups=3), 2))
    assert (FAMILY.kv_heads(config), FAMILY.head_dim(config)) == (2, 16)
    # 4 heads, 1 group, head_dim 1, MLP width 2, 2 ranks: QKV [q0 q1 q2 q3 | k | v] -> [q0 q1 k v], [q2 q3 k v];
    # [gate | up] = [g0 g1 | u0 u1] -> [g0 u0], [g1 u1]
    config = ChatGLMv2Config(num_hidden_layers=1, num_attention_heads=4, multi_query_group_num=1, kv_channels=1,
                             hidden_size=4, ffn_hidden_size=2, tensor_parallel_degree=2, tensor_parallel_rank=1)
    model = ChatGLMv2ForCausalLM(ChatGLMv2Config(**{**config.to_dict(), "tensor_parallel_degree": 1}))
    layer = "chatglm_v2.encoder.layers.0."
    qkv, gate_up = layer + "self_attention.query_key_value", layer + "mlp.dense_h_to_4h"
    whole_b = np.arange(6, dtype="float32")[None]  # the B of an adapter with r = 1
    assert _weight_rule(model, qkv, config, is_split=True)(whole_b).tolist() == [[2, 3, 4, 5]]
    assert _weight_rule(model, gate_up, config, is_split=True)(whole_b[:, :4]).tolist() == [[1, 3]]
    shards = [np.array([[0, 1, 4, 5]], dtype="float32"), np.array([[2, 3, 4, 5]], dtype="float32")]
    assert _weight_rule(model, qkv, config, is_split=False)(shards).tolist() == whole_b.tolist()


# ---------------------------------------------------------------- decoding: cache, padding, stop tokens

def tiny_config(groups: int = 2, heads: int = 4) -> ChatGLMv2Config:
    return ChatGLMv2Config(num_hidden_layers=2, vocab_size=65024, hidden_size=64, num_attention_heads=heads,
                           kv_channels=16, multi_query_group_num=groups, ffn_hidden_size=128, add_qkv_bias=True,
                           max_sequence_length=256, architectures=["ChatGLMv2ForCausalLM"])


@pytest.fixture(scope="module")
def spread_model():
    """A random tiny model whose logits are spread out (near-ties would hide a wrong cache)."""
    paddle.seed(11)
    model = ChatGLMv2ForCausalLM(tiny_config())
    model.chatglm_v2.output_layer.weight.set_value(model.chatglm_v2.output_layer.weight * 30)
    model.eval()
    return model


class RecomputeStepper(CachedStepper):
    """The reference: the model runs on every token so far at each step (no cache), with positions and mask made
    here from the real tokens alone (THUDM's: positions count from a row's first real token, causal attention)."""

    def __init__(self, model, batch):
        super().__init__(batch)
        self.model = model

    def _forward(self, input_ids, position_ids, attention_mask, prefill):
        self.ids = input_ids if prefill else np.concatenate([self.ids, input_ids], axis=1)
        real = self.key_mask  # [rows, tokens so far]: 0 on the left padding
        positions = np.maximum(np.cumsum(real, axis=1) - 1, 0).astype("int64")
        length = self.ids.shape[1]
        mask = np.tril(np.ones([length, length], dtype="float32"))[None] * real[:, None, :]
        mask[:, np.arange(length), np.arange(length)] = 1.0  # pad rows attend to themselves
        with paddle.no_grad():
            logits = self.model(paddle.to_tensor(self.ids), paddle.to_tensor(positions),
                                paddle.to_tensor(mask[:, None]), use_cache=False).logits
        return logits[:, -1].numpy()

    def _reorder_cache(self, index):
        self.ids = self.ids[index]


DIALOGUES = [("22加44等于多少？", ()), ("再加上2呢？", (("22加44等于多少？", "22加44等于66。"),)), ("你好", ()),
             ("请把“建筑师”倒过来写。", (("我叫徐杰，请记住我的名字。", "好的，徐杰，我记住了。"),))]


@pytest.mark.parametrize("settings", [dict(decode_strategy="greedy_search"),
                                      dict(decode_strategy="beam_search", num_beams=3, num_return_sequences=2)])
def test_cached_generation_equals_full_recompute_left_padded(spread_model, templates, settings):
    template = templates["chatglm3"]
    prompts = [template.generation_example(template.prompt_ids(q, h)[0]) for q, h in DIALOGUES]
    assert len({len(p["input_ids"]) for p in prompts}) == len(prompts)  # every row left-padded differently
    config = DecodingConfig(eos_token_id=template.stop_ids, pad_token_id=template.pad_id, max_length=8,
                            tokenizer_size=template.tokenizer_size, **settings)
    cached = generate(spread_model, prompts, config)
    recomputed = decode(RecomputeStepper(spread_model, generation_batch(prompts, template.pad_id)), len(prompts), config)
    assert cached.sequences == recomputed.sequences and max(map(len, cached.sequences)) == 8
    np.testing.assert_allclose(cached.scores, recomputed.scores, rtol=1e-5, atol=1e-5)


def test_left_padded_short_prompt_decodes_as_alone(spread_model, templates):
    template = templates["chatglm2"]
    short, long = (template.generation_example(template.prompt_ids(q, h)[0]) for q, h in DIALOGUES[2:0:-1])
    for settings in (dict(decode_strategy="greedy_search"), dict(decode_strategy="beam_search", num_beams=3)):
        config = DecodingConfig(eos_token_id=template.stop_ids, pad_token_id=template.pad_id, max_length=8,
                                tokenizer_size=template.tokenizer_size, **settings)
        together = generate(spread_model, [short, long], config)
        assert together.sequences[0] == generate(spread_model, [short], config).sequences[0]


class ScriptedStepper:
    """Logits that make token `script[t]` the clear choice at step t (for every row and beam)."""

    def __init__(self, script, vocab=64798):
        self.script, self.vocab, self.t, self.rows = script, vocab, 0, 0

    def _logits(self):
        logits = np.zeros([self.rows, self.vocab], dtype="float32")
        logits[:, self.script[min(self.t, len(self.script) - 1)]] = 8.0
        return logits

    def prefill(self, expand):
        self.rows, self.t = expand, 0
        return self._logits()

    def step(self, tokens):
        self.t += 1
        return self._logits()

    def reorder(self, index):
        pass


@pytest.mark.parametrize("strategy", ["greedy_search", "beam_search"])
def test_generation_stops_at_every_chatglm3_stop_token(templates, strategy):
    template = templates["chatglm3"]
    config = GenerationArguments(decode_strategy=strategy, num_beams=2, min_tgt_length=0,
                                 no_repeat_ngram_size=0).decoding_config(template, max_length=6)
    assert config.eos_ids == (EOS, USER, OBSERVATION)
    for stop in (EOS, USER, OBSERVATION):
        assert decode(ScriptedStepper([100, 200, stop, 300]), 1, config).sequences == [[100, 200]]
    for other in (ASSISTANT, SYSTEM, GMASK):  # specials that are no stop token
        assert decode(ScriptedStepper([100, 200, other, 300]), 1, config).sequences == [[100, 200, other, 300, 300, 300]]


# ---------------------------------------------------------------- fine-tuning, prediction, export, serving

def save_tiny(directory, groups: int = 2, chat_format: str = "chatglm3", seed: int = 0) -> str:
    paddle.seed(seed)
    ChatGLMv2ForCausalLM(tiny_config(groups)).save_pretrained(str(directory))
    load_chatglm2_tokenizer(TOKENIZER_MODEL, chat_format).save_pretrained(str(directory))
    return str(directory)


LINEAR_LAYERS = [".*query_key_value", ".*self_attention.dense", ".*dense_h_to_4h", ".*dense_4h_to_h"]


def run_flags(model: str, output_dir, data: dict, **overrides) -> list:
    values = dict(model_name_or_path=model, task_name=data.get("task_name", "belle"), train_file=data["train"],
                  dev_file=data["dev"], output_dir=output_dir, src_length=64, tgt_length=24, min_tgt_length=0,
                  num_beams=2, per_device_train_batch_size=8, per_device_eval_batch_size=24, learning_rate=5e-3,
                  warmup_steps=5, do_train=True, do_eval=True, eval_steps=100000, save_strategy="no", logging_steps=1,
                  report_to="none", device="cpu", seed=3, disable_tqdm=True, overwrite_output_dir=True)
    values.update(overrides)
    return [part for key, value in values.items()
            for part in (f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)]))]


def scores(output_dir) -> dict:
    return json.load(open(os.path.join(output_dir, "eval_results.json")))


def losses_by_step(output_dir) -> dict:
    history = json.load(open(os.path.join(output_dir, "trainer_state.json")))["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """A tiny random ChatGLM3-format model fully fine-tuned on a generated BELLE set (multi-turn dialogues
    included), scored before and after; then LoRA-tuned to ChatGLM2's chat format, scored before and after."""
    root = tmp_path_factory.mktemp("chatglm2")
    data = write_demo_splits(str(root / "belle"), "belle", train=200, dev=64, seed=1)
    base = save_tiny(root / "base")
    finetune(run_flags(base, root / "untrained", data, do_train=False))
    finetune(run_flags(base, root / "full", data, max_steps=200))
    # the trained model read through ChatGLM2's template: what it learnt is there, the format is new to it
    as_chatglm2 = root / "as_chatglm2"
    as_chatglm2.mkdir()
    for name in ("config.json", "model_state.pdparams"):
        shutil.copy(root / "full" / name, as_chatglm2)
    load_chatglm2_tokenizer(TOKENIZER_MODEL, "chatglm2").save_pretrained(str(as_chatglm2))
    finetune(run_flags(str(as_chatglm2), root / "lora_untrained", data, do_train=False))
    finetune(run_flags(str(as_chatglm2), root / "lora", data, max_steps=100, learning_rate=1e-2, lora=True,
                       lora_rank=16, lora_alpha=32, lora_target_modules=LINEAR_LAYERS))
    return {"root": root, "data": data, "base": base, "full": str(root / "full"), "as_chatglm2": str(as_chatglm2),
            "lora": str(root / "lora")}


def test_full_fine_tune_scores_far_above_the_untrained_model(chat):
    """Measured: BLEU-4 0.0 -> 16.9, ROUGE-L 0.5 -> 29.6, eval loss 11.08 -> 2.61 on the 64 held-out records
    (other entities, same tasks; multi-turn records give one example per answer)."""
    before, after = scores(chat["root"] / "untrained"), scores(chat["full"])
    print(f"full: BLEU-4 {before['eval_bleu4']:.1f} -> {after['eval_bleu4']:.1f}, "
          f"ROUGE-L {before['eval_rougeL']:.1f} -> {after['eval_rougeL']:.1f}")
    assert after["eval_bleu4"] >= before["eval_bleu4"] + 8 and after["eval_rougeL"] >= before["eval_rougeL"] + 20
    assert after["eval_loss"] <= before["eval_loss"] - 5  # measured 11.08 -> 2.61
    assert type(load_template(chat["full"])) is ChatGLM3Template


def test_evaluation_decodes_dialogues_with_history_as_the_saved_model_does(chat):
    """The predictions file is the saved model's beam-search answers on prompts that carry each dialogue's history."""
    records = [json.loads(line) for line in open(chat["data"]["dev"], encoding="utf-8")]
    pairs = [pair for i, record in enumerate(records) for pair in belle.to_pairs(record, f"dev:{i}")]
    assert any(len(pair) == 3 and pair.history for pair in pairs)  # multi-turn rounds reach the template
    predictions = [json.loads(line) for line in open(os.path.join(chat["full"], "eval_predictions.jsonl"))]
    assert [p["source"] for p in predictions] == [pair[0] for pair in pairs]
    template = load_template(chat["full"])
    dataset = tokenize_pairs(pairs, template, 64, 24)
    with_history = next(i for i, pair in enumerate(pairs) if len(pair) == 3 and pair.history)
    assert dataset.prompts[with_history]["input_ids"].tolist() == template.render(pairs[with_history].source,
                                                                                 pairs[with_history].history)
    config = GenerationArguments(num_beams=2, min_tgt_length=0).decoding_config(template, max_length=24)
    result = generate(ChatGLMv2ForCausalLM.from_pretrained(chat["full"]), dataset.prompts, config)
    assert [template.response(s) for s in result.sequences] == [p["prediction"] for p in predictions]


def test_lora_fine_tune_scores_far_above_its_untrained_self(chat):
    """LoRA cannot teach a random tiny model (its frozen random output layer caps every logit near 1): it adapts the
    trained model to ChatGLM2's chat format, which that model has never seen (measured BLEU-4 8.4 -> 15.9, ROUGE-L
    19.6 -> 30.6, eval loss 4.35 -> 3.27; in its own format it scores 16.9 / 29.6)."""
    before, after, native = scores(chat["root"] / "lora_untrained"), scores(chat["lora"]), scores(chat["full"])
    print(f"LoRA: BLEU-4 {before['eval_bleu4']:.1f} -> {after['eval_bleu4']:.1f}, ROUGE-L {before['eval_rougeL']:.1f} "
          f"-> {after['eval_rougeL']:.1f}, eval loss {before['eval_loss']:.2f} -> {after['eval_loss']:.2f} (in its own "
          f"format: {native['eval_bleu4']:.1f}, {native['eval_rougeL']:.1f})")
    assert after["eval_bleu4"] >= before["eval_bleu4"] + 5 and after["eval_rougeL"] >= before["eval_rougeL"] + 8
    assert after["eval_loss"] <= before["eval_loss"] - 0.7
    adapter = paddle.load(os.path.join(chat["lora"], "lora_model_state.pdparams"))
    assert len(adapter) == 2 * 4 * 2 and all(".lora_" in key for key in adapter)  # 2 layers x 4 linears x (A, B)


def test_lora_adapts_the_family_default_target():
    from types import SimpleNamespace

    from paddle_glm.lora import add_lora

    args = SimpleNamespace(lora_target_modules=None, lora_path=None, lora_rank=4, lora_alpha=8, lora_dropout=0.0)
    lora_model = add_lora(ChatGLMv2ForCausalLM(tiny_config()), args)
    trained = [name for name, p in lora_model.named_parameters() if not p.stop_gradient]
    assert len(trained) == 4 and all("self_attention.query_key_value.lora_" in name for name in trained)


def test_predict_generation_answers_as_the_model_decodes(chat, tmp_path):
    from paddle_glm.predict import main as predict

    texts = ["挪威的首都是哪里？", "22加44等于多少？"]
    predict(["--model_name_or_path", chat["full"], "--text", *texts, "--num_beams", "2", "--decode_strategy",
             "beam_search", "--tgt_length", "16", "--output_file", str(tmp_path / "out.json")])
    template = load_template(chat["full"])
    config = GenerationArguments(decode_strategy="beam_search", num_beams=2, min_tgt_length=0).decoding_config(
        template, max_length=16)
    prompts = [template.generation_example(template.prompt_ids(t)[0]) for t in texts]
    expected = [template.response(s) for s in generate(ChatGLMv2ForCausalLM.from_pretrained(chat["full"]), prompts,
                                                        config).sequences]
    predicted = [json.loads(line)["prediction"] for line in open(tmp_path / "out.json", encoding="utf-8")]
    assert predicted == expected and all(predicted)


@pytest.fixture(scope="module")
def exported(chat):
    """The ChatGLM2-format model with its LoRA adapter merged, exported with ONNX graphs."""
    from export.exporter import main as export

    directory = chat["root"] / "export"
    export(["--model_name_or_path", chat["as_chatglm2"], "--lora_path", chat["lora"], "--output_path", str(directory),
            "--tgt_length", "12", "--onnx"])
    return str(directory)


RUNNER_SETTINGS = {
    "greedy": dict(decode_strategy="greedy_search"),
    "beam": dict(decode_strategy="beam_search", num_beams=3, length_penalty=0.7, num_return_sequences=2),
    "sampling": dict(decode_strategy="sampling", top_k=5, top_p=0.9, temperature=0.8, seed=3),
}


def _runner_case(exported):
    template = load_template(exported)
    prompts = [template.generation_example(template.prompt_ids(q, h)[0]) for q, h in DIALOGUES]
    configs = {name: dict(eos_token_id=list(template.stop_ids), pad_token_id=template.pad_id, max_length=12,
                          tokenizer_size=template.tokenizer_size, **settings) for name, settings in RUNNER_SETTINGS.items()}
    return template, prompts, configs


def test_export_records_the_family_and_serves_its_template(exported):
    config = json.load(open(os.path.join(exported, "export_config.json")))
    assert (config["family"], config["kv_heads"], config["head_dim"]) == ("chatglm2", 2, 16)
    assert config["special_ids"]["stop"] == [EOS] and config["tokenizer_size"] == 64794
    assert type(load_template(exported)) is ChatGLM2Template  # the ChatGLM2 tokenizer went with the export


@pytest.mark.parametrize("backend", ["paddle", "onnxruntime"])
def test_runner_tokens_equal_dynamic_graph(chat, exported, backend):
    from infer.runner import GLMRunner

    template, prompts, configs = _runner_case(exported)
    model = load_with_adapter(chat["as_chatglm2"], chat["lora"])
    runner = GLMRunner(exported, backend=backend, device="cpu", cpu_threads=1)
    for name, settings in configs.items():
        config = DecodingConfig(**settings)
        dygraph, served = generate(model, prompts, config), runner.generate(prompts, config)
        assert served.sequences == dygraph.sequences, name
        np.testing.assert_allclose(served.scores, dygraph.scores, rtol=1e-4, atol=1e-4)


def test_fastdeploy_runner_tokens_equal_dynamic_graph(chat, exported):
    template, prompts, configs = _runner_case(exported)
    answer = fastdeploy_decode(exported, generation_batch(prompts, template.pad_id), configs)
    model = load_with_adapter(chat["as_chatglm2"], chat["lora"])
    for name, settings in configs.items():
        assert answer["sequences"][name] == generate(model, prompts, DecodingConfig(**settings)).sequences, name


def test_infer_generation_serves_what_predict_generation_predicts(chat, exported, tmp_path):
    from infer.runner import main as infer
    from paddle_glm.predict import main as predict

    texts = ["挪威的首都是哪里？", "再加上2呢？"]
    common = ["--text", *texts, "--num_beams", "2", "--decode_strategy", "beam_search", "--tgt_length", "12"]
    infer(["--model_path", exported, "--backend", "onnxruntime", "--device", "cpu", *common,
           "--output_file", str(tmp_path / "served.json")])
    predict(["--model_name_or_path", chat["as_chatglm2"], "--lora_path", chat["lora"], "--device", "cpu", *common,
             "--output_file", str(tmp_path / "predicted.json")])
    read = lambda name: [json.loads(line) for line in open(tmp_path / name, encoding="utf-8")]  # noqa: E731
    assert read("served.json") == read("predicted.json")


# ---------------------------------------------------------------- tensor parallelism and exact resume

@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    """Random tiny models (K/V groups split over 2 ranks: 2 groups; replicated: 1 group) and small data sets."""
    root = tmp_path_factory.mktemp("chatglm2_tp")
    data = write_demo_splits(str(root / "belle"), "belle", train=24, dev=4, seed=2)
    qg = write_demo_splits(str(root / "qg"), "qg", train=24, dev=4, seed=2)
    return {"root": root, "data": data, "qg": qg, "groups2": save_tiny(root / "groups2", 2, seed=5),
            "groups1": save_tiny(root / "groups1", 1, seed=6)}


TP_FLAGS = dict(max_steps=6, per_device_train_batch_size=4, learning_rate=3e-3, do_eval=False, max_train_samples=24)


def _state(directory, name="model_state.pdparams"):
    return paddle.load(os.path.join(str(directory), name), return_numpy=True)


def run_script(script: str, *args) -> None:
    """One process, as a user runs it (a resumed run must be a fresh process: optimizer states are keyed by the
    parameters' generated names)."""
    done = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]


def test_tensor_parallel_fine_tune_equals_one_process_and_resume_is_exact(small_runs, tmp_path):
    """finetune_generation.py on question generation (DuReaderQG-like), the prompts in ChatGLM3's chat format."""
    base, data = small_runs["groups2"], {**small_runs["qg"], "task_name": "dureader_qg"}
    run_script("finetune_generation.py", *run_flags(base, tmp_path / "tp1", data, save_strategy="steps", save_steps=3,
                                                    **TP_FLAGS))
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "tp1" / "checkpoint-3", resumed / "checkpoint-3")
    run_script("finetune_generation.py", *run_flags(base, resumed, data, resume_from_checkpoint=resumed / "checkpoint-3",
                                                    overwrite_output_dir=False, **TP_FLAGS))
    one = losses_by_step(tmp_path / "tp1")
    assert sorted(one) == list(range(1, 7)) and one[6] < one[1]
    assert losses_by_step(resumed) == one
    expected = _state(tmp_path / "tp1")
    assert all(np.array_equal(value, _state(resumed)[key]) for key, value in expected.items())

    launch(tmp_path, "finetune_generation.py",
           *run_flags(base, tmp_path / "tp2", data, tensor_parallel_degree=2, merge_tensor_parallel=True, **TP_FLAGS))
    two = losses_by_step(tmp_path / "tp2")
    assert sorted(two) == sorted(one) and max(abs(two[s] - one[s]) / one[s] for s in one) <= 1e-5  # measured 1.7e-7
    merged = _state(tmp_path / "tp2")
    assert set(merged) == set(expected) and max(np.abs(merged[k] - expected[k]).max() for k in expected) <= 1e-4


def test_lora_under_tensor_parallel_with_replicated_groups_equals_one_process(small_runs, tmp_path):
    """1 K/V group over 2 ranks: both hold it. A whole starting adapter on every linear kind is split by the family's
    QKV rule, trains as in one process (the K/V columns of B get the summed gradient), and is saved whole again."""
    base, data = small_runs["groups1"], small_runs["data"]
    paddle.seed(4)
    start = GLMLoRAModel(ChatGLMv2ForCausalLM.from_pretrained(base),
                         LoRAConfig(target_modules=LINEAR_LAYERS, r=4, lora_alpha=8, lora_dropout=0.0))
    for name, parameter in start.named_parameters():
        if name.endswith("lora_B"):
            parameter.set_value(paddle.randn(parameter.shape) * 0.05)
    start.save_pretrained(str(tmp_path / "start"))
    lora = dict(lora=True, lora_path=tmp_path / "start", merge_lora=True, **TP_FLAGS)
    finetune(run_flags(base, tmp_path / "tp1", data, **lora))
    launch(tmp_path, "finetune_instruction_generation.py",
           *run_flags(base, tmp_path / "tp2", data, tensor_parallel_degree=2, merge_tensor_parallel=True, **lora))
    one, two = losses_by_step(tmp_path / "tp1"), losses_by_step(tmp_path / "tp2")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    assert max(abs(two[s] - one[s]) / one[s] for s in one) <= 1e-5  # measured 2.6e-7
    trained, expected = _state(tmp_path / "tp2", "lora_model_state.pdparams"), _state(tmp_path / "tp1",
                                                                                    "lora_model_state.pdparams")
    assert set(trained) == set(expected) and max(np.abs(trained[k] - expected[k]).max() for k in expected) <= 1e-6
    assert max(np.abs(expected[k] - _state(tmp_path / "start", "lora_model_state.pdparams")[k]).max()
               for k in expected) > 1e-3  # it trained
    merged, reference = _state(tmp_path / "tp2" / "merged"), _state(tmp_path / "tp1" / "merged")
    assert max(np.abs(merged[k] - reference[k]).max() for k in reference) <= 1e-5
