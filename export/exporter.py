"""Export a model of any family for serving: one static graph that writes its K/V cache in place.

The reference freezes greedy decoding for 20 tokens into one graph. Here the graph only computes next-token
logits; every decoding strategy and setting is chosen at run time by the runner (`infer/`), through the same
`paddle_glm.decoding` that training evaluation uses.

An export directory holds:
- `step.json` / `step.pdiparams` (Paddle Inference), `step.onnx` with --onnx (ONNX Runtime, FastDeploy): one graph
  with a dynamic query length, so the prompt pass and every decode step run the same weights, loaded once. Inputs:
  input_ids [N, q], position_ids [N, 2, q] (2-D families) or [N, q], attention_mask [N, 1, q, K + C] (0/1),
  cache_index [1], logit_index [M] and, per layer i, `shared_key_i`, `shared_value_i` [N / k, kv_heads, K,
  head_dim] and `key_i`, `value_i` [N, kv_heads, C, head_dim]. Outputs: logits [M, V] of the positions
  `logit_index` (flat over the N * q tokens: each row's last for the runner, each packed prompt's last for a
  server, `models.layers.projected`), then `key_i`, `value_i` with the q new tokens written at [cache_index,
  cache_index + q) (`models.layers.SegmentedCache`: the engines write them into the buffers they were given,
  nothing is copied between steps). The runner runs the prompt into a buffer of the prompt's length (shared: one
  masked dummy column), which then becomes the shared segment of the k beams or samples that continue it; their
  own tokens go to C = max new tokens slots per row;
- the tokenizer files and `export_config.json` (format version, family, shapes, dtype, lengths, special ids,
  weight-only quantization);
- `prefix_cache.npy` [layers, 2, P, kv_heads, head_dim] for a P-Tuning v2 prefix (`--prefix_path`): the runner
  puts it in the first P slots of the prompt's buffer and opens their mask columns (`prefix_tokens` in the config).

`--quant weight_only_int8|weight_only_int4` writes weight-only quantized linear layers: ONNX Runtime's MatMulNBits
in `step.onnx` (`export.onnx_graph`, the output projection too; --backend onnxruntime: FastDeploy 1.0.7's ONNX
Runtime predates the op), and Paddle's `weight_only_linear` in the Paddle graph (`export.quantize`) when this Paddle
can trace it (a CUDA build; it serves on GPU only).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import paddle
from paddle.static import InputSpec
from paddlenlp.trainer import PdArgumentParser
from paddle_glm.logs import configure as configure_logs, logger

from paddle_glm.args import VERBOSE_HELP, check, exit_on_bad_input
from paddle_glm.lora import load_with_adapter
from paddle_glm.models import Family, family_of
from paddle_glm.models.layers import SegmentedCache
from paddle_glm.prefix import FrozenPrefixModel, load_prefix

__all__ = ["ExportArguments", "export_generation_model", "main", "EXPORT_FORMAT_VERSION", "GRAPH", "QUANT_METHODS",
           "PREFIX_FILE", "cache_input_names"]

EXPORT_FORMAT_VERSION = 4  # 3: step graph, in-place segmented cache, prefix_cache.npy, quant; 4: logit_index
GRAPH = "step"
CONFIG_NAME = "export_config.json"
PREFIX_FILE = "prefix_cache.npy"
QUANT_METHODS = ("weight_only_int8", "weight_only_int4")


@dataclass
class ExportArguments:
    model_name_or_path: str = field(
        default="checkpoints/demo/dureader_qg", metadata={"help": "Checkpoint to export (default: the demo's)."}
    )
    output_path: str = field(
        default="checkpoints/demo/export",
        metadata={"help": "Directory to write. The reference's `--output_path ./checkpoints/infer/glm` writes the "
                          "directory ./checkpoints/infer/glm, which infer_generation.py serves as `--model_path "
                          "./checkpoints/infer --model_prefix glm` (the reference's pair) or `--model_path "
                          "./checkpoints/infer/glm`."},
    )
    lora_path: Optional[str] = field(default=None, metadata={"help": "LoRA adapter merged into the weights."})
    prefix_path: Optional[str] = field(
        default=None, metadata={"help": "P-Tuning v2 prefix (fine-tuning with --prefix_tuning writes one): the cache "
                                        "the exported graphs start from."},
    )
    dtype: str = field(default="float32", metadata={"help": "float32, float16 or bfloat16 weights and activations."})
    src_length: Optional[int] = field(
        default=None, metadata={"help": "Longest source the export serves (default: positions - tgt_length)."}
    )
    tgt_length: int = field(default=64, metadata={"help": "Most tokens the export generates per input."})
    onnx: bool = field(default=False, metadata={"help": "Also write step.onnx (paddle2onnx) for the onnxruntime and "
                                                        "fastdeploy backends."})
    quant: Optional[str] = field(
        default=None,
        metadata={"help": "weight_only_int8 (per output channel) or weight_only_int4 (groups of 128 inputs). On a "
                          "CPU build: step.onnx only, with ONNX Runtime's MatMulNBits (--backend onnxruntime serves "
                          "it); on a CUDA build: Paddle's weight_only_linear in the Paddle graph (Paddle "
                          "Inference on GPU; needs --dtype bfloat16 or float16), and with --onnx also step.onnx."},
    )
    quant_arch: int = field(default=80, metadata={"help": "GPU architecture the Paddle weight-only layout is written "
                                                          "for (80: A100, 86/89: RTX 30/40, 90: H100/H200)."})
    verbose: bool = field(default=False, metadata={"help": VERBOSE_HELP})


class StepGraph(paddle.nn.Layer):
    """q new tokens per row over the segmented cache: logits of the positions `logit_index` and the written
    slots."""

    def __init__(self, model: paddle.nn.Layer, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids, position_ids, attention_mask, cache_index, logit_index, cache):
        layers = [SegmentedCache(*cache[4 * i + 2:4 * i + 4], *cache[4 * i:4 * i + 2], cache_index)
                  for i in range(self.num_layers)]
        output = self.model(input_ids, position_ids, attention_mask, cache=layers, logit_index=logit_index)
        written = [tensor for layer in output.past_key_values for tensor in (layer.key, layer.value)]
        return [output.logits[:, -1].astype("float32")] + written


def _trace(model: paddle.nn.Layer, family: Family, specs: list, prefix: str) -> None:
    """`model`'s step graph saved at `prefix` (a fresh StepGraph each time: a traced one keeps its program)."""
    graph = StepGraph(model, family.num_layers(model.config))
    paddle.jit.save(paddle.jit.to_static(graph, input_spec=specs, full_graph=True), prefix)


