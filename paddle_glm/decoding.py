"""The one decoding implementation (greedy search, sampling, beam search), in numpy.

Every backend (dynamic graph, Paddle Inference, ONNX Runtime) only has to implement a `Stepper`: produce
next-token logits and keep (and reorder) its own K/V cache, positions and masks. Token choice, logits
processing and beam bookkeeping live here once, mirroring PaddleNLP 2.8.1's `GenerationMixin` so that
greedy and beam search give the same tokens as `model.generate`. This module must not import paddle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np

STRATEGIES = ("greedy_search", "sampling", "beam_search")
_INITIAL_OTHER_BEAMS = -1e9  # beams 1..K-1 start "impossible" so step 0 expands beam 0 only (all K are equal).


class Stepper(Protocol):
    """A model with a cache, seen one token per row at a time; it handles positions and masks itself."""

    def prefill(self, expand: int) -> np.ndarray:
        """Run the B prompts, each repeated `expand` times consecutively (p0,p0,..,p1,p1,..), keep the cache;
        return next-token logits, float32 [B*expand, V]."""

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one new token per row (int64 [N]); return next-token logits [N, V]."""

    def reorder(self, index: np.ndarray) -> None:
        """Reorder the cache rows (beam search): new row i = old row index[i]."""


@dataclass
class DecodingConfig:
    """What to generate; lengths count NEW tokens only. eos and pad ids are required (no silent defaults).
    `eos_token_id` may be several ids (ChatGLM3 stops at eos, `<|user|>` and `<|observation|>`)."""

    eos_token_id: Union[int, Sequence[int]]
    pad_token_id: int
    decode_strategy: str = "greedy_search"
    max_length: int = 20
    min_length: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    num_return_sequences: int = 1
    seed: Optional[int] = None
    beam_candidates: str = "top"  # beam search: "top" keeps the 2K best candidates, "sample" draws them
    # Ids at or above this are never generated: GLM's embeddings have rows past the tokenizer (50048 vs 50010)
    # that no text decodes to. None: every id may be generated.
    tokenizer_size: Optional[int] = None

    @property
    def eos_ids(self) -> Tuple[int, ...]:
        return (self.eos_token_id,) if np.isscalar(self.eos_token_id) else tuple(self.eos_token_id)

    def validate(self) -> None:
        """Raise one ValueError naming every bad field and its fix, so a config is corrected in one go."""
        beam = self.decode_strategy == "beam_search"
        checks = [
            (self.decode_strategy not in STRATEGIES,
             f"decode_strategy={self.decode_strategy!r}: use one of {STRATEGIES}"),
            (self.max_length < 1, f"max_length={self.max_length}: generate at least 1 new token"),
            (not 0 <= self.min_length <= self.max_length,
             f"min_length={self.min_length}: must lie in [0, max_length={self.max_length}]"),
            (not beam and self.num_beams < 1, f"num_beams={self.num_beams}: must be >= 1"),
            (beam and self.num_beams < 2,
             f"num_beams={self.num_beams}: beam_search needs >= 2 (for 1 beam use greedy_search)"),
            (self.num_return_sequences < 1, f"num_return_sequences={self.num_return_sequences}: must be >= 1"),
            (beam and self.num_return_sequences > self.num_beams,
             f"num_return_sequences={self.num_return_sequences}: beam_search returns at most "
             f"num_beams={self.num_beams}; lower it or raise num_beams"),
            (self.decode_strategy == "greedy_search" and self.num_return_sequences > 1,
             f"num_return_sequences={self.num_return_sequences}: greedy_search gives 1; "
             "use sampling or beam_search for more"),
            (not 0 < self.top_p <= 1, f"top_p={self.top_p}: must lie in (0, 1]; 1 disables it"),
            (self.top_k < 0, f"top_k={self.top_k}: must be >= 0; 0 disables it"),
            (not self.temperature > 0, f"temperature={self.temperature}: must be > 0"),
            (self.no_repeat_ngram_size < 0,
             f"no_repeat_ngram_size={self.no_repeat_ngram_size}: must be >= 0; 0 disables it"),
            (not self.repetition_penalty > 0,
             f"repetition_penalty={self.repetition_penalty}: must be > 0; 1 disables it"),
            (not self.eos_ids or min(self.eos_ids) < 0, f"eos_token_id={self.eos_token_id}: must be token ids >= 0"),
            (self.pad_token_id < 0, f"pad_token_id={self.pad_token_id}: must be a token id >= 0"),
            (self.tokenizer_size is not None and self.tokenizer_size <= max(self.eos_ids, default=-1),
             f"tokenizer_size={self.tokenizer_size}: must exceed eos_token_id={self.eos_token_id}, or eos never comes"),
            (self.beam_candidates not in ("top", "sample"),
             f"beam_candidates={self.beam_candidates!r}: use 'top' or 'sample'"),
        ]
        problems = [message for bad, message in checks if bad]
        if problems:
            raise ValueError("invalid DecodingConfig:\n  " + "\n  ".join(problems))


