"""Pre-training samples from memory-mapped corpora (`python -m paddle_glm.preprocess` writes them): several corpora
blended by weight, each cut into fixed-length samples, every sample turned into an example by the objective.

- Packing: a corpus is one stream of tokens (its documents in file order, each ended by the end token); sample `k`
  is stream tokens `[k * L, (k + 1) * L)` with L = `--max_seq_length` minus what the objective puts in front
  (GLM's `[CLS]`). Every token lands in exactly one sample; the last sample of a corpus may be shorter.
- Blending: `--data_path 0.7 data/a 0.3 data/b` draws samples from the corpora in those proportions, in the
  interleaved order of PaddleNLP's (Megatron's) `build_blending_indices`; a corpus drawn more often than it has
  samples starts another pass over them.
- Order: each pass over a corpus visits its samples in a permutation fixed by `(seed, corpus, pass)`, and the
  objective of blended sample `i` draws from a generator seeded by `(seed, i)`: the data depend on the seed alone,
  never on the number of processes or on resuming, so a resumed run sees exactly the examples it would have seen.
- Sharding: the trainer's sampler hands each data-parallel rank its own batches of this one global order
  (`sampler`), so the ranks' samples are disjoint and together complete.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
from paddlenlp.data.indexed_dataset import MMapIndexedDataset, data_file_path, index_file_path

from .args import InputError
from .trainer import StepLimitedBatchSampler

__all__ = ["Corpus", "BlendedSamples", "PretrainDataset", "parse_data_path", "sampler"]

Objective = Callable[[np.ndarray, np.random.Generator], Dict[str, np.ndarray]]


def parse_data_path(values: Sequence[str]) -> List[Tuple[float, str]]:
    """`PREFIX` alone, or `WEIGHT PREFIX [WEIGHT PREFIX ...]` (Megatron's and PaddleNLP's `--data_path` form)."""
    values = list(values or [])
    if len(values) == 1:
        return [(1.0, values[0])]
    problems, pairs = [], []
    if not values or len(values) % 2:
        problems.append(f"--data_path {' '.join(values)}: give PREFIX, or WEIGHT PREFIX pairs "
                        "(e.g. --data_path 0.7 data/a 0.3 data/b)")
    else:
        for weight, prefix in zip(values[::2], values[1::2]):
            try:
                value = float(weight)
            except ValueError:
                problems.append(f"--data_path: {weight!r} (before {prefix}) is not a weight: give WEIGHT PREFIX pairs")
                continue
            if not value > 0:
                problems.append(f"--data_path: the weight of {prefix} must be > 0, got {weight}")
            pairs.append((value, prefix))
    if problems:
        raise InputError("invalid arguments:\n  - " + "\n  - ".join(problems))
    return pairs


class Corpus:
    """One preprocessed corpus (`PREFIX.bin` + `PREFIX.idx`) as a token stream cut into samples."""

    def __init__(self, prefix: str):
        missing = [path for path in (data_file_path(prefix), index_file_path(prefix)) if not os.path.isfile(path)]
        if missing:
            raise InputError(f"--data_path {prefix}: {' and '.join(missing)} not found; write them with "
                             f"python -m paddle_glm.preprocess --input CORPUS --output_prefix {prefix} ...")
        with contextlib.redirect_stdout(io.StringIO()):  # PaddleNLP's reader prints its progress
            index = MMapIndexedDataset(prefix, skip_warmup=True)
        if len(index) == 0:
            raise InputError(f"--data_path {prefix}: the corpus holds no documents")
        self.prefix = prefix
        self.documents = len(index)
        self.num_tokens = int(index.sizes.astype("int64").sum())
        dtype = index[0].dtype
        del index
        self.tokens = np.memmap(data_file_path(prefix), dtype=dtype, mode="r")
        if len(self.tokens) != self.num_tokens:
            raise InputError(f"{data_file_path(prefix)}: {len(self.tokens)} tokens but its index lists "
                             f"{self.num_tokens}: the files do not belong together (write them again)")

    def num_samples(self, length: int) -> int:
        return math.ceil(self.num_tokens / length)

    def sample(self, number: int, length: int) -> np.ndarray:
        return np.asarray(self.tokens[number * length:(number + 1) * length], dtype="int64")


class BlendedSamples:
    """`size` samples of `length` tokens drawn from `corpora` by `weights`; item i -> (corpus, sample number)."""

    def __init__(self, corpora: Sequence[Corpus], weights: Sequence[float], length: int, size: int, seed: int):
        from tool_helpers import helpers  # PaddleNLP's compiled data helpers (a PaddleNLP dependency)

        self.corpora, self.length, self.seed = list(corpora), length, seed
        self.counts = [corpus.num_samples(length) for corpus in self.corpora]
        self.corpus_index = np.zeros(size, dtype=np.uint8)
        self.drawn = np.zeros(size, dtype=np.int64)  # how many samples of its corpus came before
        weights = np.asarray(weights, dtype=np.float64)
        helpers.build_blending_indices(self.corpus_index, self.drawn, weights / weights.sum(), len(self.corpora),
                                       size, False)
        self._orders: Dict[int, Tuple[int, np.ndarray]] = {}  # corpus -> (pass, its permutation)

    def __len__(self) -> int:
        return len(self.corpus_index)

    def locate(self, index: int) -> Tuple[int, int]:
        """(corpus, sample number within it) of blended item `index`."""
        corpus = int(self.corpus_index[index])
        epoch, position = divmod(int(self.drawn[index]), self.counts[corpus])
        cached = self._orders.get(corpus)
        if cached is None or cached[0] != epoch:
            order = np.random.default_rng([self.seed, corpus, epoch]).permutation(self.counts[corpus])
            self._orders[corpus] = cached = (epoch, order)
        return corpus, int(cached[1][position])

    def tokens(self, index: int) -> np.ndarray:
        corpus, number = self.locate(index)
        return self.corpora[corpus].sample(number, self.length)


class PretrainDataset:
    """Map-style dataset of training examples: blended samples through the objective."""

    def __init__(self, samples: BlendedSamples, objective: Objective):
        self.samples = samples
        self.objective = objective

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
        return self.objective(self.samples.tokens(index), np.random.default_rng([self.samples.seed, index]))


def sampler(dataset, batch_size: int, world_size: int, rank: int, max_steps: int, num_train_epochs: float,
            accumulation: int) -> StepLimitedBatchSampler:
    """The batches of data-parallel `rank`: the global order unshuffled (it is already shuffled by the seed),
    batch b of every `world_size` consecutive ones; it stops at the run's last step (exact resume)."""
    return StepLimitedBatchSampler(dataset, batch_size=batch_size, shuffle=False, num_replicas=world_size, rank=rank,
                                   drop_last=False, max_steps=max_steps, num_train_epochs=num_train_epochs,
                                   accumulation=accumulation)
