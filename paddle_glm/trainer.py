"""`GLMTrainer`: PaddleNLP's Trainer with GLM's loss settings and evaluation that really decodes.

The reference example's evaluation decodes greedily for 20 tokens whatever `--num_beams` says.
Here evaluation computes the unsmoothed loss and perplexity with the Trainer's own loop, then
decodes every evaluation prompt with the user's decoding settings (`paddle_glm.decoding`), scores
BLEU-4 / ROUGE on characters and writes `OUTPUT_DIR/<prefix>_predictions.jsonl`.
"""
from __future__ import annotations

import math
import os
from typing import Dict, Optional

from paddlenlp.trainer import Trainer
from paddlenlp.trainer.trainer_utils import get_scheduler
from tqdm import tqdm

from .data import GLMDataset, write_json_lines
from .decoding import DecodingConfig
from .generation import generate
from .metrics import generation_metrics

__all__ = ["GLMTrainer"]


class GLMTrainer(Trainer):
    """Trainer for GLM blank infilling.

    - `label_smoothing` applies to the training loss only, so `eval_loss` and `eval_ppl` stay true
      negative log-likelihoods;
    - the learning rate warms up, then decays linearly to `lr_decay_ratio` x its peak;
    - `decoding` (a `DecodingConfig`) drives generation in `evaluate`; None skips it.
    """

    def __init__(self, *args, label_smoothing: float = 0.0, lr_decay_ratio: float = 0.1,
                 decoding: Optional[DecodingConfig] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_smoothing = label_smoothing
        self.lr_decay_ratio = lr_decay_ratio
        self.decoding = decoding

    def compute_loss(self, model, inputs, return_outputs=False):
        smoothing = self.label_smoothing if model.training else 0.0
        outputs = model(**inputs, label_smoothing=smoothing)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def create_scheduler(self, num_training_steps: int):
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
            predictions += [self.tokenizer.decode(seq, skip_special_tokens=True) for seq in result.sequences[::per_prompt]]
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
