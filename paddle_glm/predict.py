"""Dynamic-graph prediction: texts in, generated texts out, with the one decoding implementation.

    python predict_generation.py                                     # the fine-tuning demo's checkpoint
    python predict_generation.py --model_name_or_path DIR --text "答案：...，上下文：..." --num_beams 5
    python predict_generation.py --input_file in.json --output_file out.json --lora_path ADAPTER
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from typing import List, Optional

import paddle
from paddlenlp.utils.log import logger

from .batch_predict import check_lengths, parse_with_io, predict_records, read_inputs, write_outputs
from .generation import generate
from .lora import load_with_adapter
from .model import GLMForConditionalGeneration
from .tokenizer import load_tokenizer

__all__ = ["PredictArguments", "main"]

DEMO_CHECKPOINT = "checkpoints/demo/dureader_qg"


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
    device: str = field(default="cpu", metadata={"help": "cpu or gpu."})


def main(argv: Optional[List[str]] = None) -> None:
    args, io, gen_args = parse_with_io(PredictArguments, argv)
    paddle.set_device(args.device)
    demo = args.model_name_or_path == DEMO_CHECKPOINT
    if demo and not os.path.exists(DEMO_CHECKPOINT):
        raise SystemExit(f"{DEMO_CHECKPOINT} does not exist yet: run `python finetune_generation.py` (the demo) first")
    tokenizer = load_tokenizer(args.model_name_or_path)
    model = load_model(args)
    src_length = check_lengths(io, gen_args, model.config.max_sequence_length, use_demo_texts=demo)
    decoding = gen_args.decoding_config(tokenizer, max_length=io.tgt_length)
    outputs = predict_records(read_inputs(io, demo), tokenizer, io, src_length, decoding,
                              partial(generate, model, config=decoding))
    write_outputs(io, outputs)


def load_model(args: PredictArguments) -> GLMForConditionalGeneration:
    """The model, with a LoRA adapter folded in when given (decoding then runs at full speed)."""
    model = load_with_adapter(args.model_name_or_path, args.lora_path)
    model.eval()
    if args.merge_tensor_parallel_path:
        model.save_pretrained(args.merge_tensor_parallel_path)
        load_tokenizer(args.model_name_or_path).save_pretrained(args.merge_tensor_parallel_path)
        logger.info(f"model written to {args.merge_tensor_parallel_path}")
    return model
