"""Corpora and token windows: calibration windows and a held-out evaluation split that never overlap.

Corpora by name:
  austen     offline default: Jane Austen's six novels from Debian's `r-cran-janeaustenr`;
             five novels calibrate, *Persuasion* is held out for evaluation.
  wikitext2  WikiText-2 raw (train calibrates, test evaluates), through `datasets`.
  c4         C4 en shard 0 (train calibrates, validation evaluates), through `datasets`.
  PATH       a local .txt, .jsonl or .parquet file (field/column `text`); the last
             `holdout` share of its documents is held out for evaluation.
"""
from __future__ import annotations

import gzip
import json
import lzma
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

AUSTEN_DIR = Path("/usr/lib/R/site-library/janeaustenr/data")
AUSTEN_HELDOUT = "persuasion"
DEFAULT_CORPUS = "austen"


@dataclass
class Corpus:
    """Raw documents, already split so that calibration never sees evaluation text."""
    name: str
    calibration_docs: list[str]
    evaluation_docs: list[str]
    sample_by_document: bool = False  # C4 protocol: draw each window from one random document


@dataclass
class TokenData:
    """Token windows for one (calibration corpus, evaluation corpus, tokenizer, sizes, seed)."""
    calibration: torch.Tensor   # [nsamples, seqlen] int64
    evaluation: torch.Tensor    # [1, n_windows * seqlen] int64, tail already dropped
    seqlen: int
    seed: int
    calib_name: str
    eval_name: str
    calib_source_tokens: int    # size of the stream the windows were drawn from

    @property
    def nsamples(self) -> int:
        return self.calibration.shape[0]

    @property
    def eval_tokens(self) -> int:
        return self.evaluation.shape[1]

    def describe(self) -> dict:
        return {"calib_data": self.calib_name, "eval_data": self.eval_name, "nsamples": self.nsamples,
                "seqlen": self.seqlen, "seed": self.seed, "calib_tokens": self.nsamples * self.seqlen,
                "calib_source_tokens": self.calib_source_tokens, "eval_tokens": self.eval_tokens}


# ---------------------------------------------------------------- corpora

def _read_r_lazyload(folder: Path) -> dict[str, list[str]]:
    """Read an installed R package's lazy-load data base (Rdata.rdx index + Rdata.rdb blobs)."""
    import rdata  # pure-Python reader of R's serialization format

    def parse(raw: bytes):
        return rdata.conversion.convert(rdata.parser.parse_data(raw, expand_altrep=True))

    index = parse(gzip.decompress((folder / "Rdata.rdx").read_bytes()))
    blob = (folder / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[int(offset):int(offset) + int(length)]
        # Each chunk: 4-byte length, then zlib data, or a type byte ('Z', 'X') and the body.
        kind = chunk[4:5]
        raw = {b"Z": lambda b: zlib.decompress(b[5:]), b"X": lambda b: lzma.decompress(b[5:])}.get(
            kind, lambda b: zlib.decompress(b[4:]))(chunk)
        out[str(name)] = [str(line) for line in parse(raw)]
    return out


def _reflow(lines: list[str]) -> str:
    """Join hard-wrapped lines into paragraphs separated by blank lines."""
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def austen_corpus() -> Corpus:
    if not (AUSTEN_DIR / "Rdata.rdb").exists():
        raise FileNotFoundError(
            "The offline corpus needs Debian's r-cran-janeaustenr: "
            "apt-get install -y --no-install-recommends r-cran-janeaustenr")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that lazy-load chunks carry no file header
        books = _read_r_lazyload(AUSTEN_DIR)
    calib = [_reflow(books[name]) for name in sorted(books) if name != AUSTEN_HELDOUT]
    return Corpus("austen", calib, [_reflow(books[AUSTEN_HELDOUT])])


def wikitext2_corpus() -> Corpus:
    from datasets import load_dataset
    train = load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
    test = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    # Wanda/SparseGPT join the whole split with blank lines and tokenize it once.
    return Corpus("wikitext2", ["\n\n".join(train["text"])], ["\n\n".join(test["text"])])


def c4_corpus() -> Corpus:
    from datasets import load_dataset
    train = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
                         split="train")
    val = load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                       split="validation")
    # Wanda evaluates on the first 1100 validation documents joined with spaces.
    return Corpus("c4", list(train["text"]), [" ".join(val[:1100]["text"])], sample_by_document=True)


