"""Dynamic-graph prediction: texts in, generated texts out, with the one decoding implementation.

    python predict_generation.py                                     # the fine-tuning demo's checkpoint
    python predict_generation.py --model_name_or_path DIR --text "答案：...，上下文：..." --num_beams 5
    python predict_generation.py --input_file in.json --output_file out.json --lora_path ADAPTER
    python predict_generation.py --model_name_or_path BASE --prefix_path PREFIX --text "类型#上衣*版型#宽松"
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from typing import List, Optional, Tuple

import paddle
import paddle.distributed as dist
from paddle.distributed import fleet
from .logs import configure as configure_logs, logger

from .args import default_device, exit_on_bad_input, set_device
from .batch_predict import check_lengths, parse_with_io, predict_records, read_inputs, write_outputs
from .generation import generate
from .demo import held_out_pairs
from .lora import load_with_adapter
from .models import family_of, load_tokenizer
from .prefix import PrefixModel, load_prefix

__all__ = ["PredictArguments", "main"]

DEMO_CHECKPOINT = "checkpoints/demo/dureader_qg"


@dataclass
class PredictArguments:
    model_name_or_path: str = field(
        default=DEMO_CHECKPOINT,
        metadata={"help": "Checkpoint directory (any family: GLM, ChatGLM-6B, ChatGLM2/3) or a PaddleNLP model name."}
    )
    lora_path: Optional[str] = field(default=None, metadata={"help": "A LoRA adapter directory to apply."})
    prefix_path: Optional[str] = field(
        default=None, metadata={"help": "A P-Tuning v2 prefix directory (fine-tuning with --prefix_tuning writes one)."}
    )
    merge_tensor_parallel_path: Optional[str] = field(
        default=None,
        metadata={"help": "Also write the model (LoRA merged in, tensor-parallel shards merged) to this directory."},
    )
    device: Optional[str] = field(
        default=None, metadata={"help": "cpu or gpu (default: gpu when Paddle is compiled with CUDA and one is visible)."}
    )


@exit_on_bad_input
def main(argv: Optional[List[str]] = None) -> None:
    configure_logs(argv)
    args, io, gen_args = parse_with_io(PredictArguments, argv)
    set_device(args.device or default_device(), all_cores=True)
    demo = args.model_name_or_path == DEMO_CHECKPOINT
    if demo and not os.path.exists(DEMO_CHECKPOINT):
        raise SystemExit(f"{DEMO_CHECKPOINT} does not exist yet: run `python finetune_generation.py` (the demo) first")
    degree, rank = init_tensor_parallel()
    if degree > 1 and gen_args.seed_decoding is None:
        gen_args.seed_decoding = 0  # every rank must draw the same samples, or they stop agreeing on the tokens
    family = family_of(args.model_name_or_path)
    template = family.template(family.load_tokenizer(args.model_name_or_path))
    model = load_model(args, degree, rank)
    src_length = check_lengths(io, gen_args, family.max_positions(model.config))
    decoding = gen_args.decoding_config(template, max_length=io.tgt_length)
    outputs = predict_records(read_inputs(io, held_out_pairs() if demo else None), template, io, src_length, decoding,
                              partial(generate, model, config=decoding))
    if rank == 0:
        write_outputs(io, outputs)


def init_tensor_parallel() -> Tuple[int, int]:
    """Under `paddle.distributed.launch`, every process is one tensor-parallel rank (as the reference does)."""
    degree = dist.get_world_size()
    if degree == 1:
        return 1, 0
    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": degree, "pp_degree": 1}
    fleet.init(is_collective=True, strategy=strategy)
    return degree, fleet.get_hybrid_communicate_group().get_model_parallel_rank()


def load_model(args: PredictArguments, degree: int = 1, rank: int = 0) -> paddle.nn.Layer:
    """The model (this rank's shard under tensor parallelism), with a LoRA adapter folded in when given, behind a
    prefix when given."""
    model = load_with_adapter(args.model_name_or_path, args.lora_path, tensor_parallel_degree=degree,
                              tensor_parallel_rank=rank)
    if args.prefix_path:
        model = load_prefix(model, args.prefix_path)
    model.eval()
    if args.merge_tensor_parallel_path:
        save_merged(model, args, degree, rank)
    return model


def save_merged(model: paddle.nn.Layer, args: PredictArguments, degree: int, rank: int) -> None:
    """One whole checkpoint in `--merge_tensor_parallel_path`, the shards gathered to rank 0 (the base model: a prefix
    stays where it is, whole)."""
    target = args.merge_tensor_parallel_path
    if isinstance(model, PrefixModel):
        model = model.model
    model.save_pretrained(target, merge_tensor_parallel=degree > 1, is_main_process=rank == 0)
    if rank == 0:
        load_tokenizer(args.model_name_or_path).save_pretrained(target)
        logger.info(f"model written to {target}")
