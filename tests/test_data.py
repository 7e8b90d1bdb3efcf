import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from autoprune_ray.compress.data import (austen_corpus, eval_stream, file_corpus, load_corpus, load_token_data,
                                         sample_stream_windows)
from tests_support import pseudo_text


def contains(haystack: torch.Tensor, needle: torch.Tensor) -> bool:
    return any(torch.equal(haystack[i:i + len(needle)], needle) for i in range(len(haystack) - len(needle) + 1))


def test_windows_are_seeded_and_come_from_the_stream():
    ids = torch.arange(1000)
    a = sample_stream_windows(ids, 5, 16, seed=0)
    assert a.shape == (5, 16)
    assert torch.equal(a, sample_stream_windows(ids, 5, 16, seed=0))
    assert not torch.equal(a, sample_stream_windows(ids, 5, 16, seed=1))
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()  # contiguous windows


def test_eval_stream_drops_the_tail(tiny_lm):
    ids = eval_stream(["word " * 300], tiny_lm.tokenizer, seqlen=64, max_tokens=None)
    assert ids.shape[1] % 64 == 0 and ids.shape[1] > 0
    assert eval_stream(["word " * 300], tiny_lm.tokenizer, 64, max_tokens=130).shape[1] == 128


def test_calibration_never_overlaps_evaluation(tiny_lm, tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(pseudo_text(50, seed=3) + "\n\nUNIQUE HELDOUT MARKER zebra quokka." * 3)
    corpus = file_corpus(str(path), holdout=0.1)
    assert not set(corpus.calibration_docs) & set(corpus.evaluation_docs)
    assert any("quokka" in d for d in corpus.evaluation_docs)
    assert not any("quokka" in d for d in corpus.calibration_docs)
    data = load_token_data(tiny_lm.tokenizer, str(path), nsamples=4, seqlen=16, seed=0)
    desc = data.describe()
    assert desc["calib_tokens"] == 64 and desc["eval_tokens"] == data.evaluation.shape[1]
    assert desc["calib_source_tokens"] > 0


def test_jsonl_and_parquet_corpora(tmp_path):
    docs = [f"document number {i} " + pseudo_text(1, seed=i) for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.parquet"):
        corpus = load_corpus(str(tmp_path / name))
        assert corpus.calibration_docs == docs[:18] and corpus.evaluation_docs == docs[18:]


def test_bad_corpus_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="unknown corpus"):
        load_corpus("wikitext3")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported"):
        file_corpus(str(tmp_path / "x.csv"))


def test_austen_offline_corpus():
    corpus = austen_corpus()
    assert len(corpus.calibration_docs) == 5 and len(corpus.evaluation_docs) == 1
    assert corpus.evaluation_docs[0].startswith("Persuasion")
    assert "Sir Walter Elliot, of Kellynch Hall" in corpus.evaluation_docs[0]
    assert all("Kellynch" not in d for d in corpus.calibration_docs)
    assert sum(map(len, corpus.calibration_docs)) > 3_000_000
