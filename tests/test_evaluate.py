"""Benchmark evaluation: prompts against hand-worked strings, log-likelihoods against brute-force forwards (GLM and
ChatGLM2, with and without the shared-prefix cache), a tiny model taught a generated set, TP2 = TP1, bad rows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial

import numpy as np
import paddle
import pytest

from conftest import COG_MODEL, SHARED_ASSETS, tiny_config
from paddle_glm.data import DataError
from paddle_glm.eval_data import Item
from paddle_glm.eval_tasks import TASKS, prompt_text
from paddle_glm.evaluate import encode_item, main
from paddle_glm.inputs import Collator
from paddle_glm.models.family import Template
from paddle_glm.models.glm import GLMForConditionalGeneration, GLMSpecialIds, GLMTemplate
from paddle_glm.scoring import Request, Scorer
from test_parallel import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATGLM3_MODEL = os.path.join(SHARED_ASSETS, "chatglm3-tokenizer.model")


def write(path, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return str(path)


# ------------------------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------------------------

MMLU_DEV = """\
How many moons does the toy planet Zarn have?,One,Two,Three,Four,B
Which colour is the toy star Vell?,Red,Blue,Green,White,A
What shape is the toy comet Ix?,Round,Flat,"Long, thin",Square,C
Which toy planet is nearest to Vell?,Zarn,Orb,Pell,Tuk,D
How long is a day on Zarn?,10 hours,20 hours,30 hours,40 hours,A
"""
MMLU_TEST = "Which toy planet has rings? ,Zarn,Orb,Pell,Tuk,C\n"

HEADER = "The following are multiple choice questions (with answers) about high school physics.\n\n"
SHOTS = [
    "How many moons does the toy planet Zarn have?\nA. One\nB. Two\nC. Three\nD. Four\nAnswer: B\n\n",
    "Which colour is the toy star Vell?\nA. Red\nB. Blue\nC. Green\nD. White\nAnswer: A\n\n",
    "What shape is the toy comet Ix?\nA. Round\nB. Flat\nC. Long, thin\nD. Square\nAnswer: C\n\n",
    "Which toy planet is nearest to Vell?\nA. Zarn\nB. Orb\nC. Pell\nD. Tuk\nAnswer: D\n\n",
    "How long is a day on Zarn?\nA. 10 hours\nB. 20 hours\nC. 30 hours\nD. 40 hours\nAnswer: A\n\n",
]
ITEM = "Which toy planet has rings?\nA. Zarn\nB. Orb\nC. Pell\nD. Tuk\nAnswer:"


@pytest.fixture
def mmlu_dir(tmp_path):
    write(tmp_path / "mmlu" / "dev" / "high_school_physics_dev.csv", MMLU_DEV)
    write(tmp_path / "mmlu" / "test" / "high_school_physics_test.csv", MMLU_TEST)
    return str(tmp_path / "mmlu")


def _mmlu(mmlu_dir):
    task = TASKS["mmlu"]
    (item,) = task.load(mmlu_dir, "test", None)["high_school_physics"]
    shots = task.load(mmlu_dir, "dev", None)["high_school_physics"]
    return task, item, shots


def test_mmlu_prompt_0_and_5_shots_hand_worked(mmlu_dir):
    task, item, shots = _mmlu(mmlu_dir)
    assert prompt_text(task, item.subject, [], item) == HEADER + ITEM
    assert prompt_text(task, item.subject, shots, item) == HEADER + "".join(SHOTS) + ITEM
    assert task.continuations(item) == [" A", " B", " C", " D"] and item.answer == 2
    assert task.categories(item.subject) == ("STEM",)


class CharTemplate(Template):
    """One id per character, [1] text [2]: prompt lengths are character counts."""

    stop_ids = (3,)
    pad_id = 0

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def render(self, query, history):
        return [1] + self.encode(query) + [2]


def test_shots_dropped_from_the_end_until_the_prompt_fits(mmlu_dir):
    task, item, shots = _mmlu(mmlu_dir)
    template = CharTemplate(None)
    three = HEADER + "".join(SHOTS[:3]) + ITEM
    for max_length, kept in ((len(three) + 4, 3), (len(three) + 3, 2), (10_000, 5)):  # + [1], [2] and " A"
        encoded = encode_item(task, template, item.subject, shots, item, max_length, chat=False)
        text = HEADER + "".join(SHOTS[:kept]) + ITEM
        assert (encoded.shots, encoded.cut) == (kept, False)
        assert encoded.prompt_ids == [1] + [ord(c) for c in text] + [2]
        assert encoded.continuations == [[ord(" "), ord(letter)] for letter in "ABCD"]
    # Not even 0 shots fit: the prompt keeps its end (the question and "Answer:"), as the harness cuts.
    encoded = encode_item(task, template, item.subject, shots, item, 40, chat=False)
    assert (encoded.shots, encoded.cut) == (0, True)
    assert encoded.prompt_ids == [1] + [ord(c) for c in (HEADER + ITEM)[-36:]] + [2]


def test_ceval_cmmlu_copa_prompts_hand_worked(tmp_path):
    root = tmp_path
    write(root / "ceval" / "dev" / "high_school_physics_dev.csv",
          "id,question,A,B,C,D,answer,explanation\n0,玩具小车的速度是多少？,1米每秒,2米每秒,3米每秒,4米每秒,B,解析\n")
    write(root / "ceval" / "val" / "high_school_physics_val.csv",
          "id,question,A,B,C,D,answer\n0,玩具火箭飞多高？,10米,20米,30米,40米,D\n")
    write(root / "cmmlu" / "dev" / "astronomy.csv", ",Question,A,B,C,D,Answer\n0,玩具星球有几个卫星？,一个,两个,三个,四个,C\n")
    write(root / "cmmlu" / "test" / "astronomy.csv", ",Question,A,B,C,D,Answer\n0,玩具彗星是什么颜色？,红色,蓝色,绿色,白色,A\n")
    copa = [{"premise": "The toy robot fell over.", "choice1": "Its battery was empty.",
             "choice2": "It was painted red.", "question": "cause", "label": 0, "idx": 0},
            {"premise": "The toy robot sang a song.", "choice1": "The children laughed.", "choice2": "The moon rose.",
             "question": "effect", "label": 1, "idx": 0}]
    write(root / "copa" / "train.jsonl", json.dumps(copa[0]) + "\n")
    write(root / "copa" / "val.jsonl", json.dumps(copa[1]) + "\n")
    expected = {
        "ceval": "以下是中国关于高中物理考试的单项选择题，请选出其中的正确答案。\n\n玩具小车的速度是多少？\nA. 1米每秒\nB. 2米每秒\n"
                 "C. 3米每秒\nD. 4米每秒\n答案：B\n\n玩具火箭飞多高？\nA. 10米\nB. 20米\nC. 30米\nD. 40米\n答案：",
        "cmmlu": "以下是关于天文学的单项选择题，请直接给出正确答案的选项。\n\n题目：玩具星球有几个卫星？\nA. 一个\nB. 两个\nC. 三个\n"
                 "D. 四个\n答案是：C\n\n题目：玩具彗星是什么颜色？\nA. 红色\nB. 蓝色\nC. 绿色\nD. 白色\n答案是：",
        "copa": "The toy robot fell over because its battery was empty.\n\nThe toy robot sang a song therefore",
    }
    continuations = {"ceval": ["A", "B", "C", "D"], "cmmlu": ["A", "B", "C", "D"],
                     "copa": [" the children laughed.", " the moon rose."]}
    answers = {"ceval": 3, "cmmlu": 0, "copa": 1}
    for name, text in expected.items():
        task = TASKS[name]
        (subject, (item,)), = task.load(str(root / name), task.default_split, None).items()
        shots = task.load(str(root / name), task.shot_split, None)[subject]
        assert prompt_text(task, subject, shots, item) == text
        assert task.continuations(item) == continuations[name] and item.answer == answers[name]


# ------------------------------------------------------------------------------------------------------------------
# Log-likelihoods against brute-force forwards
# ------------------------------------------------------------------------------------------------------------------

def brute_force(model, template, prompt, continuation) -> float:
    """One full forward of prompt + answer start + continuation alone, with the family's 1-D sep mask."""
    example = template.training_example(prompt, continuation, len(continuation) + 1)
    positions = example["position_ids"][None]
    output = model(paddle.to_tensor(example["input_ids"][None]),
                   paddle.to_tensor(positions if positions.shape[1] > 1 else positions[:, 0]),
                   paddle.to_tensor(example["attention_mask"][None]), use_cache=False)
    logits = output.logits.astype("float64").numpy()[0]  # numpy: Paddle's CPU log_softmax takes minutes on 65k
    top = logits.max(axis=-1, keepdims=True)
    logprobs = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
    start = len(example["input_ids"]) - len(continuation)
    return float(sum(logprobs[start - 1 + j, token] for j, token in enumerate(continuation)))


