"""`paddle_glm.decoding` against plain re-implementations, driven by a toy model behind a fake `Stepper`.

The toy model's logits depend on a row's WHOLE fed history (prompt included), and the fake stepper keeps
that history as its "cache", so a missing or wrong `reorder` changes what beam search sees.
"""
from __future__ import annotations

from typing import Callable, List, Sequence

import numpy as np
import pytest

from paddle_glm import decoding
from paddle_glm.decoding import DecodingConfig, GenerationResult, generate

V, PAD, EOS = 12, 10, 11
PROMPTS = [[3, 1, 4], [7], [2, 9, 5, 0, 8]]
LogitsFn = Callable[[Sequence[int]], np.ndarray]


def toy_model(seed: int, eos_bias: float = 0.0) -> LogitsFn:
    """Next-token logits = table[last token] + table[position-weighted hash of the whole history]."""
    rng = np.random.default_rng(seed)
    by_last = rng.normal(0.0, 2.0, (V, V)).astype(np.float32)
    by_history = rng.normal(0.0, 2.0, (101, V)).astype(np.float32)
    by_last[:, EOS] += eos_bias

    def logits(history: Sequence[int]) -> np.ndarray:
        key = sum((i + 1) * token for i, token in enumerate(history)) % 101
        return by_last[history[-1]] + by_history[key]

    return logits


def table_model(table: np.ndarray) -> LogitsFn:
    """Logits that depend on the last token only: table[last]."""
    return lambda history: table[history[-1]].astype(np.float32)


class FakeStepper:
    """A `Stepper` whose cache is the list of tokens fed to each row."""

    def __init__(self, logits: LogitsFn, prompts: List[List[int]]):
        self.logits, self.prompts = logits, prompts
        self.rows: List[List[int]] = []
        self.steps = 0

    def prefill(self, expand: int) -> np.ndarray:
        self.rows = [list(prompt) for prompt in self.prompts for _ in range(expand)]
        return self._next_logits()

    def step(self, tokens: np.ndarray) -> np.ndarray:
        assert tokens.dtype == np.int64 and tokens.shape == (len(self.rows),)
        for row, token in zip(self.rows, tokens.tolist()):
            row.append(token)
        self.steps += 1
        return self._next_logits()

    def reorder(self, index: np.ndarray) -> None:
        self.rows = [list(self.rows[i]) for i in index]

    def _next_logits(self) -> np.ndarray:
        return np.stack([self.logits(row) for row in self.rows]).astype(np.float32)


class NoReorderStepper(FakeStepper):
    def reorder(self, index: np.ndarray) -> None:
        pass


def run(logits: LogitsFn, prompts: List[List[int]] = PROMPTS, **config) -> GenerationResult:
    config = DecodingConfig(eos_token_id=EOS, pad_token_id=PAD, **config)
    return generate(FakeStepper(logits, prompts), len(prompts), config)


def log_softmax(x: np.ndarray, dtype=np.float64) -> np.ndarray:
    x = np.asarray(x, dtype=dtype)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


# ---------------------------------------------------------------- plain references


def reference_greedy(logits: LogitsFn, prompt: List[int], max_length: int):
    """Step-by-step argmax on one prompt: (tokens without eos, mean log-prob including eos)."""
    history, logprobs = list(prompt), []
    for _ in range(max_length):
        scores = logits(history)
        token = int(np.argmax(scores))
        logprobs.append(log_softmax(scores)[token])
        if token == EOS:
            break
        history.append(token)
    return history[len(prompt):], float(np.mean(logprobs))


