"""`GLMTrainer`: PaddleNLP's Trainer with GLM's loss settings and evaluation that really decodes.

The reference example's evaluation decodes greedily for 20 tokens whatever `--num_beams` says.
Here evaluation computes the unsmoothed loss and perplexity with the Trainer's own loop, then
decodes every evaluation prompt with the user's decoding settings (`paddle_glm.decoding`), scores
BLEU-4 / ROUGE on characters and writes `OUTPUT_DIR/<prefix>_predictions.jsonl`.

Checkpoints are atomic: each is written to `OUTPUT_DIR/tmp-checkpoint-N` and renamed to `checkpoint-N` once
complete, so a run killed while saving never leaves a `checkpoint-N` that `--resume_from_checkpoint` or
`get_last_checkpoint` would take. A resumed run ends with the same step count, losses and (on CPU, bit for bit)
weights as an uninterrupted one: same batches, none past --max_steps, same dropout masks.
"""
from __future__ import annotations

import glob
import itertools
import math
import os
import shutil
from typing import Dict, Optional

import paddle
from paddle.io import DistributedBatchSampler
import paddlenlp.trainer.trainer as paddlenlp_trainer
from paddlenlp.trainer import Trainer, get_last_checkpoint
from paddlenlp.trainer.trainer_utils import PREFIX_CHECKPOINT_DIR, SchedulerType, get_scheduler
from paddlenlp.utils.log import logger
from tqdm import tqdm

from .data import GLMDataset, write_json_lines
from .decoding import DecodingConfig
from .generation import generate
from .metrics import generation_metrics

__all__ = ["GLMTrainer", "PARTIAL_PREFIX", "StepLimitedBatchSampler"]

PARTIAL_PREFIX = "tmp-"  # OUTPUT_DIR/tmp-checkpoint-N: a checkpoint being written (or left by a crash)
TRAINER_STATE_NAME = "trainer_state.json"


