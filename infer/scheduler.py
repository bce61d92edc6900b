"""Continuous batching: one thread owns the model; requests join the running decode batch between steps.

Every request (a `Job`: one prompt, `n` rows for its samples) is prefilled (the prompts taken together packed into
one pass, each seeing only itself), chooses its first tokens from its prompt's logits, and its rows join the batch
before the next step; a job whose rows are all finished (or that is cancelled: its client went away, its time ran
out) leaves before the next step. Tokens are chosen per job with `paddle_glm.decoding.decode_step` and a chooser of
the job's own (its own seeded generator, drawing one number per row of the job at every step, as
`decoding.generate` does for that request alone): what a request generates does not depend on what else is in the
batch. Beam search (`num_beams > 1`) reorders rows and ends them by comparing hypotheses; it runs as a batch of its
own, through `decoding.generate`, between two steps.

The cache of the batch (`ExportedBatch`) is the exported step graph's two segments (`models.layers.SegmentedCache`)
used with one shared row per decoding row (k = 1):
- shared [rows, kv, Ws, hd], Ws = Kp + C: a row's prompt (and a P-Tuning prefix) in columns [0, Kp), written by
  its own prompt pass; columns [Kp, Ws) hold the *previous* C own slots of every row (see fold). Kp is the
  batch's longest prompt rounded up to WIDTH_STEP columns, not the export's src_length: every step reads every
  row's Ws columns (a 2-layer glm-large shape at src_length 991 and 16 rows: 277 MB a step, about the weights'
  306 MB, for prompts of a few dozen tokens). A longer prompt joining widens the batch's buffers (zero columns
  inserted at Kp); rows leaving narrow them to the prompts that remain: copies at those moments, never per step;
- own [rows, kv, C, hd]: step t writes slot t of every row (the graph's common `cache_index`); a row that joined
  at step t0 masks its slots before t0 (they are zeros of its fresh buffer);
- when t reaches C the own slots are copied into columns [Kp, Ws) of the shared segment ("fold") and t restarts
  at 0. C is the export's tgt_length, the most new tokens a request may ask for, so a row lives through at most
  one fold: the columns a fold overwrites belong to rows that have left.
Per row, the mask [rows, Ws + C] opens its prompt columns, its slots of the previous epoch and its slots of this
one; positions advance by the family's `position_step`.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Protocol, Tuple

import numpy as np

from paddle_glm.decoding import DecodingConfig, GenerationResult, chooser, decode_step
from paddle_glm.inputs import Example, model_positions, prefill_attention_mask

from .engines import resize_axis
from .stepper import prefix_heads, run_step

__all__ = ["Job", "Listener", "Scheduler", "ExportedBatch", "QueueFull", "WIDTH_STEP"]

logger = logging.getLogger("paddle_glm")
ANSWER_START_ROOM = 4  # a prompt is at most src_length ids and the tokens that open an answer (GLM's <sop>)
WIDTH_STEP = 32  # the batch's prompt width Kp is a multiple of this (fewer re-layouts as prompts come and go)
BURST_WAITS = 10  # an idle batch waits at most this many `batch_wait`s for a burst of requests to end


class QueueFull(RuntimeError):
    """More requests wait than `max_queue` allows."""


class Listener(Protocol):
    """Receives a job's progress, in the scheduler's thread (keep it short: the batch waits)."""

    def tokens(self, job: "Job", live: np.ndarray) -> List[int]:
        """`job.generated` grew by a column; `live` [rows] marks the rows that got a real token (not the pad of a
        finished row). Returns rows to finish now (a stop string completed)."""

    def done(self, job: "Job", error: Optional[BaseException]) -> None:
        """The job left the batch: `job.sequences`, `job.reasons` are final (or `error` says why not)."""


@dataclass(eq=False)
class Job:
    """One prompt (`Template.generation_example`) decoded with `config` into `config.num_return_sequences` rows."""

    example: Example
    config: DecodingConfig
    listener: Listener
    cancelled: bool = False
    sequences: List[List[int]] = field(default_factory=list)
    reasons: List[str] = field(default_factory=list)  # per row: "stop" (eos or stop string) or "length"

    def __post_init__(self):
        self.rows = 1 if self.beam else self.config.num_return_sequences
        self.generated = np.empty((self.rows, 0), dtype=np.int64)
        self.finished = np.zeros(self.rows, dtype=bool)
        self.stopped = np.zeros(self.rows, dtype=bool)  # finished by the listener (a stop string)
        self.lengths = np.zeros(self.rows, dtype=np.int64)  # a stopped row's tokens
        self.choose = None if self.beam else chooser(self.config)

    @property
    def beam(self) -> bool:
        return self.config.decode_strategy == "beam_search"

    def cancel(self) -> None:
        """Leave the batch before its next step (any thread)."""
        self.cancelled = True

    def advance(self, logits: np.ndarray) -> bool:
        """Choose the rows' next tokens from their logits [rows, V] as `decoding.generate` would; True when done."""
        config = self.config
        tokens, _ = decode_step(logits, self.generated, self.finished, config, self.choose)
        self.generated = np.concatenate([self.generated, tokens[:, None]], axis=1)
        live = ~self.finished
        self.finished |= np.isin(tokens, config.eos_ids)
        for row in self.listener.tokens(self, live):
            if not self.finished[row]:
                self.stopped[row], self.finished[row] = True, True
                self.lengths[row] = self.generated.shape[1]
        return bool(self.finished.all()) or self.generated.shape[1] >= config.max_length

    def close(self) -> None:
        """Final sequences (until eos; a stopped row until the token that completed its stop string)."""
        eos = self.config.eos_ids
        for row, tokens in enumerate(self.generated.tolist()):
            end = int(self.lengths[row]) if self.stopped[row] else next(
                (i for i, token in enumerate(tokens) if token in eos), None)
            self.sequences.append(tokens[:end] if end is not None else tokens)
            self.reasons.append("stop" if self.stopped[row] or end is not None else "length")


