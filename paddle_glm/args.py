"""Command-line arguments of the fine-tuning scripts, as dataclasses for PaddleNLP's `PdArgumentParser`.

Names and defaults follow PaddleNLP's GLM example (`--src_length 608`, `--num_beams 5`, ...), so its
users' commands keep working. Each dataclass checks its own fields in `__post_init__` and reports
every problem at once, naming the flag and the fix.
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from .decoding import STRATEGIES, DecodingConfig
from .host_memory import keep_freed_memory
from .strided_views import contiguous_views

__all__ = [
    "VERBOSE_HELP", "default_device", "set_device", "cpu_cores", "ModelArguments", "DataArguments", "GenerationArguments", "FLAG_ALIASES", "InputError", "check",
    "exit_on_bad_input",
]

# Extra spellings accepted on the command line (and in JSON argument files): alias -> flag.
FLAG_ALIASES = {"--r": "--lora_rank", "--ptuning": "--prefix_tuning"}


VERBOSE_HELP = "Show every log line of PaddleNLP and Paddle (default: progress, metrics, output paths, warnings)."


def default_device() -> str:
    """gpu (or xpu) when Paddle is compiled for it and one is visible, else cpu: the reference's commands run
    unchanged on a CPU build, where PaddleNLP's default --device gpu stops them."""
    try:
        import paddle
    except ImportError:  # the FastDeploy environment has no paddle
        return "cpu"
    if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        return "gpu"
    if paddle.is_compiled_with_xpu() and paddle.device.xpu.device_count() > 0:
        return "xpu"
    return "cpu"


def set_device(device: str, all_cores: bool = False) -> None:
    """`paddle.set_device(device)`, and on CPU freed host memory kept for reuse (`host_memory`) and transposes
    copied by Paddle's kernels, not its strided copy (`strided_views`): where every entry point that trains, scores
    or predicts in dynamic graph starts.

    `all_cores` (the entry points that only predict or score): Paddle's CPU math library gets every core this
    process may use, shared among the processes `paddle.distributed.launch` started on the machine, instead of
    Paddle's default of one thread (on 2 cores the output projection of a glm-large-shaped decode step, one row:
    20 -> 9 ms). Training keeps Paddle's default, which its benchmarks measure."""
    import paddle

    paddle.set_device(device)
    device = paddle.get_device()
    keep_freed_memory(device)
    contiguous_views(device)
    if all_cores and device.startswith("cpu"):
        paddle.base.core.set_num_threads(cpu_cores())


def cpu_cores() -> int:
    """Cores this process may use, divided among the processes `paddle.distributed.launch` runs on this machine."""
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("PADDLE_LOCAL_SIZE", "1")))


class InputError(ValueError):
    """Bad flags or input files (a `ValueError`); the message names the flag or `file:line` and the fix."""


def check(problems: List[str]) -> None:
    """Raise one InputError listing every problem found."""
    if problems:
        raise InputError("invalid arguments:\n  - " + "\n  - ".join(problems))


