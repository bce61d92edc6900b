"""Benchmark evaluation (MMLU, C-Eval, CMMLU, COPA, any multiple-choice JSON lines) of a model of any family.

    python evaluate_generation.py --task mmlu --data_dir data/mmlu --model_name_or_path DIR [--shots 5]
    python evaluate_generation.py --task ceval --data_dir data/ceval --model_name_or_path DIR --chat_template on
    python -m paddle.distributed.launch --nproc_per_node 2 evaluate_generation.py ... --tensor_parallel_degree 2

Scoring (`paddle_glm.eval_tasks`, `paddle_glm.scoring`): each item's prompt is the subject's header, `--shots` solved
examples of the shot split and the item; every choice is scored by the summed log-likelihood of its continuation
(" A", " B", ... for MMLU; the choice sentence for COPA) after the prompt. `acc` takes the most likely choice,
`acc_norm` the most likely per character. Shots are dropped from the end until prompt + continuation fit
`--max_length` (then the prompt loses its beginning). With `--chat_template off` (default, as the harnesses score
base models) the prompt is the text with the family's special tokens only and a continuation is tokenized as the
text goes on (the tokens of prompt + continuation after those of the prompt); with `on` the prompt is the family's
one-round chat format and a continuation is tokenized as the model's answer (`Template.target_ids`).
GLM scores by blank infilling (the prompt before `[gMASK]`, the choice in part B), the ChatGLM families as a causal
continuation, through their `Template`.

Writes `--output_file` (summary: per subject, per category and overall accuracy, micro over items and macro over
subjects, x100) and, beside it, `<name>.predictions.jsonl` (one record per item); prints the table.
"""
from __future__ import annotations

import time
from argparse import RawDescriptionHelpFormatter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from paddlenlp.trainer import PdArgumentParser
from tqdm import tqdm

from .args import VERBOSE_HELP, InputError, check, default_device, exit_on_bad_input, set_device
from .data import DataError
from .eval_data import Item
from .eval_report import ItemResult, print_table, summarize, write_results
from .eval_tasks import TASKS, EvalTask, get_task, prompt_text
from .logs import configure as configure_logs, logger
from .models import family_of
from .models.family import Template
from .predict import PredictArguments, init_tensor_parallel, load_model
from .scoring import Request, Scorer

__all__ = ["EvaluateArguments", "EncodedItem", "encode_item", "main"]

MAX_SHOTS = 5  # the dev splits of MMLU, C-Eval and CMMLU hold 5 items per subject


