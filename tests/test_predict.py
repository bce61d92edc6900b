"""predict_generation.py: inputs, outputs, LoRA, batching and refusals."""
from __future__ import annotations

import json

import numpy as np
import paddle
import pytest
from paddlenlp.peft import LoRAConfig, LoRAModel

from paddle_glm.data import write_json_lines
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


def test_predict_tgt_length_and_num_return_sequences_act(demo_base, tmp_path):
    short = _predict(tmp_path, demo_base["model"], *_texts(TEXTS[0]), "--tgt_length", "2", name="a.json")
    assert len(short[0]["prediction"]) <= 2 * 4  # at most two pieces of a few characters
    several = _predict(tmp_path, demo_base["model"], *_texts(TEXTS[0]), "--num_return_sequences", "2", name="b.json")
    assert isinstance(several[0]["prediction"], list) and len(several[0]["prediction"]) == 2


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