def reference_beam_search(logits: LogitsFn, prompt, num_beams, max_length, length_penalty, early_stopping,
                          num_return, min_length=0):
    """Slow, loop-based beam search on one prompt, following PaddleNLP's rules: (score, tokens) best first.

    Running scores are float32 as in PaddleNLP, so exact ties (integer logits) stay ties and go to the lower
    candidate index.
    """
    def penalised(total, length):
        return total / ((length + 5) / 6) ** length_penalty

    finished = []

    def add(tokens, total):
        score = penalised(total, len(tokens))
        if len(finished) < num_beams or score > min(s for s, _ in finished):
            finished.append((score, tokens))
            if len(finished) > num_beams:
                finished.remove(min(finished, key=lambda item: item[0]))

    beams = [(np.float32(0.0), [])] + [(np.float32(-1e9), [])] * (num_beams - 1)
    for length in range(max_length):
        candidates = []
        for b, (total, tokens) in enumerate(beams):
            logprobs = log_softmax(logits(prompt + tokens), np.float32)
            if length < min_length:
                logprobs[EOS] = -np.inf
            candidates += [(total + logprobs[v], b * V + v) for v in range(V)]  # float32 sums
        candidates = sorted(candidates, key=lambda c: (-c[0], c[1]))[: 2 * num_beams]
        next_beams = []
        for rank, (total, index) in enumerate(candidates):
            b, token = divmod(index, V)
            if token == EOS:
                if rank < num_beams:
                    add(beams[b][1], float(total))
            else:
                next_beams.append((total, beams[b][1] + [token]))
            if len(next_beams) == num_beams:
                break
        beams = next_beams
        if len(finished) == num_beams and (
            early_stopping or min(s for s, _ in finished) >= penalised(float(candidates[0][0]), length)
        ):
            break
    else:
        for total, tokens in beams:
            add(tokens, float(total))
    ranked = sorted(finished, key=lambda item: item[0])  # PaddleNLP pops from the end: ties go to the later added
    return [ranked.pop() for _ in range(num_return)]


# ---------------------------------------------------------------- greedy search


def test_greedy_search_equals_stepwise_argmax_and_pads_finished_rows():
    logits = toy_model(seed=4, eos_bias=1.0)
    stepper = FakeStepper(logits, PROMPTS)
    result = generate(stepper, 3, DecodingConfig(max_length=8, eos_token_id=EOS, pad_token_id=PAD))
    expected = [reference_greedy(logits, prompt, 8) for prompt in PROMPTS]
    assert result.sequences == [tokens for tokens, _ in expected]
    np.testing.assert_allclose(result.scores, [score for _, score in expected], rtol=1e-5)
    lengths = sorted(map(len, result.sequences))
    assert lengths[0] < lengths[-1] < 8  # rows stop at eos, at different steps
    # A finished row is fed pad after its eos; the step after the last token is not run.
    assert stepper.steps == lengths[-1]
    for prompt, row, tokens in zip(PROMPTS, stepper.rows, result.sequences):
        fed = tokens + [EOS] + [PAD] * 8
        assert row == prompt + fed[: stepper.steps]


# ---------------------------------------------------------------- beam search


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_beams", [2, 3, 4])
def test_beam_search_equals_plain_reference(seed, num_beams):
    logits, min_length = toy_model(seed, eos_bias=1.0), seed  # min_length 0, 1, 2
    for num_return in range(1, num_beams + 1):
        for early_stopping in (False, True):
            for length_penalty in (0.7, 1.3):
                result = run(logits, decode_strategy="beam_search", num_beams=num_beams, max_length=6,
                             num_return_sequences=num_return, early_stopping=early_stopping,
                             length_penalty=length_penalty, min_length=min_length)
                expected = [
                    item for prompt in PROMPTS for item in reference_beam_search(
                        logits, prompt, num_beams, 6, length_penalty, early_stopping, num_return, min_length)
                ]
                assert result.sequences == [tokens for _, tokens in expected]
                np.testing.assert_allclose(result.scores, [score for score, _ in expected], rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 4, 11])
