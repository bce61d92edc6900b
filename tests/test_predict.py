"""predict_generation.py: inputs, outputs, LoRA, batching and refusals."""
from __future__ import annotations

import json

import numpy as np
import paddle
import pytest
from paddlenlp.peft import LoRAConfig, LoRAModel

from paddle_glm.data import write_json_lines
from paddle_glm.models import load_template
from paddle_glm.models.glm import GLMForConditionalGeneration
from paddle_glm.predict import main

TEXTS = ["答案：巴黎，上下文：巴黎是法国的首都，位于欧洲。", "答案：1998年，上下文：云海公司于1998年推出了手表。", "答案：长江"]


def _predict(tmp_path, model, *flags, name="out.json"):
    output = tmp_path / name
    argv = ["--model_name_or_path", model, "--output_file", str(output), "--tgt_length", "8", "--num_beams", "2",
            "--src_length", "48"]
    main(argv + [str(f) for f in flags])
    with open(output, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _texts(*texts):
    return [arg for text in texts for arg in ("--text", text)]


def test_predict_batching_does_not_change_predictions(demo_base, tmp_path):
    one = _predict(tmp_path, demo_base["model"], *_texts(*TEXTS), "--batch_size", "1", name="one.json")
    three = _predict(tmp_path, demo_base["model"], *_texts(*TEXTS), "--batch_size", "3", name="three.json")
    assert [r["src"] for r in one] == TEXTS
    assert one == three  # left padding in a batch of different lengths changes nothing


def test_predict_input_file_keeps_records_and_uses_source_field(demo_base, tmp_path):
    records = [{"question_id": i, "passage": text} for i, text in enumerate(TEXTS)]
    write_json_lines(records, str(tmp_path / "in.json"))
    out = _predict(tmp_path, demo_base["model"], "--input_file", tmp_path / "in.json", "--source_field", "passage")
    assert [r["question_id"] for r in out] == [0, 1, 2]
    by_text = _predict(tmp_path, demo_base["model"], *_texts(*TEXTS), name="texts.json")
    assert [r["prediction"] for r in out] == [r["prediction"] for r in by_text]


def _predictions(records):
    return [r["prediction"] if isinstance(r["prediction"], list) else [r["prediction"]] for r in records]


# GenerationArguments' defaults as DecodingConfig fields: what a flag left out (or ignored) means.
DEFAULTS = dict(decode_strategy="beam_search", num_beams=5, length_penalty=0.7, no_repeat_ngram_size=3, min_length=0,
                max_length=8, top_k=0, top_p=1.0, temperature=1.0, repetition_penalty=1.0, seed=None,
                num_return_sequences=1, beam_candidates="top")
DECODING_CASES = [  # (flags, the DecodingConfig fields they set)
    (["--decode_strategy", "greedy_search", "--no_repeat_ngram_size", "1", "--min_tgt_length", "5"],
     dict(decode_strategy="greedy_search", num_beams=1, no_repeat_ngram_size=1, min_length=5)),
    (["--decode_strategy", "greedy_search", "--repetition_penalty", "3.0"],
     dict(decode_strategy="greedy_search", num_beams=1, repetition_penalty=3.0)),
    (["--decode_strategy", "sampling", "--top_k", "6", "--top_p", "0.8", "--temperature", "0.6", "--seed_decoding",
      "5", "--num_return_sequences", "2"],
     dict(decode_strategy="sampling", num_beams=1, top_k=6, top_p=0.8, temperature=0.6, seed=5,
          num_return_sequences=2)),
    (["--num_beams", "3", "--length_penalty", "3.0", "--no_repeat_ngram_size", "1", "--select_topk", "false",
      "--seed_decoding", "2"],
     dict(num_beams=3, length_penalty=3.0, no_repeat_ngram_size=1, beam_candidates="sample", seed=2)),
]


@pytest.mark.parametrize("flags,fields", DECODING_CASES, ids=["greedy, no repeat, min length", "greedy, repetition penalty", "sampling", "beam search"])
def test_decoding_flags_reach_generation(demo_trained, decoded, tmp_path, flags, fields):
    """predict_generation.py predicts what `generate` gives with the settings its flags name, and each flag matters
    here: with any one of them left at its default, `generate` gives something else."""
    got = _predict(tmp_path, demo_trained, *_texts(*TEXTS), "--batch_size", "3", *flags)
    expected = decoded(TEXTS, **{**DEFAULTS, **fields})
    assert _predictions(got) == expected
    for name in fields:
        if name not in ("decode_strategy", "num_beams"):  # these two are what the others need
            assert decoded(TEXTS, **{**DEFAULTS, **fields, name: DEFAULTS[name]}) != expected, name


def test_predict_tgt_length_counts_generated_tokens(demo_trained, decoded, tmp_path):
    """--tgt_length 2 with the stop token held back for 2: exactly the first 2 tokens of a longer generation."""
    greedy = dict(DEFAULTS, decode_strategy="greedy_search", num_beams=1, no_repeat_ngram_size=0, min_length=2)
    flags = ["--decode_strategy", "greedy_search", "--no_repeat_ngram_size", "0", "--min_tgt_length", "2"]
    short = _predict(tmp_path, demo_trained, *_texts(*TEXTS), *flags, "--tgt_length", "2", name="a.json")
    assert _predictions(short) == decoded(TEXTS, **dict(greedy, max_length=2))
    assert _predictions(short) != decoded(TEXTS, **dict(greedy, max_length=3))


def test_predict_with_lora_adapter_equals_merged_model(demo_base, tmp_path):
    model = GLMForConditionalGeneration.from_pretrained(demo_base["model"])
    lora_model = LoRAModel(model, LoRAConfig(target_modules=[".*query_key_value.*"], r=4, lora_alpha=8))
    paddle.seed(5)
    for name, param in lora_model.model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapter an effect
            param.set_value(paddle.randn(param.shape) * 0.5)
    lora_model.save_pretrained(str(tmp_path / "adapter"))
    with_lora = _predict(tmp_path, demo_base["model"], *_texts(*TEXTS), "--lora_path", tmp_path / "adapter",
                         "--merge_tensor_parallel_path", tmp_path / "merged", name="lora.json")
    plain = _predict(tmp_path, demo_base["model"], *_texts(*TEXTS), name="plain.json")
    merged = _predict(tmp_path, str(tmp_path / "merged"), *_texts(*TEXTS), name="merged.json")
    assert with_lora == merged
    assert with_lora != plain  # the adapter acts
    ids = paddle.to_tensor([[5, 6, 7, 8]])
    lora_model.eval()
    written = GLMForConditionalGeneration.from_pretrained(str(tmp_path / "merged"))
    written.eval()
    np.testing.assert_allclose(written(ids).logits.numpy(), lora_model(ids).logits.numpy(), atol=1e-5)


@pytest.mark.parametrize("flags,message", [
    (["--text", "x", "--input_file", "x.json"], "give --text or --input_file, not both"),
    (["--text", "x", "--src_length", "250", "--tgt_length", "8"], "must fit the model's 256 positions"),
    (["--text", "x", "--batch_size", "0"], "--batch_size 0"),
    (["--text", "x", "--min_tgt_length", "9", "--tgt_length", "8"], "--min_tgt_length 9 exceeds"),
])
def test_predict_refuses_impossible_flags(demo_base, flags, message):
    with pytest.raises(ValueError, match=message):
        main(["--model_name_or_path", demo_base["model"]] + flags)


def test_without_texts_the_demo_serves_held_out_examples_beside_their_references(capsys):
    """The demo's last screen: held-out dev examples with the reference beside the prediction, and their scores."""
    from paddle_glm.batch_predict import IOArguments, read_inputs, write_outputs
    from paddle_glm.metrics import generation_metrics

    held_out = [("答案：巴黎，上下文：巴黎是法国的首都。", "法国的首都是哪里?"), ("答案：长江", "途中可以看到哪条河?")]
    io = IOArguments()
    records = read_inputs(io, held_out)
    assert records == [{"src": s, "reference": r} for s, r in held_out]
    outputs = [{**records[0], "prediction": "法国的首都是哪里?"}, {**records[1], "prediction": "途中可以看到哪座山?"}]
    write_outputs(io, outputs)
    shown = capsys.readouterr().out.splitlines()
    assert shown[:3] == ["1. 答案：巴黎，上下文：巴黎是法国的首都。", "   reference:  法国的首都是哪里?",
                         "   prediction: 法国的首都是哪里?"]
    expected = generation_metrics(["法国的首都是哪里?", "途中可以看到哪座山?"], [r for _, r in held_out])
    assert shown[-1] == (f"BLEU-4 {expected['bleu4']:.2f}, ROUGE-L {expected['rougeL']:.2f} on these 2 held-out "
                         "examples (they were not trained on)")
    assert read_inputs(io, None)[0]["src"].startswith("答案：巴黎")  # no demo: the built-in example texts


def test_no_arguments_predict_the_demo_checkpoint_on_its_held_out_examples(demo_trained, demo_base, tmp_path,
                                                                          monkeypatch, capsys):
    """`python predict_generation.py` alone serves checkpoints/demo/dureader_qg (the demo's fine-tuned model) on the
    demo's dev examples: each as --text would predict it, beside its reference, then their scores."""
    import shutil

    from paddle_glm.metrics import generation_metrics

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="checkpoints/demo/dureader_qg does not exist yet: run `python "
                                         "finetune_generation.py`"):
        main([])
    shutil.copytree(demo_trained, tmp_path / "checkpoints" / "demo" / "dureader_qg")
    (tmp_path / "checkpoints" / "demo" / "data" / "qg").mkdir(parents=True)
    shutil.copy(demo_base["qg"]["dev"], tmp_path / "checkpoints" / "demo" / "data" / "qg" / "dev.json")
    capsys.readouterr()
    main([])
    shown = capsys.readouterr().out.splitlines()
    dev = [json.loads(line) for line in open(demo_base["qg"]["dev"], encoding="utf-8")]
    sources = [f"答案：{r['answer']}，上下文：{r['context']}" for r in dev]
    assert len(dev) == 6 and shown[0:-1:3] == [f"{n}. {source}" for n, source in enumerate(sources, 1)]
    by_text = _predict(tmp_path, "checkpoints/demo/dureader_qg", *_texts(*sources), "--tgt_length", "64",
                       "--num_beams", "5", "--src_length", str(256 - 64))
    predictions = [r["prediction"] for r in by_text]
    assert shown[2:-1:3] == [f"   prediction: {p}" for p in predictions]
    template = load_template(demo_trained)
    references = [template.response(template.target_ids(r["question"])) for r in dev]  # "？" -> "?", as predicted
    assert shown[1:-1:3] == [f"   reference:  {r}" for r in references]
    scores = generation_metrics(predictions, references)
    assert shown[-1] == (f"BLEU-4 {scores['bleu4']:.2f}, ROUGE-L {scores['rougeL']:.2f} on these 6 held-out examples "
                         "(they were not trained on)")