def file_corpus(path: str, holdout: float = 0.1) -> Corpus:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    if p.suffix == ".txt":
        docs = [d for d in p.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    elif p.suffix == ".jsonl":
        docs = [json.loads(line)["text"] for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif p.suffix == ".parquet":
        import pyarrow.parquet as pq
        docs = [str(t) for t in pq.read_table(p, columns=["text"]).column("text").to_pylist()]
    else:
        raise ValueError(f"{path}: unsupported corpus format {p.suffix!r} (use .txt, .jsonl or .parquet)")
    if len(docs) < 2:
        raise ValueError(f"{path}: needs at least two documents (paragraphs) to hold one out")
    cut = max(1, min(len(docs) - 1, round(len(docs) * (1 - holdout))))
    return Corpus(p.name, docs[:cut], docs[cut:])


def load_corpus(name: str) -> Corpus:
    builders = {"austen": austen_corpus, "wikitext2": wikitext2_corpus, "c4": c4_corpus}
    if name in builders:
        return builders[name]()
    if Path(name).suffix in (".txt", ".jsonl", ".parquet") or Path(name).exists():
        return file_corpus(name)
    raise ValueError(f"unknown corpus {name!r}: use austen, wikitext2, c4 or a .txt/.jsonl/.parquet path")


# ---------------------------------------------------------------- windows

def _encode(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def sample_stream_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Random windows from one token stream (Wanda's WikiText-2 train loader)."""
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s:s + seqlen] for s in starts])


def sample_document_windows(docs: list[str], tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Wanda's C4 loader: a random document longer than seqlen, then a random window in it."""
    rng = random.Random(seed)
    windows = []
    for _ in range(nsamples):
        for _attempt in range(10_000):
            ids = _encode(tokenizer, docs[rng.randint(0, len(docs) - 1)])
            if ids.numel() > seqlen:
                break
        else:
            raise ValueError(f"no calibration document is longer than seqlen={seqlen} tokens")
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start:start + seqlen])
    return torch.stack(windows)


def eval_stream(docs: list[str], tokenizer, seqlen: int, max_tokens: int | None) -> torch.Tensor:
    """Held-out text joined with blank lines, tokenized once, cut to whole seqlen windows."""
    ids = _encode(tokenizer, "\n\n".join(docs))
    n_windows = ids.numel() // seqlen
    if max_tokens is not None:
        n_windows = min(n_windows, max_tokens // seqlen)
    if n_windows < 1:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, not one window of seqlen={seqlen}")
    return ids[: n_windows * seqlen].unsqueeze(0)


def load_token_data(tokenizer, calib_data: str = DEFAULT_CORPUS, eval_data: str | None = None,
                    nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
                    eval_tokens: int | None = None) -> TokenData:
    """Calibration windows from `calib_data` and the held-out stream of `eval_data` (default: same corpus)."""
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"nsamples ({nsamples}) must be >= 1 and seqlen ({seqlen}) >= 2")
    calib_corpus = load_corpus(calib_data)
    eval_corpus = calib_corpus if eval_data in (None, calib_data) else load_corpus(eval_data)
    if calib_corpus.sample_by_document:
        windows = sample_document_windows(calib_corpus.calibration_docs, tokenizer, nsamples, seqlen, seed)
        source_tokens = -1  # documents are tokenized lazily; the stream size is not known
    else:
        stream = _encode(tokenizer, "\n\n".join(calib_corpus.calibration_docs))
        windows = sample_stream_windows(stream, nsamples, seqlen, seed)
        source_tokens = stream.numel()
    evaluation = eval_stream(eval_corpus.evaluation_docs, tokenizer, seqlen, eval_tokens)
    return TokenData(windows, evaluation, seqlen, seed, calib_corpus.name, eval_corpus.name, source_tokens)
