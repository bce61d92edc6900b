"""The pre-training recipe behind `pretrain.py`: GLM's blank infilling (or the family's causal LM) on preprocessed
corpora, on PaddleNLP's Trainer and Paddle's distributed engine.

Reads top to bottom: arguments -> model family -> objective -> blended samples -> model -> trainer -> train ->
checkpoint. What a flag controls:
- `--data_path [WEIGHT] PREFIX ...` corpora written by `python -m paddle_glm.preprocess`, blended by weight;
  `--max_seq_length` (512, THUDM's glm-large-chinese recipe) tokens a sample, before the spans part B adds;
- `--preset glm-large-chinese | glm-10b-chinese | glm-10b` THUDM's task mix, or `--bert_prob`,
  `--gap_sentence_prob`, `--avg_block_length`, `--gpt_min_ratio` one by one (a flag given wins over the preset);
  families other than GLM train a plain causal LM on the same samples (their `Family.pretraining_objective`);
- TrainingArguments as in fine-tuning: `--tensor_parallel_degree`, data parallelism over the remaining processes
  of `python -m paddle.distributed.launch`, `--sharding stage1|stage2` (with `--sharding_parallel_degree`),
  `--recompute`, `--fp16`/`--bf16` on GPU, `--max_steps`, `--save_steps`, `--resume_from_checkpoint`.
Logs add `tokens_per_second` (the global batch's tokens) and `mfu` (`paddle_glm.flops`, against a matmul peak each
process measures at the start) to the Trainer's loss lines; the run ends with `OUTPUT_DIR/training_curves.png` and
a checkpoint (model, tokenizer) that `finetune_generation.py --model_name_or_path OUTPUT_DIR` fine-tunes.
Run with no arguments it pre-trains the bundled tiny demo GLM on a generated corpus for a couple of CPU minutes.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
from paddlenlp.trainer import PdArgumentParser, TrainingArguments, get_last_checkpoint

from .args import VERBOSE_HELP, check, default_device, exit_on_bad_input, set_device
from .blocklm import PRESETS, BlankInfilling, BlockLMConfig, CausalLM
from .curves import CURVES_NAME, plot_training_curves
from .demo import DEMO_CONFIG_DIR
from .finetune import check_precision
from .flops import linear_weights, matmul_peak, step_flops
from .inputs import Collator
from .logs import configure as configure_logs, logger
from .models import family_of
from .pretrain_data import BlendedSamples, Corpus, PretrainDataset, parse_data_path, sampler
from .pretrain_demo import prepare_pretrain_demo
from .trainer import GLMTrainer

__all__ = ["PretrainArguments", "PretrainTrainer", "parse_arguments", "build_objective", "build_dataset", "main"]

DEMO_ARGUMENTS = os.path.join(DEMO_CONFIG_DIR, "pretrain_argument.json")
PEAK_SIZE = 1024  # the logged MFU's matmul peak: a 1024^3 float32 matmul, a fraction of a second on a CPU


@dataclass
class PretrainArguments:
    model_name_or_path: str = field(
        default=None, metadata={"help": "The model to pre-train: a checkpoint directory (config, weights, tokenizer)."}
    )
    data_path: List[str] = field(
        default_factory=list,
        metadata={"help": "PREFIX, or WEIGHT PREFIX pairs (--data_path 0.7 data/a 0.3 data/b): corpora written by "
                          "python -m paddle_glm.preprocess, blended by weight."},
    )
    max_seq_length: int = field(default=512, metadata={"help": "Tokens a packed sample holds ([CLS] included)."})
    preset: Optional[str] = field(
        default=None,
        metadata={"help": f"THUDM's task mix by model: {', '.join(PRESETS)} (default glm-large-chinese's)."},
    )
    bert_prob: Optional[float] = field(default=None, metadata={"help": "Share of samples with [MASK] token spans."})
    gap_sentence_prob: Optional[float] = field(
        default=None, metadata={"help": "Share of samples with [sMASK] sentence spans (the rest: one [gMASK] suffix)."}
    )
    avg_block_length: Optional[float] = field(default=None, metadata={"help": "Poisson mean of token-span lengths."})
    gpt_min_ratio: Optional[float] = field(
        default=None, metadata={"help": "Shortest [gMASK] suffix, as a share of the sample."}
    )
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing of the training loss."})
    lr_decay_ratio: float = field(
        default=0.1, metadata={"help": "With --lr_scheduler_type linear: decay to this fraction of --learning_rate."}
    )
    merge_tensor_parallel: bool = field(
        default=False, metadata={"help": "Write the final model whole, not as one shard per tensor-parallel rank."}
    )
    use_flash_attention: bool = field(default=False, metadata={"help": "Fused attention (flash attention on GPU)."})
    prepare_demo: bool = field(
        default=False,
        metadata={"help": "Write the demo corpus, its token files and the tiny GLM at --data_path and "
                          "--model_name_or_path when they are missing."},
    )
    verbose: bool = field(default=False, metadata={"help": VERBOSE_HELP})

    def blocklm_config(self) -> BlockLMConfig:
        values = dict(PRESETS[self.preset or "glm-large-chinese"])
        for name in ("bert_prob", "gap_sentence_prob", "avg_block_length", "gpt_min_ratio"):
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        return BlockLMConfig(**values)

    def __post_init__(self):
        problems = []
        if not self.model_name_or_path:
            problems.append("--model_name_or_path is required")
        if not self.data_path:
            problems.append("--data_path is required (write corpora with python -m paddle_glm.preprocess)")
        if self.max_seq_length < 8:
            problems.append(f"--max_seq_length {self.max_seq_length}: must be at least 8")
        if self.preset is not None and self.preset not in PRESETS:
            problems.append(f"--preset {self.preset}: choose one of {', '.join(PRESETS)}")
        else:
            problems += self.blocklm_config().problems()
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append(f"--label_smoothing {self.label_smoothing}: must be in [0, 1)")
        check(problems)


def parse_arguments(argv: List[str]):
    """Flags, or a JSON file of flags followed by flags that override it, or (no arguments) the demo's JSON."""
    parser = PdArgumentParser((PretrainArguments, TrainingArguments))
    parser.set_defaults(device=default_device(), do_train=True)
    if not argv:
        logger.info(f"no arguments: running the bundled pre-training demo ({DEMO_ARGUMENTS})")
        argv = [DEMO_ARGUMENTS]
    if argv[0].endswith(".json"):
        argv = parser.read_json(argv[0]) + list(argv[1:])
    return parser.parse_args_into_dataclasses(args=argv)


