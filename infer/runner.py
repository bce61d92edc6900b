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

from paddle_glm.args import InputError, check, default_device, exit_on_bad_input
from paddle_glm.batch_predict import check_lengths, parse_with_io, predict_records, read_inputs, write_outputs
from paddle_glm.decoding import DecodingConfig, GenerationResult, generate
from paddle_glm.demo import held_out_pairs
from paddle_glm.inputs import Example, generation_batch
from paddle_glm.logs import configure as configure_logs

from export.exporter import CONFIG_NAME, EXPORT_FORMAT_VERSION

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
        graphs = self.config["graphs"]
        check_graph_files(export_dir, graphs, backend)
        self.engine = create_engine(backend, export_dir, graphs, device, cpu_threads)

    def template(self):
        """The exported family's template over the tokenizer saved with the export."""
        from paddle_glm.models import FAMILIES

        family = FAMILIES[self.config["family"]]
        return family.template(family.load_tokenizer(self.export_dir))

    def generate(self, prompts: List[Example], decoding: DecodingConfig) -> GenerationResult:
        batch = generation_batch(prompts, decoding.pad_token_id)
        return generate(ExportedStepper(self.engine, batch), len(prompts), decoding)


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


def check_graph_files(export_dir: str, graphs: dict, backend: str) -> None:
    """Raise FileNotFoundError naming every file of the export that the backend needs and that is missing."""
    suffixes = (".json", ".pdiparams") if backend == "paddle" else (".onnx",)
    needed = [stem + suffix for stem in graphs.values() for suffix in suffixes] + ["tokenizer_config.json"]
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
