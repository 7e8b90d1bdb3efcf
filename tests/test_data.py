import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from autoprune_ray.compress import data as data_mod
from autoprune_ray.compress.data import (FORTUNES_MARKER, SEALED_MESSAGE, Corpus, HeldOutSealed, austen_corpus,
                                         eval_stream, file_corpus, fortunes_corpus, load_corpus, load_token_data,
                                         sample_stream_windows)
from autoprune_ray.compress.protocol import Protocol, preset
from tests_support import pseudo_text

needs_fortunes = pytest.mark.skipif(not FORTUNES_MARKER.exists(),
                                    reason="Debian's fortunes is not installed (apt-get install fortunes)")


def contains(haystack: torch.Tensor, needle: torch.Tensor) -> bool:
    if len(needle) > len(haystack):
        return False
    return bool((haystack.unfold(0, len(needle), 1) == needle).all(dim=1).any())


def marked_corpus(tmp_path, name="c.txt"):
    """30 paragraphs: 24 calibrate, then 3 validation (ibex) and 3 held-out (quokka) paragraphs."""
    validation = [f"Validation marker ibex number {i} walks." for i in range(3)]
    heldout = [f"Heldout marker quokka number {i} sleeps." for i in range(3)]
    path = tmp_path / name
    path.write_text("\n\n".join([pseudo_text(24, seed=3)] + validation + heldout))
    return path


@pytest.fixture
def trap_corpus(monkeypatch, corpus_file):
    """A corpus whose held-out part raises when read, registered as 'trap'."""
    docs = corpus_file.read_text().split("\n\n")

    def unreadable():
        raise AssertionError("the held-out split was read")
    monkeypatch.setitem(data_mod.CORPORA, "trap", lambda: Corpus("trap", docs[:300], docs[300:350], unreadable))


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
    with pytest.raises(ValueError, match="validation text"):
        eval_stream(["word"], tiny_lm.tokenizer, 64, None, "validation")