def test_beam_search_breaks_ties_like_reference(seed):
    """Integer logits make many candidates tie exactly: the lower flat index (beam * V + token) must win."""
    model = table_model(np.random.default_rng(seed).integers(0, 3, (V, V)))
    for num_beams in (2, 3, 4):
        for length_penalty in (0.7, 1.0):
            result = run(model, decode_strategy="beam_search", num_beams=num_beams, num_return_sequences=num_beams,
                         max_length=5, length_penalty=length_penalty)
            expected = [tokens for prompt in PROMPTS for _, tokens in reference_beam_search(
                model, prompt, num_beams, 5, length_penalty, False, num_beams)]
            assert result.sequences == expected


def test_beam_search_covers_early_and_late_finishes():
    """The reference comparisons above are only meaningful if hypotheses end both by eos and by length."""
    lengths = set()
    for seed in (0, 1, 2):
        result = run(toy_model(seed, eos_bias=1.0), decode_strategy="beam_search", num_beams=3,
                     num_return_sequences=3, max_length=6)
        lengths |= set(map(len, result.sequences))
    assert 6 in lengths and min(lengths) < 6


def test_beam_search_reorders_the_cache():
    logits = toy_model(seed=1, eos_bias=1.0)
    config = DecodingConfig(decode_strategy="beam_search", num_beams=4, num_return_sequences=4, max_length=6,
                            eos_token_id=EOS, pad_token_id=PAD)
    expected = [
        tokens for prompt in PROMPTS for _, tokens in reference_beam_search(logits, prompt, 4, 6, 1.0, False, 4)
    ]
    assert generate(FakeStepper(logits, PROMPTS), 3, config).sequences == expected
    assert generate(NoReorderStepper(logits, PROMPTS), 3, config).sequences != expected


@pytest.mark.parametrize("num_beams,num_return,length_penalty,early_stopping,min_length", [
    (2, 1, 1.0, False, 0), (3, 2, 0.7, False, 2), (4, 4, 1.3, True, 0), (4, 3, 1.0, False, 3),
])
def test_beam_search_equals_paddlenlp_beam_search(num_beams, num_return, length_penalty, early_stopping, min_length):
    """PaddleNLP's own `GenerationMixin.beam_search` + `BeamSearchScorer` on the same toy model."""
    paddle = pytest.importorskip("paddle")
    utils = pytest.importorskip("paddlenlp.generation.utils")
    from paddlenlp.generation.logits_process import LogitsProcessorList, MinLengthLogitsProcessor

    logits = toy_model(seed=5, eos_bias=1.0)
    prompts = [[3, 1, 4], [7, 7, 2], [2, 9, 5]]  # PaddleNLP batches need equal lengths
    max_length, prompt_length = 6, 3

    class ToyPaddleNLPModel(utils.GenerationMixin):
        is_encoder_decoder = False

        def __call__(self, input_ids):
            rows = input_ids.numpy().tolist()
            return paddle.to_tensor(np.stack([logits(row) for row in rows])[:, None, :])

    scorer = utils.BeamSearchScorer(
        batch_size=3, max_length=prompt_length + max_length, num_beams=num_beams, length_penalty=length_penalty,
        do_early_stopping=early_stopping, num_beam_hyps_to_keep=num_return,
    )
    processors = LogitsProcessorList([MinLengthLogitsProcessor(prompt_length + min_length, EOS)] if min_length else [])
    ids, scores = ToyPaddleNLPModel().beam_search(
        paddle.to_tensor(np.repeat(prompts, num_beams, axis=0), dtype="int64"), scorer, processors,
        max_length=prompt_length + max_length, diversity_rate=0.0, pad_token_id=PAD, eos_token_id=EOS,
    )
    expected = [row[: row.index(EOS)] if EOS in row else row for row in ids.numpy().tolist()]
    result = run(logits, prompts, decode_strategy="beam_search", num_beams=num_beams, max_length=max_length,
                 num_return_sequences=num_return, length_penalty=length_penalty, early_stopping=early_stopping,
                 min_length=min_length)
    assert result.sequences == expected
    np.testing.assert_allclose(result.scores, scores.numpy()[:, 0], rtol=1e-4)


