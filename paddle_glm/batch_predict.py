"""Texts in, generated texts out: the input/output half shared by `predict_generation.py` (dynamic graph)
and `infer_generation.py` (exported graphs). Only the function that decodes a batch of prompts differs.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from paddlenlp.trainer import PdArgumentParser
from paddlenlp.utils.log import logger
from tqdm import tqdm

from .args import GenerationArguments, check
from .data import read_json_lines, text_field, write_json_lines
from .decoding import DecodingConfig, GenerationResult
from .inputs import Example, GLMSpecialIds, build_source_ids, generation_example

__all__ = ["IOArguments", "parse_with_io", "read_inputs", "check_lengths", "predict_records", "write_outputs"]

DEMO_TEXTS = [
    "答案：巴黎，上下文：巴黎是法国的首都，位于欧洲，人口约210万。",
    "答案：1998年，上下文：云海电子公司于1998年推出了智能手表，售价为899元。",
    "答案：长江，上下文：从南京到武汉约500公里，途中可以看到长江。",
]
DecodeBatch = Callable[[List[Example]], GenerationResult]


@dataclass
class IOArguments:
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


def parse_with_io(model_arguments, argv: Optional[List[str]]) -> Tuple[object, IOArguments, GenerationArguments]:
    """(model arguments, IOArguments, GenerationArguments) from the command line; `--text` is repeatable."""
    parser = PdArgumentParser((model_arguments, IOArguments, GenerationArguments))
    parser.set_defaults(min_tgt_length=0)  # prediction has no minimum unless asked for
    return parser.parse_args_into_dataclasses(args=_gather_repeated(sys.argv[1:] if argv is None else argv, "--text"))


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


def check_lengths(io: IOArguments, gen_args: GenerationArguments, positions: int, use_demo_texts: bool) -> int:
    """The source length to use; refuses impossible flag values before any work."""
    src_length = io.src_length or positions - io.tgt_length
    problems = []
    if io.text and io.input_file:
        problems.append("give --text or --input_file, not both")
    if not (io.text or io.input_file or use_demo_texts):
        problems.append("nothing to predict: give --text or --input_file")
    if io.batch_size < 1:
        problems.append(f"--batch_size {io.batch_size}: must be at least 1")
    if src_length < 4 or src_length + io.tgt_length > positions:
        problems.append(
            f"--src_length {src_length} + --tgt_length {io.tgt_length} must fit the model's {positions} positions "
            "(and --src_length be at least 4)"
        )
    if gen_args.min_tgt_length > io.tgt_length:
        problems.append(f"--min_tgt_length {gen_args.min_tgt_length} exceeds --tgt_length {io.tgt_length}")
    check(problems)
    return src_length


def read_inputs(io: IOArguments, use_demo_texts: bool) -> List[dict]:
    if io.input_file:
        records = []
        for where, record in read_json_lines(io.input_file):
            text_field(record, (io.source_field,), where)
            records.append(record)
        return records
    return [{io.source_field: text} for text in (io.text or (DEMO_TEXTS if use_demo_texts else []))]


def predict_records(records: List[dict], tokenizer, io: IOArguments, src_length: int, decoding: DecodingConfig,
                    decode_batch: DecodeBatch) -> List[dict]:
    """Each record plus its `prediction` (a list when several sequences are returned)."""
    special = GLMSpecialIds.from_tokenizer(tokenizer)
    per_prompt = decoding.num_return_sequences
    outputs = []
    for start in tqdm(range(0, len(records), io.batch_size), desc="predicting", disable=len(records) <= io.batch_size):
        batch = records[start:start + io.batch_size]
        prompts = [
            generation_example(build_source_ids(tokenizer(r[io.source_field], add_special_tokens=False)["input_ids"],
                                                special, src_length), special)
            for r in batch
        ]
        sequences = decode_batch(prompts).sequences
        for index, record in enumerate(batch):
            texts = [tokenizer.decode(s, skip_special_tokens=True) for s in sequences[index * per_prompt:(index + 1) * per_prompt]]
            outputs.append({**record, "prediction": texts[0] if per_prompt == 1 else texts})
    return outputs


def write_outputs(io: IOArguments, outputs: List[dict]) -> None:
    if io.output_file:
        write_json_lines(outputs, io.output_file)
        logger.info(f"{len(outputs)} predictions written to {io.output_file}")
        return
    for record in outputs:
        print(json.dumps(record, ensure_ascii=False))
