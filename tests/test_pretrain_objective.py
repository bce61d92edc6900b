"""GLM's blank-infilling objective (`paddle_glm.blocklm`) against THUDM's `blocklm` semantics: statistics over 10,000
generated samples, part-B positions and a reconstruction of every sample, a hand-worked example with its attention
mask, the model honouring that mask, seeded shuffling; the causal-LM examples of the other families."""
from __future__ import annotations

import os

import numpy as np
import paddle
import pytest
from scipy.stats import poisson

from paddle_glm.blocklm import BlankInfilling, BlankInfillingIds, BlockLMConfig, CausalLM, PRESETS, sentence_end_ids
from paddle_glm.models.layers import sep_to_dense_mask

from conftest import SHARED_ASSETS

IDS = BlankInfillingIds(cls=1001, eos=1000, mask=1002, smask=1003, gmask=1004, sop=1005, eop=1006)
END = 5  # the one sentence-ending token of the generated samples
WORDS = (10, 1000)  # ordinary tokens
SAMPLES = 10_000
LENGTH = 511  # + [CLS] = THUDM's 512


def objective(**config) -> BlankInfilling:
    return BlankInfilling(IDS, np.array([END]), 1007, BlockLMConfig(**config))


def generated_sample(rng: np.random.Generator, length: int = LENGTH) -> np.ndarray:
    """Documents of 30 to 300 tokens (each ended by eos), a fifth of the tokens ending a sentence (END)."""
    tokens = rng.integers(*WORDS, size=length)
    tokens[rng.random(length) < 0.2] = END
    ends = np.cumsum(rng.integers(30, 301, size=length // 30))
    tokens[ends[ends < length]] = IDS.eos
    return tokens


@pytest.fixture(scope="module")
def infilled():
    """10,000 samples through glm-large-chinese's mix (0.4 / 0.3 / 0.3), each with its text."""
    blocks = objective(**PRESETS["glm-large-chinese"])
    data = np.random.default_rng(0)
    results = []
    for index in range(SAMPLES):
        tokens = generated_sample(data)
        results.append((np.concatenate([[IDS.cls], tokens]), blocks.infill(tokens, np.random.default_rng([7, index]))))
    return results


def test_task_mix_is_within_two_points_of_the_flags(infilled):
    counts = {task: sum(r.task == task for _, r in infilled) / SAMPLES for task in ("token", "sentence", "long")}
    assert max(abs(counts[task] - share) for task, share in (("token", 0.4), ("sentence", 0.3), ("long", 0.3))) < 0.02


def masked_share(infilled, task: str) -> float:
    chosen = [(text, r) for text, r in infilled if r.task == task]
    return sum(end - start for _, r in chosen for start, end in r.spans) / sum(len(text) for text, _ in chosen)


def test_token_spans_cover_15_percent_with_poisson_lengths(infilled):
    assert abs(masked_share(infilled, "token") - 0.15) < 0.01
    lengths = [end - start for _, r in infilled if r.task == "token" for start, end in r.spans]
    assert min(lengths) >= 1 and max(lengths) <= 39
    # THUDM draws lengths 1..39 with weights poisson.pmf(k, 3): mean 3 / (1 - e^-3) = 3.157, not 3.
    support = np.arange(1, 40)
    expected = float((support * poisson.pmf(support, 3)).sum() / poisson.pmf(support, 3).sum())
    assert abs(expected - 3.157) < 1e-3
    assert abs(np.mean(lengths) - expected) < 0.1
    frequencies = np.bincount(lengths, minlength=40)[1:8] / len(lengths)  # the shape, not only the mean
    assert np.abs(frequencies - poisson.pmf(support[:7], 3) / poisson.pmf(support, 3).sum()).max() < 0.01


def test_token_spans_stay_inside_documents_and_apart(infilled):
    for text, r in infilled:
        if r.task != "token":
            continue
        for (start, end), (next_start, _) in zip(r.spans, r.spans[1:]):
            assert end < next_start  # at least one unmasked token between spans
        for start, end in r.spans:
            assert start >= 1 and IDS.eos not in text[start:end].tolist()


def test_sentence_spans_are_whole_sentences_covering_15_percent(infilled):
    assert abs(masked_share(infilled, "sentence") - 0.15) < 0.01
    for text, r in infilled:
        if r.task != "sentence":
            continue
        covered = sum(end - start for start, end in r.spans)
        target = int(0.15 * len(text))
        assert covered >= target and covered - max(end - start for start, end in r.spans) < target  # stops once reached
        for start, end in r.spans:
            inside = text[start:end].tolist()
            assert IDS.eos not in inside and END not in inside[:-1]
            assert inside[-1] == END or end == len(text)  # a whole sentence (or the sample's unfinished last one)
            assert text[start - 1] in (END, IDS.eos, IDS.cls)  # starting right after the previous one


def test_long_span_is_a_suffix_of_25_to_100_percent(infilled):
    ratios = []
    for text, r in infilled:
        if r.task == "long":
            (start, end), = r.spans
            assert end == len(text) and start >= 1
            ratios.append((end - start) / len(text))
    assert min(ratios) >= 0.25 and max(ratios) <= 1.0
    assert abs(np.mean(ratios) - (0.25 + 1.0) / 2) < 0.02  # uniform over the allowed lengths


def test_every_part_b_token_sits_at_its_mask_and_the_text_is_recovered(infilled):
    masks = {"token": IDS.mask, "sentence": IDS.smask, "long": IDS.gmask}
    for text, r in infilled:
        example = r.example
        sep = int(example["attention_mask"])
        inputs, positions, labels = example["input_ids"], example["position_ids"], example["labels"]
        part_a = inputs[:sep]
        mask_positions = np.flatnonzero(part_a == masks[r.task])  # the generated text holds no mask ids
        assert len(mask_positions) == len(r.spans)
        assert positions[0, :sep].tolist() == list(range(sep)) and not positions[1, :sep].any()
        assert not example["loss_mask"][:sep].any() and example["loss_mask"][sep:].all()
        cursor, recovered = sep, {}
        for index in r.order:
            start, end = r.spans[index]
            size = end - start + 1
            assert inputs[cursor] == IDS.sop and labels[cursor + size - 1] == IDS.eop
            assert (positions[0, cursor:cursor + size] == mask_positions[index]).all()
            assert positions[1, cursor:cursor + size].tolist() == list(range(1, size + 1))
            assert (inputs[cursor + 1:cursor + size] == labels[cursor:cursor + size - 1]).all()  # teacher forcing
            recovered[index] = inputs[cursor + 1:cursor + size]
            cursor += size
        assert cursor == len(inputs) == len(labels) == positions.shape[1]
        rebuilt, last = [], 0
        for index, at in enumerate(mask_positions):
            rebuilt += part_a[last:at].tolist() + recovered[index].tolist()
            last = at + 1
        assert rebuilt + part_a[last:].tolist() == text.tolist()


HAND_MASK = [  # sep = 7 of 12: part A sees part A; part B sees part A and every part-B token up to itself
    "111111100000",
    "111111100000",
    "111111100000",
    "111111100000",
    "111111100000",
    "111111100000",
    "111111100000",
    "111111110000",  # <sop> of the 2nd span (first in part B)
    "111111111000",
    "111111111100",  # <sop> of the 1st span sees the span before it in part B
    "111111111110",
    "111111111111",
]


def test_a_small_example_hand_checked():
    blocks = objective()
    text = np.array([IDS.cls, 11, 12, 13, 14, 15, 16, 17])
    example = blocks.block_example(text, [(2, 4), (6, 7)], order=[1, 0], mask=IDS.mask)
    m, s, e = IDS.mask, IDS.sop, IDS.eop
    assert example["input_ids"].tolist() == [IDS.cls, 11, m, 14, 15, m, 17, s, 16, s, 12, 13]
    assert example["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 5, 5, 2, 2, 2],
                                                [0, 0, 0, 0, 0, 0, 0, 1, 2, 1, 2, 3]]
    assert example["labels"].tolist() == [0] * 7 + [16, e, 12, 13, e]
    assert example["loss_mask"].tolist() == [0] * 7 + [1] * 5
    assert int(example["attention_mask"]) == 7
    dense = sep_to_dense_mask(paddle.to_tensor([7]), 12).numpy()[0, 0]
    assert ["".join(str(int(v)) for v in row) for row in dense] == HAND_MASK


def test_the_model_reads_part_b_causally_over_part_a_and_earlier_spans(twin_models):
    """Changing the later span in part B leaves the earlier span's logits alone; changing part A does not."""
    model, _ = twin_models
    text = np.array([1, 11, 12, 13, 14, 15, 16, 17]) % 90  # ids inside the tiny vocabulary
    ids = BlankInfillingIds(cls=1, eos=2, mask=3, smask=4, gmask=5, sop=6, eop=7)
    example = BlankInfilling(ids, np.array([8]), 96).block_example(text, [(2, 4), (6, 7)], [1, 0], ids.mask)

    def logits(input_ids):
        out = model(paddle.to_tensor(input_ids[None]), paddle.to_tensor(example["position_ids"][None]),
                    paddle.to_tensor(example["attention_mask"][None]))
        return out.logits.numpy()[0]

    base = logits(example["input_ids"])
    later = example["input_ids"].copy()
    later[10:] = [40, 41]  # the second span of part B
    assert np.abs(logits(later)[:10] - base[:10]).max() == 0.0
    earlier_a = example["input_ids"].copy()
    earlier_a[6] = 42  # the last token of part A
    assert np.abs(logits(earlier_a)[7:9] - base[7:9]).max() > 1e-3


def test_shuffling_is_seeded():
    blocks = objective(bert_prob=1.0, gap_sentence_prob=0.0)
    data = np.random.default_rng(3)
    samples = [generated_sample(data) for _ in range(50)]
    first = [blocks.infill(s, np.random.default_rng([1, i])) for i, s in enumerate(samples)]
    again = [blocks.infill(s, np.random.default_rng([1, i])) for i, s in enumerate(samples)]
    other = [blocks.infill(s, np.random.default_rng([2, i])) for i, s in enumerate(samples)]
    assert all((a.example["input_ids"] == b.example["input_ids"]).all() for a, b in zip(first, again))
    assert sum(a.order != sorted(a.order) for a in first) > 45  # ~25 spans: shuffled
    assert sum(a.spans != b.spans or a.order != b.order for a, b in zip(first, other)) == 50
    unshuffled = objective(bert_prob=1.0, gap_sentence_prob=0.0, shuffle_blocks=False)
    assert all(r.order == sorted(r.order) for r in (unshuffled.infill(s, np.random.default_rng(i))
                                                    for i, s in enumerate(samples)))


def test_sentence_ends_found_in_the_glm_vocabulary(cog_tokenizer):
    ends = set(sentence_end_ids(cog_tokenizer).tolist())
    for text in ("今天下雨了。", "你好吗?", "好!", "注意:"):
        ids = cog_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids[-1] in ends, text
    assert not ends & {cog_tokenizer.eos_token_id, cog_tokenizer.cls_token_id}
    assert cog_tokenizer(text="北京", add_special_tokens=False)["input_ids"][0] not in ends


CHATGLM3_TOKENIZER = os.path.join(SHARED_ASSETS, "chatglm3-tokenizer.model")


@pytest.mark.skipif(not os.path.isfile(CHATGLM3_TOKENIZER), reason="needs ChatGLM2/3's sentencepiece model")
def test_causal_examples_for_chatglm2_score_every_corpus_token_once():
    from paddle_glm.models.chatglm2 import FAMILY, load_chatglm2_tokenizer

    template = FAMILY.template(load_chatglm2_tokenizer(CHATGLM3_TOKENIZER, "chatglm2"))
    example = CausalLM(template)(np.array([100, 200, 300]))
    assert example["input_ids"].tolist() == [64790, 64792, 100, 200, 300]  # [gMASK] sop, THUDM's plain-text prefix
    assert example["labels"].tolist()[1:4] == [100, 200, 300]
    assert example["loss_mask"].tolist() == [0, 1, 1, 1, 0]
    assert example["position_ids"].tolist() == [[0, 1, 2, 3, 4]] and int(example["attention_mask"]) == 0
