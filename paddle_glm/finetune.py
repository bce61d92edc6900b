"""The fine-tuning recipe behind `finetune_generation.py` and `finetune_instruction_generation.py`.

Reads top to bottom: arguments -> task -> data -> model (+ LoRA or a P-Tuning v2 prefix) -> trainer -> train /
evaluate / predict -> checkpoint (+ merged LoRA). Run with no arguments it uses the bundled demo arguments.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Tuple

import paddle
from paddlenlp.trainer import PdArgumentParser, TrainingArguments, get_last_checkpoint

from tasks import get_task

from .args import (
    FLAG_ALIASES, DataArguments, GenerationArguments, InputError, ModelArguments, check, default_device,
    exit_on_bad_input, set_device,
)
from .curves import CURVES_NAME, plot_training_curves
from .data import read_pairs, summarize_skipped, tokenize_pairs, write_json_lines
from .demo import DEMO_CONFIG_DIR, prepare_demo
from .inputs import Collator
from .logs import configure as configure_logs, logger
from .lora import add_lora, merged_model
from .models import family_of
from .prefix import add_prefix
from .named_data import load_named_pairs, named_data_set
from .trainer import GLMTrainer

__all__ = ["parse_arguments", "main"]

SKIPPED_NAME = "skipped_examples.jsonl"  # --skip_invalid_examples: file, line and reason of every skipped line
Arguments = Tuple[ModelArguments, DataArguments, GenerationArguments, TrainingArguments]


def parse_arguments(argv: List[str], demo_arguments: str, task_name: str = "dureader_qg") -> Arguments:
    """Flags, or a JSON file of flags followed by flags that override it, or (no arguments) the demo's JSON."""
    parser = PdArgumentParser((ModelArguments, DataArguments, GenerationArguments, TrainingArguments))
    parser.set_defaults(task_name=task_name, device=default_device())
    if not argv:
        logger.info(f"no arguments: running the bundled demo ({demo_arguments})")
        argv = [demo_arguments]
    if argv[0].endswith(".json"):
        argv = parser.read_json(argv[0]) + list(argv[1:])  # later flags win
    argv = [FLAG_ALIASES.get(arg, arg) for arg in argv]
    model_args, data_args, gen_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    # TrainingArguments forgets --tensor_parallel_degree in a single process; keep the value asked for, so that
    # one that cannot split the model is refused before a multi-process launch would find out.
    requested = argparse.ArgumentParser(add_help=False)
    requested.add_argument("--tensor_parallel_degree", type=int, default=-1)
    training_args.requested_tensor_parallel_degree = requested.parse_known_args(argv)[0].tensor_parallel_degree
    return model_args, data_args, gen_args, training_args


@exit_on_bad_input
def main(argv: Optional[List[str]] = None, demo: str = "finetune_argument.json", task_name: str = "dureader_qg") -> None:
    configure_logs(argv)
    model_args, data_args, gen_args, training_args = parse_arguments(
        sys.argv[1:] if argv is None else argv, os.path.join(DEMO_CONFIG_DIR, demo), task_name
    )
    check_precision(training_args)
    set_device(training_args.device)
    task = get_task(data_args.task_name)
    if model_args.prepare_demo:
        prepare_demo(model_args.model_name_or_path, data_args.train_file, data_args.dev_file,
                     kind=task.NAME if task.NAME in ("belle", "adgen") else "qg", seed=training_args.seed)

    family = family_of(model_args.model_name_or_path)
    tokenizer = family.load_tokenizer(model_args.model_name_or_path)
    template = family.template(tokenizer)
    check_against_model(family, family.config_class.from_pretrained(model_args.model_name_or_path), tokenizer,
                        data_args, gen_args, training_args, model_args)
    model = family.model_class.from_pretrained(
        model_args.model_name_or_path,
        tensor_parallel_degree=training_args.tensor_parallel_degree,
        tensor_parallel_rank=training_args.tensor_parallel_rank,
        use_flash_attention=model_args.use_flash_attention,
    )
    if model_args.lora:
        model = add_lora(model, model_args)
    elif model_args.prefix_tuning:
        paddle.seed(training_args.seed)  # a new prefix starts from --seed (the Trainer seeds only once it is built)
        model = add_prefix(model, model_args)

    datasets = load_datasets(task, data_args, template, training_args)
    trainer = GLMTrainer(
        model=model,
        args=training_args,
        train_dataset=datasets.get("train"),
        eval_dataset=datasets.get("dev"),
        tokenizer=tokenizer,
        data_collator=Collator(template.pad_id),
        label_smoothing=model_args.label_smoothing,
        lr_decay_ratio=model_args.lr_decay_ratio,
        decoding=gen_args.decoding_config(template, max_length=data_args.tgt_length),
        template=template,
    )
    run(trainer, model_args, datasets, training_args)


def check_precision(training_args: TrainingArguments) -> None:
    """--fp16 needs a GPU: PaddleNLP would crash deep inside AMP on a CPU."""
    if training_args.fp16 and training_args.device == "cpu":
        check(["--fp16 needs a GPU (this Paddle runs on the CPU: it is compiled without CUDA or --device cpu was "
               "given): drop --fp16, training then runs in float32"])