def glm_case(equal_lengths: bool = False):
    """A tiny random GLM with special ids inside its 96 tokens; random prompts sharing a start (of one length: their
    bidirectional prefixes are alike, yet reach past the start)."""
    paddle.seed(3)
    model = GLMForConditionalGeneration(tiny_config())
    model.eval()
    template = GLMTemplate(None, GLMSpecialIds(pad=90, cls=91, eos=90, sop=93, eop=94, gmask=95, mask_ids=(95,)))
    rng = np.random.default_rng(5)
    shared = [int(t) for t in rng.integers(2, 80, 12)]
    own = lambda: [int(t) for t in rng.integers(2, 80, 4 if equal_lengths else rng.integers(1, 8))]  # noqa: E731
    requests = [Request(template.render_cut(shared + own(), None),
                        [[int(t) for t in rng.integers(2, 80, rng.integers(1, 4))] for _ in range(rng.integers(2, 5))])
                for _ in range(5)]
    return model, template, requests


def chatglm2_template():
    from paddle_glm.models import FAMILIES
    from paddle_glm.models.chatglm2 import load_chatglm2_tokenizer

    if not os.path.isfile(CHATGLM3_MODEL):
        pytest.skip(f"needs ChatGLM2/3's sentencepiece model at {CHATGLM3_MODEL}")
    return FAMILIES["chatglm2"].template(load_chatglm2_tokenizer(CHATGLM3_MODEL, chat_format="chatglm2"))


