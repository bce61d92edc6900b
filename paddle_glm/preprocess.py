"""`python -m paddle_glm.preprocess`: a text corpus -> the token files pre-training reads.

    python -m paddle_glm.preprocess --input corpus.jsonl --json_key text --model_name_or_path M \\
        --output_prefix data/corpus [--workers 4] [--skip_invalid_examples]

Input: JSON lines (`.json`, `.jsonl`; the document is the `--json_key` field) or plain text (`.txt`, one document a
line). Each document is tokenized with the model's tokenizer (its family's `encode`: text never turns into special
tokens) and ended with the tokenizer's end token, then written in the Megatron / PaddleNLP memory-mapped format,
`PREFIX.bin` + `PREFIX.idx`, through `paddlenlp.data.indexed_dataset`'s builder (one item and one document per
input document; uint16 when every id fits, else int32), so PaddleNLP's `MMapIndexedDataset` and its pre-training
tools read the files too. Both files are written under temporary names and renamed when complete.

A bad line stops the run with `file:line: what is wrong` (as fine-tuning's data files do); with
`--skip_invalid_examples` it is skipped instead, counted by reason and listed in `PREFIX.skipped.jsonl`.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from multiprocessing import Pool
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from paddlenlp.data.indexed_dataset import MMapIndexedDatasetBuilder, data_file_path, index_file_path
from tqdm import tqdm

from .args import VERBOSE_HELP, exit_on_bad_input
from .data import DataError, read_json_lines, read_text_lines, summarize_skipped, text_field, write_json_lines
from .logs import configure as configure_logs, logger
from .models import family_of

__all__ = ["main", "token_dtype", "read_documents", "preprocess"]

JSON_SUFFIXES = (".json", ".jsonl")
TEXT_SUFFIXES = (".txt",)
BATCH = 64  # documents per tokenization task handed to a worker


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m paddle_glm.preprocess", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="The corpus: JSON lines (.json/.jsonl) or text (.txt, one "
                                                       "document a line).")
    parser.add_argument("--json_key", default="text", help="The field of a JSON line that holds the document.")
    parser.add_argument("--model_name_or_path", required=True, help="The model (or tokenizer) whose tokenizer to use.")
    parser.add_argument("--output_prefix", required=True, help="Writes PREFIX.bin and PREFIX.idx.")
    parser.add_argument("--workers", type=int, default=1, help="Tokenizing processes.")
    parser.add_argument("--skip_invalid_examples", action="store_true",
                        help="Skip bad lines (counted, listed in PREFIX.skipped.jsonl) instead of stopping.")
    parser.add_argument("--disable_tqdm", action="store_true", help="No progress bar.")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    args = parser.parse_args(list(argv))
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: must be at least 1")
    return args


def token_dtype(vocabulary: int) -> type:
    """uint16 when every id fits (PaddleNLP's choice halves the files), else int32."""
    return np.uint16 if vocabulary <= np.iinfo(np.uint16).max + 1 else np.int32


def read_documents(path: str, json_key: str, skipped: Optional[List[dict]] = None) -> Iterator[str]:
    """The documents of a corpus file. A bad line raises its DataError (`file:line: ...`); given a list `skipped`,
    it is appended there as {"file", "line", "reason"} and reading goes on."""
    on_error = None if skipped is None else _skipper(path, skipped)
    if path.endswith(TEXT_SUFFIXES):
        lines: Iterable[Tuple[str, object]] = read_text_lines(path, on_error)
    elif path.endswith(JSON_SUFFIXES):
        lines = read_json_lines(path, on_error)
    else:
        raise DataError(f"{path}: unknown corpus format: name it .jsonl / .json (JSON lines, the document in "
                        f"--json_key) or .txt (one document a line)")
    for where, line in lines:
        if isinstance(line, str):
            yield line
            continue
        try:
            yield text_field(line, [json_key], where)
        except DataError as error:
            if skipped is None:
                raise
            on_error(int(where.rsplit(":", 1)[1]), error)


def _skipper(path: str, skipped: List[dict]):
    def skip(number: int, error: DataError) -> None:
        prefix = f"{path}:{number}: "
        message = str(error)
        skipped.append({"file": path, "line": number, "reason": message[len(prefix):] if message.startswith(prefix)
                        else message})

    return skip


# ------------------------------------------------------------------------------------------------ tokenizing

_WORKER_TEMPLATE = None  # each worker process's template, loaded once


def _load_template(model_name_or_path: str):
    family = family_of(model_name_or_path)
    return family.template(family.load_tokenizer(model_name_or_path))


def _init_worker(model_name_or_path: str, verbose: bool) -> None:
    global _WORKER_TEMPLATE
    configure_logs(["--verbose"] if verbose else [])
    _WORKER_TEMPLATE = _load_template(model_name_or_path)


def _encode_batch(texts: List[str]) -> List[List[int]]:
    return [_WORKER_TEMPLATE.encode(text) for text in texts]


def _batches(items: Iterable[str], size: int) -> Iterator[List[str]]:
    batch: List[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def preprocess(input_path: str, model_name_or_path: str, output_prefix: str, json_key: str = "text",
               workers: int = 1, skipped: Optional[List[dict]] = None, progress: bool = True,
               verbose: bool = False) -> dict:
    """Tokenize `input_path` into `output_prefix`.bin/.idx; returns counts and speeds."""
    template = _load_template(model_name_or_path)
    end = template.tokenizer.eos_token_id
    dtype = token_dtype(len(template.tokenizer))
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    partial = f"{output_prefix}.tmp-{os.getpid()}"
    builder = MMapIndexedDatasetBuilder(data_file_path(partial), dtype=dtype)
    documents = tokens = 0
    start = time.perf_counter()
    batches = _batches(read_documents(input_path, json_key, skipped), BATCH)
    pool = Pool(workers, initializer=_init_worker, initargs=(model_name_or_path, verbose)) if workers > 1 else None
    bar = tqdm(unit=" docs", disable=not progress, desc="tokenizing", file=sys.stderr)
    try:
        encoded = pool.imap(_encode_batch, batches) if pool else ([template.encode(t) for t in b] for b in batches)
        for batch in encoded:
            for ids in batch:
                builder.add_item(np.array(ids + [end], dtype=dtype))
                builder.end_document()
                tokens += len(ids) + 1
            documents += len(batch)
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.update(len(batch))
            bar.set_postfix_str(f"{documents / elapsed:.0f} docs/s, {tokens / elapsed:.0f} tokens/s", refresh=False)
        if not documents:
            raise DataError(f"{input_path}: no valid documents" + (f": all {len(skipped)} lines skipped" if skipped
                                                                   else ""))
        with contextlib.redirect_stdout(io.StringIO()):  # PaddleNLP's builder prints its totals
            builder.finalize(index_file_path(partial))
        os.replace(data_file_path(partial), data_file_path(output_prefix))
        os.replace(index_file_path(partial), index_file_path(output_prefix))
    finally:
        bar.close()
        if pool:
            pool.terminate()
        for leftover in (data_file_path(partial), index_file_path(partial)):
            if os.path.exists(leftover):
                os.remove(leftover)
    elapsed = max(time.perf_counter() - start, 1e-9)
    return {"documents": documents, "tokens": tokens, "dtype": np.dtype(dtype).name, "seconds": elapsed,
            "documents_per_second": documents / elapsed, "tokens_per_second": tokens / elapsed}


@exit_on_bad_input
def main(argv: Optional[List[str]] = None) -> dict:
    configure_logs(argv)
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    skipped: Optional[List[dict]] = [] if args.skip_invalid_examples else None
    result = preprocess(args.input, args.model_name_or_path, args.output_prefix, args.json_key, args.workers,
                        skipped, progress=not args.disable_tqdm, verbose=args.verbose)
    logger.info(f"{data_file_path(args.output_prefix)} + .idx written: {result['documents']} documents, "
                f"{result['tokens']} tokens ({result['dtype']}), {result['documents_per_second']:.0f} docs/s, "
                f"{result['tokens_per_second']:.0f} tokens/s")
    if skipped:
        listing = f"{args.output_prefix}.skipped.jsonl"
        write_json_lines(skipped, listing)
        logger.warning(f"skipped {len(skipped)} invalid lines of {args.input} (--skip_invalid_examples): "
                       f"{summarize_skipped(skipped)}; each is listed in {listing}")
    result["skipped"] = len(skipped or [])
    return result


if __name__ == "__main__":
    main()