@dataclass
class EvaluateArguments:
    data_dir: str = field(metadata={"help": "The data set's directory, in its published layout (see --task)."})
    model_name_or_path: str = field(
        metadata={"help": "Checkpoint directory of any family (GLM, ChatGLM-6B, ChatGLM2/3)."})
    task: str = field(default="mmlu", metadata={
        "help": "mmlu ({split}/{subject}_{split}.csv), ceval ({split}/{subject}_{split}.csv with a header), cmmlu "
                "({split}/{subject}.csv with a header), copa ({split}.jsonl: premise, choice1, choice2, question, "
                "label) or jsonl_choice ({split}.jsonl: question, choices, answer[, subject]).",
        "choices": list(TASKS)})
    split: Optional[str] = field(default=None, metadata={
        "help": "The split scored (default: mmlu test, ceval val (its test answers are not published), cmmlu test, "
                "copa val, jsonl_choice test)."})
    shots: Optional[int] = field(default=None, metadata={
        "help": f"Solved examples before each item, 0 to {MAX_SHOTS}: the first ones of the subject's dev split "
                "(COPA: train) (default: 5 for mmlu, ceval, cmmlu; 0 for copa, jsonl_choice)."})
    subjects: Optional[List[str]] = field(default=None, metadata={"help": "Only these subjects (default: all)."})
    limit: Optional[int] = field(default=None, metadata={"help": "Only the first N items of each subject."})
    batch_size: int = field(default=8, metadata={"help": "Items scored together (rows of continuations without "
                                                         "--shared_prefix)."})
    shared_prefix: bool = field(default=True, metadata={
        "help": "Reuse the K/V cache of what items and choices share: each item's prompt for its choices, and "
                "for causal families (ChatGLM2/3) a subject's header and shots for its items. Same scores, faster."})
    chat_template: str = field(default="off", metadata={
        "help": "on: the family's chat format around each prompt, continuations tokenized as answers (chat models); "
                "off: plain text with the family's special tokens only (base models; GLM and ChatGLM-6B prompts "
                "are the same either way).",
        "choices": ["on", "off"]})
    max_length: Optional[int] = field(default=None, metadata={
        "help": "Most tokens of prompt + continuation (default: the model's positions)."})
    lora_path: Optional[str] = field(default=None, metadata={"help": "A LoRA adapter directory to apply."})
    prefix_path: Optional[str] = field(default=None, metadata={"help": "A prefix-tuning (P-Tuning v2) directory."})
    output_file: Optional[str] = field(default=None, metadata={
        "help": "Write the summary here (JSON) and the item-level predictions beside it (.predictions.jsonl)."})
    tensor_parallel_degree: Optional[int] = field(default=None, metadata={
        "help": "Under paddle.distributed.launch: the ranks the model is split over (= the processes)."})
    device: Optional[str] = field(default=None, metadata={"help": "cpu or gpu (default: gpu when there is one)."})
    verbose: bool = field(default=False, metadata={"help": VERBOSE_HELP})

    def __post_init__(self):
        task = TASKS.get(self.task)
        problems = []
        if task and self.split is None:
            self.split = task.default_split
        if task and self.shots is None:
            self.shots = task.default_shots
        if self.shots is not None and not 0 <= self.shots <= MAX_SHOTS:
            problems.append(f"--shots {self.shots}: must be 0 to {MAX_SHOTS}")
        for name in ("limit", "max_length", "tensor_parallel_degree"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"--{name} {value}: must be at least 1")
        if self.batch_size < 1:
            problems.append(f"--batch_size {self.batch_size}: must be at least 1")
        check(problems)


@dataclass
class EncodedItem:
    """An item's token ids as scored."""

    prompt_ids: List[int]
    continuations: List[List[int]]
    shots: int  # shots kept
    cut: bool  # the 0-shot prompt still did not fit and lost its beginning


def encode_item(task: EvalTask, template: Template, subject: str, shots: Sequence[Item], item: Item,
                max_length: int, chat: bool) -> EncodedItem:
    """The prompt with as many of `shots` as fit (dropped from the end) and each choice's continuation ids."""
    for kept in range(len(shots), -1, -1):
        encoded = _encode(task, template, prompt_text(task, subject, shots[:kept], item), item, chat)
        if _length(encoded, template) <= max_length:
            return EncodedItem(*encoded, shots=kept, cut=False)
    text_ids = template.encode(prompt_text(task, subject, (), item))  # `encoded` is the 0-shot prompt's
    dropped = 0
    while _length(encoded, template) > max_length:  # the harness's left truncation
        dropped += _length(encoded, template) - max_length
        if dropped >= len(text_ids):
            raise DataError(f"{item.where}: the answers alone take more than --max_length {max_length} tokens")
        encoded = _encode(task, template, template.decode(text_ids[dropped:]), item, chat)
    return EncodedItem(*encoded, shots=0, cut=True)


def _encode(task: EvalTask, template: Template, text: str, item: Item, chat: bool) -> Tuple[List[int], List[List[int]]]:
    continuations = task.continuations(item)
    if chat:
        return template.render(text, []), [template.target_ids(c.strip()) for c in continuations]
    text_ids = template.encode(text)
    return template.completion_prompt(text), [_continued(template, text, text_ids, c) for c in continuations]


def _continued(template: Template, text: str, text_ids: List[int], continuation: str) -> List[int]:
    """The ids `continuation` adds to `text` when tokenized together (as lm-evaluation-harness splits them: a
    sentencepiece tokenizer writes "Answer: A" as ..., ':', '▁A' but "A" alone differently); alone when the
    text's own ids change."""
    whole = template.encode(text + continuation)
    if whole[:len(text_ids)] == text_ids and len(whole) > len(text_ids):
        return whole[len(text_ids):]
    return template.encode(continuation)