# ---------------------------------------------------------------- lengths


@pytest.mark.parametrize("strategy,beams", [("greedy_search", 1), ("sampling", 1), ("beam_search", 3)])
def test_min_length_blocks_eos(strategy, beams):
    logits = toy_model(seed=0, eos_bias=20.0)  # eos always wins when allowed
    stepper = FakeStepper(logits, PROMPTS)
    config = DecodingConfig(decode_strategy=strategy, num_beams=beams, seed=0, eos_token_id=EOS, pad_token_id=PAD)
    assert all(seq == [] for seq in generate(stepper, 3, config).sequences)
    # Decoding stops once every prompt is finished (beam search: once K hypotheses cannot be beaten).
    assert stepper.steps <= (2 if strategy == "beam_search" else 0)
    result = run(logits, decode_strategy=strategy, num_beams=beams, min_length=3, seed=0)
    assert [len(seq) for seq in result.sequences] == [3, 3, 3]
    assert all(EOS not in seq for seq in result.sequences)


@pytest.mark.parametrize("strategy,beams", [("greedy_search", 1), ("sampling", 1), ("beam_search", 3)])
def test_max_length_bounds_output_without_wasted_step(strategy, beams):
    stepper = FakeStepper(toy_model(seed=0, eos_bias=-50.0), PROMPTS)  # eos never wins
    config = DecodingConfig(decode_strategy=strategy, num_beams=beams, max_length=5, seed=0,
                            eos_token_id=EOS, pad_token_id=PAD)
    result = generate(stepper, 3, config)
    assert [len(seq) for seq in result.sequences] == [5, 5, 5]
    assert stepper.steps == 4


# ---------------------------------------------------------------- n-gram ban and repetition penalty


def cycle_table() -> np.ndarray:
    """1 -> 2 and 2 -> 1 are strongly preferred, so greedy loops "1 2 1 2 ..."; eos never wins."""
    table = np.random.default_rng(0).normal(0.0, 0.5, (V, V))
    table[1, 2] = table[2, 1] = 6.0
    table[:, EOS] = -20.0
    return table


def ngrams(tokens: List[int], n: int) -> List[tuple]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_size_prevents_repeated_ngrams(n):
    model = table_model(cycle_table())
    looping = run(model, [[1]], max_length=10).sequences[0]
    assert len(set(ngrams(looping, n))) < len(ngrams(looping, n))
    for strategy, beams in (("greedy_search", 1), ("beam_search", 3)):
        result = run(model, [[1]], decode_strategy=strategy, num_beams=beams, num_return_sequences=beams,
                     max_length=10, no_repeat_ngram_size=n)
        for tokens in result.sequences:
            assert len(tokens) == 10 and len(set(ngrams(tokens, n))) == len(ngrams(tokens, n))


def test_no_repeat_ngram_size_ignores_the_prompt():
    model = table_model(cycle_table())
    # The prompt already holds the bigrams (1, 2) and (2, 1): copying them is allowed.
    tokens = run(model, [[1, 2, 1]], max_length=4, no_repeat_ngram_size=2).sequences[0]
    assert tokens[:3] == [2, 1, 2] and tokens[3] != 1


def penalty_table() -> np.ndarray:
    table = np.full((V, V), -5.0)
    table[5, 1] = 2.0  # prompt [5] -> 1
    table[1, 1], table[1, 4] = 3.0, 2.0  # then 1 again (3.0), unless penalised: 3.0 / 2 = 1.5 < 2.0 -> 4
    table[7, 2] = -0.5  # prompt [7] -> 2
    table[2, 2], table[2, 3] = -1.0, -1.5  # then 2 again, unless penalised: -1.0 * 2 = -2.0 < -1.5 -> 3
    return table


