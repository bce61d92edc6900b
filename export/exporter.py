"""Export a model of any family for serving: static prefill and decode graphs with K/V cache inputs and outputs.

The reference freezes greedy decoding for 20 tokens into one graph. Here the graphs only compute
next-token logits and the new cache; every decoding strategy and setting is chosen at run time by
the runner (`infer/`), through the same `paddle_glm.decoding` that training evaluation uses.

An export directory holds:
- `prefill.json` / `prefill.pdiparams`: (input_ids [B, S], position_ids [B, 2, S] (2-D families) or [B, S],
  attention_mask [B, 1, S, S]) -> (logits [B, V] of the last position, cache [L, 2, B, S, kv_heads, head_dim]);
- `decode.json` / `decode.pdiparams`: (input_ids [B, 1], position_ids [B, 2, 1] or [B, 1], attention_mask
  [B, 1, 1, T + 1], cache [L, 2, B, T, kv_heads, head_dim]) -> (logits [B, V], cache [L, 2, B, T + 1, ...]);
- the tokenizer files and `export_config.json` (format version, family, shapes, dtype, lengths, special ids).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import paddle
from paddle.static import InputSpec
from paddlenlp.trainer import PdArgumentParser
from paddle_glm.logs import configure as configure_logs, logger

from paddle_glm.args import VERBOSE_HELP, check, exit_on_bad_input
from paddle_glm.lora import load_with_adapter
from paddle_glm.models import Family, family_of

__all__ = ["ExportArguments", "export_generation_model", "main", "EXPORT_FORMAT_VERSION", "GRAPHS"]

EXPORT_FORMAT_VERSION = 2  # 2: any family (`family`, `kv_heads`, the template's special ids)
GRAPHS = ("prefill", "decode")
CONFIG_NAME = "export_config.json"


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
    dtype: str = field(default="float32", metadata={"help": "float32, float16 or bfloat16 weights and activations."})
    src_length: Optional[int] = field(
        default=None, metadata={"help": "Longest source the export serves (default: positions - tgt_length)."}
    )
    tgt_length: int = field(default=64, metadata={"help": "Most tokens the export generates per input."})
    onnx: bool = field(default=False, metadata={"help": "Also write prefill.onnx and decode.onnx (paddle2onnx)."})
    verbose: bool = field(default=False, metadata={"help": VERBOSE_HELP})


class PrefillGraph(paddle.nn.Layer):
    """The prompt pass: last-position logits and the whole K/V cache, stacked into one tensor."""

    def __init__(self, model: paddle.nn.Layer):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, attention_mask):
        output = self.model(input_ids, position_ids, attention_mask, num_logits_to_keep=1)
        return _last_logits(output), _stack(output.past_key_values)


class DecodeGraph(paddle.nn.Layer):
    """One step over new tokens with the stacked cache [L, 2, B, T, kv_heads, head_dim]."""

    def __init__(self, model: paddle.nn.Layer, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids, position_ids, attention_mask, cache):
        layers = [(cache[i, 0], cache[i, 1]) for i in range(self.num_layers)]
        output = self.model(input_ids, position_ids, attention_mask, cache=layers, num_logits_to_keep=1)
        return _last_logits(output), _stack(output.past_key_values)


def _last_logits(output):
    return output.logits[:, -1].astype("float32")


def _stack(cache):
    return paddle.stack([paddle.stack([key, value]) for key, value in cache])


def input_specs(family: Family, config, dtype: str):
    """Graph inputs; positions are [B, 2, S] for 2-D families, [B, S] for 1-D ones."""
    positions = [None, 2, None] if family.position_rows == 2 else [None, None]
    common = [
        InputSpec([None, None], "int64", "input_ids"),
        InputSpec(positions, "int64", "position_ids"),
        InputSpec([None, 1, None, None], "float32", "attention_mask"),
    ]
    cache_shape = [family.num_layers(config), 2, None, None, family.kv_heads(config), family.head_dim(config)]
    return {"prefill": common, "decode": common + [InputSpec(cache_shape, dtype, "cache")]}


def export_generation_model(
    model: paddle.nn.Layer, template, output_path: str, dtype: str, src_length: int, tgt_length: int,
    onnx: bool = False,
) -> dict:
    """Write the graphs, the tokenizer and `export_config.json`; returns the config written."""
    family = family_of(model.config)
    os.makedirs(output_path, exist_ok=True)
    model.eval()
    family.prepare_export(model)
    if dtype != "float32":
        model.to(dtype=dtype)
    specs = input_specs(family, model.config, dtype)
    graphs = (("prefill", PrefillGraph(model)), ("decode", DecodeGraph(model, family.num_layers(model.config))))
    for name, graph in graphs:
        static = paddle.jit.to_static(graph, input_spec=specs[name], full_graph=True)
        paddle.jit.save(static, os.path.join(output_path, name))
        logger.info(f"exported {name} graph to {output_path}")
    template.tokenizer.save_pretrained(output_path)
    config = export_config(family, model.config, template, dtype, src_length, tgt_length)
    with open(os.path.join(output_path, CONFIG_NAME), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    if onnx:
        convert_to_onnx(output_path)
    return config


def convert_to_onnx(output_path: str, opset_version: int = 17) -> None:
    """`prefill.onnx` and `decode.onnx` beside the Paddle graphs, for ONNX Runtime and FastDeploy."""
    import paddle2onnx

    for name in GRAPHS:
        prefix = os.path.join(output_path, name)
        # optimize_tool None: the default (polygraphy) tries to pip-install sympy at conversion time.
        paddle2onnx.export(prefix + ".json", prefix + ".pdiparams", save_file=prefix + ".onnx",
                           opset_version=opset_version, optimize_tool="None")
        logger.info(f"exported {name}.onnx")


def export_config(family: Family, config, template, dtype: str, src_length: int, tgt_length: int) -> dict:
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "family": family.name,
        "graphs": {name: name for name in GRAPHS},
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
    }


@exit_on_bad_input
def main(argv: Optional[List[str]] = None) -> None:
    configure_logs(argv)
    (args,) = PdArgumentParser(ExportArguments).parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
    paddle.set_device("cpu")  # tracing needs no accelerator
    if not os.path.exists(args.model_name_or_path) and args.model_name_or_path == ExportArguments.model_name_or_path:
        raise SystemExit(f"{args.model_name_or_path} does not exist yet: run `python finetune_generation.py` first")
    model = load_with_adapter(args.model_name_or_path, args.lora_path)
    family = family_of(model.config)
    positions = family.max_positions(model.config)
    src_length = args.src_length or positions - args.tgt_length
    problems = []
    if args.dtype not in ("float32", "float16", "bfloat16"):
        problems.append(f"--dtype {args.dtype}: use float32, float16 or bfloat16")
    if args.dtype == "float16" and not paddle.is_compiled_with_cuda():
        problems.append("--dtype float16 needs a GPU build of Paddle to trace (CPU has no float16 kernels): "
                        "export on a GPU machine, or use bfloat16")
    if src_length < 4 or src_length + args.tgt_length > positions:
        problems.append(f"--src_length {src_length} + --tgt_length {args.tgt_length} must fit the model's "
                        f"{positions} positions")
    check(problems)
    template = family.template(family.load_tokenizer(args.model_name_or_path))
    config = export_generation_model(model, template, args.output_path, args.dtype, src_length, args.tgt_length,
                                     args.onnx)
    logger.info(f"export written to {args.output_path}: {json.dumps({k: config[k] for k in ('dtype', 'src_length', 'tgt_length')})}")