def chatglm2_case():
    """A tiny random ChatGLM2 on the real vocabulary; texts sharing a start through its completion prompt."""
    from paddle_glm.models.chatglm2 import ChatGLMv2Config, ChatGLMv2ForCausalLM

    template = chatglm2_template()
    paddle.seed(4)
    config = ChatGLMv2Config(num_hidden_layers=2, vocab_size=64800, hidden_size=64, num_attention_heads=4,
                             kv_channels=16, multi_query_group_num=2, ffn_hidden_size=96, add_qkv_bias=True,
                             max_sequence_length=128, hidden_dropout=0.0, attention_dropout=0.0)
    model = ChatGLMv2ForCausalLM(config)
    model.eval()
    words = "the toy planet Zarn has two moons and a ring of ice".split()
    texts = ["Facts about toys.\n\n" + " ".join(words[:6 + i]) + " Answer:" for i in range(5)]
    requests = [Request(template.completion_prompt(text), [template.encode(c) for c in (" A", " B", " yes, it is")])
                for text in texts]
    gmask, sop = (template.tokenizer.get_command(token) for token in ("[gMASK]", "sop"))
    assert all(r.prompt_ids[:2] == [gmask, sop] for r in requests)
    return model, template, requests


@pytest.mark.parametrize("case", [glm_case, partial(glm_case, equal_lengths=True), chatglm2_case],
                         ids=["glm", "glm-equal-lengths", "chatglm2"])
def test_loglikelihood_equals_full_forward_with_and_without_shared_prefix(case):
    model, template, requests = case()
    expected = [[brute_force(model, template, r.prompt_ids, c) for c in r.continuations] for r in requests]
    seen = []
    hook = model.register_forward_pre_hook(lambda layer, inputs: seen.append(list(inputs[0].shape)))
    for shared_prefix in (True, False):
        for batch_size in (1, 3, 16):
            seen.clear()
            scores = Scorer(model, template, batch_size, shared_prefix).score(requests)
            for got, want in zip(scores, expected):
                assert np.abs(np.array(got) - np.array(want)).max() <= 1e-5, (shared_prefix, batch_size)
            if shared_prefix and batch_size == 16:
                common = len(os.path.commonprefix([list(r.prompt_ids) for r in requests]))
                if template.sep(requests[0].prompt_ids) == 0:  # causal: the common start runs once, alone
                    assert seen[0] == [1, common] and seen[1][0] == len(requests)
                else:  # GLM: prompts are bidirectional, each item runs whole once (its choices share it)
                    assert seen[0] == [len(requests), max(len(r.prompt_ids) for r in requests) + 1]
    hook.remove()
    single = Scorer(model, template).loglikelihood(requests[0].prompt_ids, requests[0].continuations)
    assert np.abs(np.array(single) - np.array(expected[0])).max() <= 1e-5