def _length(encoded: Tuple[List[int], List[List[int]]], template: Template) -> int:
    prompt, continuations = encoded
    return len(prompt) + len(template.answer_start) + max(len(c) for c in continuations)


def model_arguments(args: EvaluateArguments) -> PredictArguments:
    """What prediction's `load_model` needs: a LoRA adapter and a prefix (P-Tuning v2) load as prediction loads them."""
    return PredictArguments(model_name_or_path=args.model_name_or_path, lora_path=args.lora_path,
                            prefix_path=args.prefix_path)


def load_items(task: EvalTask, args: EvaluateArguments) -> Tuple[Dict[str, List[Item]], Dict[str, List[Item]]]:
    """(items by subject, shots by subject), before any model is loaded: bad data fails fast."""
    items = task.load(args.data_dir, args.split, args.subjects)
    if args.limit:
        items = {subject: subject_items[:args.limit] for subject, subject_items in items.items()}
    if not args.shots:
        return items, {subject: [] for subject in items}
    try:
        pool = task.load(args.data_dir, task.shot_split, list(items))
    except DataError as error:
        raise DataError(f"--shots {args.shots} takes solved examples from the {task.shot_split} split: {error} "
                        "(or use --shots 0)") from None
    return items, {subject: pool[subject][:args.shots] for subject in items}


def score_subjects(task: EvalTask, template: Template, scorer: Scorer, items: Dict[str, List[Item]],
                   shots: Dict[str, List[Item]], max_length: int, chat: bool,
                   progress: Callable[[int], None] = lambda done: None) -> List[ItemResult]:
    """Every item's log-likelihoods, subject by subject (a subject's items share their shots, so their prefix)."""
    results = []
    for subject, subject_items in items.items():
        encoded = [encode_item(task, template, subject, shots[subject], item, max_length, chat)
                   for item in subject_items]
        scores = scorer.score([Request(e.prompt_ids, e.continuations) for e in encoded], progress)
        lengths = [[len(c) for c in task.continuations(item)] for item in subject_items]
        results += [ItemResult.of(item, e, s, n) for item, e, s, n in zip(subject_items, encoded, scores, lengths)]
    return results


@exit_on_bad_input
def main(argv: Optional[List[str]] = None) -> None:
    configure_logs(argv)
    parser = PdArgumentParser(EvaluateArguments, description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    set_device(args.device or default_device(), all_cores=True)
    model_args = model_arguments(args)
    task = get_task(args.task)
    items, shots = load_items(task, args)
    degree, rank = init_tensor_parallel()
    if args.tensor_parallel_degree not in (None, degree):
        raise InputError(f"--tensor_parallel_degree {args.tensor_parallel_degree} but {degree} processes: launch "
                         f"with paddle.distributed.launch --nproc_per_node {args.tensor_parallel_degree}")
    family = family_of(args.model_name_or_path)
    template = family.template(family.load_tokenizer(args.model_name_or_path))
    model = load_model(model_args, degree, rank)
    positions = family.max_positions(model.config)
    if args.max_length and args.max_length > positions:
        raise InputError(f"--max_length {args.max_length} exceeds the model's {positions} positions")
    max_length = args.max_length or positions
    scorer = Scorer(model, template, args.batch_size, args.shared_prefix)
    total = sum(len(subject_items) for subject_items in items.values())
    logger.info(f"{task.name} {args.split}: {total} items in {len(items)} subjects, {args.shots}-shot, chat template "
                f"{args.chat_template}")
    started = time.perf_counter()
    with tqdm(total=total, desc=f"scoring {task.name}", unit="item", disable=rank != 0) as bar:
        results = score_subjects(task, template, scorer, items, shots, max_length, args.chat_template == "on",
                                 bar.update)
    seconds = time.perf_counter() - started
    if rank == 0:
        summary = summarize(task, results, {"task": task.name, "split": args.split, "shots": args.shots,
                                            "chat_template": args.chat_template, "model": args.model_name_or_path,
                                            "lora_path": args.lora_path, "seconds": round(seconds, 2),
                                            "items_per_second": round(total / seconds, 2)})
        print_table(summary)
        if args.output_file:
            write_results(summary, results, args.output_file)
