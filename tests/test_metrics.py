"""Character-level BLEU-4 / ROUGE checked against nltk, the `rouge` package and hand computations."""
from __future__ import annotations

import math

import pytest
from rouge import Rouge

from paddle_glm.metrics import bleu4, char_tokens, generation_metrics, rouge_l, rouge_n

# (prediction, reference). No "." anywhere: the `rouge` package splits sentences there.
PAIRS = [
    ("今天天气很好，我们去公园散步吧", "今天天气不错，我们一起去公园散步"),  # partial overlap, repeated 天
    ("哈哈哈哈哈哈", "哈哈"),  # repeated characters, clipping, prediction longer
    ("我爱我的家", "我的家我爱"),  # same characters, different order: ROUGE-1 = 1 but LCS = 3
    ("苹果香蕉", "火车飞机"),  # no overlap at all
    ("GPT3模型有175B参数", "GLM模型有10B参数"),  # Latin letters and digits mixed in
    ("北京是中国的首都，也是一座历史悠久的城市", "北京是中华人民共和国的首都"),  # different lengths
    ("人工智能改变世界", "人工 智能 正在 改变 世界"),  # whitespace in the reference is ignored
    ("床前明月光疑是地上霜", "床前明月光，疑是地上霜"),  # near copy
]

SECOND_CORPUS = [
    ("机器学习是人工智能的一个分支", "机器学习是人工智能的重要分支之一"),
    ("他明天要去上海出差", "他明天去上海"),
    ("这部电影非常好看，值得一看", "这部电影很好看，非常值得一看"),
    ("The quick brown fox", "The quick brown dog jumps"),  # total c = 52 < r = 57: brevity penalty
]


def _spaced(texts):
    """What the word-based `rouge` package needs: one space-separated token per character."""
    return [" ".join("".join(text.split())) for text in texts]


def _split(corpus):
    return [p for p, _ in corpus], [r for _, r in corpus]


def test_char_tokens_drop_all_whitespace():
    assert char_tokens(" 今天\t天气\n好\u3000ok 1 ") == ["今", "天", "天", "气", "好", "o", "k", "1"]
    assert char_tokens("") == [] and char_tokens(" \u3000\n") == []


def test_rouge_matches_rouge_package_counting_repeats():
    preds, refs = _split(PAIRS)
    expected = Rouge(exclusive=False).get_scores(_spaced(preds), _spaced(refs), avg=True)
    assert rouge_n(preds, refs, 1) == pytest.approx(expected["rouge-1"]["f"], abs=1e-6)
    assert rouge_n(preds, refs, 2) == pytest.approx(expected["rouge-2"]["f"], abs=1e-6)
    assert rouge_l(preds, refs) == pytest.approx(expected["rouge-l"]["f"], abs=1e-6)


def test_rouge_matches_rouge_package_defaults_where_no_character_repeats():
    # Rouge()'s default (exclusive=True) counts distinct n-grams only; without repeated characters
    # that is the same thing, so the default settings must agree with us too.
    unique = [(p, r) for p, r in PAIRS if all(len(set(char_tokens(t))) == len(char_tokens(t)) for t in (p, r))]
    assert len(unique) >= 3
    preds, refs = _split(unique)
    expected = Rouge().get_scores(_spaced(preds), _spaced(refs), avg=True)
    assert rouge_n(preds, refs, 1) == pytest.approx(expected["rouge-1"]["f"], abs=1e-6)
    assert rouge_n(preds, refs, 2) == pytest.approx(expected["rouge-2"]["f"], abs=1e-6)
    assert rouge_l(preds, refs) == pytest.approx(expected["rouge-l"]["f"], abs=1e-6)


def test_repetition_is_penalised_unlike_rouge_package_default():
    # Degenerate repetition: Rouge() defaults give ~1.0; with counts P = 1/4, R = 1, F = 0.4.
    assert Rouge().get_scores("的 的 的 的", "的")[0]["rouge-1"]["f"] == pytest.approx(1.0)
    assert rouge_n(["的的的的"], ["的"], 1) == pytest.approx(0.4)
    assert rouge_l(["的的的的"], ["的"]) == pytest.approx(0.4)