def build_objective(family, tokenizer, args: PretrainArguments):
    """The family's pre-training objective: GLM's blank infilling, or a causal LM in the family's format."""
    if family.pretraining_objective == "blank_infilling":
        return BlankInfilling.from_tokenizer(tokenizer, args.blocklm_config())
    return CausalLM(family.template(tokenizer))


def build_dataset(args: PretrainArguments, objective, training_args: TrainingArguments) -> PretrainDataset:
    """The run's samples: --max_steps global batches (or every sample of the corpora once, in whole batches)."""
    corpora = [(weight, Corpus(prefix)) for weight, prefix in parse_data_path(args.data_path)]
    length = args.max_seq_length - objective.prefix_length
    global_batch = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                    * training_args.dataset_world_size)
    if training_args.max_steps > 0:
        size = training_args.max_steps * global_batch
    else:
        size = math.ceil(sum(corpus.num_samples(length) for _, corpus in corpora) / global_batch) * global_batch
    samples = BlendedSamples([c for _, c in corpora], [w for w, _ in corpora], length, size, training_args.seed)
    described = ", ".join(f"{c.prefix} ({c.documents} documents, {c.num_tokens} tokens, {c.num_samples(length)} "
                          f"samples, weight {w:g})" for w, c in corpora)
    logger.info(f"pre-training on {size} samples of {args.max_seq_length} tokens from {described}")
    return PretrainDataset(samples, objective)