def test_repetition_penalty_changes_the_choice_by_hand():
    model = table_model(penalty_table())
    assert run(model, [[5], [7]], max_length=2).sequences == [[1, 1], [2, 2]]
    assert run(model, [[5], [7]], max_length=2, repetition_penalty=2.0).sequences == [[1, 4], [2, 3]]
    # Prompt tokens are not penalised: 4 and 3 in the prompt do not change the second choice.
    assert run(model, [[4, 5], [3, 7]], max_length=2, repetition_penalty=2.0).sequences == [[1, 4], [2, 3]]


# ---------------------------------------------------------------- sampling


def test_sampling_with_top_k_1_or_tiny_top_p_equals_greedy():
    logits = toy_model(seed=4, eos_bias=1.0)
    greedy = run(logits, max_length=8)
    for options in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, temperature=3.0)):
        sampled = run(logits, decode_strategy="sampling", max_length=8, seed=7, **options)
        assert sampled.sequences == greedy.sequences
        np.testing.assert_allclose(sampled.scores, greedy.scores, rtol=1e-6)


def test_sampling_is_reproducible_with_a_seed():
    logits = toy_model(seed=4)
    first, again, other = (run(logits, decode_strategy="sampling", max_length=12, num_return_sequences=2, seed=s)
                           for s in (11, 11, 12))
    assert first.sequences == again.sequences
    np.testing.assert_array_equal(first.scores, again.scores)
    assert first.sequences != other.sequences


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_sampling_top_k_draws_from_renormalised_top_tokens(temperature):
    table = np.random.default_rng(1).normal(0.0, 1.0, (V, V))
    result = run(table_model(table), [[0]], decode_strategy="sampling", max_length=1, top_k=2,
                 temperature=temperature, num_return_sequences=4000, seed=3)
    first = np.array([seq[0] if seq else EOS for seq in result.sequences])
    top2 = np.argsort(-table[0])[:2]
    assert set(first.tolist()) == set(top2.tolist())
    probs = np.exp(table[0][top2] / temperature) / np.exp(table[0][top2] / temperature).sum()
    np.testing.assert_allclose([np.mean(first == t) for t in top2], probs, atol=0.03)


def test_sampling_top_p_keeps_smallest_set_reaching_p():
    logits = np.array([3.0, 2.0, 1.0, 0.0] + [-30.0] * (V - 4))
    probs = np.exp(logits) / np.exp(logits).sum()  # about 0.64, 0.24, 0.09, 0.03
    top_p = probs[0] + probs[1] / 2  # needs the two most probable tokens
    result = run(table_model(np.tile(logits, (V, 1))), [[0]], decode_strategy="sampling", max_length=1,
                 top_p=top_p, num_return_sequences=3000, seed=0)
    first = np.array([seq[0] for seq in result.sequences])
    assert set(first.tolist()) == {0, 1}
    assert abs(np.mean(first == 0) - probs[0] / (probs[0] + probs[1])) < 0.03


def _reference_sampler(config, seed):
    """The sampler written the plain way: normalised float64 probabilities, top-k, top-p over a stable sort of the
    whole row, the first token whose cumulative probability exceeds a uniform draw of the kept mass."""
    rng = np.random.default_rng(seed)

    def choose(scores):
        shifted = scores.astype(np.float64) / config.temperature
        shifted -= shifted.max(axis=-1, keepdims=True)
        probs = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
        if 0 < config.top_k < probs.shape[-1]:
            probs = np.where(probs >= np.sort(probs, axis=-1)[:, [-config.top_k]], probs, 0.0)
        if config.top_p < 1.0:
            order = np.argsort(-probs, axis=-1, kind="stable")
            ranked = np.take_along_axis(probs, order, axis=-1)
            keep = np.zeros(probs.shape, dtype=bool)
            np.put_along_axis(keep, order, np.cumsum(ranked, axis=-1) - ranked < config.top_p, axis=-1)
            probs = np.where(keep, probs, 0.0)
        cumulative = np.cumsum(probs, axis=-1)
        return (cumulative <= rng.random(len(probs))[:, None] * cumulative[:, -1:]).sum(axis=-1)

    return choose


