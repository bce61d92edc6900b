"""Serve an exported model (any family) through a C++ engine, decoding with settings chosen at run time.

    python infer_generation.py                                   # the demo export, a few demo texts
    python infer_generation.py --model_path EXPORT_DIR --text "答案：...，上下文：..." --num_beams 5
    python infer_generation.py --model_path EXPORT_DIR --backend onnxruntime --input_file in.json
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from paddle_glm.args import InputError, check, default_device, exit_on_bad_input
from paddle_glm.batch_predict import check_lengths, parse_with_io, predict_records, read_inputs, write_outputs
from paddle_glm.decoding import DecodingConfig, GenerationResult, generate
from paddle_glm.demo import held_out_pairs
from paddle_glm.inputs import Example, generation_batch
from paddle_glm.logs import configure as configure_logs

from export.exporter import CONFIG_NAME, EXPORT_FORMAT_VERSION, PREFIX_FILE

from .engines import BACKENDS, create_engine
from .stepper import ExportedStepper

__all__ = ["InferArguments", "GLMRunner", "main"]

DEMO_EXPORT = "checkpoints/demo/export"


@dataclass
class InferArguments:
    model_path: str = field(default=DEMO_EXPORT, metadata={"help": "Directory written by export_generation_model.py."})
    model_prefix: Optional[str] = field(
        default=None,
        metadata={"help": "The reference's form: the export is --model_path/--model_prefix (what "
                          "`export_generation_model.py --output_path DIR/PREFIX` wrote)."},
    )
    backend: str = field(default="paddle", metadata={"help": "paddle (Paddle Inference), onnxruntime or fastdeploy."})
    device: Optional[str] = field(
        default=None, metadata={"help": "cpu or gpu (default: gpu when Paddle is compiled with CUDA and one is visible)."}
    )
    cpu_threads: Optional[int] = field(default=None, metadata={"help": "CPU math threads (default: the engine's)."})


class GLMRunner:
    """An exported model of any GLM family behind an engine: prompts in, `GenerationResult` out."""

    def __init__(self, export_dir: str, backend: str = "paddle", device: str = "cpu",
                 cpu_threads: Optional[int] = None):
        self.export_dir = export_dir
        self.config = read_export_config(export_dir)
        check_graph_files(export_dir, self.config, backend, device)
        self.engine = create_engine(backend, export_dir, self.config["graph"], self.config["dtype"], device,
                                    cpu_threads)
        self.prefix = np.load(os.path.join(export_dir, PREFIX_FILE)) if self.config["prefix_tokens"] else None

    def template(self):
        """The exported family's template over the tokenizer saved with the export."""
        from paddle_glm.models import FAMILIES

        family = FAMILIES[self.config["family"]]
        return family.template(family.load_tokenizer(self.export_dir))

    def stepper(self, prompts: List[Example], decoding: DecodingConfig) -> ExportedStepper:
        """A stepper over a batch of prompts with room for `decoding.max_length` new tokens per row."""
        batch = generation_batch(prompts, decoding.pad_token_id)
        return ExportedStepper(self.engine, batch, self.config, decoding.max_length, self.prefix)

    def generate(self, prompts: List[Example], decoding: DecodingConfig) -> GenerationResult:
        return generate(self.stepper(prompts, decoding), len(prompts), decoding)

    def prompt_logits(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Last-position logits [B, V] of a prompt pass: ids [B, S], positions as the model takes them ([B, 2, S] or
        [B, S]), mask [B, 1, S, S] over the prompt (a prefix is added as the runner always adds it)."""
        stepper = ExportedStepper(self.engine, {}, self.config, 1, self.prefix)
        positions = position_ids if position_ids.ndim == 3 else position_ids[:, None]
        return stepper.run_prompt(input_ids, positions, attention_mask)[0]


def export_directory(model_path: str, model_prefix: Optional[str] = None) -> str:
    """The export directory: --model_path, or --model_path/--model_prefix (the reference's pair)."""
    if not model_prefix:
        return model_path
    path = os.path.join(model_path, model_prefix)
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise FileNotFoundError(f"--model_path {model_path} --model_prefix {model_prefix}: no export at {path} "
                                f"(export_generation_model.py --output_path {path} writes one)")
    return path


def read_export_config(export_dir: str) -> dict:
    path = os.path.join(export_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {export_dir} a directory written by export_generation_model.py?")
    with open(path, encoding="utf-8") as handle:
        try:
            config = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InputError(f"{path}: not a valid export config ({error}); export the model again") from None
    if config.get("format_version") != EXPORT_FORMAT_VERSION:
        raise InputError(f"{path}: export format {config.get('format_version')} but this runner reads "
                         f"{EXPORT_FORMAT_VERSION}; export the model again")
    return config


def check_graph_files(export_dir: str, config: dict, backend: str, device: str = "cpu") -> None:
    """Raise naming what keeps `backend` from serving the export: a quantization it cannot run, or every missing
    file it needs."""
    quant = config.get("quant")
    if quant and backend == "paddle" and not config["paddle_graph"]:
        raise InputError(f"{export_dir} is a {quant} export without a Paddle graph: Paddle Inference runs "
                         "weight-only int8/int4 (weight_only_linear) on GPU only, so a CPU build of Paddle exports "
                         "step.onnx alone; serve it with --backend onnxruntime, or export on a CUDA build for "
                         "--backend paddle --device gpu")
    if quant and backend == "paddle" and device != "gpu":
        raise InputError(f"{export_dir} is a {quant} export: Paddle Inference runs weight_only_linear on GPU only; "
                         "serve it with --device gpu, or with --backend onnxruntime on CPU")
    if quant and backend == "fastdeploy":
        raise InputError(f"{export_dir} is a {quant} export: FastDeploy 1.0.7 bundles ONNX Runtime 1.12, which "
                         "predates MatMulNBits (1.17); serve it with --backend onnxruntime")
    suffixes = (".json", ".pdiparams") if backend == "paddle" else (".onnx",)
    needed = [config["graph"] + suffix for suffix in suffixes] + ["tokenizer_config.json"]
    if config.get("prefix_tokens"):
        needed.append(PREFIX_FILE)
    missing = [os.path.join(export_dir, name) for name in needed if not os.path.isfile(os.path.join(export_dir, name))]
    if missing:
        fix = "export the model again"
        if backend != "paddle":
            fix += " (with --onnx for the onnxruntime and fastdeploy backends)"
        raise FileNotFoundError(f"{', '.join(missing)} not found: the export in {export_dir} is incomplete for "
                                f"--backend {backend}; {fix}")


@exit_on_bad_input
def main(argv: Optional[List[str]] = None) -> None:
    configure_logs(argv)
    args, io, gen_args = parse_with_io(InferArguments, argv)
    args.device = args.device or default_device()
    demo = args.model_path == DEMO_EXPORT and not args.model_prefix
    if demo and not os.path.exists(DEMO_EXPORT):
        raise SystemExit(f"{DEMO_EXPORT} does not exist yet: run `python finetune_generation.py` and "
                         "`python export_generation_model.py` first")
    check([f"--backend {args.backend}: choose one of {', '.join(BACKENDS)}"] if args.backend not in BACKENDS else [])
    export_dir = export_directory(args.model_path, args.model_prefix)
    export = read_export_config(export_dir)
    check([f"{args.model_path} was exported in {export['dtype']}, which serves on GPU (--device gpu); on CPU "
           "serve a float32 export"] if args.device == "cpu" and export["dtype"] != "float32" else [])
    runner = GLMRunner(export_dir, args.backend, args.device, args.cpu_threads)
    io.src_length, io.tgt_length = io.src_length or export["src_length"], io.tgt_length or export["tgt_length"]
    check([f"--{name} {getattr(io, name)} exceeds the export's {export[name]}: export again with a larger one"
           for name in ("src_length", "tgt_length") if getattr(io, name) > export[name]])
    src_length = check_lengths(io, gen_args, export["src_length"] + export["tgt_length"])
    template = runner.template()
    decoding = gen_args.decoding_config(template, max_length=io.tgt_length)
    outputs = predict_records(read_inputs(io, held_out_pairs() if demo else None), template, io, src_length, decoding,
                              lambda prompts: runner.generate(prompts, decoding))
    write_outputs(io, outputs)
