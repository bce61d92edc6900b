"""P-Tuning v2 (paddle_glm.prefix) for every family: a prefix is the K/V cache a prompt starts from. Against the
model given the same keys and values as a cache by hand; training moves the prefix alone; ADGEN learnt by a prefix;
saving, prediction, evaluation, export and the runners, and tensor parallelism."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import paddle
import pytest
from paddlenlp.peft import PrefixConfig
from paddlenlp.transformers import ChatGLMConfig

from conftest import SHARED_ASSETS, tiny_config
from test_parallel import launch
from prefix_tp_worker import run_checks
from paddle_glm.args import InputError
from paddle_glm.data import write_json_lines
from paddle_glm.decoding import DecodingConfig
from paddle_glm.demo import build_demo_model
from paddle_glm.demo_data import adgen_records, write_demo_splits
from paddle_glm.finetune import main as finetune, parse_arguments
from paddle_glm.generation import generate
from paddle_glm.models import load_model, load_template
from paddle_glm.models.chatglm import ChatGLMForCausalLM
from paddle_glm.models.chatglm2 import ChatGLMv2Config, ChatGLMv2ForCausalLM, load_chatglm2_tokenizer
from paddle_glm.models.glm import GLMForConditionalGeneration
from paddle_glm.prefix import (
    PREFIX_CONFIG_NAME, PREFIX_WEIGHTS_NAME, PrefixModel, add_prefix, kv_head_slice, load_prefix, prefix_config_for,
    prefixed_forward,
)
from paddle_glm.scoring import Request, Scorer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATGLM3_TOKENIZER = os.path.join(SHARED_ASSETS, "chatglm3-tokenizer.model")
pytestmark = pytest.mark.timeout(600)


# ------------------------------------------------------------------------------------------------------------------
# Tiny random models of the three families
# ------------------------------------------------------------------------------------------------------------------

def chatglm_config() -> ChatGLMConfig:
    return ChatGLMConfig(num_hidden_layers=2, vocab_size=160, hidden_size=64, num_attention_heads=4,
                         inner_hidden_size=256, max_sequence_length=64, bos_token_id=151, gmask_token_id=150,
                         pad_token_id=3)


def chatglm2_config(groups: int = 2, vocab: int = 128) -> ChatGLMv2Config:
    return ChatGLMv2Config(num_hidden_layers=2, vocab_size=vocab, hidden_size=64, num_attention_heads=4, kv_channels=16,
                           multi_query_group_num=groups, ffn_hidden_size=96, add_qkv_bias=True, max_sequence_length=64,
                           hidden_dropout=0.0, attention_dropout=0.0, architectures=["ChatGLMv2ForCausalLM"])


FAMILIES = {
    "glm": lambda: GLMForConditionalGeneration(tiny_config()),
    "chatglm": lambda: ChatGLMForCausalLM(chatglm_config()),
    "chatglm2": lambda: ChatGLMv2ForCausalLM(chatglm2_config()),
}


def random_model(family: str, seed: int = 0):
    paddle.seed(seed)
    model = FAMILIES[family]()
    model.eval()
    return model


def random_prefix(model, tokens: int = 3, seed: int = 1, **options) -> PrefixModel:
    """A prefix of clearly non-zero keys and values (an effect on every logit)."""
    paddle.seed(seed)
    prefix_model = PrefixModel(model, prefix_config_for(model, tokens, **options))
    for parameter in prefix_model.prefix_encoder.parameters():
        parameter.set_value(paddle.randn(parameter.shape) * 0.5)
    prefix_model.eval()
    return prefix_model


def batch_inputs(model, batch: int = 2, length: int = 7, seed: int = 0) -> dict:
    """Random ids, the family's positions ([B, 2, S] or [B, S]), sep masks [B] and labels (numpy)."""
    rng = np.random.default_rng(seed)
    seps = np.array([3, 5][:batch])
    positions = np.tile(np.arange(length), (batch, 1))
    if not isinstance(model, ChatGLMv2ForCausalLM):  # 2-D: part B at its mask's position, block positions count
        block = np.maximum(positions - seps[:, None] + 1, 0)
        positions = np.stack([np.minimum(positions, seps[:, None] - 1), block], axis=1)
    return {"input_ids": rng.integers(4, 140 if isinstance(model, ChatGLMForCausalLM) else 90, [batch, length]),
            "position_ids": positions, "attention_mask": seps,
            "labels": rng.integers(4, 90, [batch, length]),
            "loss_mask": (np.arange(length)[None] >= seps[:, None]).astype("float32")}