class StepLimitedBatchSampler(DistributedBatchSampler):
    """`paddle.io.DistributedBatchSampler` whose last epoch ends with the batch of the run's last optimizer step.

    Works around PaddleNLP 2.8.1's `Trainer._inner_training_loop`, which tests `global_step >= max_steps` only after
    training a step: resumed from a checkpoint inside an epoch, it skips the batches already trained, then trains the
    next one before looking. From the last checkpoint of a 30-step run it trained a 31st step (and rerunning a
    finished command did the same). With no batch after the last step's, the epoch ends there and nothing more is
    trained; an uninterrupted run stops at that batch anyway, so it draws exactly the batches it drew before.
    """

    def __init__(self, dataset, *, max_steps: int, num_train_epochs: float, accumulation: int, **kwargs):
        super().__init__(dataset, **kwargs)
        self.accumulation = accumulation
        self.steps_per_epoch = max(len(self) // accumulation, 1)  # as `Trainer.train` counts them
        self.max_steps = max_steps if max_steps > 0 else int(self.steps_per_epoch * num_train_epochs)

    def __iter__(self):
        steps_left = self.max_steps - self.epoch * self.steps_per_epoch  # read before `super().__iter__` bumps epoch
        batches = super().__iter__()
        if steps_left >= self.steps_per_epoch:
            return batches  # a full epoch, with any batches that do not fill an accumulation
        return itertools.islice(batches, max(steps_left, 0) * self.accumulation)


class GLMTrainer(Trainer):
    """Trainer for GLM blank infilling.

    - `label_smoothing` applies to the training loss only, so `eval_loss` and `eval_ppl` stay true
      negative log-likelihoods;
    - the learning rate warms up, then decays linearly to `lr_decay_ratio` x its peak;
    - `decoding` (a `DecodingConfig`) drives generation in `evaluate`; None skips it. The family's `template`
      turns what is generated into answers (`Template.response`).
    """

    def __init__(self, *args, label_smoothing: float = 0.0, lr_decay_ratio: float = 0.1,
                 decoding: Optional[DecodingConfig] = None, template=None, **kwargs):
        super().__init__(*args, **kwargs)
        if decoding is not None and template is None:
            raise ValueError("GLMTrainer: decoding in evaluation needs the family's template to read the answers")
        self.label_smoothing = label_smoothing
        self.lr_decay_ratio = lr_decay_ratio
        self.decoding = decoding
        self.template = template
        self._resume_rng_from: Optional[str] = None  # checkpoint whose RNG states are still to be restored
        self._rotation_paused = False

    def _get_train_sampler(self):
        # One sampler for every world size: its shuffle depends only on the epoch, so a one-process run,
        # a tensor-parallel run and a resumed run all see the same batches in the same order.
        return StepLimitedBatchSampler(
            self.train_dataset, batch_size=self.args.per_device_train_batch_size, shuffle=True,
            num_replicas=self.args.dataset_world_size, rank=self.args.dataset_rank,
            drop_last=self.args.dataloader_drop_last, max_steps=self.args.max_steps,
            num_train_epochs=self.args.num_train_epochs, accumulation=self.args.gradient_accumulation_steps,
        )

    def _wrap_model(self, model, training=True):
        wrapped = super()._wrap_model(model, training)
        strategy = getattr(wrapped, "_strategy", None)
        if self.args.tensor_parallel_degree > 1 and strategy is not None and not paddle.is_compiled_with_cuda():
            # fleet's TensorParallel broadcasts every batch across the model-parallel group with ops that only
            # exist on GPU/XPU; the batches are already identical there (the sampler shards by data-parallel rank).
            strategy.hybrid_configs["mp_configs"].need_broadcast_data = False
        return wrapped

    # ------------------------------------------------------------------------------- exact resume

    def train(self, resume_from_checkpoint=None, ignore_keys_for_eval=None):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint to resume from in {self.args.output_dir}")
        self._resume_rng_from = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None,
                             ignore_keys_for_eval=ignore_keys_for_eval)

    def _load_rng_state(self, checkpoint):
        self._resume_rng_from = None
        super()._load_rng_state(checkpoint)

    def training_step(self, model, inputs):
        # PaddleNLP restores a checkpoint's RNG states (python, numpy, paddle: dropout) only after skipping the
        # trained batches of a partly trained epoch; resumed at an epoch boundary it never did, and dropout drew
        # other masks than the uninterrupted run. Nothing draws random numbers between the save and this step.
        if self._resume_rng_from is not None:
            if self.state.global_step > 0:  # the trainer state was loaded: a real resume
                self._load_rng_state(self._resume_rng_from)
            self._resume_rng_from = None
        return super().training_step(model, inputs)

    # --------------------------------------------------------------------------- atomic checkpoints

    def _save_checkpoint(self, model, metrics=None):
        """PaddleNLP's checkpoint, written to OUTPUT_DIR/tmp-checkpoint-N, then renamed to checkpoint-N."""
        if self.args.unified_checkpoint and "async_save" in (self.args.unified_checkpoint_config or []):
            return super()._save_checkpoint(model, metrics)  # files still being written after return: no rename
        run_dir = self.args.output_dir
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final, partial = os.path.join(run_dir, name), os.path.join(run_dir, PARTIAL_PREFIX + name)
        renames = self.args.local_rank <= 0  # one process per machine (per disk)
        if renames:
            for leftover in glob.glob(os.path.join(run_dir, f"{PARTIAL_PREFIX}{PREFIX_CHECKPOINT_DIR}-*")):
                logger.warning(f"removing {leftover}: an incomplete checkpoint left by an interrupted run")
                shutil.rmtree(leftover, ignore_errors=True)
        self._barrier()
        # `_save_checkpoint` names its folder from this module global at call time; rotation waits for the rename.
        paddlenlp_trainer.PREFIX_CHECKPOINT_DIR = PARTIAL_PREFIX + PREFIX_CHECKPOINT_DIR
        self._rotation_paused = True
        try:
            super()._save_checkpoint(model, metrics)
        finally:
            paddlenlp_trainer.PREFIX_CHECKPOINT_DIR = PREFIX_CHECKPOINT_DIR
            self._rotation_paused = False
        if self.state.best_model_checkpoint == partial:
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                self.state.save_to_json(os.path.join(partial, TRAINER_STATE_NAME))
        self._barrier()
        if renames:
            _replace_directory(partial, final)
        self._barrier()
        # PaddleNLP rotates only where local_rank == 0, i.e. never in a one-process run: --save_total_limit was ignored.
        rotates = self.dp_group.rank <= 0 if self.args.use_hybrid_parallel else self.args.should_save_model_state
        if rotates and renames:
            self._rotate_checkpoints(use_mtime=True, output_dir=run_dir)

    def _rotate_checkpoints(self, use_mtime=False, output_dir=None) -> None:
        if not self._rotation_paused:
            super()._rotate_checkpoints(use_mtime=use_mtime, output_dir=output_dir)

    def _barrier(self) -> None:
        if self.args.world_size > 1:
            paddle.distributed.barrier()

    def compute_loss(self, model, inputs, return_outputs=False):
        smoothing = self.label_smoothing if model.training else 0.0
        # Only the loss is used: the vocabulary projection runs on the target positions alone.
        outputs = model(**inputs, label_smoothing=smoothing, loss_positions_only=True)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def create_scheduler(self, num_training_steps: int):
        if self.args.lr_scheduler_type != SchedulerType.LINEAR:  # cosine, constant, polynomial, ...: PaddleNLP's
            return super().create_scheduler(num_training_steps)
        if self.lr_scheduler is None:
            warmup = self.args.warmup_steps or int(self.args.warmup_ratio * num_training_steps)
            # PaddleNLP's polynomial schedule with power 1 is exactly warm-up + linear decay to lr_end.
            self.lr_scheduler = get_scheduler(
                "polynomial", learning_rate=self.args.learning_rate, num_warmup_steps=warmup,
                num_training_steps=num_training_steps, lr_end=self.args.learning_rate * self.lr_decay_ratio, power=1.0,
            )
        return self.lr_scheduler

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval", max_eval_iters=-1):
        # Only the loss is needed from the Trainer's loop: gathering [B, S, V] logits would waste memory.
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only=True, ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix, max_eval_iters=max_eval_iters,
        )
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None:
            output.metrics[f"{metric_key_prefix}_ppl"] = math.exp(min(loss, 50.0))
        dataset = dataloader.dataset
        if self.decoding is not None and isinstance(dataset, GLMDataset):
            output.metrics.update(self.decode_and_score(dataset, metric_key_prefix))
        return output

    def decode_and_score(self, dataset: GLMDataset, prefix: str = "eval") -> Dict[str, float]:
        """Decode every prompt of `dataset`, write the predictions file, return BLEU-4 / ROUGE (%)."""
        predictions = []
        batch_size = self.args.per_device_eval_batch_size
        batches = range(0, len(dataset.prompts), batch_size)
        for start in tqdm(batches, desc=f"decoding ({self.decoding.decode_strategy})",
                          disable=self.args.disable_tqdm or not self.is_world_process_zero()):
            result = generate(self.model, dataset.prompts[start:start + batch_size], self.decoding)
            per_prompt = self.decoding.num_return_sequences
            predictions += [self.template.response(seq) for seq in result.sequences[::per_prompt]]
        metrics = {f"{prefix}_{name}": value for name, value in generation_metrics(predictions, dataset.references).items()}
        if self.is_world_process_zero():
            self._write_predictions(dataset, predictions, f"{prefix}_predictions.jsonl")
        return metrics

    def _write_predictions(self, dataset: GLMDataset, predictions, name: str) -> None:
        records = (
            {"source": source, "reference": reference, "prediction": prediction}
            for source, reference, prediction in zip(dataset.sources, dataset.targets, predictions)
        )
        write_json_lines(records, os.path.join(self.args.output_dir, name))


def _replace_directory(partial: str, final: str) -> None:
    """Rename the complete `partial` folder to `final`; an older `final` (a rerun from an earlier checkpoint) is
    moved aside first and deleted after."""
    try:
        os.rename(partial, final)
        return
    except FileNotFoundError:
        return  # another machine sharing this disk renamed it
    except OSError:
        if not os.path.isdir(final):
            raise
    stale = os.path.join(os.path.dirname(final), f"{PARTIAL_PREFIX}{os.path.basename(final)}.old")
    shutil.rmtree(stale, ignore_errors=True)
    os.rename(final, stale)
    os.rename(partial, final)
    shutil.rmtree(stale, ignore_errors=True)
