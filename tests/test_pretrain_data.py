"""Pre-training data: `python -m paddle_glm.preprocess` writes token files PaddleNLP's reader reads back exactly;
bad lines name `file:line` (or are skipped and counted); packing keeps every token once; blending follows the
weights; per-rank shards are disjoint and complete; samples depend on the seed alone."""
from __future__ import annotations

import contextlib
import io
import json
from collections import Counter

import numpy as np
import pytest
from paddlenlp.data.indexed_dataset import MMapIndexedDataset

from paddle_glm.data import DataError
from paddle_glm.models import load_template
from paddle_glm.preprocess import main as preprocess_main, token_dtype
from paddle_glm.pretrain_data import BlendedSamples, Corpus, PretrainDataset, parse_data_path, sampler
from paddle_glm.pretrain_demo import demo_documents

DOCUMENTS = demo_documents(60, seed=5)


def write_corpus(path, texts, key="text"):
    path.write_text("".join(json.dumps({key: t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def read_back(prefix):
    with contextlib.redirect_stdout(io.StringIO()):
        dataset = MMapIndexedDataset(prefix)
    return dataset


@pytest.fixture(scope="module")
def corpus(demo_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    prefix = str(root / "corpus")
    result = preprocess_main(["--input", write_corpus(root / "corpus.jsonl", DOCUMENTS), "--model_name_or_path",
                              demo_base["model"], "--output_prefix", prefix, "--disable_tqdm"])
    return {"prefix": prefix, "result": result, "root": root}


def test_index_round_trips_through_paddlenlp_reader(demo_base, corpus):
    template = load_template(demo_base["model"])
    expected = [template.encode(text) + [template.tokenizer.eos_token_id] for text in DOCUMENTS]
    dataset = read_back(corpus["prefix"])
    assert len(dataset) == len(DOCUMENTS) and dataset.doc_idx.tolist() == list(range(len(DOCUMENTS) + 1))
    assert [dataset[i].tolist() for i in range(len(dataset))] == expected
    assert dataset[0].dtype == np.uint16 and corpus["result"]["tokens"] == sum(map(len, expected))
    assert token_dtype(65536) is np.uint16 and token_dtype(65537) is np.int32  # ChatGLM-6B's 130k ids: int32


def test_text_input_and_workers_write_the_same_files(demo_base, corpus, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(DOCUMENTS[:30]) + "\n\n" + "\n".join(DOCUMENTS[30:]) + "\n", encoding="utf-8")
    preprocess_main(["--input", str(text), "--model_name_or_path", demo_base["model"], "--output_prefix",
                     str(tmp_path / "two"), "--workers", "2", "--disable_tqdm"])
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"two{suffix}").read_bytes() == open(corpus["prefix"] + suffix, "rb").read()
    assert not list(tmp_path.glob("*.tmp-*"))  # written under temporary names, renamed when complete


def test_bad_lines_name_file_and_line_or_are_skipped_and_counted(demo_base, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "\xe4\xbd\xa0\xe5\xa5\xbd"}\n{"text": \n{"body": "x"}\n{"text": "  "}\n'
                     b'\xff\xfe\n{"text": "\xe5\x86\x8d\xe8\xa7\x81"}\n')
    flags = ["--input", str(path), "--model_name_or_path", demo_base["model"], "--output_prefix",
             str(tmp_path / "bad"), "--disable_tqdm"]
    with pytest.raises(DataError, match=rf"^{path}:2: invalid JSON"):
        preprocess_main(flags)
    assert not list(tmp_path.glob("bad.*[nx]"))  # nothing half-written
    result = preprocess_main(flags + ["--skip_invalid_examples"])
    assert result["documents"] == 2 and result["skipped"] == 4
    listed = [json.loads(line) for line in (tmp_path / "bad.skipped.jsonl").read_text().splitlines()]
    assert [(item["line"], item["reason"].split(" (")[0]) for item in listed] == [
        (2, "invalid JSON"), (3, "missing field 'text'"), (4, "field 'text' is empty"), (5, "not UTF-8 text")]
    assert len(read_back(str(tmp_path / "bad"))) == 2
    with pytest.raises(DataError, match="unknown corpus format"):
        preprocess_main(["--input", str(tmp_path / "c.csv")] + flags[2:])


def test_packing_keeps_every_token_exactly_once(corpus):
    stream = np.concatenate([d.astype("int64") for d in read_back(corpus["prefix"])])
    data = Corpus(corpus["prefix"])
    for length in (7, 64, 127):
        count = data.num_samples(length)
        blended = BlendedSamples([data], [1.0], length, count, seed=3)
        numbers = [blended.locate(i)[1] for i in range(count)]
        assert sorted(numbers) == list(range(count)) and numbers != sorted(numbers)  # each once, shuffled
        pieces = {n: blended.tokens(i) for i, n in enumerate(numbers)}
        assert sum(len(p) for p in pieces.values()) == len(stream)  # counts: nothing dropped or duplicated
        assert np.array_equal(np.concatenate([pieces[n] for n in range(count)]), stream)
        assert all(len(pieces[n]) == length for n in range(count - 1))


def test_blending_follows_the_weights_and_passes_over_a_small_corpus_again(corpus, tmp_path):
    data = Corpus(corpus["prefix"])
    length = 32
    size = 10 * data.num_samples(length)
    blended = BlendedSamples([data, data], [0.7, 0.3], length, size, seed=1)
    share = Counter(int(c) for c in blended.corpus_index)
    assert abs(share[0] / size - 0.7) < 1e-3 and abs(share[1] / size - 0.3) < 1e-3
    passes = [[blended.locate(i)[1] for i in range(size) if blended.corpus_index[i] == 0 and
               blended.drawn[i] // data.num_samples(length) == p] for p in (0, 1)]
    assert sorted(passes[0]) == sorted(passes[1]) == list(range(data.num_samples(length)))
    assert passes[0] != passes[1]  # each pass in its own order
    assert parse_data_path(["0.7", "a", "0.3", "b"]) == [(0.7, "a"), (0.3, "b")]
    assert parse_data_path(["only"]) == [(1.0, "only")]
    with pytest.raises(ValueError, match="WEIGHT PREFIX pairs"):
        parse_data_path(["0.7", "a", "b"])
    with pytest.raises(ValueError, match=r"corpus\.bin and .*corpus\.idx not found.*paddle_glm\.preprocess"):
        Corpus(str(tmp_path / "corpus"))


@pytest.mark.parametrize("ranks", [2, 3])
def test_rank_shards_are_disjoint_and_complete(ranks):
    batch, steps = 4, 5
    dataset = list(range(batch * ranks * steps))  # the run's size: --max_steps global batches
    shards = [[i for b in sampler(dataset, batch, ranks, rank, steps, 1, 1) for i in b] for rank in range(ranks)]
    assert all(len(shard) == batch * steps for shard in shards)
    assert sorted(i for shard in shards for i in shard) == dataset  # disjoint and complete
    for step in range(steps):  # step s trains global batch s, split over the ranks
        together = sorted(i for shard in shards for i in shard[step * batch:(step + 1) * batch])
        assert together == list(range(step * batch * ranks, (step + 1) * batch * ranks))


def test_samples_depend_on_the_seed_alone(corpus):
    data = Corpus(corpus["prefix"])

    def dataset(seed):
        return PretrainDataset(BlendedSamples([data], [1.0], 32, 40, seed), lambda tokens, rng: {
            "tokens": tokens, "draw": rng.integers(1 << 30)})

    first, again, other = dataset(5), dataset(5), dataset(6)
    forward = [first[i] for i in range(40)]
    for i in np.random.default_rng(0).permutation(40):  # another access order (a resumed run starts in the middle)
        assert np.array_equal(again[i]["tokens"], forward[i]["tokens"]) and again[i]["draw"] == forward[i]["draw"]
    assert any(not np.array_equal(forward[i]["tokens"], other[i]["tokens"]) for i in range(40))