def hand_cache(prefix_model: PrefixModel, batch: int):
    """The prefix's keys and values read off the encoder's weight by hand (numpy; rows [2, layers, heads, dim])."""
    config = prefix_model.prefix_config
    state = {k: v.numpy() for k, v in prefix_model.prefix_encoder.state_dict().items()}
    if config.prefix_projection:
        rows = np.tanh(state["0.weight"] @ state["1.weight"] + state["1.bias"]) @ state["3.weight"] + state["3.bias"]
    else:
        rows = state["0.weight"]
    layers, heads = config.num_hidden_layers, config.multi_query_group_num or config.num_attention_heads
    kv = rows.reshape([config.num_prefix_tokens, 2, layers, heads, config.head_dim])
    return [tuple(paddle.to_tensor(np.repeat(kv[None, :, part, layer], batch, axis=0)) for part in (0, 1))
            for layer in range(layers)]


def hand_mask(seps: np.ndarray, queries: int, prefix: int, cache: int = 0) -> np.ndarray:
    """Dense [B, 1, q, prefix + cache + q]: prefix columns all visible, then key j visible to query i when j < sep
    or j <= i (real-token columns)."""
    mask = np.ones([len(seps), 1, queries, prefix + cache + queries], dtype="float32")
    for row, sep in enumerate(seps):
        for i in range(queries):
            for j in range(cache + queries):
                mask[row, 0, i, prefix + j] = float(j < sep or j <= cache + i)
    return mask


def tensors(inputs: dict) -> dict:
    return {key: paddle.to_tensor(value) for key, value in inputs.items()}


# ------------------------------------------------------------------------------------------------------------------
# The prefix is a cache: masks, positions, layout
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_an_empty_prefix_equals_the_base_model(family):
    model = random_model(family)
    inputs = tensors(batch_inputs(model))
    ids, positions, sep = inputs["input_ids"], inputs["position_ids"], inputs["attention_mask"]
    config = prefix_config_for(model, 1)
    groups = config.multi_query_group_num or config.num_attention_heads
    empty = [(paddle.zeros([2, 0, groups, config.head_dim]),) * 2 for _ in range(2)]
    dense = paddle.to_tensor(hand_mask(sep.numpy(), ids.shape[1], 0))
    for mask in (sep, dense):
        got = prefixed_forward(model, 0, ids, positions, mask, empty).logits
        np.testing.assert_array_equal(got.numpy(), model(ids, positions, mask).logits.numpy())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_prefix_equals_its_keys_and_values_given_as_a_cache(family):
    """Training's sep mask, and generation's prefill (dense mask over the prompt) + a decode step, both against the
    model given the prefix's K/V as a cache with a hand-built mask; the real tokens keep their positions."""
    model = random_model(family)
    prefix_model = random_prefix(model)
    inputs = batch_inputs(model)
    seps, (batch, length) = inputs["attention_mask"], inputs["input_ids"].shape
    ids, positions = (paddle.to_tensor(inputs[k]) for k in ("input_ids", "position_ids"))
    expected = model(ids, positions, paddle.to_tensor(hand_mask(seps, length, 3)),
                     cache=hand_cache(prefix_model, batch))
    got = prefix_model(ids, positions, paddle.to_tensor(seps)).logits
    np.testing.assert_allclose(got.numpy(), expected.logits.numpy(), atol=2e-5)
    assert np.abs(got.numpy() - model(ids, positions, paddle.to_tensor(seps)).logits.numpy()).max() > 1e-2

    prompt = length - 1
    prefill = prefix_model(ids[:, :prompt], positions[..., :prompt], paddle.to_tensor(hand_mask(seps, prompt, 0)))
    assert prefill.past_key_values[0][0].shape[1] == 3 + prompt  # the prefix stays in the cache
    step = prefix_model(ids[:, prompt:], positions[..., prompt:], paddle.to_tensor(hand_mask(seps, 1, 0, prompt)),
                        cache=prefill.past_key_values)
    np.testing.assert_allclose(step.logits[:, -1].numpy(), expected.logits[:, -1].numpy(), atol=2e-5)