@dataclass
class GenerationResult:
    """`sequences`: generated ids without eos or padding, sample-major (all of prompt 0's first).
    `scores`: beam search, the length-penalised beam score; greedy/sampling, the mean log-probability
    of the generated tokens (eos included when produced), as PaddleNLP reports them."""

    sequences: List[List[int]]
    scores: np.ndarray

    def padded(self, pad_token_id: int) -> np.ndarray:
        """The sequences as one int64 [num_sequences, longest] array, right-padded with `pad_token_id`."""
        width = max(map(len, self.sequences), default=0)
        out = np.full((len(self.sequences), width), pad_token_id, dtype=np.int64)
        for row, sequence in zip(out, self.sequences):
            row[: len(sequence)] = sequence
        return out


def generate(stepper: Stepper, batch_size: int, config: DecodingConfig) -> GenerationResult:
    """Decode `batch_size` prompts held by `stepper` with the strategy of `config`."""
    config.validate()
    if config.decode_strategy == "beam_search":
        return _beam_search(stepper, batch_size, config)
    return _decode_rows(stepper, batch_size, config, chooser(config))


def chooser(config: DecodingConfig) -> Callable[[np.ndarray], np.ndarray]:
    """The token chooser of greedy search or sampling; a sampler owns its seeded generator, so one chooser serves
    one group of rows (a prompt and its samples) for its whole decoding."""
    return _sampler(config) if config.decode_strategy == "sampling" else _argmax