def cache_input_names(num_layers: int) -> List[str]:
    """The graph's cache inputs in order: per layer shared key, shared value, key, value."""
    return [f"{kind}_{i}" for i in range(num_layers) for kind in ("shared_key", "shared_value", "key", "value")]


def input_specs(family: Family, config, dtype: str) -> list:
    """Graph inputs (the cache ones as one list); positions are [N, 2, q] for 2-D families, [N, q] for 1-D ones."""
    positions = [None, 2, None] if family.position_rows == 2 else [None, None]
    cache_shape = [None, family.kv_heads(config), None, family.head_dim(config)]
    return [
        InputSpec([None, None], "int64", "input_ids"),
        InputSpec(positions, "int64", "position_ids"),
        InputSpec([None, 1, None, None], "float32", "attention_mask"),
        InputSpec([1], "int64", "cache_index"),
        InputSpec([None], "int64", "logit_index"),
        [InputSpec(cache_shape, dtype, name) for name in cache_input_names(family.num_layers(config))],
    ]


def export_generation_model(
    model: paddle.nn.Layer, template, output_path: str, dtype: str, src_length: int, tgt_length: int,
    onnx: bool = False, quant: Optional[str] = None, quant_arch: int = 80,
) -> dict:
    """Write the step graph(s), the tokenizer, a prefix's cache and `export_config.json`; returns the config."""
    os.makedirs(output_path, exist_ok=True)
    prefix_tokens = 0
    if isinstance(model, FrozenPrefixModel):  # the runner puts the prefix in the cache; the graph is the model's
        np.save(os.path.join(output_path, PREFIX_FILE), model.prefix_cache.astype(dtype).astype("float32").numpy())
        prefix_tokens, model = int(model.prefix_cache.shape[2]), model.model
    family = family_of(model.config)
    model.eval()
    family.prepare_export(model)
    if dtype != "float32":
        model.to(dtype=dtype)
    specs = input_specs(family, model.config, dtype)
    # Paddle's weight_only_linear traces and runs only on a CUDA build; elsewhere a quantized export is ONNX only.
    paddle_graph = quant is None or paddle.is_compiled_with_cuda()
    if onnx or not paddle_graph:
        with tempfile.TemporaryDirectory() as scratch:  # paddle2onnx's input, in full precision
            _trace(model, family, specs, os.path.join(scratch, GRAPH))
            convert_to_onnx(os.path.join(scratch, GRAPH), os.path.join(output_path, GRAPH + ".onnx"), quant)
    if paddle_graph:
        if quant:
            from .quantize import weight_only_paddle

            count = weight_only_paddle(model, quant, quant_arch)
            logger.info(f"{count} linear layers as Paddle weight_only_linear ({quant}, GPU arch {quant_arch})")
        with family.paddle_graph_form(model):
            _trace(model, family, specs, os.path.join(output_path, GRAPH))
    else:
        logger.info(f"no Paddle graph for --quant {quant}: Paddle's weight_only_linear runs on GPU only and this "
                    "Paddle has no CUDA; step.onnx serves with --backend onnxruntime (FastDeploy 1.0.7's ONNX "
                    "Runtime predates MatMulNBits)")
    logger.info(f"exported the step graph to {output_path}")
    template.tokenizer.save_pretrained(output_path)
    config = export_config(family, model.config, template, dtype, src_length, tgt_length, prefix_tokens, quant,
                           paddle_graph)
    with open(os.path.join(output_path, CONFIG_NAME), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    return config


def convert_to_onnx(paddle_prefix: str, onnx_file: str, quant: Optional[str] = None, opset_version: int = 17) -> None:
    """The Paddle graph at `paddle_prefix` as ONNX for ONNX Runtime and FastDeploy (`export.onnx_graph`)."""
    import paddle2onnx

    from .onnx_graph import finish_onnx

    # optimize_tool None: the default (polygraphy) tries to pip-install sympy at conversion time.
    paddle2onnx.export(paddle_prefix + ".json", paddle_prefix + ".pdiparams", save_file=onnx_file,
                       opset_version=opset_version, optimize_tool="None")
    finish_onnx(onnx_file, quant)
    logger.info(f"exported {os.path.basename(onnx_file)}" + (f" ({quant})" if quant else ""))


def export_config(family: Family, config, template, dtype: str, src_length: int, tgt_length: int,
                  prefix_tokens: int = 0, quant: Optional[str] = None, paddle_graph: bool = True) -> dict:
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "family": family.name,
        "graph": GRAPH,
        "paddle_graph": paddle_graph,
        "quant": quant,
        "dtype": dtype,
        "num_layers": family.num_layers(config),
        "num_attention_heads": int(config.num_attention_heads),
        "kv_heads": family.kv_heads(config),
        "head_dim": family.head_dim(config),
        "vocab_size": int(config.vocab_size),
        "tokenizer_size": template.tokenizer_size,
        "max_sequence_length": family.max_positions(config),
        "src_length": src_length,
        "tgt_length": tgt_length,
        "special_ids": template.special_ids(),
        "prefix_tokens": prefix_tokens,
    }