def test_a_projected_prefix_is_the_mlp_of_its_embedding():
    model = random_model("glm")
    prefix_model = random_prefix(model, projection=True, projection_hidden_size=24)
    inputs = batch_inputs(model)
    ids, positions, sep = (paddle.to_tensor(inputs[k]) for k in ("input_ids", "position_ids", "attention_mask"))
    expected = model(ids, positions, paddle.to_tensor(hand_mask(inputs["attention_mask"], ids.shape[1], 3)),
                     cache=hand_cache(prefix_model, 2)).logits
    np.testing.assert_allclose(prefix_model(ids, positions, sep).logits.numpy(), expected.numpy(), atol=2e-5)


def test_kv_heads_of_each_rank_hand_worked():
    """(first K/V head, count) per rank: heads split like the query heads; ChatGLM2's groups split, or shared by the
    ranks whose query heads read them."""
    def slices(config, kv_heads, degree):
        return [kv_head_slice(SimpleNamespace(num_attention_heads=config, tensor_parallel_degree=degree,
                                              tensor_parallel_rank=rank), kv_heads) for rank in range(degree)]

    assert slices(4, 4, 1) == [(0, 4)]
    assert slices(4, 4, 2) == [(0, 2), (2, 2)]  # GLM, ChatGLM-6B: every head is a K/V head
    assert slices(4, 2, 2) == [(0, 1), (1, 1)]  # 2 groups over 2 ranks
    assert slices(4, 1, 2) == [(0, 1), (0, 1)]  # 1 group, held by both ranks
    assert slices(8, 2, 4) == [(0, 1), (0, 1), (1, 1), (1, 1)]  # groups replicated on 2 ranks each
    assert slices(32, 2, 8)[3:5] == [(0, 1), (1, 1)]  # ChatGLM2-6B on 8 ranks: heads 12-15 read group 0, 16-19 group 1


# ------------------------------------------------------------------------------------------------------------------
# Training moves the prefix alone; counts; files
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, projection, expected", [
    ("glm", False, 2 * 2 * 16 * 32),  # layers x 2 x pre_seq_len x kv width (4 heads x 8)
    ("chatglm2", False, 2 * 2 * 16 * 32),  # kv width = 2 groups x 16
    ("chatglm2", True, 16 * 32 + (32 * 24 + 24) + (24 * 128 + 128)),  # embedding, Linear(32, 24), Linear(24, 2*2*32)
])
def test_trainable_parameter_count_is_logged_and_only_the_prefix_trains(family, projection, expected, paddlenlp_log):
    args = SimpleNamespace(prefix_path=None, pre_seq_len=16, prefix_projection=projection,
                           prefix_hidden_size=24 if projection else None, prefix_dropout=0.0)
    prefix_model = add_prefix(random_model(family), args)
    trainable = {name: int(p.numel()) for name, p in prefix_model.named_parameters() if not p.stop_gradient}
    assert sum(trainable.values()) == expected and all(name.startswith("prefix_encoder.") for name in trainable)
    assert f"P-Tuning v2: {expected} of " in paddlenlp_log.text


