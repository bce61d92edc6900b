"""Generation metrics for Chinese: corpus BLEU-4 and averaged ROUGE-1/2/L F1, on characters.

Every non-whitespace character is one token and whitespace is dropped. Chinese has no spaces, and
scoring on words would make the numbers depend on which segmenter (and which version of its
dictionary) cut the text; characters (as in LCSTS-style evaluations) need nothing but the strings.

The formulas are the textbook ones (checked in tests against nltk's ``corpus_bleu`` and against the
``rouge`` package run with ``exclusive=False``). Note that ``rouge``'s *default*
(``exclusive=True``) counts each distinct n-gram once, so it scores a degenerate "的的的的" against
"的" as 100 ROUGE-1 and ROUGE-L; repetition is the usual failure of fine-tuned generators, so we count
repeats (clipped counts) instead.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Dict, List, Sequence, Tuple

__all__ = ["char_tokens", "bleu4", "rouge_n", "rouge_l", "generation_metrics"]


def char_tokens(text: str) -> List[str]:
    """Characters of `text` without whitespace (incl. full-width U+3000), one token each."""
    return [ch for ch in text if not ch.isspace()]


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _tokenized_pairs(predictions: Sequence[str], references: Sequence[str]) -> List[Tuple[List[str], List[str]]]:
    """Checks the corpus (one reference per prediction, not empty) and tokenizes it."""
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} references: "
            "there must be exactly one reference per prediction"
        )
    if not predictions:
        raise ValueError("no predictions to score: the corpus is empty")
    return [(char_tokens(p), char_tokens(r)) for p, r in zip(predictions, references)]


def _f1(overlap: int, pred_count: int, ref_count: int) -> float:
    """F1 of P = overlap/pred_count and R = overlap/ref_count; 0 when either side is empty."""
    if overlap == 0:  # also every pair with an empty side
        return 0.0
    precision, recall = overlap / pred_count, overlap / ref_count
    return 2 * precision * recall / (precision + recall)


def bleu4(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level BLEU-4 (Papineni et al. 2002) in [0, 1], one reference per prediction.

    p_n = sum over pairs of clipped n-gram matches / sum of prediction n-grams (n = 1..4), then
    BLEU = BP * exp(sum 0.25 * log p_n) with BP = exp(1 - r/c) if c < r else 1 (c, r: total
    prediction and reference lengths). Corpus-level because sentence BLEU of short outputs is mostly
    zeros. No smoothing: if some p_n has no match at all (e.g. every text is under 4 characters)
    the score is 0.0, as in nltk's ``corpus_bleu``.
    """
    pairs = _tokenized_pairs(predictions, references)
    matches, totals = [0] * 4, [0] * 4
    for pred, ref in pairs:
        for n in range(1, 5):
            pred_ngrams, ref_ngrams = _ngrams(pred, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(count, ref_ngrams[g]) for g, count in pred_ngrams.items())
            totals[n - 1] += sum(pred_ngrams.values())
    if min(matches) == 0:  # also covers c == 0, where every total is 0
        return 0.0
    c = sum(len(pred) for pred, _ in pairs)
    r = sum(len(ref) for _, ref in pairs)
    brevity_penalty = 1.0 if c >= r else math.exp(1 - r / c)
    return brevity_penalty * math.exp(math.fsum(0.25 * math.log(m / t) for m, t in zip(matches, totals)))


def rouge_n(predictions: Sequence[str], references: Sequence[str], n: int) -> float:
    """ROUGE-N F1 in [0, 1], computed per pair and averaged over pairs.

    overlap = clipped n-gram matches (an n-gram counts min(#pred, #ref) times), P = overlap / pred
    n-grams, R = overlap / ref n-grams, F = 2PR / (P + R). A pair with an empty side scores 0 (the
    ``rouge`` package raises there; one empty generation should not abort an evaluation).
    """
    scores = []
    for pred, ref in _tokenized_pairs(predictions, references):
        pred_ngrams, ref_ngrams = _ngrams(pred, n), _ngrams(ref, n)
        overlap = sum((pred_ngrams & ref_ngrams).values())
        scores.append(_f1(overlap, sum(pred_ngrams.values()), sum(ref_ngrams.values())))
    return sum(scores) / len(scores)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) DP, one row kept)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            new = diagonal + 1 if x == y else max(row[j], row[j - 1])
            diagonal, row[j] = row[j], new
    return row[-1]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """ROUGE-L F1 in [0, 1] (Lin 2004, beta = 1), computed per pair and averaged over pairs.

    P = LCS / len(pred), R = LCS / len(ref), F = 2PR / (P + R), with the whole text as one sentence.
    This is exactly what ``rouge`` 1.0.1's "rouge-l" "f" gives with ``exclusive=False`` on
    space-joined characters, up to its +1e-8 in the F denominator; its default ``exclusive=True``
    instead uses distinct characters (|set(LCS)| / |set(tokens)|), and it splits sentences at "."
    (summary-level union LCS), neither of which we do. An empty side scores 0.
    """
    scores = [
        _f1(_lcs_length(pred, ref), len(pred), len(ref))
        for pred, ref in _tokenized_pairs(predictions, references)
    ]
    return sum(scores) / len(scores)


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    """{"bleu4", "rouge1", "rouge2", "rougeL"} as percentages rounded to 4 decimals (like HF's
    run_summarization). Raises ValueError if the lists differ in length or are empty."""
    _tokenized_pairs(predictions, references)  # fail early with the clear message
    scores = {
        "bleu4": bleu4(predictions, references),
        "rouge1": rouge_n(predictions, references, 1),
        "rouge2": rouge_n(predictions, references, 2),
        "rougeL": rouge_l(predictions, references),
    }
    return {name: round(100 * value, 4) for name, value in scores.items()}
