"""The fine-tuning recipe end to end on a tiny GLM, and each flag reaching what it controls."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import paddle
import pytest

from paddle_glm.data import tokenize_pairs
from paddle_glm.data import write_json_lines
from paddle_glm.finetune import main, parse_arguments
from paddle_glm.generation import generate
from paddle_glm.inputs import Collator
from paddle_glm.lora import add_lora
from paddle_glm.metrics import generation_metrics
from paddle_glm.models.glm import GLMForConditionalGeneration
from paddle_glm.models import load_template
from test_parallel import launch, no_dropout_base  # noqa: F401 (a fixture)


def _common_flags(base, output_dir, **overrides):
    flags = {
        "model_name_or_path": base["model"], "train_file": base["qg"]["train"], "dev_file": base["qg"]["dev"],
        "output_dir": str(output_dir), "src_length": 64, "tgt_length": 12, "min_tgt_length": 0,
        "num_beams": 2, "max_steps": 3, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
        "learning_rate": 1e-3, "do_train": True, "do_eval": True, "eval_steps": 1000, "save_strategy": "no",
        "logging_steps": 1, "report_to": "none", "device": "cpu", "seed": 3, "disable_tqdm": True,
        "max_train_samples": 24, "max_eval_samples": 4,
    }
    flags.update(overrides)
    argv = []
    for key, value in flags.items():
        argv += [f"--{key}"] + ([str(value)] if not isinstance(value, list) else [str(v) for v in value])
    return argv


def _read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _trainer_state(output_dir):
    return json.load(open(os.path.join(output_dir, "trainer_state.json")))


def _losses(output_dir) -> dict:
    """step -> logged loss (--logging_steps 1)."""
    return {entry["step"]: entry["loss"] for entry in _trainer_state(output_dir)["log_history"] if "loss" in entry}


def test_finetune_trains_evaluates_with_beam_search_saves_and_reloads(demo_base, tmp_path):
    # Trained on the 4 dev examples it is evaluated on, long enough that its predictions overlap the references.
    flags = _common_flags(demo_base, tmp_path, train_file=demo_base["qg"]["dev"], max_train_samples=4, max_steps=40,
                          learning_rate=5e-3)
    main(flags)
    assert _trainer_state(tmp_path)["global_step"] == 40
    losses = _losses(tmp_path)
    assert sorted(losses) == list(range(1, 41)) and losses[40] < 0.5 * losses[1]
    with open(tmp_path / "eval_results.json") as handle:
        metrics = json.load(handle)
    assert metrics["eval_ppl"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-6)
    predictions = _read_jsonl(tmp_path / "eval_predictions.jsonl")
    assert len(predictions) == 4 and set(predictions[0]) == {"source", "reference", "prediction"}
    assert [(p["source"], p["reference"]) for p in predictions] == [
        (f"答案：{r['answer']}，上下文：{r['context']}", r["question"]) for r in _read_jsonl(demo_base["qg"]["dev"])[:4]]
    # The scores are those of the written predictions against the written references as the tokenizer gives them
    # back (cut to --tgt_length and normalised: "？" -> "?", as predictions are); generation_metrics itself is
    # checked against nltk and the rouge package in test_metrics.py.
    template = load_template(str(tmp_path))
    references = [template.response(template.target_ids(p["reference"])[:11]) for p in predictions]
    assert references != [p["reference"] for p in predictions]
    scores = generation_metrics([p["prediction"] for p in predictions], references)
    assert {name: metrics[f"eval_{name}"] for name in scores} == scores
    assert 0 < scores["bleu4"] < 100 and 0 < scores["rouge2"] < 100

    # The saved model is the trained one, and it decodes to exactly what evaluation wrote.
    trained = GLMForConditionalGeneration.from_pretrained(str(tmp_path))
    base = GLMForConditionalGeneration.from_pretrained(demo_base["model"])
    name = "glm.transformer.layers.0.attention.query_key_value.weight"
    assert not np.allclose(trained.state_dict()[name].numpy(), base.state_dict()[name].numpy())
    model_args, data_args, gen_args, _ = parse_arguments(flags, "unused.json")
    pairs = [(p["source"], p["reference"]) for p in predictions]
    dataset = tokenize_pairs(pairs, template, data_args.src_length, data_args.tgt_length)
    config = gen_args.decoding_config(template, max_length=data_args.tgt_length)
    result = generate(trained, dataset.prompts, config)
    assert [template.decode(s) for s in result.sequences] == [p["prediction"] for p in predictions]


def test_finetune_lora_trains_only_adapters_saves_reloads_and_merges(demo_base, tmp_path):
    main(_common_flags(demo_base, tmp_path, lora=True, lora_rank=4, lora_alpha=8, merge_lora=True))
    with open(tmp_path / "lora_config.json") as handle:
        lora_config = json.load(handle)
    assert (lora_config["r"], lora_config["lora_alpha"]) == (4, 8)
    adapter = paddle.load(str(tmp_path / "lora_model_state.pdparams"))
    assert adapter and all("lora_" in key for key in adapter)

    base = GLMForConditionalGeneration.from_pretrained(demo_base["model"])
    merged = GLMForConditionalGeneration.from_pretrained(str(tmp_path / "merged"))
    from paddlenlp.peft import LoRAModel

    reloaded = LoRAModel.from_pretrained(GLMForConditionalGeneration.from_pretrained(demo_base["model"]), str(tmp_path))
    reloaded.eval()
    merged.eval()
    # only adapted weights changed in the merged model
    for key, value in base.state_dict().items():
        changed = not np.allclose(value.numpy(), merged.state_dict()[key].numpy())
        assert changed == ("query_key_value.weight" in key), key
    ids = paddle.to_tensor([[5, 6, 7, 8, 9, 10]])
    np.testing.assert_allclose(merged(ids).logits.numpy(), reloaded(ids).logits.numpy(), atol=1e-5)


def test_finetune_belle_keeps_input_and_expands_multi_turn(demo_base, tmp_path):
    belle = demo_base["belle"]
    main(_common_flags(demo_base, tmp_path, task_name="belle", train_file=belle["train"], dev_file=belle["dev"],
                       max_eval_samples=100, num_beams=1, decode_strategy="greedy_search"))
    predictions = _read_jsonl(tmp_path / "eval_predictions.jsonl")
    records = _read_jsonl(belle["dev"])
    from tasks import belle as belle_task

    expected = [pair[:2] for i, r in enumerate(records) for pair in belle_task.to_pairs(r, f"dev:{i}")]
    assert [(p["source"], p["reference"]) for p in predictions] == expected
    assert len(expected) > len(records)  # multi-turn records give one example per assistant turn
    with_input = [r for r in records if r.get("input", "").strip()]
    assert with_input and any(with_input[0]["input"] in p["source"] for p in predictions)


def test_finetune_test_file_is_decoded_and_scored(demo_base, tmp_path):
    test_file = tmp_path / "test.json"
    write_json_lines(_read_jsonl(demo_base["qg"]["dev"])[:2], str(test_file))
    main(_common_flags(demo_base, tmp_path / "out", do_train=False, do_eval=False, do_predict=True,
                       test_file=str(test_file)))
    assert len(_read_jsonl(tmp_path / "out" / "test_predictions.jsonl")) == 2
    assert "test_bleu4" in json.load(open(tmp_path / "out" / "test_results.json"))


# ---------------------------------------------------------------- every flag reaches what it controls


def test_flags_reach_the_decoding_config(demo_base):
    argv = _common_flags(demo_base, "unused", num_beams=4, length_penalty=1.3, no_repeat_ngram_size=2,
                         min_tgt_length=3, tgt_length=9, top_k=7, top_p=0.8, temperature=0.5,
                         repetition_penalty=1.2, seed_decoding=11, decode_strategy="sampling")
    _, data_args, gen_args, _ = parse_arguments(argv, "unused.json")
    template = load_template(demo_base["model"])
    config = gen_args.decoding_config(template, max_length=data_args.tgt_length)
    assert (config.decode_strategy, config.max_length, config.min_length) == ("sampling", 9, 3)
    assert (config.length_penalty, config.no_repeat_ngram_size, config.top_k, config.top_p) == (1.3, 2, 7, 0.8)
    assert (config.temperature, config.repetition_penalty, config.seed) == (0.5, 1.2, 11)
    assert config.eos_ids == (template.tokenizer.eop_token_id,)
    _, _, beam_args, _ = parse_arguments(argv[:-2] + ["--decode_strategy", "beam_search", "--select_topk", "false"], "x")
    beam = beam_args.decoding_config(template, max_length=9)
    assert (beam.num_beams, beam.beam_candidates) == (4, "sample")
    _, _, top_args, _ = parse_arguments(argv[:-2] + ["--decode_strategy", "beam_search", "--top_p", "0.0"], "x")
    assert top_args.decoding_config(template, max_length=9).top_p == 1.0  # the reference's 0.0 means off


# The decoding settings of evaluation that _common_flags gives, as DecodingConfig fields (--tgt_length 8).
EVAL_DECODING = dict(decode_strategy="beam_search", num_beams=2, length_penalty=0.7, no_repeat_ngram_size=3,
                     min_length=0, max_length=8, top_k=0, top_p=1.0, temperature=1.0, repetition_penalty=1.0,
                     seed=None, num_return_sequences=1, beam_candidates="top")
EVAL_CASES = [  # (flags, the DecodingConfig fields they set)
    (dict(decode_strategy="sampling", top_k=6, temperature=1.5, repetition_penalty=2.0, seed_decoding=5,
          num_return_sequences=2),
     dict(decode_strategy="sampling", num_beams=1, top_k=6, temperature=1.5, repetition_penalty=2.0, seed=5,
          num_return_sequences=2)),
    # top_p alone: its mass is the whole distribution's (PaddleNLP's), which after top_k 6 rarely reaches p
    (dict(decode_strategy="sampling", top_p=0.5, temperature=0.7, seed_decoding=7),
     dict(decode_strategy="sampling", num_beams=1, top_p=0.5, temperature=0.7, seed=7)),
    (dict(num_beams=3, length_penalty=3.0, no_repeat_ngram_size=1, select_topk="false", seed_decoding=2,
          num_return_sequences=2),
     dict(num_beams=3, length_penalty=3.0, no_repeat_ngram_size=1, beam_candidates="sample", seed=2,
          num_return_sequences=2)),
]


@pytest.mark.parametrize("flags,fields", EVAL_CASES, ids=["sampling top_k", "sampling top_p", "beam search"])
def test_evaluation_decodes_with_the_decoding_flags_and_the_jsonl_fields(demo_base, demo_trained, decoded, tmp_path,
                                                                         flags, fields):
    """An evaluation run (--task_name jsonl with its --source_field and --target_field) writes as predictions what
    `generate` gives with the settings the flags name (the first of --num_return_sequences), and each flag matters:
    left at its default, `generate` gives something else."""
    records = [{"ask": f"答案：{r['answer']}，上下文：{r['context']}", "gold": r["question"]}
               for r in _read_jsonl(demo_base["qg"]["dev"])[:4]]
    write_json_lines(records, str(tmp_path / "dev.json"))
    main(_common_flags(demo_base, tmp_path / "out", model_name_or_path=demo_trained, do_train=False,
                       task_name="jsonl", source_field="ask", target_field="gold", dev_file=tmp_path / "dev.json",
                       tgt_length=8, **flags))
    written = _read_jsonl(tmp_path / "out" / "eval_predictions.jsonl")
    assert [(p["source"], p["reference"]) for p in written] == [(r["ask"], r["gold"]) for r in records]
    sources = [r["ask"] for r in records]
    first = lambda settings: [texts[0] for texts in decoded(sources, 64, **settings)]  # noqa: E731
    expected = first({**EVAL_DECODING, **fields})
    assert [p["prediction"] for p in written] == expected
    # decode_strategy and num_beams are what the others need; beam search returns the best beam first however many
    # it returns (sampling draws differently for more sequences)
    beam = fields.get("decode_strategy", "beam_search") == "beam_search"
    for name in set(fields) - {"decode_strategy", "num_beams"} - ({"num_return_sequences"} if beam else set()):
        assert first({**EVAL_DECODING, **fields, name: EVAL_DECODING[name]}) != expected, name


def test_use_flash_attention_flag_trains_through_the_fused_attention(demo_base, tmp_path, monkeypatch):
    import paddle.nn.functional as F

    calls = []
    fused = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("training"))
        return fused(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    main(_common_flags(demo_base, tmp_path / "plain", max_steps=1, do_eval=False))
    assert calls == []
    main(_common_flags(demo_base, tmp_path / "fused", max_steps=1, do_eval=False, use_flash_attention=True))
    assert calls == [True, True]  # one training step through both layers, with attention dropout on


def test_instruction_script_with_a_json_file_prepares_the_demo_and_trains_on_belle(tmp_path, monkeypatch):
    """`finetune_instruction_generation.py ARGS.json --max_steps 2`: the JSON's flags with the later flag winning,
    --prepare_demo writing the missing BELLE data and base model, --task_name belle by default."""
    import runpy
    import sys

    from tasks import belle

    data = tmp_path / "data" / "belle"
    flags = dict(prepare_demo=True, model_name_or_path=str(tmp_path / "base_belle"), train_file=str(data / "train.json"),
                 dev_file=str(data / "dev.json"), output_dir=str(tmp_path / "out"), src_length=48, tgt_length=8,
                 min_tgt_length=0, num_beams=2, max_steps=5, max_train_samples=16, max_eval_samples=3,
                 per_device_train_batch_size=4, per_device_eval_batch_size=4, do_train=True, do_eval=True,
                 save_strategy="no", logging_steps=1, report_to="none", device="cpu", seed=3, disable_tqdm=True)
    (tmp_path / "args.json").write_text(json.dumps(flags))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setattr(sys, "argv", ["finetune_instruction_generation.py", str(tmp_path / "args.json"),
                                      "--max_steps", "2"])
    runpy.run_path(os.path.join(root, "finetune_instruction_generation.py"), run_name="__main__")

    assert [sum(1 for _ in open(data / name, encoding="utf-8")) for name in ("train.json", "dev.json")] == [3000, 120]
    assert os.path.isfile(tmp_path / "base_belle" / "config.json")
    assert _trainer_state(tmp_path / "out")["global_step"] == 2 and sorted(_losses(tmp_path / "out")) == [1, 2]
    records = _read_jsonl(data / "dev.json")
    pairs = [pair[:2] for i, record in enumerate(records) for pair in belle.to_pairs(record, f"dev:{i}")][:3]
    written = _read_jsonl(tmp_path / "out" / "eval_predictions.jsonl")
    assert [(p["source"], p["reference"]) for p in written] == pairs


def test_flag_r_is_an_alias_of_lora_rank(demo_base):
    model_args, *_ = parse_arguments(_common_flags(demo_base, "unused") + ["--r", "6"], "x")
    assert model_args.lora_rank == 6


def test_lora_flags_shape_the_adapters(demo_base):
    model_args, *_ = parse_arguments(_common_flags(demo_base, "unused", lora=True, lora_rank=3, lora_alpha=12,
                                                   lora_dropout=0.25, lora_target_modules=[".*dense_h_to_4h.*"]), "x")
    lora_model = add_lora(GLMForConditionalGeneration.from_pretrained(demo_base["model"]), model_args)
    adapted = {name: layer for name, layer in lora_model.model.named_sublayers() if hasattr(layer, "lora_A")}
    assert sorted(adapted) == ["glm.transformer.layers.0.mlp.dense_h_to_4h", "glm.transformer.layers.1.mlp.dense_h_to_4h"]
    layer = adapted["glm.transformer.layers.0.mlp.dense_h_to_4h"]
    assert layer.lora_A.shape[1] == 3 and layer.scaling == pytest.approx(12 / 3)
    assert layer.lora_dropout.p == 0.25
    trainable = [name for name, p in lora_model.model.named_parameters() if not p.stop_gradient]
    assert trainable and all("lora" in name for name in trainable)
    model_args.lora_target_modules = [".*no_such_layer.*"]
    with pytest.raises(ValueError, match="matched no linear layer"):
        add_lora(GLMForConditionalGeneration.from_pretrained(demo_base["model"]), model_args)


def test_label_smoothing_and_lr_decay_ratio_act_in_the_trainer(demo_base, tmp_path):
    from paddle_glm.trainer import GLMTrainer

    model_args, data_args, _, training_args = parse_arguments(
        _common_flags(demo_base, tmp_path, label_smoothing=0.3, lr_decay_ratio=0.25, warmup_steps=2, max_steps=10), "x"
    )
    template = load_template(demo_base["model"])
    model = GLMForConditionalGeneration.from_pretrained(demo_base["model"])
    dataset = tokenize_pairs([("答案：北京，上下文：北京很大", "北京大吗")], template, 32, 8)
    trainer = GLMTrainer(model=model, args=training_args, tokenizer=template.tokenizer,
                         label_smoothing=model_args.label_smoothing, lr_decay_ratio=model_args.lr_decay_ratio)
    batch = Collator(template.pad_id)([dataset[0]])
    model.eval()  # no dropout; compute_loss smooths only in training mode
    plain = float(trainer.compute_loss(model, dict(batch)))
    model.train()
    for layer in model.sublayers():
        if isinstance(layer, paddle.nn.Dropout):
            layer.p = 0.0
    smoothed = float(trainer.compute_loss(model, dict(batch)))
    logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "loss_mask")}).logits.numpy()[0]
    mask = batch["loss_mask"].numpy()[0] > 0
    log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    labels = batch["labels"].numpy()[0]
    nll = -log_p[np.arange(len(labels)), labels][mask].mean()
    expected = (0.7 * -log_p[np.arange(len(labels)), labels] + 0.3 * -log_p.mean(-1))[mask].mean()
    assert plain == pytest.approx(nll, rel=1e-5) and smoothed == pytest.approx(expected, rel=1e-5)

    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    rates = []
    for _ in range(11):
        rates.append(trainer.lr_scheduler.get_lr())
        trainer.lr_scheduler.step()
    peak = training_args.learning_rate
    assert rates[1] == pytest.approx(peak / 2) and rates[2] == pytest.approx(peak)  # warm-up
    assert rates[10] == pytest.approx(0.25 * peak)  # linear decay to lr_decay_ratio x peak
    assert rates[6] == pytest.approx(peak - (peak - 0.25 * peak) * 4 / 8)


def test_length_flags_truncate_sources_and_targets(demo_base, tmp_path):
    """--src_length and --tgt_length, parsed as the recipe parses them, cut the training examples it loads."""
    from paddle_glm.finetune import load_datasets
    from tasks import dureader_qg

    record = {"context": "北京是中国的首都。" * 20, "answer": "北京", "question": "中国的首都是哪里？" * 5}
    write_json_lines([record], str(tmp_path / "long.json"))
    template = load_template(demo_base["model"])
    for src_length, tgt_length in ((16, 6), (64, 20)):
        _, data_args, _, training_args = parse_arguments(_common_flags(
            demo_base, tmp_path, train_file=tmp_path / "long.json", do_eval=False, src_length=src_length,
            tgt_length=tgt_length), "x")
        (example,) = load_datasets(dureader_qg, data_args, template, training_args)["train"].features
        assert int(example["attention_mask"]) == src_length and len(example["input_ids"]) == src_length + tgt_length


def test_src_plus_tgt_beyond_model_positions_is_refused_before_work(demo_base, tmp_path):
    with pytest.raises(ValueError, match="exceeds the model's 256 positions"):
        main(_common_flags(demo_base, tmp_path, src_length=200, tgt_length=100))
    assert not os.path.exists(tmp_path / "eval_results.json")


@pytest.mark.timeout(300)
def test_finetune_script_under_data_parallel_launch_trains_as_one_process_accumulating(no_dropout_base,  # noqa: F811
                                                                                      tmp_path):
    """2 data-parallel ranks of 4 examples = one process accumulating 2 micro-batches of 4, exactly: the sampler gives
    rank r batches r, r + 2, ... of one shuffle, i.e. micro-batch r of each step; each rank's loss is the mean over
    its own target tokens and the gradients are averaged over ranks, as accumulation averages micro-batch losses; the
    logged loss is the mean over ranks, as over micro-batches. (One process with batches of 8 would weight tokens, not
    examples, equally: a different loss unless every example had as many target tokens.) Dropout off: the ranks' RNGs
    differ from one process's."""
    argv = lambda out, **extra: _common_flags(no_dropout_base, out, max_steps=3, max_eval_samples=2,  # noqa: E731
                                              **extra)
    launch(tmp_path, "finetune_generation.py", *argv(tmp_path / "dp2", verbose=True))
    # Evaluation in batches of 1: the ranks' eval loss is the mean of per-rank means (here one example each).
    main(argv(tmp_path / "one", gradient_accumulation_steps=2, per_device_eval_batch_size=1))
    logs = "".join(open(path).read() for path in (tmp_path).glob("log-*/*"))
    assert "Total Batch size = 8" in logs  # 4 per device x 2 data-parallel ranks
    assert _trainer_state(tmp_path / "dp2")["global_step"] == _trainer_state(tmp_path / "one")["global_step"] == 3
    dp, one = _losses(tmp_path / "dp2"), _losses(tmp_path / "one")
    assert sorted(dp) == sorted(one) == [1, 2, 3] and len(set(one.values())) == 3
    assert dp == pytest.approx(one, rel=1e-6, abs=0)  # only the order of float sums differs
    evaluated = [json.load(open(tmp_path / run / "eval_results.json")) for run in ("dp2", "one")]
    assert evaluated[0]["eval_loss"] == pytest.approx(evaluated[1]["eval_loss"], rel=1e-6)
    assert _read_jsonl(tmp_path / "dp2" / "eval_predictions.jsonl") == _read_jsonl(tmp_path / "one" / "eval_predictions.jsonl")


def test_lr_scheduler_type_other_than_linear_is_paddlenlps_schedule(demo_base, tmp_path):
    """--lr_scheduler_type cosine is not silently replaced by our linear decay to --lr_decay_ratio."""
    from paddlenlp.trainer.trainer_utils import get_scheduler

    from paddle_glm.trainer import GLMTrainer

    *_, training_args = parse_arguments(_common_flags(demo_base, tmp_path, warmup_steps=2, max_steps=10,
                                                      lr_scheduler_type="cosine"), "x")
    model = GLMForConditionalGeneration.from_pretrained(demo_base["model"])
    trainer = GLMTrainer(model=model, args=training_args, lr_decay_ratio=0.25)
    scheduler = trainer.create_scheduler(10)
    expected = get_scheduler("cosine", learning_rate=1e-3, num_warmup_steps=2, num_training_steps=10)
    rates = []
    for _ in range(11):
        rates.append((scheduler.get_lr(), expected.get_lr()))
        scheduler.step()
        expected.step()
    assert [a for a, _ in rates] == pytest.approx([b for _, b in rates])
    assert rates[10][0] == pytest.approx(0.0, abs=1e-9)  # cosine ends at zero, not at 0.25 x the peak