def check_against_model(family, config, tokenizer, data_args, gen_args, training_args, model_args=None) -> None:
    """Refuse flag values the model (its family and `config`) cannot serve, before any work starts."""
    problems = []
    if model_args is not None and model_args.prefix_tuning and training_args.recompute:
        problems.append("--recompute with --prefix_tuning: recomputed layers run without their cache, so they would "
                        "drop the prefix; train the prefix without --recompute")
    if len(tokenizer) > config.vocab_size:
        problems.append(f"the tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size} embeddings")
    positions = family.max_positions(config)
    if data_args.tgt_length >= positions:
        problems.append(f"--tgt_length {data_args.tgt_length} exceeds the model's {positions} positions: lower it")
    elif data_args.src_length + data_args.tgt_length > positions:
        problems.append(
            f"--src_length {data_args.src_length} + --tgt_length {data_args.tgt_length} exceeds the model's "
            f"{positions} positions: lower one of them"
        )
    if gen_args.min_tgt_length > data_args.tgt_length:
        problems.append(f"--min_tgt_length {gen_args.min_tgt_length} exceeds --tgt_length {data_args.tgt_length}")
    if training_args.do_train and not data_args.train_file and not named_data_set(data_args.task_name,
                                                                                     data_args.data_name):
        problems.append("--do_train needs --train_file (JSON lines)")
    degree = max(training_args.tensor_parallel_degree, getattr(training_args, "requested_tensor_parallel_degree", -1))
    if degree > 1:
        problems += family.tensor_parallel_problems(config, degree)
    resume = training_args.resume_from_checkpoint
    if training_args.do_train and resume and not os.path.isfile(os.path.join(resume, "trainer_state.json")):
        problems.append(f"--resume_from_checkpoint {resume}: not a checkpoint (no trainer_state.json); give an "
                        f"OUTPUT_DIR/checkpoint-N directory")
    check(problems)


def load_datasets(task, data_args: DataArguments, template, training_args) -> dict:
    """Tokenized splits that the run needs: train (--do_train), dev (--do_eval), test (--do_predict)."""
    wanted = {
        "train": (training_args.do_train, data_args.train_file, data_args.max_train_samples),
        "dev": (training_args.do_eval, data_args.dev_file, data_args.max_eval_samples),
        "test": (training_args.do_predict, data_args.test_file, data_args.max_eval_samples),
    }
    datasets, all_skipped = {}, []
    named = named_data_set(data_args.task_name, data_args.data_name)
    for split, (needed, path, limit) in wanted.items():
        if not needed:
            continue
        skipped = [] if data_args.skip_invalid_examples else None
        if path:
            pairs = read_pairs(path, lambda record, where: task.to_pairs(record, where, data_args), limit, skipped)
        elif named and split != "test":
            pairs = load_named_pairs(named, split, lambda record, where: task.to_pairs(record, where, data_args), limit)
        else:
            raise InputError(f"--do_{'eval' if split == 'dev' else 'predict'} needs --{split}_file (JSON lines)")
        if skipped:
            logger.warning(f"{split}: skipped {len(skipped)} invalid lines of {path} (--skip_invalid_examples): "
                           f"{summarize_skipped(skipped)}; each is listed in {training_args.output_dir}/{SKIPPED_NAME}")
            all_skipped += skipped
        datasets[split] = tokenize_pairs(pairs, template, data_args.src_length, data_args.tgt_length)
        logger.info(f"{split}: {len(pairs)} examples")
    if data_args.skip_invalid_examples and training_args.should_save:
        write_json_lines(all_skipped, os.path.join(training_args.output_dir, SKIPPED_NAME))
    return datasets


def run(trainer: GLMTrainer, model_args: ModelArguments, datasets: dict, training_args: TrainingArguments) -> None:
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint
        if checkpoint is None and os.path.isdir(training_args.output_dir) and not training_args.overwrite_output_dir:
            checkpoint = get_last_checkpoint(training_args.output_dir)
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model(merge_tensor_parallel=model_args.merge_tensor_parallel)
        saved = "LoRA adapter" if model_args.lora else "prefix" if model_args.prefix_tuning else "model"
        logger.info(f"{saved} written to {training_args.output_dir}")
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        if model_args.merge_lora:
            save_merged(trainer, training_args.output_dir, model_args.merge_tensor_parallel)
    for split, prefix in (("dev", "eval"), ("test", "test")):
        if split in datasets:
            metrics = trainer.evaluate(datasets[split], metric_key_prefix=prefix)
            trainer.log_metrics(prefix, metrics)
            trainer.save_metrics(prefix, metrics)
            logger.info(f"{prefix} predictions and scores written to "
                        f"{os.path.join(training_args.output_dir, prefix + '_predictions.jsonl')}, {prefix}_results.json")
    curves = os.path.join(training_args.output_dir, CURVES_NAME)
    if training_args.do_train and trainer.is_world_process_zero() and plot_training_curves(trainer.state.log_history,
                                                                                           curves):
        logger.info(f"training curves written to {curves}")


def save_merged(trainer: GLMTrainer, output_dir: str, merge_tensor_parallel: bool = False) -> None:
    """Write the base model with the adapter folded in (loads without LoRA) to OUTPUT_DIR/merged: under tensor
    parallelism one shard per rank, or one whole checkpoint with `merge_tensor_parallel`."""
    merged_dir = os.path.join(output_dir, "merged")
    base = merged_model(trainer.model)  # this rank's shard: adapters fold into weight shards alike
    if trainer.args.should_save_model_state:
        base.save_pretrained(merged_dir, merge_tensor_parallel=merge_tensor_parallel,
                             is_main_process=trainer.args.should_save)
    if trainer.is_world_process_zero():
        trainer.tokenizer.save_pretrained(merged_dir)
        logger.info(f"merged LoRA model written to {merged_dir}")