# What a script run reports as bad input rather than as a crash: our checks (`InputError`, `DataError`), every
# other `ValueError` raised while checking flags (PaddleNLP's `TrainingArguments` too) and unusable paths.
BAD_INPUT = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def exit_on_bad_input(main: Callable) -> Callable:
    """Decorate a script's `main(argv=None, ...)`: run as a script (argv None: flags from `sys.argv`), bad input
    ends it with `error: <message>` on stderr and exit status 2 (argparse's convention) instead of a
    traceback, and Ctrl-C with `interrupted` and status 130. Called with an argv list (from Python, tests),
    the exception propagates unchanged."""

    @functools.wraps(main)
    def run(argv: Optional[List[str]] = None, *args, **kwargs):
        if argv is not None:
            return main(argv, *args, **kwargs)
        try:
            return main(argv, *args, **kwargs)
        except BAD_INPUT as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted (files already written are complete: checkpoints and outputs are written "
                  "atomically)", file=sys.stderr)
            raise SystemExit(130) from None

    return run


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="THUDM/glm-large-chinese",
        metadata={"help": "A PaddleNLP GLM name (downloads when online) or a checkpoint directory."},
    )
    label_smoothing: float = field(
        default=0.1, metadata={"help": "Label smoothing of the training loss (evaluation loss is unsmoothed)."}
    )
    lr_decay_ratio: float = field(
        default=0.1,
        metadata={"help": "With --lr_scheduler_type linear (the default): after warm-up the learning rate decays linearly "
                          "to this fraction of --learning_rate (0: to zero, PaddleNLP's linear schedule). Other "
                          "--lr_scheduler_type values are PaddleNLP's schedules."},
    )
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r (also accepted as --r)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha: adapters are scaled by alpha / rank."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: Optional[List[str]] = field(
        default=None,
        metadata={"help": "Regular expressions of the linear layers that get adapters (full sublayer names); default: "
                          "the family's (every family: the fused QKV projection, '.*query_key_value.*')."},
    )
    lora_path: Optional[str] = field(
        default=None, metadata={"help": "Continue training (or evaluate) an existing LoRA adapter directory."}
    )
    merge_lora: bool = field(
        default=False,
        metadata={"help": "With --lora: also write the base model with the adapter merged to OUTPUT_DIR/merged."},
    )
    prefix_tuning: bool = field(
        default=False,
        metadata={"help": "P-Tuning v2 (also --ptuning): train a prefix of keys and values in every layer (the cache "
                          "every prompt starts from) instead of the weights, which stay frozen; the prefix is saved "
                          "alone (prefix_config.json + prefix_model_state.pdparams)."},
    )
    pre_seq_len: int = field(default=128, metadata={"help": "Prefix tokens (keys and values per layer)."})
    prefix_projection: bool = field(
        default=False,
        metadata={"help": "Reparameterise the prefix through a two-layer MLP (embedding -> linear -> tanh -> linear)."},
    )
    prefix_hidden_size: Optional[int] = field(
        default=None, metadata={"help": "Hidden width of --prefix_projection's MLP (default: the model's hidden size)."}
    )
    prefix_dropout: float = field(default=0.0, metadata={"help": "Dropout on the prefix keys and values in training."})
    prefix_path: Optional[str] = field(
        default=None, metadata={"help": "Continue training (or evaluate) an existing prefix directory."}
    )
    merge_tensor_parallel: bool = field(
        default=False,
        metadata={"help": "With --tensor_parallel_degree > 1: write the final model (or adapter, and OUTPUT_DIR/merged) "
                          "as one whole checkpoint instead of one shard per rank (*.tpXX.pdparams). Checkpoints "
                          "saved during training stay sharded, for --resume_from_checkpoint."},
    )
    use_flash_attention: bool = field(
        default=False, metadata={"help": "Use fused scaled-dot-product attention (flash attention on GPU)."}
    )
    prepare_demo: bool = field(
        default=False,
        metadata={"help": "Write the bundled demo data, sentencepiece model and tiny GLM to the paths given by "
                          "--train_file, --dev_file and --model_name_or_path when they are missing."},
    )
    verbose: bool = field(default=False, metadata={"help": VERBOSE_HELP})

    def __post_init__(self):
        problems = []
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append(f"--label_smoothing {self.label_smoothing}: must be in [0, 1)")
        if not 0.0 <= self.lr_decay_ratio <= 1.0:
            problems.append(f"--lr_decay_ratio {self.lr_decay_ratio}: must be in [0, 1]")
        if self.lora_rank < 1:
            problems.append(f"--lora_rank {self.lora_rank}: must be at least 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"--lora_dropout {self.lora_dropout}: must be in [0, 1)")
        if self.merge_lora and not self.lora:
            problems.append("--merge_lora needs --lora")
        if self.lora_path and not self.lora:
            problems.append(f"--lora_path {self.lora_path} needs --lora "
                            "(add --lora true to train or evaluate the adapter)")
        if self.lora and self.prefix_tuning:
            problems.append("--lora and --prefix_tuning: choose one way of training")
        if self.pre_seq_len < 1:
            problems.append(f"--pre_seq_len {self.pre_seq_len}: must be at least 1")
        if self.prefix_hidden_size is not None and self.prefix_hidden_size < 1:
            problems.append(f"--prefix_hidden_size {self.prefix_hidden_size}: must be at least 1")
        if not 0.0 <= self.prefix_dropout < 1.0:
            problems.append(f"--prefix_dropout {self.prefix_dropout}: must be in [0, 1)")
        if self.prefix_hidden_size is not None and not self.prefix_projection:
            problems.append("--prefix_hidden_size sizes --prefix_projection's MLP: add --prefix_projection")
        for name in ("prefix_projection", "prefix_path"):
            if getattr(self, name) not in (None, False) and not self.prefix_tuning:
                problems.append(f"--{name} needs --prefix_tuning (or --ptuning)")
        check(problems)


@dataclass
class DataArguments:
    task_name: str = field(
        default="dureader_qg",
        metadata={"help": "Task module of tasks/: dureader_qg, belle, adgen or jsonl; or a BELLE set of PaddleNLP's "
                          "'bellegroup' data set by name (school_math_0.25M, generated_chat_0.4M, train_2M_CN, "
                          "multiturn_chat_0.8M, ...: the belle task, downloaded unless --train_file/--dev_file are given)."},
    )
    data_name: Optional[str] = field(
        default=None,
        metadata={"help": "The reference's data set name: bellegroup (with a BELLE set as --task_name) or dureader_qg. "
                          "Downloads need network; local --train_file/--dev_file take precedence."},
    )
    train_file: Optional[str] = field(default=None, metadata={"help": "Training data, JSON lines."})
    dev_file: Optional[str] = field(default=None, metadata={"help": "Evaluation data, JSON lines."})
    test_file: Optional[str] = field(
        default=None, metadata={"help": "Test data, JSON lines: decoded and scored after training (--do_predict)."}
    )
    source_field: str = field(default="src", metadata={"help": "Source field of --task_name jsonl records."})
    target_field: str = field(default="tgt", metadata={"help": "Target field of --task_name jsonl records."})
    src_length: int = field(
        default=608,
        metadata={"help": "Maximum source tokens (with [CLS], [gMASK], <|endoftext|>); longer sources lose their end."},
    )
    tgt_length: int = field(
        default=160,
        metadata={"help": "Maximum target tokens in training (with <|endofpiece|>) and tokens generated in evaluation."},
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N training pairs."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N evaluation pairs."})
    skip_invalid_examples: bool = field(
        default=False,
        metadata={"help": "Skip data lines that are not valid examples instead of stopping at the first one; the "
                          "count and reasons are logged and every skipped line is listed (file, line, reason) in "
                          "OUTPUT_DIR/skipped_examples.jsonl."},
    )

    def __post_init__(self):
        problems = []
        if self.src_length < 4:
            problems.append(f"--src_length {self.src_length}: must be at least 4 ([CLS] text [gMASK] <|endoftext|>)")
        if self.tgt_length < 2:
            problems.append(f"--tgt_length {self.tgt_length}: must be at least 2")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"--{name} {value}: must be at least 1")
        check(problems)


