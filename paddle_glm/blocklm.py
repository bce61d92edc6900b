"""GLM's pre-training objective, autoregressive blank infilling (THUDM's `blocklm`), and a plain causal-LM objective
for the other families; each turns one packed sample of corpus tokens into a training example in the shape every
family's fine-tuning examples have (`models.family`), so the same collator, model and loss train on it.

Blank infilling, per sample (THUDM's `ConstructBlockStrategy`, `blocklm_utils.py`, with `--task-mask`):
- one task, drawn with probabilities `bert_prob` (token spans), `gap_sentence_prob` (sentences), else a long span;
- token spans: lengths drawn from Poisson(`avg_block_length`) restricted to 1..`max_block_length - 1` until they
  cover `bert_ratio` (15%) of the sample, placed at random inside documents, never over a document end and never
  touching each other; each becomes one `[MASK]`;
- sentences: the sample's sentences (ended by `.?!;:` or a newline, and `。？！；：`) in random order until they cover
  `gap_sentence_ratio` (15%); each becomes one `[sMASK]`;
- a long span: the sample's suffix, `gpt_min_ratio` (25%) to all but one token of it, behind one `[gMASK]`.
Part A is the text with each span replaced by its mask; part B holds the spans in random order, each
`<|startofpiece|> span` as input and `span <|endofpiece|>` as labels. Positions are 2-D: row 0 counts part A and
gives every part-B token its mask's position, row 1 is 0 in part A and counts 1, 2, ... inside each span. Part A is
bidirectional and part B causal over part A and the spans before it: THUDM passes this as one number per sample,
the length of part A (`sep`), the 1-D attention mask our models take; the loss is on part B only.

Where this differs from THUDM's code (each a choice, said here once):
- the task is drawn per sample rather than per batch (same mix in expectation; batches of one task are not needed);
- token spans that do not fit are dropped (THUDM drops the whole sample), so no sample is lost;
- THUDM's Chinese recipes also replace 10% of part-B inputs by a `dBLOCK` token (`--block-mask-prob 0.1`) and cut 2%
  of samples short (`--short-seq-prob 0.02`); PaddleNLP's GLM tokenizer has no `dBLOCK`, and both are left out;
- the long span always uses the block layout (`<sop> span` / `span <eop>`), never THUDM's second layout without
  `<|endofpiece|>`, so every task ends its spans the way fine-tuning's targets end;
- sentence ends include the full-width `。` (THUDM's test only knows ASCII marks, which sentencepiece's normalisation
  makes of `？！；：` but not of `。`); a task that finds nothing to mask (a sample too short for one token span) becomes a long span.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "BlockLMConfig", "PRESETS", "BlankInfillingIds", "BlankInfilling", "Infilled", "CausalLM", "SENTENCE_END_MARKS",
    "span_length_distribution", "sentence_end_ids",
]

TASKS = ("token", "sentence", "long")
# THUDM's test (`contains_sentence_end`) plus the full-width full stop, which NFKC normalisation leaves as it is.
SENTENCE_END_MARKS = (".", "?", "!", ";", ":", "\n", "。", "？", "！", "；", "：")

Example = Dict[str, np.ndarray]
Span = Tuple[int, int]  # [start, end) in the sample's tokens


@dataclass(frozen=True)
class BlockLMConfig:
    """The mix and sizes of blank-infilling tasks (THUDM's flags of the same names)."""

    bert_prob: float = 0.4
    gap_sentence_prob: float = 0.3
    avg_block_length: float = 3.0
    max_block_length: int = 40  # THUDM draws span lengths 1 .. max_block_length - 1
    bert_ratio: float = 0.15
    gap_sentence_ratio: float = 0.15
    gpt_min_ratio: float = 0.25
    shuffle_blocks: bool = True

    def problems(self) -> List[str]:
        checks = [
            (not 0.0 <= self.bert_prob <= 1.0, f"--bert_prob {self.bert_prob}: must lie in [0, 1]"),
            (not 0.0 <= self.gap_sentence_prob <= 1.0,
             f"--gap_sentence_prob {self.gap_sentence_prob}: must lie in [0, 1]"),
            (self.bert_prob + self.gap_sentence_prob > 1.0 + 1e-9,
             f"--bert_prob {self.bert_prob} + --gap_sentence_prob {self.gap_sentence_prob} exceeds 1 (the rest is the "
             "long-span task)"),
            (not self.avg_block_length > 0, f"--avg_block_length {self.avg_block_length}: must be > 0"),
            (not 0.0 < self.gpt_min_ratio < 1.0, f"--gpt_min_ratio {self.gpt_min_ratio}: must lie in (0, 1)"),
        ]
        return [message for bad, message in checks if bad]

    @property
    def task_probabilities(self) -> Tuple[float, float, float]:
        return self.bert_prob, self.gap_sentence_prob, max(0.0, 1.0 - self.bert_prob - self.gap_sentence_prob)


# THUDM's pre-training scripts (config/ds_block_large_chinese.sh, config/ds_block_10B_chinese.sh, ds_block_10B.sh).
PRESETS: Dict[str, Dict[str, float]] = {
    "glm-large-chinese": dict(bert_prob=0.4, gap_sentence_prob=0.3, avg_block_length=3, gpt_min_ratio=0.25),
    "glm-10b-chinese": dict(bert_prob=0.5, gap_sentence_prob=0.3, avg_block_length=3, gpt_min_ratio=0.25),
    "glm-10b": dict(bert_prob=0.5, gap_sentence_prob=0.3, avg_block_length=3, gpt_min_ratio=0.25),
}


def span_length_distribution(average: float, max_block_length: int) -> Tuple[np.ndarray, np.ndarray]:
    """(lengths 1 .. max_block_length - 1, their probabilities): Poisson(average) restricted to those lengths."""
    lengths = np.arange(1, max_block_length)
    log_pmf = lengths * math.log(average) - average - np.array([math.lgamma(k + 1) for k in lengths])
    weights = np.exp(log_pmf)
    return lengths, weights / weights.sum()


def sentence_end_ids(tokenizer, marks: Sequence[str] = SENTENCE_END_MARKS) -> np.ndarray:
    """Ids of the vocabulary pieces that end a sentence (any piece holding one of `marks`)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return np.array([i for i, piece in enumerate(pieces) if piece and any(mark in piece for mark in marks)],
                    dtype="int64")


@dataclass(frozen=True)
class BlankInfillingIds:
    """The tokenizer ids blank infilling writes."""

    cls: int
    eos: int  # ends every document in the corpus
    mask: int
    smask: int
    gmask: int
    sop: int
    eop: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "BlankInfillingIds":
        return cls(cls=tokenizer.cls_token_id, eos=tokenizer.eos_token_id, mask=tokenizer.mask_token_id,
                   smask=tokenizer.smask_token_id, gmask=tokenizer.gmask_token_id, sop=tokenizer.sop_token_id,
                   eop=tokenizer.eop_token_id)


@dataclass
class Infilled:
    """One blank-infilling example and how it was made (the statistics tests read `task` and `spans`)."""

    example: Example
    task: str
    spans: List[Span] = field(default_factory=list)  # in the sample's tokens ([CLS] at 0), by start
    order: List[int] = field(default_factory=list)  # part B's order: indices into `spans`


class BlankInfilling:
    """GLM's pre-training examples from packed samples of corpus tokens."""

    prefix_length = 1  # [CLS]

    def __init__(self, ids: BlankInfillingIds, sentence_ends: np.ndarray, vocab_size: int,
                 config: BlockLMConfig = BlockLMConfig()):
        self.ids = ids
        self.config = config
        self.lengths, self.length_probabilities = span_length_distribution(config.avg_block_length,
                                                                           config.max_block_length)
        self.is_sentence_end = np.zeros(vocab_size, dtype=bool)  # indexed by token id
        self.is_sentence_end[sentence_ends] = True

    @classmethod
    def from_tokenizer(cls, tokenizer, config: BlockLMConfig = BlockLMConfig()) -> "BlankInfilling":
        return cls(BlankInfillingIds.from_tokenizer(tokenizer), sentence_end_ids(tokenizer), len(tokenizer), config)

    def __call__(self, tokens: np.ndarray, rng: np.random.Generator) -> Example:
        return self.infill(tokens, rng).example

    def infill(self, tokens: np.ndarray, rng: np.random.Generator) -> Infilled:
        """The example of one sample (`tokens`: corpus ids, documents ended by eos), drawn with `rng`."""
        text = np.concatenate([[self.ids.cls], np.asarray(tokens, dtype="int64")])
        drawn = int(np.searchsorted(np.cumsum(self.config.task_probabilities), rng.random(), side="right"))
        task = TASKS[min(drawn, len(TASKS) - 1)]
        spans: List[Span] = []
        if task == "token":
            spans = self.token_spans(text, rng)
        elif task == "sentence":
            spans = self.sentence_spans(text, rng)
        if not spans:  # the long task, or nothing to mask for the others
            task, spans = "long", [self.long_span(len(text), rng)]
        mask = {"token": self.ids.mask, "sentence": self.ids.smask, "long": self.ids.gmask}[task]
        order = list(rng.permutation(len(spans))) if self.config.shuffle_blocks else list(range(len(spans)))
        return Infilled(self.block_example(text, spans, order, mask), task, spans, [int(i) for i in order])

    # ---------------------------------------------------------------------------------------- the spans

    def token_spans(self, text: np.ndarray, rng: np.random.Generator) -> List[Span]:
        """Poisson span lengths until `bert_ratio` of the text is covered, placed inside documents (THUDM's
        `sample_span_in_document`: every document but the longest masks its own share, the longest the rest)."""
        target = int(self.config.bert_ratio * len(text))
        lengths: List[int] = []
        while sum(lengths) < target:
            lengths += rng.choice(self.lengths, size=max(4, (target - sum(lengths)) // 3),
                                  p=self.length_probabilities).tolist()
            covered = np.cumsum(lengths)
            lengths = lengths[: int(np.searchsorted(covered, target)) + 1]  # up to the first that reaches target
        rng.shuffle(lengths)
        documents = sorted(_documents(text, self.ids.eos), key=lambda doc: doc[1])
        spans: List[Span] = []
        used = 0
        for number, (offset, length) in enumerate(documents):
            last = number == len(documents) - 1
            quota = int(length * self.config.bert_ratio)
            taken = 0
            while used + taken < len(lengths):
                nxt = lengths[used + taken]
                total = sum(lengths[used:used + taken]) + nxt
                if (total + taken > length) if last else (total > quota):
                    break
                taken += 1
            if taken:
                spans += _place(lengths[used:used + taken], length, offset, rng)
                used += taken
        return sorted(spans)

    def sentence_spans(self, text: np.ndarray, rng: np.random.Generator) -> List[Span]:
        """Whole sentences in random order until `gap_sentence_ratio` of the text is covered (THUDM's gap
        sentences: a sentence ends at an end mark; a document end closes nothing and starts a new sentence)."""
        candidates: List[Span] = []
        start = 1  # after [CLS]
        ends = self.is_sentence_end[text]
        for i in np.flatnonzero(ends | (text == self.ids.eos)).tolist():
            if ends[i] and start < i + 1:
                candidates.append((start, i + 1))
            start = i + 1
        if start < len(text):
            candidates.append((start, len(text)))
        target = int(self.config.gap_sentence_ratio * len(text))
        spans, covered = [], 0
        for index in rng.permutation(len(candidates)):
            spans.append(candidates[index])
            covered += candidates[index][1] - candidates[index][0]
            if covered >= target:
                break
        return sorted(spans)

    def long_span(self, length: int, rng: np.random.Generator) -> Span:
        """The suffix of `gpt_min_ratio` of the text up to all of it but [CLS] and one token."""
        low = max(1, int(self.config.gpt_min_ratio * length))
        high = max(low, length - 2)
        size = int(rng.integers(low, high + 1))
        return length - size, length

    # ---------------------------------------------------------------------------------------- the example

    def block_example(self, text: np.ndarray, spans: List[Span], order: List[int], mask: int) -> Example:
        """Part A (text, each span one `mask`) then part B (the spans in `order`), THUDM's `make_block_data`."""
        pieces, mask_at, last = [], [], 0
        for start, end in spans:
            pieces.append(text[last:start])
            mask_at.append(sum(map(len, pieces)))  # this span's mask: part A's length so far
            pieces.append(np.array([mask]))
            last = end
        part_a = np.concatenate(pieces + [text[last:]])
        sep = len(part_a)
        inputs, labels = [part_a], [np.zeros(sep, dtype="int64")]
        positions, blocks = [np.arange(sep)], [np.zeros(sep, dtype="int64")]
        for index in order:
            start, end = spans[index]
            span = text[start:end]
            inputs.append(np.concatenate([[self.ids.sop], span]))
            labels.append(np.concatenate([span, [self.ids.eop]]))
            positions.append(np.full(len(span) + 1, mask_at[index]))
            blocks.append(np.arange(1, len(span) + 2))
        input_ids = np.concatenate(inputs).astype("int64")
        loss_mask = np.zeros(len(input_ids), dtype="float32")
        loss_mask[sep:] = 1.0
        return {
            "input_ids": input_ids,
            "position_ids": np.stack([np.concatenate(positions), np.concatenate(blocks)]).astype("int64"),
            "attention_mask": np.array(sep, dtype="int64"),
            "labels": np.concatenate(labels).astype("int64"),
            "loss_mask": loss_mask,
        }


def _documents(text: np.ndarray, eos: int) -> List[Tuple[int, int]]:
    """(offset, length) of each document of a sample: the runs of tokens between [CLS] and the eos tokens."""
    bounds = [0] + np.flatnonzero(text == eos).tolist() + [len(text)]
    return [(a + 1, b - a - 1) for a, b in zip(bounds[:-1], bounds[1:]) if b - a - 1 > 0]


def _place(lengths: Sequence[int], length: int, offset: int, rng: np.random.Generator) -> List[Span]:
    """Spans of `lengths`, in that order, at uniformly random places in a run of `length` tokens at `offset`, with
    at least one unmasked token between neighbours (THUDM's `sample_spans`)."""
    room = length - sum(lengths) - len(lengths) + 1
    places = np.sort(rng.integers(0, room + 1, size=len(lengths)))
    spans = []
    for place, span_length in zip(places, lengths):
        start = offset + int(place)
        spans.append((start, start + span_length))
        offset += span_length + 1
    return spans


class CausalLM:
    """Next-token prediction over a packed sample, in a family's own format: the family's plain-text prompt (no chat
    wrapping: `Template.completion_prompt("")`) and answer start open the sample, the corpus tokens follow; every
    corpus token is a label once, the sample's last token predicts nothing."""

    def __init__(self, template):
        self.template = template
        self.prompt = list(template.completion_prompt(""))
        self.prefix = self.prompt + list(template.answer_start)
        self.prefix_length = len(self.prefix)

    def __call__(self, tokens: np.ndarray, rng: Optional[np.random.Generator] = None) -> Example:
        input_ids = np.concatenate([self.prefix, np.asarray(tokens, dtype="int64")]).astype("int64")
        labels = np.zeros(len(input_ids), dtype="int64")
        labels[:-1] = input_ids[1:]
        loss_mask = np.zeros(len(input_ids), dtype="float32")
        loss_mask[self.prefix_length - 1:-1] = 1.0
        return {
            "input_ids": input_ids,
            "position_ids": self.template.positions(self.prompt, len(input_ids)),
            "attention_mask": np.array(self.template.sep(self.prompt), dtype="int64"),
            "labels": labels,
            "loss_mask": loss_mask,
        }