def test_only_the_prefix_gets_gradients_and_the_base_stays_byte_identical(adgen):
    """The Trainer (AdamW with weight decay) for a few steps on ADGEN: the prefix moves, no base weight does."""
    from paddlenlp.trainer import TrainingArguments

    from paddle_glm.data import read_pairs, tokenize_pairs
    from paddle_glm.inputs import Collator
    from paddle_glm.trainer import GLMTrainer
    from tasks import adgen as task

    base = load_model(adgen["base"])
    before = {k: v.numpy().tobytes() for k, v in base.state_dict().items()}
    prefix_model = PrefixModel(base, prefix_config_for(base, 4, dropout=0.1))
    start = prefix_model.prefix_encoder[0].weight.numpy().copy()
    template = load_template(adgen["base"])
    pairs = read_pairs(adgen["data"]["train"], lambda record, where: task.to_pairs(record, where), limit=16)
    args = TrainingArguments(output_dir=str(adgen["root"] / "steps"), max_steps=3, per_device_train_batch_size=8,
                             learning_rate=1e-2, weight_decay=0.1, report_to=["none"], device="cpu", save_strategy="no",
                             disable_tqdm=True)
    dataset = tokenize_pairs(pairs, template, 48, 48)
    GLMTrainer(model=prefix_model, args=args, train_dataset=dataset, data_collator=Collator(template.pad_id)).train()
    assert {k: v.numpy().tobytes() for k, v in base.state_dict().items()} == before
    prefix_model.clear_gradients()
    prefix_model(**Collator(template.pad_id)(dataset.features[:4])).loss.backward()
    assert [name for name, p in prefix_model.named_parameters() if p.grad is not None] == ["prefix_encoder.0.weight"]
    assert np.abs(prefix_model.prefix_encoder[0].weight.numpy() - start).max() > 1e-3


def test_a_saved_prefix_is_alone_in_paddlenlp_format_and_reloads_to_identical_outputs(tmp_path):
    model = random_model("chatglm2")
    prefix_model = random_prefix(model, projection=True, projection_hidden_size=24)
    prefix_model.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [PREFIX_CONFIG_NAME, PREFIX_WEIGHTS_NAME]
    assert sorted(paddle.load(str(tmp_path / PREFIX_WEIGHTS_NAME))) == ["0.weight", "1.bias", "1.weight", "3.bias",
                                                                          "3.weight"]
    paddlenlp_config = PrefixConfig.from_pretrained(str(tmp_path))  # PaddleNLP reads it
    assert (paddlenlp_config.num_prefix_tokens, paddlenlp_config.multi_query_group_num,
            paddlenlp_config.prefix_projection_hidden_size, paddlenlp_config.tensor_parallel_degree) == (3, 2, 24, -1)
    inputs = tensors(batch_inputs(model))
    reloaded = load_prefix(random_model("chatglm2"), str(tmp_path))
    args = (inputs["input_ids"], inputs["position_ids"], inputs["attention_mask"])
    np.testing.assert_array_equal(reloaded(*args).logits.numpy(), prefix_model(*args).logits.numpy())


def test_a_prefix_of_another_model_is_refused(tmp_path):
    random_prefix(random_model("chatglm2")).save_pretrained(str(tmp_path / "chatglm2"))
    with pytest.raises(InputError, match="K/V heads 2 but the model has 4"):
        load_prefix(random_model("glm"), str(tmp_path / "chatglm2"))
    with pytest.raises(InputError, match="no prefix_config.json"):
        load_prefix(random_model("glm"), str(tmp_path))