@dataclass
class GenerationArguments:
    decode_strategy: str = field(
        default="beam_search",
        metadata={"help": "Decoding in evaluation: beam_search, greedy_search or sampling."},
    )
    num_beams: int = field(default=5, metadata={"help": "Beams of beam search."})
    length_penalty: float = field(
        default=0.7, metadata={"help": "Beam score = log-prob / ((5 + length) / 6) ** length_penalty."}
    )
    no_repeat_ngram_size: int = field(
        default=3, metadata={"help": "Never repeat an n-gram of this size within the generated text (0 = off)."}
    )
    min_tgt_length: int = field(default=55, metadata={"help": "Minimum generated tokens before <|endofpiece|>."})
    select_topk: bool = field(
        default=True,
        metadata={"help": "Beam search keeps the top-scoring candidates (true) or samples them (false), as the reference."},
    )
    top_k: int = field(default=0, metadata={"help": "Sampling: keep the k most likely tokens (0 = all)."})
    top_p: float = field(default=0.0, metadata={"help": "Sampling: nucleus probability mass (0 or 1 = off)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling: divide logits by this."})
    repetition_penalty: float = field(
        default=1.0, metadata={"help": "Penalise tokens already generated (1.0 = off)."}
    )
    seed_decoding: Optional[int] = field(default=None, metadata={"help": "Seed of sampling in evaluation."})
    num_return_sequences: int = field(
        default=1, metadata={"help": "Outputs per input (sampling, beam search); evaluation scores the best one."}
    )

    def __post_init__(self):
        """Refuse impossible decoding flags at parse time, naming the flag and the fix."""
        beam = self.decode_strategy == "beam_search"
        checks = [
            (self.decode_strategy not in STRATEGIES,
             f"--decode_strategy {self.decode_strategy}: choose one of {', '.join(STRATEGIES)}"),
            (self.num_beams < 1, f"--num_beams {self.num_beams}: must be at least 1"),
            (beam and self.num_beams == 1,
             "--num_beams 1: beam_search needs at least 2 beams (for one, use --decode_strategy greedy_search)"),
            (not 0.0 <= self.top_p <= 1.0, f"--top_p {self.top_p}: must lie in [0, 1] (0 or 1 = off)"),
            (self.top_k < 0, f"--top_k {self.top_k}: must be >= 0 (0 = off)"),
            (not self.temperature > 0.0, f"--temperature {self.temperature}: must be > 0 (1 = unchanged)"),
            (self.no_repeat_ngram_size < 0,
             f"--no_repeat_ngram_size {self.no_repeat_ngram_size}: must be >= 0 (0 = off)"),
            (self.min_tgt_length < 0, f"--min_tgt_length {self.min_tgt_length}: must be >= 0"),
            (not self.repetition_penalty > 0.0,
             f"--repetition_penalty {self.repetition_penalty}: must be > 0 (1 = off)"),
            (self.num_return_sequences < 1, f"--num_return_sequences {self.num_return_sequences}: must be at least 1"),
            (beam and self.num_beams >= 1 and self.num_return_sequences > self.num_beams,
             f"--num_return_sequences {self.num_return_sequences} exceeds --num_beams {self.num_beams}: "
             "beam search returns at most one sequence per beam"),
            (self.decode_strategy == "greedy_search" and self.num_return_sequences > 1,
             f"--num_return_sequences {self.num_return_sequences}: greedy_search gives one; "
             "use --decode_strategy sampling or beam_search"),
        ]
        check([message for bad, message in checks if bad])

    def decoding_config(self, template, max_length: int) -> DecodingConfig:
        """The decoding settings for `paddle_glm.decoding` with the family's stop and pad tokens (`template`, a
        `models.Template`), validated there."""
        config = DecodingConfig(
            decode_strategy=self.decode_strategy,
            num_beams=self.num_beams if self.decode_strategy == "beam_search" else 1,
            length_penalty=self.length_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            min_length=min(self.min_tgt_length, max_length),
            max_length=max_length,
            beam_candidates="top" if self.select_topk else "sample",
            top_k=self.top_k,
            top_p=self.top_p if 0.0 < self.top_p < 1.0 else 1.0,
            temperature=self.temperature,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed_decoding,
            num_return_sequences=self.num_return_sequences,
            eos_token_id=template.stop_ids,
            pad_token_id=template.pad_id,
            tokenizer_size=template.tokenizer_size,
        )
        config.validate()
        return config