def decode_step(logits: np.ndarray, generated: np.ndarray, finished: np.ndarray, config: DecodingConfig,
                choose: Callable[[np.ndarray], np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """One greedy/sampling step of a group of rows: logits [N, V], their generated tokens [N, t] and finished flags
    [N] -> (next tokens [N], pad on finished rows; their log-probabilities [N]). Rows of a group are decoded
    together because a sampler draws one number per row of its group at every step (finished ones included): a
    server that batches other groups beside them gets the same tokens."""
    scores = _process(logits.astype(np.float32, copy=False), generated, config)
    tokens = np.where(finished, config.pad_token_id, choose(scores)).astype(np.int64)
    return tokens, _token_logprobs(scores, tokens)


# ---------------------------------------------------------------- logits processing


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _token_logprobs(scores: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """`_log_softmax(scores)[row, tokens[row]]` with the same arithmetic, without writing the [N, V] log-softmax:
    one pass over the logits fewer at every greedy/sampling step (a tenth of a batch-8 step's host time)."""
    top = scores.max(axis=-1, keepdims=True)
    exp = np.subtract(scores, top)
    normalizer = np.log(np.exp(exp, out=exp).sum(axis=-1, keepdims=True))
    return (np.take_along_axis(scores, tokens[:, None], axis=1) - top - normalizer)[:, 0]


def _process(scores: np.ndarray, generated: np.ndarray, config: DecodingConfig) -> np.ndarray:
    """PaddleNLP's processors in its order: min length, repetition penalty, no-repeat n-grams.

    `generated` [N, t] holds each row's generated tokens. Unlike PaddleNLP, the repetition penalty and the
    n-gram ban look at generated tokens only, not the prompt: copying a phrase from the context (a
    question reusing the passage's words) is legitimate, repeating ourselves is not.
    """
    scores = scores.copy()
    if config.tokenizer_size is not None:
        scores[:, config.tokenizer_size:] = -np.inf
    if generated.shape[1] < config.min_length:
        scores[:, list(config.eos_ids)] = -np.inf
    if config.repetition_penalty != 1.0 and generated.size:
        seen = np.zeros(scores.shape, dtype=bool)
        np.put_along_axis(seen, generated, True, axis=1)
        penalised = np.where(scores > 0, scores / config.repetition_penalty, scores * config.repetition_penalty)
        scores = np.where(seen, penalised, scores)
    if config.no_repeat_ngram_size:
        _ban_repeated_ngrams(scores, generated, config.no_repeat_ngram_size)
    return scores


def _ban_repeated_ngrams(scores: np.ndarray, generated: np.ndarray, n: int) -> None:
    """Set to -inf every token that would complete an n-gram already present in the row's generated tokens."""
    length = generated.shape[1]
    if length < n:
        return
    windows = np.lib.stride_tricks.sliding_window_view(generated, n, axis=1)  # [N, length-n+1, n]
    hits = (windows[:, :, :-1] == generated[:, None, length - n + 1:]).all(axis=2)
    rows, starts = np.nonzero(hits)
    scores[rows, windows[rows, starts, -1]] = -np.inf


# ---------------------------------------------------------------- greedy search and sampling


def _argmax(scores: np.ndarray) -> np.ndarray:
    return scores.argmax(axis=-1)


def _sampler(config: DecodingConfig) -> Callable[[np.ndarray], np.ndarray]:
    """Token chooser for sampling: temperature, top-k, then top-p, drawn from a seeded generator."""
    rng = np.random.default_rng(config.seed)

    def choose(scores: np.ndarray) -> np.ndarray:
        weights = _sampling_weights(scores, config)
        return np.array([_draw(row, u) for row, u in zip(weights, rng.random(len(weights)))])

    return choose


def _draw(weights: np.ndarray, u: float, block: int = 512) -> int:
    """The first token whose cumulative weight exceeds u times the total weight (u in [0, 1)).

    A cumulative sum over 50k float64 weights is sequential, the slowest pass of a sampling step: the sums of
    512-token blocks find the block, a cumulative sum inside it the token.
    """
    sums = np.add.reduceat(weights, np.arange(0, len(weights), block))
    edges = np.cumsum(sums)
    draw = u * edges[-1]
    # the first block whose edge exceeds the draw; the last block with weight if rounding put the draw at the end
    index = min(int(np.searchsorted(edges, draw, side="right")), int(np.flatnonzero(sums)[-1]))
    inside = weights[index * block:(index + 1) * block]
    position = int(np.searchsorted((edges[index - 1] if index else 0.0) + np.cumsum(inside), draw, side="right"))
    if position == len(inside):  # the draw fell in the rounding between the two sums: the block's last token drawn
        position = int(np.flatnonzero(inside)[-1])
    return index * block + position


def _sampling_weights(scores: np.ndarray, config: DecodingConfig) -> np.ndarray:
    """softmax(scores / temperature) up to a factor per row (a draw scales by the kept mass, so the weights need
    no normalising pass), top-k and top-p applied; float64, so that the cumulative sum over 50k tokens is exact
    enough. A server samples every row of its batch with this at every step: each pass over [rows, V] counts."""
    weights = np.subtract(scores, scores.max(axis=-1, keepdims=True), dtype=np.float64)
    if config.temperature != 1.0:
        weights /= config.temperature
    np.exp(weights, out=weights)
    if config.top_p >= 1.0:
        return _top_k(weights, config.top_k)
    # As in PaddleNLP, top-p measures the mass of the full distribution, not the one renormalised after top-k.
    mass = config.top_p * weights.sum(axis=-1)
    return _top_p(_top_k(weights, config.top_k), mass)


def _top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """Zero all but the k most probable tokens (ties with the k-th are kept, as in PaddleNLP); k=0 keeps all."""
    if not 0 < k < probs.shape[-1]:
        return probs
    kth = np.partition(probs, -k, axis=-1)[:, [-k]]
    return np.where(probs >= kth, probs, 0.0)


def _top_p(weights: np.ndarray, mass: np.ndarray, candidates: int = 256) -> np.ndarray:
    """Keep each row's smallest set of most probable tokens whose weight reaches `mass` [N] (at least one token).

    Sorting 50k weights per row per step would cost milliseconds; the nucleus almost always lies among the few
    hundred largest, so those (with every tie of the smallest of them) are sorted first, and the search widens
    only when their weight falls short. Same order and sums as a stable sort of the whole row.
    """
    kept = np.zeros_like(weights)
    for row, (w, reach) in enumerate(zip(weights, mass)):
        count = candidates
        while True:
            if count >= len(w):
                order = np.argsort(-w, kind="stable")
            else:
                top = np.flatnonzero(w >= np.partition(w, -count)[-count])
                order = top[np.argsort(-w[top], kind="stable")]
            ranked = w[order]
            keep = np.cumsum(ranked) - ranked < reach
            if not keep[-1] or len(order) == len(w):
                break  # the set ends among these candidates
            count *= 8
        kept[row, order[keep]] = ranked[keep]
    return kept


def _prefill(stepper: Stepper, batch_size: int, expand: int) -> np.ndarray:
    logits = stepper.prefill(expand)
    if logits.ndim != 2 or len(logits) != batch_size * expand:
        raise ValueError(f"stepper.prefill({expand}) gave logits {logits.shape}, expected [{batch_size * expand}, V]")
    return logits


def _decode_rows(
    stepper: Stepper, batch_size: int, config: DecodingConfig, choose: Callable[[np.ndarray], np.ndarray]
) -> GenerationResult:
    """Greedy search or sampling: every row decodes on its own until eos, then is fed pad.

    The score of a token is its log-probability under the processed logits before temperature/top-k/top-p
    (PaddleNLP's sampling score; for greedy PaddleNLP averages raw logit values, which is not a probability).
    """
    logits = _prefill(stepper, batch_size, config.num_return_sequences)
    rows = len(logits)
    generated = np.empty((rows, 0), dtype=np.int64)
    finished = np.zeros(rows, dtype=bool)
    logprob_sum, counted = np.zeros(rows), np.zeros(rows)
    for step in range(config.max_length):
        tokens, logprobs = decode_step(logits, generated, finished, config, choose)
        logprob_sum += np.where(finished, 0.0, logprobs)
        counted += ~finished
        generated = np.concatenate([generated, tokens[:, None]], axis=1)
        finished |= np.isin(tokens, config.eos_ids)
        if finished.all() or step == config.max_length - 1:
            break  # before feeding a token nobody will read
        logits = stepper.step(tokens)
    sequences = [_until_eos(row, config.eos_ids) for row in generated.tolist()]
    return GenerationResult(sequences, logprob_sum / counted)


def _until_eos(tokens: List[int], eos_ids: Tuple[int, ...]) -> List[int]:
    return next((tokens[:i] for i, token in enumerate(tokens) if token in eos_ids), tokens)


# ---------------------------------------------------------------- beam search


class _Hypotheses:
    """The best `size` finished hypotheses of one prompt, scored GNMT-style as PaddleNLP's `BeamHypotheses`."""

    def __init__(self, size: int, length_penalty: float, early_stopping: bool):
        self.size, self.length_penalty, self.early_stopping = size, length_penalty, early_stopping
        self.items: List[Tuple[float, List[int]]] = []

    def penalised(self, sum_logprobs: float, length: int) -> float:
        return sum_logprobs / ((length + 5) / 6) ** self.length_penalty

    def add(self, tokens: List[int], sum_logprobs: float) -> None:
        score = self.penalised(sum_logprobs, len(tokens))
        if len(self.items) < self.size or score > self.worst():
            self.items.append((score, tokens))
            if len(self.items) > self.size:  # drop the worst; among equals the earliest added
                del self.items[min(range(len(self.items)), key=lambda i: self.items[i][0])]

    def worst(self) -> float:
        return min(score for score, _ in self.items)

    def is_done(self, best_sum_logprobs: float, length: int) -> bool:
        """Full, and (early stopping or) no live beam can still beat the worst kept hypothesis."""
        if len(self.items) < self.size:
            return False
        return self.early_stopping or self.worst() >= self.penalised(best_sum_logprobs, length)

    def best(self, n: int) -> List[Tuple[float, List[int]]]:
        """Best first; among equal scores the later added wins (PaddleNLP pops a stable ascending sort)."""
        return sorted(self.items, key=lambda item: item[0])[::-1][:n]


def _top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest entries of each row, best first; ties go to the lower index."""
    kth = np.partition(scores, -k, axis=-1)[:, -k]
    top = []
    for row, threshold in zip(scores, kth):
        candidates = np.flatnonzero(row >= threshold)
        top.append(candidates[np.argsort(-row[candidates], kind="stable")[:k]])
    return np.stack(top)


def _sampled_indices(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k candidates per row drawn without replacement from softmax(row) (Gumbel top-k), best score first.

    This is the reference GLM example's `--select_topk false` beam search (it draws with multinomial).
    """
    drawn = _top_indices(scores - np.log(-np.log(rng.random(scores.shape))), k)
    order = np.argsort(-np.take_along_axis(scores, drawn, axis=1), axis=1, kind="stable")
    return np.take_along_axis(drawn, order, axis=1)


def _advance(
    hypotheses: _Hypotheses, candidates: np.ndarray, scores: np.ndarray, first_row: int,
    history: np.ndarray, vocab: int, config: DecodingConfig,
) -> Tuple[List[int], List[int], List[float]]:
    """Walk one prompt's 2K candidates best first: eos among the top K closes a hypothesis (without eos),
    other tokens fill the K next beams. Returns the new beams' source rows, tokens and running scores."""
    sources: List[int] = []
    tokens: List[int] = []
    beam_scores: List[float] = []
    for rank, (candidate, score) in enumerate(zip(candidates.tolist(), scores.tolist())):
        row, token = first_row + candidate // vocab, candidate % vocab
        if token not in config.eos_ids:
            sources.append(row)
            tokens.append(token)
            beam_scores.append(score)
        elif rank < config.num_beams:
            hypotheses.add(history[row].tolist(), score)
        if len(tokens) == config.num_beams:
            break
    return sources, tokens, beam_scores


def _beam_search(stepper: Stepper, batch_size: int, config: DecodingConfig) -> GenerationResult:
    """PaddleNLP's beam search (one group, no diversity): same candidates, same ties, same stopping rule.

    Rows are prompt-major (prompt b owns rows b*K..b*K+K-1). A prompt whose hypotheses can no longer improve
    is done: its rows are fed pad and ignored. Scores are float32 like PaddleNLP's, so ranks match exactly.
    """
    num_beams = config.num_beams
    logits = _prefill(stepper, batch_size, num_beams)
    vocab = logits.shape[1]
    first_rows = np.arange(batch_size) * num_beams
    beam_scores = np.zeros((batch_size, num_beams), dtype=np.float32)
    beam_scores[:, 1:] = _INITIAL_OTHER_BEAMS
    beam_scores = beam_scores.reshape(-1)
    history = np.empty((batch_size * num_beams, 0), dtype=np.int64)
    hypotheses = [_Hypotheses(num_beams, config.length_penalty, config.early_stopping) for _ in range(batch_size)]
    done = np.zeros(batch_size, dtype=bool)
    rng = np.random.default_rng(config.seed)
    for step in range(config.max_length):
        scores = _process(_log_softmax(logits.astype(np.float32)), history, config) + beam_scores[:, None]
        scores = scores.reshape(batch_size, num_beams * vocab)
        if config.beam_candidates == "sample":
            candidates = _sampled_indices(scores, 2 * num_beams, rng)
        else:
            candidates = _top_indices(scores, 2 * num_beams)
        candidate_scores = np.take_along_axis(scores, candidates, axis=1)
        # Done prompts keep their first beam, fed pad with score 0.
        sources = np.repeat(first_rows, num_beams)
        tokens = np.full(batch_size * num_beams, config.pad_token_id, dtype=np.int64)
        beam_scores = np.zeros(batch_size * num_beams, dtype=np.float32)
        for b in np.flatnonzero(~done):
            rows = slice(first_rows[b], first_rows[b] + num_beams)
            sources[rows], tokens[rows], beam_scores[rows] = _advance(
                hypotheses[b], candidates[b], candidate_scores[b], first_rows[b], history, vocab, config
            )
            done[b] = hypotheses[b].is_done(float(candidate_scores[b, 0]), step)
        history = np.concatenate([history[sources], tokens[:, None]], axis=1)
        if done.all() or step == config.max_length - 1:
            break  # before feeding tokens nobody will read
        stepper.reorder(sources)
        logits = stepper.step(tokens)
    return _best(hypotheses, done, history, beam_scores, config.num_return_sequences)


def _best(
    hypotheses: List[_Hypotheses], done: np.ndarray, history: np.ndarray, beam_scores: np.ndarray, n: int
) -> GenerationResult:
    """The n best hypotheses per prompt; prompts stopped by length first let their live beams compete."""
    num_beams = len(history) // len(hypotheses)
    for b in np.flatnonzero(~done):
        for row in range(b * num_beams, (b + 1) * num_beams):
            hypotheses[b].add(history[row].tolist(), float(beam_scores[row]))
    best = [item for prompt in hypotheses for item in prompt.best(n)]
    return GenerationResult([tokens for _, tokens in best], np.array([score for score, _ in best]))