def test_flags_alias_and_refusals():
    common = ["--model_name_or_path", "x", "--output_dir", "out"]
    model_args = parse_arguments(common + ["--ptuning", "--pre_seq_len", "8"], "")[0]
    assert model_args.prefix_tuning and model_args.pre_seq_len == 8
    for flags, message in ((["--prefix_hidden_size", "8", "--ptuning"], "add --prefix_projection"),
                           (["--prefix_projection"], "needs --prefix_tuning"),
                           (["--ptuning", "--lora"], "choose one way of training"),
                           (["--ptuning", "--pre_seq_len", "0"], "--pre_seq_len 0")):
        with pytest.raises(InputError, match=message):
            parse_arguments(common + flags, "")


# ------------------------------------------------------------------------------------------------------------------
# ADGEN learnt by a prefix; prediction, evaluation, export and the runners with it
# ------------------------------------------------------------------------------------------------------------------

def natural_format(records) -> list:
    """The same kind of mapping read from a sentence ("商品：衬衫。特点：宽松、纯棉。"): the base model's task."""
    rows = []
    for record in records:
        pairs = [item.split("#") for item in record["content"].split("*")]
        rows.append({"src": f"商品：{pairs[0][1]}。特点：" + "、".join(value for _, value in pairs[1:]) + "。",
                     "tgt": record["summary"]})
    return rows