@exit_on_bad_input
def main(argv: Optional[List[str]] = None) -> None:
    configure_logs(argv)
    (args,) = PdArgumentParser(ExportArguments).parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
    paddle.set_device("cpu")  # tracing needs no accelerator
    if not os.path.exists(args.model_name_or_path) and args.model_name_or_path == ExportArguments.model_name_or_path:
        raise SystemExit(f"{args.model_name_or_path} does not exist yet: run `python finetune_generation.py` first")
    model = load_with_adapter(args.model_name_or_path, args.lora_path)
    if args.prefix_path:
        model = load_prefix(model, args.prefix_path).frozen()
    family = family_of(model.config)
    positions = family.max_positions(model.config)
    src_length = args.src_length or positions - args.tgt_length
    problems = []
    if args.dtype not in ("float32", "float16", "bfloat16"):
        problems.append(f"--dtype {args.dtype}: use float32, float16 or bfloat16")
    if args.dtype == "float16" and not paddle.is_compiled_with_cuda():
        problems.append("--dtype float16 needs a GPU build of Paddle to trace (CPU has no float16 kernels): "
                        "export on a GPU machine, or use bfloat16")
    if args.quant not in (None,) + QUANT_METHODS:
        problems.append(f"--quant {args.quant}: use {' or '.join(QUANT_METHODS)}")
    if args.quant and args.dtype == "float32" and paddle.is_compiled_with_cuda():
        problems.append(f"--quant {args.quant} on a CUDA build writes Paddle's weight_only_linear graph, which "
                        "computes in half precision: add --dtype bfloat16 (or float16)")
    if args.quant and args.dtype != "float32" and not paddle.is_compiled_with_cuda():
        problems.append(f"--quant {args.quant} on this CPU build writes step.onnx only (MatMulNBits over float32 "
                        "activations): drop --dtype, or export on a CUDA build for Paddle Inference on GPU")
    if src_length < 4 or src_length + args.tgt_length > positions:
        problems.append(f"--src_length {src_length} + --tgt_length {args.tgt_length} must fit the model's "
                        f"{positions} positions")
    check(problems)
    template = family.template(family.load_tokenizer(args.model_name_or_path))
    config = export_generation_model(model, template, args.output_path, args.dtype, src_length, args.tgt_length,
                                     args.onnx, args.quant, args.quant_arch)
    summary = json.dumps({k: config[k] for k in ("dtype", "quant", "src_length", "tgt_length")})
    logger.info(f"export written to {args.output_path}: {summary}")
