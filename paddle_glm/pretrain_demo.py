"""The pre-training demo's corpus and model, made on the spot, offline: documents of generated facts (the demo
question-generation passages, each followed by its questions and answers), a sentencepiece vocabulary trained on
them and a tiny random GLM, then the corpus preprocessed into token files."""
from __future__ import annotations

import os
import random
from typing import List

from .data import write_json_lines
from .demo import build_demo_model
from .demo_data import qg_records
from .logs import logger
from .preprocess import preprocess

__all__ = ["demo_documents", "prepare_pretrain_demo", "DEMO_DOCUMENTS"]

DEMO_DOCUMENTS = 4000


def demo_documents(count: int, seed: int) -> List[str]:
    """`count` documents of 2 to 5 facts each, every fact followed by a question about it and its answer."""
    rng = random.Random(seed)
    records = qg_records(count * 4, seed)
    documents = []
    for _ in range(count):
        facts = rng.sample(records, rng.randint(2, 5))
        documents.append("".join(f"{r['context']}{r['question']}答案是{r['answer']}。" for r in facts))
    return documents


def prepare_pretrain_demo(model_dir: str, data_prefix: str, seed: int = 0, documents: int = DEMO_DOCUMENTS) -> None:
    """Write whatever of the demo is missing: the corpus (`DATA_PREFIX.jsonl`), the base model with its tokenizer,
    and the corpus's token files (`DATA_PREFIX.bin` / `.idx`)."""
    corpus = f"{data_prefix}.jsonl"
    if not os.path.isfile(corpus):
        write_json_lines(({"text": text} for text in demo_documents(documents, seed)), corpus)
        logger.info(f"demo corpus written: {corpus} ({documents} documents)")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        build_demo_model(model_dir, corpus, seed)
    if not os.path.isfile(f"{data_prefix}.idx"):
        result = preprocess(corpus, model_dir, data_prefix, progress=False)
        logger.info(f"demo corpus tokenized: {data_prefix}.bin/.idx, {result['tokens']} tokens")