def run_flags(model, output_dir, data, **overrides) -> list:
    values = dict(model_name_or_path=model, task_name="adgen", train_file=data["train"], dev_file=data["dev"],
                  output_dir=output_dir, src_length=48, tgt_length=48, min_tgt_length=0,
                  decode_strategy="greedy_search", per_device_train_batch_size=16, per_device_eval_batch_size=32,
                  learning_rate=5e-2, warmup_steps=10, label_smoothing=0.0, do_train=True, do_eval=True,
                  eval_steps=100000, save_strategy="no", logging_steps=1, report_to="none", device="cpu", seed=3,
                  disable_tqdm=True, overwrite_output_dir=True)
    values.update(overrides)
    return [part for key, value in values.items() for part in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def adgen(tmp_path_factory):
    """The tiny demo GLM trained fully on a *different format* of attribute-to-ad data (sentences, other records),
    then prefix-tuned (16 tokens, 150 steps) on ADGEN's `key#value*...` format; scored before and after."""
    root = tmp_path_factory.mktemp("adgen")
    data = write_demo_splits(str(root / "adgen"), "adgen", train=400, dev=32, seed=1)
    sentences = {"train": str(root / "sentences" / "train.json")}
    write_json_lines(natural_format(adgen_records(560, 11)), sentences["train"])
    vocabulary = root / "vocabulary.json"
    shutil.copy(sentences["train"], vocabulary)
    with open(vocabulary, "a", encoding="utf-8") as handle, open(data["train"], encoding="utf-8") as extra:
        handle.write(extra.read())
    build_demo_model(str(root / "random"), str(vocabulary), seed=0)
    base = str(root / "base")
    finetune(run_flags(str(root / "random"), base, {**sentences, "dev": None}, task_name="jsonl", do_eval=False,
                       dev_file="", max_steps=200, learning_rate=6e-3, logging_steps=50))
    shutil.copy(os.path.join(str(root / "random"), "cog-pretrain.model"), base)
    prefix = dict(prefix_tuning=True, pre_seq_len=16)
    finetune(run_flags(base, root / "untrained", data, do_train=False, **prefix))
    finetune(run_flags(base, root / "prefix", data, max_steps=150, **prefix))
    return {"root": root, "data": data, "base": base, "prefix": str(root / "prefix")}


def scores(output_dir) -> dict:
    return json.load(open(os.path.join(output_dir, "eval_results.json")))


def test_prefix_tuning_on_adgen_scores_far_above_the_untrained_prefix(adgen):
    """Measured: BLEU-4 37 -> 64, ROUGE-L 51 -> 71, eval loss 1.19 -> 0.43 on 32 held-out records: the base writes
    ads from sentences; the prefix teaches it ADGEN's attribute format."""
    before, after = scores(adgen["root"] / "untrained"), scores(adgen["prefix"])
    print(f"ADGEN prefix: BLEU-4 {before['eval_bleu4']:.1f} -> {after['eval_bleu4']:.1f}, ROUGE-L "
          f"{before['eval_rougeL']:.1f} -> {after['eval_rougeL']:.1f}, loss {before['eval_loss']:.2f} -> "
          f"{after['eval_loss']:.2f}")
    assert after["eval_bleu4"] >= before["eval_bleu4"] + 15 and after["eval_rougeL"] >= before["eval_rougeL"] + 12
    assert after["eval_loss"] <= before["eval_loss"] - 0.5
    assert sorted(f for f in os.listdir(adgen["prefix"]) if f.endswith(".pdparams")) == [PREFIX_WEIGHTS_NAME]


def adgen_prompts(adgen, count: int = 3):
    template = load_template(adgen["base"])
    records = [json.loads(line) for line in open(adgen["data"]["dev"], encoding="utf-8")][:count]
    return template, [template.generation_example(template.prompt_ids(r["content"])[0]) for r in records]


def test_predict_generation_with_prefix_path_answers_as_the_prefix_model_decodes(adgen, tmp_path):
    from paddle_glm.predict import main as predict

    template, prompts = adgen_prompts(adgen, 2)
    texts = [json.loads(line)["content"] for line in open(adgen["data"]["dev"], encoding="utf-8")][:2]
    predict(["--model_name_or_path", adgen["base"], "--prefix_path", adgen["prefix"], "--text", *texts,
             "--decode_strategy", "greedy_search", "--tgt_length", "32", "--output_file", str(tmp_path / "out.json")])
    config = DecodingConfig(decode_strategy="greedy_search", max_length=32, eos_token_id=list(template.stop_ids),
                            pad_token_id=template.pad_id, tokenizer_size=template.tokenizer_size,
                            no_repeat_ngram_size=3)
    expected = generate(load_prefix(load_model(adgen["base"]), adgen["prefix"]), prompts, config).sequences
    predicted = [json.loads(line)["prediction"] for line in open(tmp_path / "out.json", encoding="utf-8")]
    assert predicted == [template.response(s) for s in expected] and all(p.startswith("这款") for p in predicted)


def test_evaluation_scores_log_likelihoods_with_the_prefix(adgen):
    """`evaluate_generation.py --prefix_path` loads the prefix as prediction does; the scorer's cached, batched
    log-likelihoods (prompt cache with the prefix, then the choices) equal full forwards of the prefix model."""
    from paddle_glm.evaluate import EvaluateArguments, model_arguments
    from paddle_glm.predict import load_model as predict_model

    arguments = EvaluateArguments(model_name_or_path=adgen["base"], data_dir=str(adgen["root"]),
                                  prefix_path=adgen["prefix"])
    prefix_model = predict_model(model_arguments(arguments))
    assert isinstance(prefix_model, PrefixModel)
    template = load_template(adgen["base"])
    prompt = template.prompt_ids("类型#衬衫*颜色#白色")[0]
    choices = [template.encode(text) for text in ("这款衬衫，白色的配色干净大方。", "这款风衣。", "哪位作家")]
    requests = [Request(prompt, choices), Request(template.prompt_ids("类型#毛衣")[0], choices[1:])]
    cached = Scorer(prefix_model, template, batch_size=2).score(requests)
    for request, item_scores in zip(requests, cached):
        for continuation, score in zip(request.continuations, item_scores):
            example = tensors(template.training_example(request.prompt_ids, continuation, len(continuation) + 1))
            logits = prefix_model(example["input_ids"][None], example["position_ids"][None],
                                  example["attention_mask"][None]).logits.astype("float64")
            logprobs = paddle.nn.functional.log_softmax(logits, axis=-1).numpy()[0]
            rows = np.nonzero(example["loss_mask"].numpy())[0][:-1]  # the continuation's tokens, not the stop token
            assert score == pytest.approx(sum(logprobs[r, example["labels"].numpy()[r]] for r in rows), abs=1e-4)
    assert cached[0][0] > cached[0][2] + 5  # the tuned model prefers the ad
    base_scores = Scorer(load_model(adgen["base"]), template).score(requests)
    assert abs(base_scores[0][0] - cached[0][0]) > 0.1


def runner_cases(template, prompts):
    return {name: DecodingConfig(eos_token_id=list(template.stop_ids), pad_token_id=template.pad_id, max_length=16,
                                 tokenizer_size=template.tokenizer_size, **settings)
            for name, settings in (("greedy", dict(decode_strategy="greedy_search")),
                                   ("beam", dict(decode_strategy="beam_search", num_beams=3)))}


def assert_runners_equal_dygraph(export_dir, prefix_model, base, template, prompts):
    from infer.runner import GLMRunner

    assert json.load(open(os.path.join(export_dir, "export_config.json")))["prefix_tokens"] == \
        prefix_model.prefix_config.num_prefix_tokens
    for name, config in runner_cases(template, prompts).items():
        expected = generate(prefix_model, prompts, config).sequences
        assert expected != generate(base, prompts, config).sequences, name  # the prefix matters
        for backend in ("paddle", "onnxruntime"):
            assert GLMRunner(export_dir, backend).generate(prompts, config).sequences == expected, (name, backend)


def test_glm_export_and_runners_serve_the_prefix(adgen):
    """The prefix lives in the exported prefill graph: the runner feeds what it feeds without one."""
    from export.exporter import main as export

    directory = str(adgen["root"] / "export")
    export(["--model_name_or_path", adgen["base"], "--prefix_path", adgen["prefix"], "--output_path", directory,
            "--tgt_length", "16", "--onnx"])
    template, prompts = adgen_prompts(adgen)
    base = load_model(adgen["base"])
    base.eval()
    assert_runners_equal_dygraph(directory, load_prefix(load_model(adgen["base"]), adgen["prefix"]), base, template,
                                 prompts)


@pytest.mark.skipif(not os.path.isfile(CHATGLM3_TOKENIZER), reason=f"needs {CHATGLM3_TOKENIZER} (../shared/assets)")
def test_chatglm2_export_and_runners_serve_the_prefix(tmp_path):
    """A random ChatGLM2 (spread logits) with a random 4-token prefix over its 2 K/V groups."""
    from export.exporter import main as export

    paddle.seed(5)
    model = ChatGLMv2ForCausalLM(chatglm2_config(vocab=65024))
    model.chatglm_v2.output_layer.weight.set_value(model.chatglm_v2.output_layer.weight * 30)
    model.save_pretrained(str(tmp_path / "base"))
    load_chatglm2_tokenizer(CHATGLM3_TOKENIZER, "chatglm3").save_pretrained(str(tmp_path / "base"))
    random_prefix(model, tokens=4).save_pretrained(str(tmp_path / "prefix"))
    export(["--model_name_or_path", str(tmp_path / "base"), "--prefix_path", str(tmp_path / "prefix"),
            "--output_path", str(tmp_path / "export"), "--tgt_length", "16", "--onnx"])
    template = load_template(str(tmp_path / "export"))
    prompts = [template.generation_example(template.prompt_ids(q)[0]) for q in ("你好", "挪威的首都是哪里？")]
    base = load_model(str(tmp_path / "base"))
    base.eval()
    prefix_model = load_prefix(load_model(str(tmp_path / "base")), str(tmp_path / "prefix"))
    assert_runners_equal_dygraph(str(tmp_path / "export"), prefix_model, base, template, prompts)


# ------------------------------------------------------------------------------------------------------------------
# Tensor parallelism: 2 ranks = 1 rank
# ------------------------------------------------------------------------------------------------------------------

def test_tensor_parallel_prefix_equals_one_process(tmp_path):
    """Each family on 2 ranks (GLM's and ChatGLM-6B's heads split; ChatGLM2's 2 groups split, its 1 group shared by
    both ranks): logits, loss and the whole prefix encoder's gradients of the one-process model."""
    models = {"glm": random_model("glm"), "chatglm": random_model("chatglm"),
              "chatglm2_split": ChatGLMv2ForCausalLM(chatglm2_config(groups=2)),
              "chatglm2_shared": ChatGLMv2ForCausalLM(chatglm2_config(groups=1))}
    expected = {}
    for name, model in models.items():
        directory = tmp_path / name
        model.save_pretrained(str(directory))
        prefix = random_prefix(model, projection=name == "glm", projection_hidden_size=16)
        prefix.save_pretrained(str(directory / "prefix"))
        inputs = batch_inputs(model)
        np.savez(directory / "inputs.npz", **inputs)
        expected[name] = run_checks(load_prefix(model, str(directory / "prefix")), inputs)
    launch(tmp_path, "tests/prefix_tp_worker.py", tmp_path, *(tmp_path / name for name in models))
    for name, reference in expected.items():
        for rank in (0, 1):
            result = np.load(tmp_path / f"{name}-rank{rank}.npz")
            assert float(result["loss"]) == pytest.approx(reference["loss"], rel=1e-6), name
            np.testing.assert_allclose(result["logits"], reference["logits"], atol=1e-5, err_msg=name)
            for key, grad in reference["grads"].items():
                np.testing.assert_allclose(result[f"grad:{key}"], grad, atol=1e-6, err_msg=f"{name} {key}")


def test_finetune_prefix_tensor_parallel_losses_equal_one_process(adgen, tmp_path):
    """`finetune_generation.py --ptuning` on 2 ranks from the same starting prefix: the losses of one process, and
    one whole prefix saved. (The base without dropout: ranks draw other dropout masks than one process.)"""
    base = str(tmp_path / "base")
    shutil.copytree(adgen["base"], base)
    config = json.load(open(os.path.join(base, "config.json")))
    config.update({key: 0.0 for key in config if key.endswith("dropout_prob")})
    json.dump(config, open(os.path.join(base, "config.json"), "w"))
    random_prefix(load_model(base), tokens=8, seed=4).save_pretrained(str(tmp_path / "start"))
    flags = dict(prefix_tuning=True, prefix_path=tmp_path / "start", max_steps=6, do_eval=False, learning_rate=1e-2,
                 max_train_samples=48)
    finetune(run_flags(base, tmp_path / "tp1", adgen["data"], **flags))
    launch(tmp_path, "finetune_generation.py", *run_flags(base, tmp_path / "tp2", adgen["data"],
                                                          tensor_parallel_degree=2, **flags))
    losses = [[entry["loss"] for entry in json.load(open(tmp_path / run / "trainer_state.json"))["log_history"]
               if "loss" in entry] for run in ("tp1", "tp2")]
    assert len(losses[0]) == 6 and max(abs(a - b) / a for a, b in zip(*losses)) <= 1e-4
    trained = [paddle.load(str(tmp_path / run / PREFIX_WEIGHTS_NAME), return_numpy=True) for run in ("tp1", "tp2")]
    np.testing.assert_allclose(trained[1]["0.weight"], trained[0]["0.weight"], atol=1e-5)
    assert sorted(f for f in os.listdir(tmp_path / "tp2") if f.endswith(".pdparams")) == [PREFIX_WEIGHTS_NAME]


# ------------------------------------------------------------------------------------------------------------------
# The benchmark script
# ------------------------------------------------------------------------------------------------------------------

def test_bench_peft_smoke():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_peft.py"), "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| prefix tuning" in done.stdout and "| LoRA" in done.stdout and "| full" in done.stdout