class PretrainTrainer(GLMTrainer):
    """GLMTrainer (atomic checkpoints, exact resume, the loss on the scored positions only) over pre-training samples,
    logging tokens/s and MFU with the loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.model.config
        degree = max(1, self.args.tensor_parallel_degree)
        self.shape = dict(weights=linear_weights(self.model, config.vocab_size, degree), hidden=config.hidden_size,
                          layers=family_of(config).num_layers(config), vocab=config.vocab_size)
        self.peak = matmul_peak(PEAK_SIZE)
        self._interval = None  # (start time, tokens, FLOPs) since the last log

    def _get_train_sampler(self):
        args = self.args
        return sampler(self.train_dataset, args.per_device_train_batch_size, args.dataset_world_size,
                       args.dataset_rank, args.max_steps, args.num_train_epochs, args.gradient_accumulation_steps)

    def training_step(self, model, inputs):
        loss_mask = inputs["loss_mask"].numpy()
        scored = [np.flatnonzero(row) for row in loss_mask]
        lengths = [int(row[-1]) + 1 for row in scored if len(row)]  # a sample's positions up to its last scored one
        flops = step_flops(lengths=lengths, projected=int(sum(len(row) for row in scored)), **self.shape)
        if self._interval is None:
            self._interval = (time.perf_counter(), 0, 0.0)
        start, tokens, total = self._interval
        self._interval = (start, tokens + int(inputs["input_ids"].size), total + flops)
        return super().training_step(model, inputs)

    def log(self, logs, **kwargs) -> None:
        if "loss" in logs and self._interval is not None:
            start, tokens, flops = self._interval
            elapsed = max(time.perf_counter() - start, 1e-9)
            ranks = self.args.dataset_world_size  # each data-parallel rank counted its own batches
            logs["tokens_per_second"] = round(tokens * ranks / elapsed, 1)
            logs["mfu"] = round(flops * ranks / elapsed / (self.peak * max(1, self.args.world_size)), 4)
            self._interval = None
        super().log(logs, **kwargs)


@exit_on_bad_input
def main(argv: Optional[List[str]] = None) -> None:
    configure_logs(argv)
    args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    check_precision(training_args)
    set_device(training_args.device)
    if args.prepare_demo:
        prepare_pretrain_demo(args.model_name_or_path, parse_data_path(args.data_path)[0][1], seed=training_args.seed)

    family = family_of(args.model_name_or_path)
    tokenizer = family.load_tokenizer(args.model_name_or_path)
    check_against_model(family, family.config_class.from_pretrained(args.model_name_or_path), tokenizer, args,
                        training_args)
    model = family.model_class.from_pretrained(
        args.model_name_or_path, tensor_parallel_degree=training_args.tensor_parallel_degree,
        tensor_parallel_rank=training_args.tensor_parallel_rank, use_flash_attention=args.use_flash_attention,
    )
    objective = build_objective(family, tokenizer, args)
    trainer = PretrainTrainer(
        model=model, args=training_args, train_dataset=build_dataset(args, objective, training_args),
        tokenizer=tokenizer, data_collator=Collator(family.template(tokenizer).pad_id),
        label_smoothing=args.label_smoothing, lr_decay_ratio=args.lr_decay_ratio,
    )
    train(trainer, args, training_args)


def check_against_model(family, config, tokenizer, args: PretrainArguments, training_args) -> None:
    problems = []
    if len(tokenizer) > config.vocab_size:
        problems.append(f"the tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size} embeddings")
    if args.max_seq_length > family.max_positions(config):
        problems.append(f"--max_seq_length {args.max_seq_length} exceeds the model's {family.max_positions(config)} "
                        "positions: lower it")
    if training_args.tensor_parallel_degree > 1:
        problems += family.tensor_parallel_problems(config, training_args.tensor_parallel_degree)
    problems += sharding_problems(training_args.sharding, training_args.device)
    resume = training_args.resume_from_checkpoint
    if resume and not os.path.isfile(os.path.join(resume, "trainer_state.json")):
        problems.append(f"--resume_from_checkpoint {resume}: not a checkpoint (no trainer_state.json); give an "
                        "OUTPUT_DIR/checkpoint-N directory")
    check(problems)


def sharding_problems(sharding, device: str) -> List[str]:
    """Paddle's group-sharded stages 2 and 3 assert a GPU, XPU or custom device; stage 1 (the sharded optimizer
    state) runs on CPU too."""
    stages = sorted({str(getattr(option, "value", option)) for option in sharding or []} & {"stage2", "stage3"})
    if stages and device == "cpu":
        return [f"--sharding {stages[0]} needs a GPU or XPU (Paddle's group-sharded {stages[0]} has no CPU path): "
                "use --sharding stage1 on CPU"]
    return []


def train(trainer: PretrainTrainer, args: PretrainArguments, training_args: TrainingArguments) -> None:
    """Train (resuming from the last checkpoint of OUTPUT_DIR unless --overwrite_output_dir), save the model and
    tokenizer, the metrics and the curves."""
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None and os.path.isdir(training_args.output_dir) and not training_args.overwrite_output_dir:
        checkpoint = get_last_checkpoint(training_args.output_dir)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(merge_tensor_parallel=args.merge_tensor_parallel)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if len(losses) > 1:
        logger.info(f"training loss {losses[0]:.3f} (first log) -> {losses[-1]:.3f} (last log)")
    logger.info(f"model written to {training_args.output_dir} (fine-tune it with finetune_generation.py "
                f"--model_name_or_path {training_args.output_dir})")
    curves = os.path.join(training_args.output_dir, CURVES_NAME)
    if trainer.is_world_process_zero() and plot_training_curves(trainer.state.log_history, curves):
        logger.info(f"training curves written to {curves}")