def test_continuations_are_tokenized_as_the_text_goes_on():
    """Completion mode: " A" after "Answer:" is ChatGLM2's piece '▁A', "A" after "答案：" its piece 'A' (a tokenizer
    adds '▁' before a text alone); chat mode renders THUDM's one-round prompt and the answer as the model's."""
    template = chatglm2_template()
    piece = template.tokenizer.tokenizer.sp_model.PieceToId
    for name, letter_piece in (("mmlu", "▁A"), ("ceval", "A")):
        task = TASKS[name]
        item = Item("high_school_physics", "x:1", "Which?", ("a", "b", "c", "d"), 0)
        plain = encode_item(task, template, item.subject, [], item, 100, chat=False)
        assert plain.continuations[0] == [piece(letter_piece)]
        assert plain.prompt_ids == template.completion_prompt(prompt_text(task, item.subject, [], item))
        chat = encode_item(task, template, item.subject, [], item, 100, chat=True)
        assert template.decode(chat.prompt_ids).startswith("[Round 1]\n\n问：") and chat.continuations[0] == [piece("▁A")]


# ------------------------------------------------------------------------------------------------------------------
# A tiny GLM taught a generated set, through the command line; tensor parallelism
# ------------------------------------------------------------------------------------------------------------------

NAMES = ["Arlo", "Bea", "Cato", "Dina", "Eli", "Fern", "Gus", "Hana", "Ivo", "Juno", "Kai", "Lena", "Milo", "Nora",
         "Otto", "Pia"]
WORDS = ["apple", "river", "stone", "cloud"]


def write_toy_set(directory) -> None:
    """16 questions, answers balanced over A-D: a model answers them only by remembering which is which."""
    rows = [f"Which word is the secret of {name}?,{','.join(WORDS)},{'ABCD'[i % 4]}" for i, name in enumerate(NAMES)]
    write(os.path.join(directory, "test", "toy_secrets_test.csv"), "\n".join(rows) + "\n")


def evaluate(model_dir, data_dir, output, *extra):
    main(["--task", "mmlu", "--data_dir", str(data_dir), "--model_name_or_path", str(model_dir), "--shots", "0",
          "--output_file", str(output), "--batch_size", "5", *extra])
    with open(output, encoding="utf-8") as handle:
        return json.load(handle)


