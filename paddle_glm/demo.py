"""The bundled demo: data, a sentencepiece vocabulary and a tiny GLM, made on the spot, offline.

`python finetune_generation.py` with no arguments fine-tunes this tiny GLM on generated
DuReaderQG-style data in a few CPU minutes; nothing is downloaded.
"""
from __future__ import annotations

import io
import json
import os
from typing import Dict, List

import paddle
import sentencepiece as spm

from .data import TextPair, read_pairs
from .demo_data import demo_texts, write_demo_splits
from .logs import logger
from .models.glm import GLMConfig, GLMForConditionalGeneration, tokenizer_from_sentencepiece

__all__ = ["DEMO_MODEL_CONFIG", "DEMO_CONFIG_DIR", "prepare_demo", "held_out_pairs"]

# The demos' argument files (`python finetune_generation.py` with no arguments runs demo/finetune_argument.json).
DEMO_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tasks", "configs", "demo")

# A GLM small enough to train from scratch on 2 CPU cores in minutes; same architecture as glm-large-chinese.
DEMO_MODEL_CONFIG = dict(
    num_layers=2, hidden_size=128, num_attention_heads=4, max_sequence_length=256,
    embedding_dropout_prob=0.1, attention_dropout_prob=0.1, output_dropout_prob=0.1,
    block_position_encoding=True, output_predict=True, parallel_output=False, initializer_range=0.02,
)
DEMO_VOCAB_SIZE = 1500
DEMO_SPLIT_SIZES = {"qg": (3000, 120), "belle": (3000, 120), "adgen": (3000, 120)}


def prepare_demo(model_dir: str, train_file: str, dev_file: str, kind: str = "qg", seed: int = 0) -> None:
    """Write whatever of the demo is missing: data splits, then the base model with its tokenizer."""
    if not (os.path.isfile(train_file) and os.path.isfile(dev_file)):
        train, dev = DEMO_SPLIT_SIZES[kind]
        paths = write_demo_splits(os.path.dirname(train_file), kind, train=train, dev=dev, seed=seed)
        _check_demo_paths(paths, train_file, dev_file)
        logger.info(f"demo data written: {paths}")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        build_demo_model(model_dir, train_file, seed)


def held_out_pairs(count: int = 8, arguments: str = "finetune_argument.json") -> List[TextPair]:
    """The first `count` (source, reference) pairs of the demo's dev set, which training never saw: serving them
    beside their references shows what the demo model really learned. Empty when the demo has not run."""
    with open(os.path.join(DEMO_CONFIG_DIR, arguments), encoding="utf-8") as handle:
        flags = json.load(handle)
    if not os.path.isfile(flags["dev_file"]):
        return []
    from tasks import get_task

    task = get_task(flags["task_name"])
    return read_pairs(flags["dev_file"], lambda record, where: task.to_pairs(record, where, None), limit=count)


def _check_demo_paths(paths: Dict[str, str], train_file: str, dev_file: str) -> None:
    if os.path.abspath(paths["train"]) != os.path.abspath(train_file) or os.path.abspath(paths["dev"]) != os.path.abspath(dev_file):
        raise ValueError(
            f"--prepare_demo writes train.json and dev.json side by side: got --train_file {train_file} "
            f"and --dev_file {dev_file}"
        )


def build_demo_model(model_dir: str, train_file: str, seed: int = 0) -> None:
    """Train a sentencepiece model on the demo data and save a randomly initialised tiny GLM with it."""
    os.makedirs(model_dir, exist_ok=True)
    with open(train_file, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    model_proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(demo_texts(records))), model_writer=model_proto, vocab_size=DEMO_VOCAB_SIZE,
        character_coverage=1.0, model_type="unigram", hard_vocab_limit=False, minloglevel=2,
    )
    spm_path = os.path.join(model_dir, "cog-pretrain.model")
    with open(spm_path, "wb") as handle:
        handle.write(model_proto.getvalue())
    tokenizer = tokenizer_from_sentencepiece(spm_path)
    tokenizer.save_pretrained(model_dir)
    paddle.seed(seed)
    vocab_size = -(-len(tokenizer) // 16) * 16  # GLM checkpoints round their vocabulary up, as 50010 -> 50048
    model = GLMForConditionalGeneration(GLMConfig(vocab_size=vocab_size, **DEMO_MODEL_CONFIG))
    model.save_pretrained(model_dir)
    logger.info(f"demo base model written to {model_dir} (vocab {vocab_size})")
