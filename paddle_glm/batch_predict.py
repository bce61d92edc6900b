"""Texts in, generated texts out: the input/output half shared by `predict_generation.py` (dynamic graph)
and `infer_generation.py` (exported graphs). Only the function that decodes a batch of prompts differs.

Bad inputs never cost the others their predictions: an input line that is not valid (not UTF-8, invalid JSON,
source field missing, empty or not a string) or an empty `--text` gets an output record with an `error` field
(`file:line: reason`) instead of a `prediction`, with a warning in the log, and the run goes on. Sources longer
than `--src_length` tokens lose their end (as in training); the count is logged.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from paddlenlp.trainer import PdArgumentParser
from .logs import logger
from tqdm import tqdm

from .args import VERBOSE_HELP, GenerationArguments, check
from .data import DataError, TextPair, read_json_lines, text_field, write_json_lines
from .decoding import DecodingConfig, GenerationResult
from .inputs import Example
from .metrics import generation_metrics

__all__ = ["IOArguments", "parse_with_io", "read_inputs", "check_lengths", "predict_records", "write_outputs",
           "InvalidInput"]

# Predicted when neither --text nor --input_file is given, as the reference's predict script does.
EXAMPLE_TEXTS = [
    "答案：巴黎，上下文：巴黎是法国的首都，位于欧洲，人口约210万。",
    "答案：1998年，上下文：云海电子公司于1998年推出了智能手表，售价为899元。",
    "答案：长江，上下文：从南京到武汉约500公里，途中可以看到长江。",
]
DEFAULT_TGT_LENGTH = 64
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
    tgt_length: Optional[int] = field(
        default=None, metadata={"help": "Maximum generated tokens (default: 64; an export's own limit when serving one)."}
    )
    verbose: bool = field(default=False, metadata={"help": VERBOSE_HELP})


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


def check_lengths(io: IOArguments, gen_args: GenerationArguments, positions: int) -> int:
    """The source length to use; refuses impossible flag values before any work."""
    io.tgt_length = io.tgt_length or DEFAULT_TGT_LENGTH
    src_length = io.src_length or positions - io.tgt_length
    problems = []
    if io.text and io.input_file:
        problems.append("give --text or --input_file, not both")
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


class InvalidInput(dict):
    """An input that cannot be predicted: its output record as is (the input record, if any, plus `error`)."""


def read_inputs(io: IOArguments, held_out: Optional[List[TextPair]] = None) -> List[dict]:
    """The input records in order; a bad line of --input_file comes as an `InvalidInput` (a missing, empty or
    UTF-16 file still raises a DataError). With neither --text nor --input_file: the `held_out` (source,
    reference) pairs when given (the demo's dev set), else a few built-in example texts."""
    if io.input_file:
        records: List[dict] = []
        on_error = lambda number, error: records.append(InvalidInput(error=str(error)))  # noqa: E731
        for where, record in read_json_lines(io.input_file, on_error=on_error):
            try:
                text_field(record, (io.source_field,), where)
            except DataError as error:
                record = InvalidInput(record, error=str(error))
            records.append(record)
        return records
    if not io.text and held_out:
        logger.info(f"no --text or --input_file: predicting {len(held_out)} held-out examples of the demo's dev set")
        return [{io.source_field: source, "reference": reference} for source, reference in held_out]
    if not io.text:
        logger.info(f"no --text or --input_file: predicting {len(EXAMPLE_TEXTS)} built-in example texts")
    texts = io.text or EXAMPLE_TEXTS
    return [InvalidInput({io.source_field: text}, error=f"--text {index + 1}: empty text") if not text.strip()
            else {io.source_field: text} for index, text in enumerate(texts)]


def predict_records(records: List[dict], template, io: IOArguments, src_length: int, decoding: DecodingConfig,
                    decode_batch: DecodeBatch) -> List[dict]:
    """Each record plus its `prediction` (a list when several sequences are returned), in input order; an
    `InvalidInput` is passed through with its `error` (and a warning) instead."""
    per_prompt = decoding.num_return_sequences
    outputs: List[Optional[dict]] = [dict(r) if isinstance(r, InvalidInput) else None for r in records]
    valid = [index for index, record in enumerate(records) if not isinstance(record, InvalidInput)]
    truncated = 0
    for start in tqdm(range(0, len(valid), io.batch_size), desc="predicting", disable=len(valid) <= io.batch_size):
        batch = valid[start:start + io.batch_size]
        prompts = []
        for index in batch:
            ids, cut = template.prompt_ids(records[index][io.source_field], (), src_length)
            truncated += cut
            prompts.append(template.generation_example(ids))
        sequences = decode_batch(prompts).sequences
        for position, index in enumerate(batch):
            texts = [template.response(s) for s in sequences[position * per_prompt:(position + 1) * per_prompt]]
            outputs[index] = {**records[index], "prediction": texts[0] if per_prompt == 1 else texts}
            if "reference" in outputs[index]:  # scored as training evaluation scores: through the tokenizer
                outputs[index]["reference"] = template.response(template.target_ids(outputs[index]["reference"]))
    if truncated:
        logger.warning(f"truncated {truncated} of {len(valid)} sources to --src_length {src_length} tokens "
                       "(their end dropped)")
    errors = [record["error"] for record in records if isinstance(record, InvalidInput)]
    for message in errors[:10]:
        logger.warning(f"not predicted: {message}")
    if errors:
        logger.warning(f"{len(errors)} of {len(records)} inputs not predicted: their output records carry 'error' "
                       "instead of 'prediction'")
    return outputs


def write_outputs(io: IOArguments, outputs: List[dict]) -> None:
    """JSON lines to --output_file or standard output; records with a `reference` (held-out examples) are shown
    as reference beside prediction, with the BLEU-4 and ROUGE-L of the predictions on them."""
    if io.output_file:
        write_json_lines(outputs, io.output_file)
        logger.info(f"{len(outputs)} predictions written to {io.output_file}")
    elif outputs and all("reference" in record for record in outputs):
        print(held_out_report(outputs, io.source_field))
    else:
        for record in outputs:
            print(json.dumps(record, ensure_ascii=False))


def held_out_report(outputs: List[dict], source_field: str) -> str:
    """Each held-out example with its reference and prediction, then one line of scores over them."""
    lines = []
    for number, record in enumerate(outputs, 1):
        prediction = record.get("prediction", f"(not predicted: {record.get('error')})")
        prediction = prediction[0] if isinstance(prediction, list) else prediction
        lines += [f"{number}. {record[source_field]}", f"   reference:  {record['reference']}",
                  f"   prediction: {prediction}"]
    scored = [r for r in outputs if "prediction" in r]
    predictions = [r["prediction"][0] if isinstance(r["prediction"], list) else r["prediction"] for r in scored]
    scores = generation_metrics(predictions, [r["reference"] for r in scored])
    lines.append(f"BLEU-4 {scores['bleu4']:.2f}, ROUGE-L {scores['rougeL']:.2f} on these {len(scored)} held-out "
                 "examples (they were not trained on)")
    return "\n".join(lines)
