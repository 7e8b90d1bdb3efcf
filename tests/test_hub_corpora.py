"""WikiText-2 and C4 follow the Wanda/SparseGPT loaders; `datasets` is replaced by local tables here
because CI has no hub access (the calls and splits are what is checked)."""
import datasets
import pytest

from autoprune_ray.compress import data as data_mod


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []

    def load_dataset(path, name=None, data_files=None, split=None):
        calls.append((path, name, data_files, split))
        if path == "wikitext":
            return datasets.Dataset.from_dict({"text": [f" = {split} {i} = \n" for i in range(3)]})
        n = 1200 if split == "validation" else 5
        return datasets.Dataset.from_dict({"text": [f"{split} document {i} " + "word " * 40 for i in range(n)]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_wikitext2_joins_splits_with_blank_lines(fake_hub):
    corpus = data_mod.load_corpus("wikitext2")
    assert corpus.evaluation_docs == ["\n\n".join(f" = test {i} = \n" for i in range(3))]
    assert ("wikitext", "wikitext-2-raw-v1", None, "test") in fake_hub


def test_c4_uses_shard_zero_and_first_1100_validation_documents(fake_hub, tiny_lm):
    corpus = data_mod.load_corpus("c4")
    assert corpus.sample_by_document
    assert fake_hub[0][2] == {"train": "en/c4-train.00000-of-01024.json.gz"}
    assert corpus.evaluation_docs[0].count("validation document") == 1100
    tokens = data_mod.load_token_data(tiny_lm.tokenizer, "c4", "wikitext2", nsamples=3, seqlen=8, seed=0)
    assert tokens.calibration.shape == (3, 8) and tokens.calib_name == "c4" and tokens.eval_name == "wikitext2"