def test_file_corpus_has_three_disjoint_parts(tmp_path):
    corpus = file_corpus(str(marked_corpus(tmp_path)), holdout=0.1)
    assert len(corpus.calibration_docs) == 24 and len(corpus.validation_docs) == len(corpus.evaluation_docs) == 3
    assert all("ibex" in d for d in corpus.validation_docs)
    assert all("quokka" in d for d in corpus.evaluation_docs)
    assert not any("ibex" in d or "quokka" in d for d in corpus.calibration_docs)
    parts = [set(corpus.calibration_docs), set(corpus.validation_docs), set(corpus.evaluation_docs)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    again = file_corpus(str(marked_corpus(tmp_path)), holdout=0.1)
    assert again == corpus and again.evaluation_docs == corpus.evaluation_docs  # deterministic


def test_windows_come_from_the_calibration_part_only(tiny_lm, tmp_path):
    path = marked_corpus(tmp_path)
    tok = tiny_lm.tokenizer
    data = load_token_data(tok, str(path), nsamples=16, seqlen=16, seed=0)
    corpus = file_corpus(str(path))
    stream = data_mod._encode(tok, "\n\n".join(corpus.calibration_docs))
    assert all(contains(stream, w) for w in data.calibration)
    assert "ibex" not in tok.decode(stream) and "quokka" not in tok.decode(stream)
    assert "ibex" in tok.decode(data.validation[0]) and "quokka" not in tok.decode(data.validation[0])
    assert "quokka" in tok.decode(data.evaluation[0]) and "ibex" not in tok.decode(data.evaluation[0])
    desc = data.describe()
    assert desc["calib_tokens"] == 16 * 16 and desc["eval_tokens"] == data.evaluation.shape[1]
    assert desc["val_tokens"] == data.validation.shape[1] > 0 and desc["calib_source_tokens"] == stream.numel()
    again = load_token_data(tok, str(path), nsamples=16, seqlen=16, seed=0)
    for a, b in [(data.calibration, again.calibration), (data.validation, again.validation),
                 (data.evaluation, again.evaluation)]:
        assert torch.equal(a, b)


def test_val_tokens_caps_the_validation_stream(tiny_lm, corpus_file):
    tok = tiny_lm.tokenizer
    capped = load_token_data(tok, str(corpus_file), nsamples=2, seqlen=16, val_tokens=40, eval_tokens=64)
    assert capped.validation.shape == (1, 32) and capped.evaluation.shape == (1, 64)
    whole = load_token_data(tok, str(corpus_file), nsamples=2, seqlen=16, eval_tokens=64)
    expected = eval_stream(file_corpus(str(corpus_file)).validation_docs, tok, 16, None)
    assert torch.equal(whole.validation, expected) and whole.validation.shape[1] > 32
    assert torch.equal(whole.validation[:, :32], capped.validation)


def test_sealed_heldout_is_never_read(tiny_lm, trap_corpus):
    data = load_token_data(tiny_lm.tokenizer, "trap", nsamples=2, seqlen=16, val_tokens=64, heldout=False)
    assert data.sealed and data.validation.shape == (1, 64)
    with pytest.raises(HeldOutSealed, match="sealed: a search selects on the validation split"):
        data.evaluation
    with pytest.raises(HeldOutSealed) as err:
        data.eval_tokens
    assert str(err.value) == SEALED_MESSAGE and isinstance(err.value, RuntimeError)
    assert data.describe()["eval_tokens"] is None and data.describe()["eval_data"] == "trap"
    with pytest.raises(AssertionError, match="held-out split was read"):
        load_token_data(tiny_lm.tokenizer, "trap", nsamples=2, seqlen=16, val_tokens=64)


def test_sealed_heldout_of_another_corpus_is_not_even_loaded(tiny_lm, corpus_file, monkeypatch):
    def explode():
        raise AssertionError("the evaluation corpus was loaded")
    monkeypatch.setitem(data_mod.CORPORA, "explode", explode)
    data = load_token_data(tiny_lm.tokenizer, str(corpus_file), "explode", 2, 16, 0, None, 64, heldout=False)
    assert data.sealed and data.eval_name == "explode"


def test_validation_comes_from_the_calibration_corpus(tiny_lm, corpus_file, tmp_path):
    other = marked_corpus(tmp_path, "other.txt")
    data = load_token_data(tiny_lm.tokenizer, str(corpus_file), str(other), nsamples=2, seqlen=16)
    assert data.calib_name == corpus_file.name and data.eval_name == "other.txt"
    expected = eval_stream(file_corpus(str(corpus_file)).validation_docs, tiny_lm.tokenizer, 16, None)
    assert torch.equal(data.validation, expected)
    assert "quokka" in tiny_lm.tokenizer.decode(data.evaluation[0])


def test_jsonl_and_parquet_corpora(tmp_path):
    docs = [f"document number {i} " + pseudo_text(1, seed=i) for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.parquet"):
        corpus = load_corpus(str(tmp_path / name))
        assert corpus.calibration_docs == docs[:16] and corpus.validation_docs == docs[16:18]
        assert corpus.evaluation_docs == docs[18:]


def test_bad_corpus_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="unknown corpus"):
        load_corpus("wikitext3")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported"):
        file_corpus(str(tmp_path / "x.csv"))
    (tmp_path / "two.txt").write_text("one paragraph\n\nanother one")
    with pytest.raises(ValueError, match="at least three documents"):
        file_corpus(str(tmp_path / "two.txt"))
    (tmp_path / "three.txt").write_text("a\n\nb\n\nc")
    corpus = file_corpus(str(tmp_path / "three.txt"), holdout=0.5)
    assert (corpus.calibration_docs, corpus.validation_docs, corpus.evaluation_docs) == (["a"], ["b"], ["c"])


def test_protocol_val_tokens():
    assert preset("smoke").val_tokens == 1024 and preset("paper").val_tokens is None
    assert preset("cpu").val_tokens is None
    with pytest.raises(ValueError, match="val_tokens"):
        Protocol(seqlen=128, val_tokens=100).validate()
    assert preset("smoke").with_overrides(val_tokens=256).val_tokens == 256


def test_austen_offline_corpus():
    corpus = austen_corpus()
    assert len(corpus.calibration_docs) == len(corpus.validation_docs) == 5
    assert corpus.calibration_docs[0].startswith("EMMA") and corpus.validation_docs[0].endswith("FINIS")
    assert corpus.evaluation_docs[0].startswith("Persuasion")
    assert "Sir Walter Elliot, of Kellynch Hall" in corpus.evaluation_docs[0]
    assert all("Kellynch" not in d for d in corpus.calibration_docs + corpus.validation_docs)
    calib_chars, val_chars = sum(map(len, corpus.calibration_docs)), sum(map(len, corpus.validation_docs))
    assert calib_chars > 3_000_000 and 0.08 < val_chars / (calib_chars + val_chars) < 0.15
    calib_paragraphs = {p for d in corpus.calibration_docs for p in d.split("\n\n")}
    # Chapter headings ("CHAPTER XVI") recur across novels; real paragraphs are unique.
    long_val = [p for d in corpus.validation_docs for p in d.split("\n\n") if len(p) > 100]
    assert len(long_val) > 500 and not calib_paragraphs & set(long_val)
    # Each novel's validation text is the paragraphs that follow its calibration text.
    assert "Emma, in forwarding to you the enclosed" not in corpus.calibration_docs[0]
    assert "Emma, in forwarding to you the enclosed" in corpus.validation_docs[0]


def test_austen_seals_persuasion_without_reading_it(monkeypatch):
    read = []
    real = data_mod._read_r_lazyload
    monkeypatch.setattr(data_mod, "_read_r_lazyload", lambda folder, names: read.append(names) or real(folder, names))
    corpus = austen_corpus()
    assert all(data_mod.AUSTEN_HELDOUT not in names for names in read)
    corpus.evaluation_docs
    assert read[-1] == (data_mod.AUSTEN_HELDOUT,)


@needs_fortunes
def test_fortunes_corpus_is_split_by_text_hash():
    corpus = fortunes_corpus()
    calib, val, held = corpus.calibration_docs, corpus.validation_docs, corpus.evaluation_docs
    total = len(calib) + len(val) + len(held)
    chars = sum(map(len, calib + val + held))
    assert 10_000 < total < 30_000 and 2_000_000 < chars < 3_000_000
    assert 0.07 < len(val) / total < 0.13 and 0.07 < len(held) / total < 0.13
    assert not (set(calib) & set(val) or set(calib) & set(held) or set(val) & set(held))
    assert all(d == d.strip() and d and "\n%\n" not in f"\n{d}\n" for d in calib[:2000])
    again = fortunes_corpus()
    assert (again.calibration_docs, again.validation_docs, again.evaluation_docs) == (calib, val, held)
    assert load_corpus("fortunes").name == "fortunes"


@needs_fortunes
def test_fortunes_windows_never_see_validation_text(tiny_lm):
    tok = tiny_lm.tokenizer
    data = load_token_data(tok, "fortunes", nsamples=4, seqlen=32, val_tokens=256, heldout=False)
    assert data.calibration.shape == (4, 32) and data.validation.shape == (1, 256) and data.sealed
    calib_text = "\n\n".join(fortunes_corpus().calibration_docs)
    assert all(tok.decode(w) in calib_text for w in data.calibration)


def test_missing_fortunes_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(data_mod, "FORTUNES_MARKER", tmp_path / "computers")
    with pytest.raises(FileNotFoundError, match="apt-get install -y --no-install-recommends fortunes"):
        fortunes_corpus()