def test_sampler_draws_the_tokens_of_a_plain_implementation():
    """Over a 50k vocabulary: peaked, flat (a nucleus of thousands of tokens: the partial sort must widen) and tied
    logits, with temperature, top-k and top-p; the same seeded draws pick the same tokens."""
    rng = np.random.default_rng(5)
    cases = 0
    for scale in (0.05, 1.0, 6.0):
        for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 50, 0.8), (1.0, 0, 0.999),
                                          (1.0, 5, 1.0), (0.9, 0, 0.5)):
            scores = (rng.normal(0.0, scale, (3, 50048)) * 4).round() / 4  # many ties
            config = DecodingConfig(eos_token_id=EOS, pad_token_id=PAD, decode_strategy="sampling",
                                    temperature=temperature, top_k=top_k, top_p=top_p, seed=cases)
            ours, reference = decoding.chooser(config), _reference_sampler(config, cases)
            for _ in range(4):
                np.testing.assert_array_equal(ours(scores.astype(np.float32)), reference(scores.astype(np.float32)))
            cases += 1


def test_draw_lands_on_a_token_with_weight_at_both_ends():
    """Hand-worked: weight 1 on tokens 0..599 of 50048 -> u = 0.5 draws token 300 (the first whose cumulative weight
    exceeds 300); u just below 1 draws 599, never a token of the empty blocks after it."""
    weights = np.zeros(50048)
    weights[:600] = 1.0
    assert [decoding._draw(weights, u) for u in (0.0, 0.5, np.nextafter(1.0, 0.0))] == [0, 300, 599]


# ---------------------------------------------------------------- config validation


def test_decoding_config_validate_names_every_bad_field():
    bad = DecodingConfig(eos_token_id=EOS, pad_token_id=PAD, decode_strategy="beam_search", num_beams=1,
                         num_return_sequences=3, top_p=0.0, temperature=0.0, max_length=0, min_length=2,
                         no_repeat_ngram_size=-1, repetition_penalty=0.0, top_k=-1)
    with pytest.raises(ValueError) as error:
        bad.validate()
    message = str(error.value)
    for field in ("num_beams=1", "num_return_sequences=3", "top_p=0.0", "temperature=0.0", "max_length=0",
                  "min_length=2", "no_repeat_ngram_size=-1", "repetition_penalty=0.0", "top_k=-1"):
        assert field in message
    assert "decode_strategy" not in message


@pytest.mark.parametrize("fields,named", [
    (dict(decode_strategy="nucleus"), "decode_strategy='nucleus'"),
    (dict(num_beams=0), "num_beams=0"),
    (dict(num_return_sequences=2), "num_return_sequences=2"),  # greedy gives one
    (dict(decode_strategy="sampling", top_p=1.5), "top_p=1.5"),
    (dict(eos_token_id=-1), "eos_token_id=-1"),
])
def test_decoding_config_validate_rejects(fields, named):
    config = DecodingConfig(**{"eos_token_id": EOS, "pad_token_id": PAD, **fields})
    with pytest.raises(ValueError, match=named):
        generate(FakeStepper(toy_model(0), PROMPTS), 3, config)


def test_decoding_config_validate_accepts_good_configs():
    for fields in (dict(), dict(decode_strategy="sampling", num_return_sequences=4, top_k=5, top_p=0.9),
                   dict(decode_strategy="beam_search", num_beams=4, num_return_sequences=4, min_length=20)):
        DecodingConfig(eos_token_id=EOS, pad_token_id=PAD, **fields).validate()


# ---------------------------------------------------------------- output order