@dataclass
class NewRows:
    """Rows prefilled by `ExportedBatch.prefill`, not yet in the batch."""

    shared: list  # per layer key, value [rows, kv, Kp + C, hd], Kp = prompt_width
    mask: np.ndarray  # [rows, Kp + 2 C]
    positions: np.ndarray  # [rows, P] the prompt's last position
    position_step: np.ndarray  # [rows, P]
    prompt_width: int  # Kp of these rows: their prefix + prompt rounded up to WIDTH_STEP
    needs: np.ndarray  # [rows] their prefix + prompt columns


class ExportedBatch:
    """The running decode batch over an export's step graph (`infer.runner.GLMRunner`); see the module docstring."""

    def __init__(self, runner):
        config = runner.config
        self.runner, self.engine = runner, runner.engine
        self.layers, self.heads, self.head_dim = config["num_layers"], config["kv_heads"], config["head_dim"]
        self.prefix = runner.prefix  # [layers, 2, P, kv, hd] or None
        prefix_tokens = 0 if self.prefix is None else self.prefix.shape[2]
        self.capacity = config["tgt_length"]  # C
        self.max_prompt_width = prefix_tokens + config["src_length"] + ANSWER_START_ROOM  # the most Kp can be
        self.prefix_tokens = prefix_tokens
        self.reset()

    def reset(self) -> None:
        self.prompt_width = 0  # Kp
        self.needs = np.zeros([0], "int64")  # [rows] each row's prefix + prompt columns
        self.shared: Optional[list] = None  # per layer key, value [rows, kv, Ws, hd]
        self.own: Optional[list] = None  # per layer key, value [rows, kv, C, hd]
        self.mask = np.zeros([0, 2 * self.capacity], "float32")
        self.positions = np.zeros([0, 0], "int64")  # [rows, P] the last fed position
        self.position_step = np.zeros([0, 0], "int64")
        self.t = 0

    @property
    def rows(self) -> int:
        return len(self.mask)

    @property
    def width(self) -> int:
        """Ws, the shared segment's columns."""
        return self.prompt_width + self.capacity

    def _rounded(self, columns: int) -> int:
        return min(-(-columns // WIDTH_STEP) * WIDTH_STEP, self.max_prompt_width)

    def generate(self, example: Example, config: DecodingConfig) -> GenerationResult:
        """A job decoded alone (beam search) with the runner's own stepper."""
        return self.runner.generate([example], config)

    def prefill(self, examples: List[Example], rows: List[int]) -> Tuple[List[np.ndarray], List["NewRows"]]:
        """The prompts packed into one row of one pass, which reads every weight once for all of them, and
        projects each prompt's last position only (prompts arriving together: see `_admit`): per prompt the
        next-token logits [rows[i], V] of the rows continuing it, and those rows for `add`. A prompt's queries see
        only its own keys and the prefix (the others' are masked out, as a batch step masks the other rows'): its
        logits are those of its pass alone but for rounding, as a row's in a batch step."""
        lengths = [len(example["input_ids"]) for example in examples]
        for length in lengths:
            if self.prefix_tokens + length > self.max_prompt_width:
                raise ValueError(f"a prompt of {length} tokens exceeds the {self.max_prompt_width - self.prefix_tokens}"
                                 " this batch holds")
        widths = [self._rounded(self.prefix_tokens + length) + self.capacity for length in lengths]
        logits, buffers = self._pass(examples, lengths, widths)
        news = [self._rows(example, count, filled, width)
                for example, count, filled, width in zip(examples, rows, buffers, widths)]
        return [np.repeat(logits[i:i + 1], count, axis=0) for i, count in enumerate(rows)], news

    def _pass(self, examples: List[Example], lengths: List[int], widths: List[int]) -> Tuple[np.ndarray, list]:
        """The prompt pass: last-position logits [len(examples), V] and per prompt its buffers [1, kv, width, hd]
        (the prefix, then the prompt's keys and values)."""
        prefix, heads = self.prefix_tokens, prefix_heads(self.prefix, self.layers)
        total, starts = sum(lengths), np.cumsum([0] + lengths)[:-1]
        # one prompt: straight into its row's buffers; several: one packed row, then each prompt's columns copied
        columns = widths[0] if len(examples) == 1 else prefix + total
        packed = [self.engine.buffer([1, self.heads, columns, self.head_dim], head) for head in heads]
        # columns: one masked dummy shared column | the prefix | the prompts | (one prompt) the rest of its row
        mask = np.zeros([1, 1, total, 1 + columns], "float32")
        mask[..., 1:1 + prefix] = 1.0
        for example, start, length in zip(examples, starts, lengths):
            inside = prefill_attention_mask(np.ones([1, length], "float32"), example["attention_mask"][None])
            mask[0, 0, start:start + length, 1 + prefix + start:1 + prefix + start + length] = inside[0, 0]
        input_ids = np.concatenate([example["input_ids"] for example in examples]).astype("int64")[None]
        positions = np.concatenate([example["position_ids"] for example in examples], axis=1).astype("int64")[None]
        empty = self.engine.buffer([1, self.heads, 1, self.head_dim])
        logits = run_step(self.engine, input_ids, model_positions(positions), mask, prefix, [empty] * len(packed),
                          packed, logit_index=starts + np.asarray(lengths) - 1)
        if len(examples) == 1:
            return logits, [packed]
        buffers = []
        for start, length, width in zip(starts, lengths, widths):
            filled = [self.engine.buffer([1, self.heads, width, self.head_dim], head) for head in heads]
            own = self.engine.columns(packed, prefix + int(start), prefix + int(start) + length)
            buffers.append(self.engine.write_slots(filled, own, prefix))
        return logits, buffers

    def _rows(self, example: Example, rows: int, buffers: list, width: int) -> "NewRows":
        """`rows` rows continuing `example`'s prompt, whose pass filled `buffers` [1, kv, width, hd]."""
        columns = self.prefix_tokens + len(example["input_ids"])
        mask = np.zeros([rows, width + self.capacity], "float32")
        mask[:, :columns] = 1.0
        last = np.asarray(example["position_ids"], "int64")[None, :, -1]
        step = np.asarray(example["position_step"], "int64")[None]
        return NewRows(self.engine.gather(buffers, np.zeros(rows, "int64")) if rows > 1 else buffers, mask,
                       np.repeat(last, rows, axis=0), np.repeat(step, rows, axis=0), width - self.capacity,
                       np.full(rows, columns, "int64"))

    def add(self, new: List["NewRows"]) -> None:
        """Append prefilled rows to the batch: one copy of the batch's buffers however many join (and one more to
        widen them when a joining prompt is longer than Kp)."""
        kp = max([n.prompt_width for n in new] + [self.prompt_width])
        if self.shared is None:
            self.prompt_width, self.mask = kp, np.zeros([0, kp + 2 * self.capacity], "float32")
        else:
            self._resize(kp)
        pieces = [self._widened(n, kp) for n in new]
        shared = pieces[0]
        for more in pieces[1:]:
            shared = self.engine.concat(shared, more)
        self.needs = np.concatenate([self.needs] + [n.needs for n in new])
        rows = sum(len(n.mask) for n in new)
        own = [self.engine.buffer([rows, self.heads, self.capacity, self.head_dim]) for _ in shared]
        if self.shared is None:
            self.shared, self.own = shared, own
        else:
            self.shared, self.own = self.engine.concat(self.shared, shared), self.engine.concat(self.own, own)
        self.mask = np.concatenate([self.mask] + [resize_axis(n.mask, n.prompt_width, kp - n.prompt_width, 1)
                                                  for n in new])
        positions = np.concatenate([n.positions for n in new])
        steps = np.concatenate([n.position_step for n in new])
        self.positions = np.concatenate([self.positions.reshape(-1, positions.shape[1]), positions])
        self.position_step = np.concatenate([self.position_step.reshape(-1, steps.shape[1]), steps])

    def keep(self, index: np.ndarray) -> None:
        """Keep only rows `index` (in that order): the others' requests left."""
        if len(index) == 0:
            self.reset()
            return
        if len(index) == self.rows:
            return
        self.shared, self.own = self.engine.gather(self.shared, index), self.engine.gather(self.own, index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        self.position_step, self.needs = self.position_step[index], self.needs[index]
        self._resize(self._rounded(int(self.needs.max())))

    def _resize(self, kp: int) -> None:
        """The batch's prompt width becomes `kp`: columns inserted (zeros, masked) or removed (masked for every
        row) at the current Kp, where the folded slots begin."""
        if kp != self.prompt_width:
            self.shared = self.engine.resize(self.shared, self.prompt_width, kp - self.prompt_width)
            self.mask = resize_axis(self.mask, self.prompt_width, kp - self.prompt_width, 1)
            self.prompt_width = kp

    def _widened(self, new: "NewRows", kp: int) -> list:
        return new.shared if new.prompt_width == kp else self.engine.resize(new.shared, new.prompt_width,
                                                                               kp - new.prompt_width)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per row (int64 [rows]); next-token logits [rows, V]."""
        if self.t == self.capacity:
            self._fold()
        self.mask[:, self.width + self.t] = 1.0
        self.positions = self.positions + self.position_step
        logits = run_step(self.engine, tokens.astype("int64")[:, None], model_positions(self.positions[:, :, None]),
                           self.mask[:, None, None, :], self.t, self.shared, self.own)
        self.t += 1
        return logits

    def _fold(self) -> None:
        """Own slots -> the shared segment's last C columns; the epoch before is dead (rows live <= C steps)."""
        kp = self.prompt_width
        self.shared = self.engine.write_slots(self.shared, self.own, kp)
        self.mask[:, kp:self.width] = self.mask[:, self.width:]
        self.mask[:, self.width:] = 0.0
        self.t = 0


class Scheduler:
    """Owns `batch` (an `ExportedBatch`) in one thread; `submit` jobs from any thread."""

    def __init__(self, batch: ExportedBatch, max_batch_size: int = 16, max_queue: int = 64,
                 prefill_tokens: int = 512, flush: Callable[[], None] = lambda: None, batch_wait: float = 0.001):
        self.batch, self.max_batch_size, self.max_queue = batch, max_batch_size, max_queue
        self.flush = flush  # called after listeners heard of new tokens or ends: they may hand events on together
        self.prefill_tokens = prefill_tokens  # prompt tokens prefilled between two steps (at least one prompt)
        self.batch_wait = batch_wait  # an idle batch's quiet time before a pass: requests sent together share it
        self.incoming: "queue.Queue[Optional[Job]]" = queue.Queue()
        self.waiting: Optional[Job] = None  # pulled from `incoming` but not yet room for its rows
        self.jobs: List[Job] = []  # in batch row order
        self.pending_lock = threading.Lock()
        self.pending = 0  # submitted, not yet in the batch
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self.steps = 0

    def start(self) -> "Scheduler":
        self.thread.start()
        return self

    def stop(self) -> None:
        """Finish the loop: jobs still queued or running end with an error."""
        self.running = False
        self.incoming.put(None)
        self.thread.join()

    @property
    def running_rows(self) -> int:
        return sum(job.rows for job in self.jobs)

    def submit(self, job: Job) -> None:
        """Queue `job`; raises QueueFull when `max_queue` jobs already wait."""
        if job.rows > self.max_batch_size:
            raise ValueError(f"{job.rows} rows exceed --max_batch_size {self.max_batch_size}")
        if not job.beam and job.config.max_length > self.batch.capacity:
            raise ValueError(f"max_length {job.config.max_length} exceeds the batch's {self.batch.capacity} slots")
        with self.pending_lock:
            if self.pending >= self.max_queue:
                raise QueueFull(f"{self.pending} requests are waiting (--max_queue {self.max_queue})")
            self.pending += 1
        self.incoming.put(job)

    # ---------------------------------------------------------------- the loop (scheduler thread)

    def _loop(self) -> None:
        while self.running:
            try:
                self._admit(block=not self.jobs)
                self._leave([job for job in self.jobs if job.cancelled])
                if self.jobs:
                    self._step()
            except Exception as error:  # the model failed: fail the running jobs, keep serving
                logger.exception("the scheduler's step failed")
                self._leave(list(self.jobs), error)
                self.batch.reset()
            self.flush()
        for job in self.jobs + ([self.waiting] if self.waiting else []):
            job.listener.done(job, RuntimeError("the server stopped"))
        while not self.incoming.empty():
            job = self.incoming.get_nowait()
            if job is not None:
                job.listener.done(job, RuntimeError("the server stopped"))
        self.flush()

    def _next(self, wait: float) -> Optional[Job]:
        """The job waiting to be taken, waiting at most `wait` seconds for one."""
        if self.waiting is not None:
            return self.waiting
        try:
            job = self.incoming.get(timeout=wait) if wait > 0 else self.incoming.get_nowait()
        except queue.Empty:
            return None
        self.waiting = job
        return job

    def _admit(self, block: bool) -> None:
        """Pass the prompts of the jobs waiting (FIFO) while their rows fit and their prompt tokens stay within
        `prefill_tokens` (at least one job: running rows wait for the passes, so this bounds their stall), packed
        into one pass (`ExportedBatch.prefill`); each job chooses its first tokens right after it. Jobs arriving
        during that pass get the next one, in the same round, rather than wait for the next decode step. Then all
        join the batch at once. Beam jobs run to the end here. (4 clients sending together, 2-layer glm-large
        shape: see the README's serving table.)"""
        joining: List[Tuple[Job, NewRows, bool]] = []  # (job, its rows, done already)
        budget = self.prefill_tokens
        while self.running:
            group, budget = self._take(block and not joining, budget, sum(job.rows for job, _, _ in joining))
            if not group:
                break
            try:
                logits, rows = self.batch.prefill([job.example for job in group], [job.rows for job in group])
            except Exception as error:
                logger.exception("a prompt pass failed")
                for job in group:
                    job.listener.done(job, error)
                continue
            joining.extend((job, new, job.advance(first)) for job, new, first in zip(group, rows, logits))
            self.flush()
        if joining:
            self.jobs.extend(job for job, _, _ in joining)  # first: if adding fails, the loop fails them with the rest
            self.batch.add([rows for _, rows, _ in joining])
            self._leave([job for job, _, done in joining if done])

    def _take(self, block: bool, budget: int, taken_rows: int) -> Tuple[List[Job], int]:
        """The jobs waiting now (FIFO) whose rows fit beside `taken_rows` and the batch's, and whose prompt tokens
        fit `budget` (at least one job a round: `taken_rows` 0), and the budget left. With `block` (an idle batch)
        it waits for a first job, then until none arrived for `batch_wait` seconds (at most BURST_WAITS times as
        long): requests sent together share one pass, and one alone waits `batch_wait`. Cancelled jobs end here
        and beam jobs run here."""
        group: List[Job] = []
        first = until = None  # a blocking take's first arrival; when it stops waiting for more
        while self.running:
            rows = taken_rows + sum(j.rows for j in group) + self.running_rows
            if rows >= self.max_batch_size:
                break
            if until is None:
                wait = 0.5 if block else 0.0
            else:
                wait = until - time.monotonic()
            job = self._next(wait)
            if block and job is not None:
                now = time.monotonic()
                first = first or now
                until = min(now + self.batch_wait, first + BURST_WAITS * self.batch_wait)
            if job is None or job.rows + rows > self.max_batch_size:
                break
            cost = len(job.example["input_ids"])
            if (group or taken_rows) and cost > budget:
                break
            budget -= cost
            self.waiting = None
            with self.pending_lock:
                self.pending -= 1
            if job.cancelled:
                job.listener.done(job, None)
            elif job.beam:
                self._run_beam(job)
            else:
                group.append(job)
        return group, budget

    def _run_beam(self, job: Job) -> None:
        try:
            result = self.batch.generate(job.example, job.config)
        except Exception as error:
            logger.exception("a beam search failed")
            job.listener.done(job, error)
            return
        job.sequences = result.sequences
        job.reasons = ["stop" if len(s) < job.config.max_length else "length" for s in result.sequences]
        job.listener.done(job, None)

    def _step(self) -> None:
        tokens = np.concatenate([job.generated[:, -1] for job in self.jobs])
        logits = self.batch.step(tokens)
        self.steps += 1
        done, row = [], 0
        for job in self.jobs:
            if job.advance(logits[row:row + job.rows]):
                done.append(job)
            row += job.rows
        if done:
            self._leave(done)

    def _leave(self, jobs: List[Job], error: Optional[BaseException] = None) -> None:
        if not jobs:
            return
        keep, row = [], 0
        for job in self.jobs:
            if job not in jobs:
                keep.extend(range(row, row + job.rows))
            row += job.rows
        self.jobs = [job for job in self.jobs if job not in jobs]
        self.batch.keep(np.array(keep, dtype="int64"))
        for job in jobs:
            if error is None and not job.cancelled:
                job.close()
            job.listener.done(job, error)


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll `predicate` until true or `timeout` seconds pass (tests and draining)."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True