def predictions(output) -> list:
    with open(str(output)[:-5] + ".predictions.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def taught(tmp_path_factory, cog_tokenizer_module):
    """A tiny GLM (real GLM vocabulary) evaluated before and after a few hundred Adam steps on the set's prompts."""
    root = tmp_path_factory.mktemp("taught")
    write_toy_set(root / "data")
    paddle.seed(11)
    model = GLMForConditionalGeneration(tiny_config(vocab_size=50048, hidden_size=64, max_sequence_length=128))
    model.save_pretrained(str(root / "before"))
    cog_tokenizer_module.save_pretrained(str(root / "before"))
    before = evaluate(root / "before", root / "data", root / "before.json")

    task, template = TASKS["mmlu"], GLMTemplate(cog_tokenizer_module)
    items = task.load(str(root / "data"), "test", None)["toy_secrets"]
    examples = []
    for item in items:
        encoded = encode_item(task, template, item.subject, [], item, 128, chat=False)
        target = encoded.continuations[item.answer]
        examples.append(template.training_example(encoded.prompt_ids, target, len(target) + 1))
    batch = Collator(template.pad_id)(examples)
    optimizer = paddle.optimizer.Adam(learning_rate=3e-3, parameters=model.parameters())
    model.train()
    for _ in range(150):  # 100% from about 75 steps on
        loss = model(**batch, loss_positions_only=True).loss
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
    model.save_pretrained(str(root / "after"))
    cog_tokenizer_module.save_pretrained(str(root / "after"))
    after = evaluate(root / "after", root / "data", root / "after.json")
    return {"root": root, "before": before, "after": after, "loss": float(loss)}


@pytest.fixture(scope="module")
def cog_tokenizer_module():
    if not os.path.isfile(COG_MODEL):
        pytest.skip(f"needs the real GLM sentencepiece model at {COG_MODEL} (../shared/assets)")
    from paddle_glm.models.glm import tokenizer_from_sentencepiece

    return tokenizer_from_sentencepiece(COG_MODEL)


def test_taught_tiny_model_scores_100_and_chance_before(taught):
    before, after = taught["before"], taught["after"]
    assert before["overall"]["items"] == after["overall"]["items"] == 16
    assert before["overall"]["acc_micro"] <= 50.0  # chance: 25
    assert after["overall"]["acc_micro"] == after["subjects"]["toy_secrets"]["acc"] == 100.0
    records = predictions(taught["root"] / "after.json")
    assert [r["answer"] for r in records] == [i % 4 for i in range(16)]
    assert all(r["prediction"] == r["answer"] and len(r["loglikelihoods"]) == 4 for r in records)


def test_tensor_parallel_two_ranks_score_as_one(taught, tmp_path):
    root = taught["root"]
    launch(tmp_path, "evaluate_generation.py", "--task", "mmlu", "--data_dir", root / "data", "--model_name_or_path",
           root / "after", "--shots", "0", "--output_file", tmp_path / "tp2.json", "--tensor_parallel_degree", "2")
    one, two = predictions(root / "after.json"), predictions(tmp_path / "tp2.json")
    assert len(one) == len(two) == 16
    difference = max(abs(a - b) for x, y in zip(one, two) for a, b in zip(x["loglikelihoods"], y["loglikelihoods"]))
    assert difference <= 1e-5


# ------------------------------------------------------------------------------------------------------------------
# Bad data: file and line
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task, path, text, message", [
    ("mmlu", "test/s_test.csv", 'Q1?,a,b,c,d,A\n"A question\nover two lines?",a,b,c,d,B\nQ3?,a,b,c,A\n',
     r"test/s_test.csv:4: expected 6 fields \(question, A, B, C, D, answer\), got 5"),
    ("mmlu", "test/s_test.csv", 'Q1?,a,b,c,d,A\n"A question\nover two lines?",a,b,c,B\n', r"s_test.csv:2: expected 6"),
    ("mmlu", "test/s_test.csv", "Q1?,a,b,c,d,A\nQ2?,a,b,c,d,E\n", r"s_test.csv:2: field 'answer' is 'E', not one of A"),
    ("mmlu", "test/s_test.csv", "Q1?,a,b,c,d,A\n ,a,b,c,d,B\n", r"s_test.csv:2: field 'question' is empty"),
    ("ceval", "val/s_val.csv", "id,question,A,B,C,D\n0,Q?,a,b,c,d\n", r"s_val.csv:1: no 'answer' column .*--split val"),
    ("ceval", "val/s_val.csv", "id,question,A,B,C,D,answer\n0,Q?,a,b,c,d,A\n1,Q?,a,b,c,A\n",
     r"s_val.csv:3: expected 7 fields"),
    ("cmmlu", "test/s.csv", ",Question,A,B,C,D,Answer\n0,Q?,a,b,c,d,A\n1,Q?,a,b,c,d,\n", r"s\.csv:3: field 'answer'"),
    ("copa", "val.jsonl", '{"premise": "P.", "choice1": "a", "choice2": "b", "question": "cause", "label": 0}\n'
     '{"premise": "P.", "choice1": "a", "choice2": "b", "question": "cause", "label": 2}\n',
     r"val.jsonl:2: field 'label' is 2, not 0 or 1"),
    ("copa", "val.jsonl", '{"premise": "P.", "choice1": "a", "choice2": "b", "question": "why", "label": 0}\n',
     r"val.jsonl:1: field 'question' is 'why'"),
    ("jsonl_choice", "test.jsonl", '{"question": "Q?", "choices": ["a", "b"], "answer": 1}\n{"question": "Q?", '
     '"choices": ["a"], "answer": 0}\n', r"test.jsonl:2: field 'choices' must be a list of 2 to 10 strings"),
    ("jsonl_choice", "test.jsonl", '{"question": "Q?", "choices": ["a", "b"], "answer": 1}\n{"question": "Q?"\n',
     r"test.jsonl:2: invalid JSON"),
])
def test_malformed_rows_refused_with_file_and_line(tmp_path, task, path, text, message):
    write(tmp_path / path, text)
    evaluation = TASKS[task]
    with pytest.raises(DataError, match=message):
        evaluation.load(str(tmp_path), evaluation.default_split, None)


def test_missing_files_and_subjects_named(tmp_path, mmlu_dir):
    with pytest.raises(DataError, match="mmlu/val: no such directory"):
        TASKS["mmlu"].load(mmlu_dir, "val", None)
    with pytest.raises(DataError, match="mmlu/test: no subject astrology \\(it has high_school_physics\\)"):
        TASKS["mmlu"].load(mmlu_dir, "test", ["astrology"])


# ------------------------------------------------------------------------------------------------------------------
# The benchmark script
# ------------------------------------------------------------------------------------------------------------------

def test_bench_eval_smoke():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_eval.py"), "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shared-prefix / per-choice:" in done.stdout
