"""Dynamic-graph prediction: texts in, generated texts out, with the one decoding implementation.

    python predict_generation.py                                     # the fine-tuning demo's checkpoint
    python predict_generation.py --model_name_or_path DIR --text "答案：...，上下文：..." --num_beams 5
    python predict_generation.py --input_file in.json --output_file out.json --lora_path ADAPTER
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import paddle
from paddlenlp.trainer import PdArgumentParser
from paddlenlp.utils.log import logger
from tqdm import tqdm

from .args import GenerationArguments, check
from .data import read_json_lines, text_field, write_json_lines
from .generation import generate
from .inputs import GLMSpecialIds, build_source_ids, generation_example
from .lora import merged_state_dict
from .model import GLMForConditionalGeneration
from .tokenizer import load_tokenizer

__all__ = ["PredictArguments", "main"]

DEMO_CHECKPOINT = "checkpoints/demo/dureader_qg"
DEMO_TEXTS = [
    "答案：巴黎，上下文：巴黎是法国的首都，位于欧洲，人口约210万。",
    "答案：1998年，上下文：云海电子公司于1998年推出了智能手表，售价为899元。",
    "答案：长江，上下文：从南京到武汉约500公里，途中可以看到长江。",
]


@dataclass
class PredictArguments:
    model_name_or_path: str = field(
        default=DEMO_CHECKPOINT, metadata={"help": "Checkpoint directory or PaddleNLP GLM name to predict with."}
    )
    lora_path: Optional[str] = field(default=None, metadata={"help": "A LoRA adapter directory to apply."})
    merge_tensor_parallel_path: Optional[str] = field(
        default=None,
        metadata={"help": "Also write the model (LoRA merged in, tensor-parallel shards merged) to this directory."},
    )
    text: List[str] = field(default_factory=list, metadata={"help": "Source texts (repeatable)."})
    input_file: Optional[str] = field(default=None, metadata={"help": "JSON lines with a source field per line."})
    source_field: str = field(default="src", metadata={"help": "The source field of --input_file records."})
    output_file: Optional[str] = field(
        default=None, metadata={"help": "Write JSON lines (input record + 'prediction'); default: print."}
    )
    batch_size: int = field(default=8, metadata={"help": "Prompts decoded together."})
    src_length: Optional[int] = field(
        default=None, metadata={"help": "Maximum source tokens (longer sources lose their end); "
                                        "default: the model's positions minus --tgt_length."},
    )
    tgt_length: int = field(default=64, metadata={"help": "Maximum generated tokens."})
    device: str = field(default="cpu", metadata={"help": "cpu or gpu."})


def parse_arguments(argv: List[str]) -> Tuple[PredictArguments, GenerationArguments]:
    parser = PdArgumentParser((PredictArguments, GenerationArguments))
    parser.set_defaults(min_tgt_length=0)  # prediction has no minimum unless asked for
    return parser.parse_args_into_dataclasses(args=_gather_repeated(argv, "--text"))


def _gather_repeated(argv: List[str], flag: str) -> List[str]:
    """`--text a --text b c` -> `--text a b c` (argparse keeps only the last occurrence of a list flag)."""
    values, rest, taking = [], [], False
    for arg in argv:
        if arg == flag:
            taking = True
        elif taking and not arg.startswith("--"):
            values.append(arg)
        else:
            taking = False
            rest.append(arg)
    return rest + ([flag] + values if values else [])


def main(argv: Optional[List[str]] = None) -> None:
    args, gen_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    paddle.set_device(args.device)
    if not os.path.exists(args.model_name_or_path) and args.model_name_or_path == DEMO_CHECKPOINT:
        raise SystemExit(f"{DEMO_CHECKPOINT} does not exist yet: run `python finetune_generation.py` (the demo) first")
    tokenizer = load_tokenizer(args.model_name_or_path)
    model = load_model(args)
    src_length = validate(args, gen_args, model.config)
    decoding = gen_args.decoding_config(tokenizer, max_length=args.tgt_length)
    special = GLMSpecialIds.from_tokenizer(tokenizer)

    records = list(read_inputs(args))
    outputs = []
    for start in tqdm(range(0, len(records), args.batch_size), desc="predicting", disable=len(records) <= args.batch_size):
        batch = records[start:start + args.batch_size]
        prompts = [
            generation_example(build_source_ids(tokenizer(r[args.source_field], add_special_tokens=False)["input_ids"],
                                                special, src_length), special)
            for r in batch
        ]
        result = generate(model, prompts, decoding)
        per_prompt = decoding.num_return_sequences
        for index, record in enumerate(batch):
            texts = [tokenizer.decode(s, skip_special_tokens=True) for s in result.sequences[index * per_prompt:(index + 1) * per_prompt]]
            outputs.append({**record, "prediction": texts[0] if per_prompt == 1 else texts})
    write_outputs(args, outputs)


def load_model(args: PredictArguments) -> GLMForConditionalGeneration:
    """The model, with a LoRA adapter folded in when given (decoding then runs at full speed)."""
    model = GLMForConditionalGeneration.from_pretrained(args.model_name_or_path)
    if args.lora_path:
        from paddlenlp.peft import LoRAModel

        lora_model = LoRAModel.from_pretrained(model, args.lora_path)
        merged = GLMForConditionalGeneration(lora_model.model.config)
        merged.set_state_dict(merged_state_dict(lora_model))
        model = merged
    model.eval()
    if args.merge_tensor_parallel_path:
        model.save_pretrained(args.merge_tensor_parallel_path)
        load_tokenizer(args.model_name_or_path).save_pretrained(args.merge_tensor_parallel_path)
        logger.info(f"model written to {args.merge_tensor_parallel_path}")
    return model


def validate(args: PredictArguments, gen_args: GenerationArguments, config) -> int:
    """The source length to use; refuses impossible lengths before any work."""
    src_length = args.src_length or config.max_sequence_length - args.tgt_length
    problems = []
    if args.text and args.input_file:
        problems.append("give --text or --input_file, not both")
    if not (args.text or args.input_file or args.model_name_or_path == DEMO_CHECKPOINT):
        problems.append("nothing to predict: give --text or --input_file")
    if args.batch_size < 1:
        problems.append(f"--batch_size {args.batch_size}: must be at least 1")
    if src_length < 4 or src_length + args.tgt_length > config.max_sequence_length:
        problems.append(
            f"--src_length {src_length} + --tgt_length {args.tgt_length} must fit the model's "
            f"{config.max_sequence_length} positions (and --src_length be at least 4)"
        )
    if gen_args.min_tgt_length > args.tgt_length:
        problems.append(f"--min_tgt_length {gen_args.min_tgt_length} exceeds --tgt_length {args.tgt_length}")
    check(problems)
    return src_length


def read_inputs(args: PredictArguments) -> Iterator[dict]:
    if args.input_file:
        for where, record in read_json_lines(args.input_file):
            text_field(record, (args.source_field,), where)
            yield record
        return
    for text in args.text or (DEMO_TEXTS if args.model_name_or_path == DEMO_CHECKPOINT else []):
        yield {args.source_field: text}


def write_outputs(args: PredictArguments, outputs: List[dict]) -> None:
    if args.output_file:
        write_json_lines(outputs, args.output_file)
        logger.info(f"{len(outputs)} predictions written to {args.output_file}")
        return
    for record in outputs:
        print(json.dumps(record, ensure_ascii=False))