@pytest.mark.parametrize("corpus", [PAIRS, SECOND_CORPUS], ids=["pairs", "second"])
def test_bleu4_matches_nltk_corpus_bleu(corpus):
    bleu_score = pytest.importorskip(
        "nltk.translate.bleu_score", reason="nltk is needed as the reference BLEU (pip install nltk)"
    )
    preds, refs = _split(corpus)
    expected = bleu_score.corpus_bleu(
        [[char_tokens(r)] for r in refs], [char_tokens(p) for p in preds], weights=(0.25,) * 4
    )
    assert expected > 0.1  # a real, non-degenerate comparison (PAIRS: c > r, SECOND_CORPUS: c < r)
    assert bleu4(preds, refs) == pytest.approx(expected, abs=1e-9)


def test_bleu4_by_hand():
    # prediction 好好好好学习 (c = 6), reference 好好学习天天向上 (r = 8); clipped matches / prediction n-grams:
    #   1-grams: 好 min(4, 2) = 2, 学 1, 习 1                      -> 4/6
    #   2-grams: 好好 min(3, 1) = 1, 好学 1, 学习 1                 -> 3/5
    #   3-grams: 好好好 0 (x2), 好好学 1, 好学习 1                   -> 2/4
    #   4-grams: 好好好好 0, 好好好学 0, 好好学习 1                   -> 1/3
    # product = 1/15; brevity penalty (c < r) = exp(1 - 8/6) = exp(-1/3)
    assert bleu4(["好好好好学习"], ["好好学习天天向上"]) == pytest.approx(math.exp(-1 / 3) * 15 ** -0.25, abs=1e-12)
    # Prediction longer than the reference: no brevity penalty, all 4 precisions 3/4, 2/3, 1/2, 0/1 -> 0.
    assert bleu4(["一二三x"], ["一二三"]) == 0.0


def test_rouge_by_hand():
    # 我爱北京天安门 (7) vs 北京的天安门很美 (8): LCS 北京天安门 = 5, P = 5/7, R = 5/8, F = 2*5/(7+8) = 2/3.
    # 我爱我的家 (5) vs 我的家我爱 (5): LCS 我的家 = 3 (我爱 has 2), F = 2*3/(5+5) = 3/5.
    preds, refs = ["我爱北京天安门", "我爱我的家"], ["北京的天安门很美", "我的家我爱"]
    assert rouge_l(preds, refs) == pytest.approx((2 / 3 + 3 / 5) / 2, abs=1e-12)
    assert rouge_l(preds[:1], refs[:1]) == pytest.approx(2 / 3, abs=1e-12)
    # ROUGE-2 for 好好好好学习 vs 好好学习天天向上: overlap 3 (好好 clipped to 1), P = 3/5, R = 3/7, F = 6/12.
    assert rouge_n(["好好好好学习"], ["好好学习天天向上"], 2) == pytest.approx(0.5, abs=1e-12)


def test_identical_texts_score_100():
    texts = ["今天天气很好", "GLM模型有10B参数", "哈哈哈哈"]
    assert generation_metrics(texts, list(texts)) == {"bleu4": 100.0, "rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}


def test_empty_prediction_scores_zero_without_error():
    zeros = {"bleu4": 0.0, "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert generation_metrics([""], ["今天天气很好"]) == zeros
    assert generation_metrics([" \u3000\n"], ["今天天气很好"]) == zeros
    assert generation_metrics(["今天天气很好"], [""]) == zeros
    # In a corpus the empty pair contributes 0 to each ROUGE average.
    mixed = generation_metrics(["", "今天天气很好"], ["今天天气很好", "今天天气很好"])
    assert mixed["rouge1"] == mixed["rouge2"] == mixed["rougeL"] == 50.0


def test_whitespace_is_ignored():
    spaced = generation_metrics(["今天 天气\t很好\n", "我 爱 你"], ["今\u3000天天气 很好", "我爱你们 "])
    plain = generation_metrics(["今天天气很好", "我爱你"], ["今天天气很好", "我爱你们"])
    assert spaced == plain
    assert plain["rouge1"] < 100.0


def test_percentages_rounded_to_4_decimals():
    preds, refs = _split(PAIRS)
    scores = generation_metrics(preds, refs)
    assert scores["bleu4"] == round(100 * bleu4(preds, refs), 4)
    assert scores["rougeL"] == round(100 * rouge_l(preds, refs), 4)
    assert 0.0 < scores["rouge2"] < scores["rouge1"] < 100.0


@pytest.mark.parametrize(
    "metric",
    [generation_metrics, bleu4, lambda p, r: rouge_n(p, r, 1), rouge_l],
    ids=["all", "bleu4", "rouge1", "rougeL"],
)
def test_bad_corpus_raises(metric):
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metric(["你好", "世界"], ["你好"])
    with pytest.raises(ValueError, match="empty"):
        metric([], [])