def vocab_split_model(seed: int) -> LogitsFn:
    """Prompt [b] can only produce tokens 3b..3b+2 (others get -1e4), so outputs reveal their prompt."""
    noise = toy_model(seed)

    def logits(history: Sequence[int]) -> np.ndarray:
        allowed = np.full(V, -1e4, dtype=np.float32)
        allowed[3 * history[0]: 3 * history[0] + 3] = 0.0
        return noise(history) + allowed

    return logits


@pytest.mark.parametrize("strategy,beams", [("sampling", 1), ("beam_search", 3)])
def test_num_return_sequences_are_sample_major(strategy, beams):
    result = run(vocab_split_model(2), [[0], [1], [2]], decode_strategy=strategy, num_beams=beams,
                 num_return_sequences=3, max_length=5, seed=0)
    assert len(result.sequences) == len(result.scores) == 9
    for i, tokens in enumerate(result.sequences):
        assert tokens and all(3 * (i // 3) <= t < 3 * (i // 3) + 3 for t in tokens)
    for b in range(3):
        distinct = len({tuple(t) for t in result.sequences[3 * b: 3 * b + 3]})
        assert distinct == 3 if strategy == "beam_search" else distinct > 1
        if strategy == "beam_search":
            assert list(result.scores[3 * b: 3 * b + 3]) == sorted(result.scores[3 * b: 3 * b + 3], reverse=True)


def test_generation_result_padded():
    result = GenerationResult([[1, 2, 3], [], [4]], np.zeros(3))
    np.testing.assert_array_equal(result.padded(PAD), [[1, 2, 3], [PAD] * 3, [4, PAD, PAD]])
    assert result.padded(PAD).dtype == np.int64


# ---------------------------------------------------------------- sampled beam candidates (--select_topk false)


def test_sampled_beam_candidates_follow_softmax_without_replacement():
    from paddle_glm.decoding import _sampled_indices

    probs = np.array([0.5, 0.3, 0.15, 0.05])
    scores = np.log(np.tile(probs, (20000, 1)))
    drawn = _sampled_indices(scores, 1, np.random.default_rng(0))[:, 0]
    np.testing.assert_allclose(np.bincount(drawn, minlength=4) / len(drawn), probs, atol=0.01)
    pairs = _sampled_indices(scores[:2000], 2, np.random.default_rng(1))
    assert (pairs[:, 0] != pairs[:, 1]).all()  # without replacement
    assert (scores[0, pairs[:, 0]] >= scores[0, pairs[:, 1]]).all()  # best score first


def test_beam_search_with_sampled_candidates_is_seeded_and_differs_from_top():
    logits = toy_model(3)
    settings = dict(decode_strategy="beam_search", num_beams=3, max_length=6, beam_candidates="sample")
    first = run(logits, seed=7, **settings).sequences
    assert first == run(logits, seed=7, **settings).sequences
    top = run(logits, decode_strategy="beam_search", num_beams=3, max_length=6).sequences
    draws = [run(logits, seed=s, **settings).sequences for s in range(8)]
    assert any(d != top for d in draws)
    assert all(len(seq) <= 6 and EOS not in seq for d in draws for seq in d)


def test_tokenizer_size_keeps_ids_past_the_tokenizer_out():
    table = np.zeros((V + 4, V + 4), dtype=np.float32)  # 4 embedding rows past the tokenizer's V ids
    table[:, V + 2] = 5.0  # would win everywhere...
    table[:, 4] = 1.0
    for strategy, beams in (("greedy_search", 1), ("beam_search", 3)):
        free = run(table_model(table), decode_strategy=strategy, num_beams=beams, max_length=3).sequences
        capped = run(table_model(table), decode_strategy=strategy, num_beams=beams, max_length=3, tokenizer_size=V)
        assert all(V + 2 in seq for seq in free)
        assert all(max(seq) < V for seq in capped.sequences)  # ...but the tokenizer has only ids 0..V-1
