"""Corpora and token windows: calibration, validation and held-out splits that never overlap.

Every corpus has three disjoint parts. Calibration windows come only from the calibration part;
a search selects on the validation part; the held-out part is read only by reports
(`load_token_data(..., heldout=False)` seals it: it is never read, and reading it raises).

Corpora by name:
  austen     offline default: Jane Austen's six novels from Debian's `r-cran-janeaustenr`;
             five novels calibrate (their last 10% of paragraphs validate), *Persuasion* is held out.
  fortunes   offline: Debian's `fortunes` (~2.6 MB of fortune cookies); each fortune goes to
             held-out / validation / calibration by a hash of its text (10% / 10% / 80%).
  wikitext2  WikiText-2 raw (train calibrates, validation validates, test is held out), through `datasets`.
  c4         C4 en shard 0 (train calibrates; validation documents 1100..2199 validate, the first
             1100 are held out, as Wanda evaluates), through `datasets`.
  PATH       a local .txt, .jsonl or .parquet file (field/column `text`); the last `holdout` share of
             its documents is held out, the `holdout` share before it validates.
"""
from __future__ import annotations

import functools
import gzip
import json
import lzma
import random
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

AUSTEN_DIR = Path("/usr/lib/R/site-library/janeaustenr/data")
AUSTEN_CALIBRATION = ("emma", "mansfieldpark", "northangerabbey", "prideprejudice", "sensesensibility")
AUSTEN_HELDOUT = "persuasion"
AUSTEN_VALIDATION_SHARE = 0.1       # the last paragraphs of each calibration novel
FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_MARKER = FORTUNES_DIR / "computers"   # from `fortunes` itself, not the much smaller fortunes-min
C4_TRAIN = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION = "en/c4-validation.00000-of-00008.json.gz"
C4_HELDOUT_DOCS = 1100              # Wanda evaluates on the first 1100 validation documents
DEFAULT_CORPUS = "austen"

SEALED_MESSAGE = ("the held-out split is sealed: a search selects on the validation split; "
                  "only reports read held-out data")


class HeldOutSealed(RuntimeError):
    """Held-out tokens were asked of data loaded for a search (heldout=False)."""


@dataclass
class Corpus:
    """Raw documents in three disjoint parts. The held-out part is read the first time
    `evaluation_docs` is asked for, so a search that never asks never reads it."""
    name: str
    calibration_docs: list[str]
    validation_docs: list[str]
    read_heldout: Callable[[], list[str]] = field(repr=False, compare=False)
    sample_by_document: bool = False  # C4 protocol: draw each window from one random document

    @functools.cached_property
    def evaluation_docs(self) -> list[str]:
        return self.read_heldout()


class TokenData:
    """Token windows for one (calibration corpus, evaluation corpus, tokenizer, sizes, seed).

    calibration: [nsamples, seqlen]; validation and evaluation: [1, n_windows * seqlen], tail dropped.
    evaluation=None seals the held-out split: reading it raises HeldOutSealed."""

    def __init__(self, calibration: torch.Tensor, evaluation: torch.Tensor | None, seqlen: int, seed: int,
                 calib_name: str, eval_name: str, calib_source_tokens: int,
                 validation: torch.Tensor | None = None):
        self.calibration = calibration
        self._evaluation = evaluation
        self.validation = validation
        self.seqlen = seqlen
        self.seed = seed
        self.calib_name = calib_name
        self.eval_name = eval_name
        self.calib_source_tokens = calib_source_tokens   # size of the stream the windows were drawn from

    @property
    def sealed(self) -> bool:
        return self._evaluation is None

    @property
    def evaluation(self) -> torch.Tensor:
        if self._evaluation is None:
            raise HeldOutSealed(SEALED_MESSAGE)
        return self._evaluation

    @property
    def nsamples(self) -> int:
        return self.calibration.shape[0]

    @property
    def eval_tokens(self) -> int:
        return self.evaluation.shape[1]

    @property
    def val_tokens(self) -> int:
        return 0 if self.validation is None else self.validation.shape[1]

    def describe(self) -> dict:
        return {"calib_data": self.calib_name, "eval_data": self.eval_name, "nsamples": self.nsamples,
                "seqlen": self.seqlen, "seed": self.seed, "calib_tokens": self.nsamples * self.seqlen,
                "calib_source_tokens": self.calib_source_tokens, "val_tokens": self.val_tokens,
                "eval_tokens": None if self.sealed else self.eval_tokens}   # None: sealed, never read


# ---------------------------------------------------------------- corpora

def _read_r_lazyload(folder: Path, names: tuple[str, ...] | None = None) -> dict[str, list[str]]:
    """Read an installed R package's lazy-load data base (Rdata.rdx index + Rdata.rdb blobs);
    only the variables in `names` (all when None), so a held-out one is never even decompressed."""
    import rdata  # pure-Python reader of R's serialization format

    def parse(raw: bytes):
        return rdata.conversion.convert(rdata.parser.parse_data(raw, expand_altrep=True))

    index = parse(gzip.decompress((folder / "Rdata.rdx").read_bytes()))
    blob = (folder / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        if names is not None and str(name) not in names:
            continue
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


def _austen_novels(names: tuple[str, ...]) -> dict[str, str]:
    if not (AUSTEN_DIR / "Rdata.rdb").exists():
        raise FileNotFoundError(
            "The offline corpus needs Debian's r-cran-janeaustenr: "
            "apt-get install -y --no-install-recommends r-cran-janeaustenr")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that lazy-load chunks carry no file header
        books = _read_r_lazyload(AUSTEN_DIR, names)
    return {name: _reflow(books[name]) for name in names}


def _split_tail(text: str, share: float) -> tuple[str, str]:
    """(first paragraphs, last `share` of the paragraphs), at a paragraph boundary."""
    paragraphs = text.split("\n\n")
    cut = len(paragraphs) - max(1, round(len(paragraphs) * share))
    return "\n\n".join(paragraphs[:cut]), "\n\n".join(paragraphs[cut:])


def austen_corpus() -> Corpus:
    novels = _austen_novels(AUSTEN_CALIBRATION)
    calib, val = zip(*(_split_tail(novels[name], AUSTEN_VALIDATION_SHARE) for name in AUSTEN_CALIBRATION))
    return Corpus("austen", list(calib), list(val),
                  lambda: [_austen_novels((AUSTEN_HELDOUT,))[AUSTEN_HELDOUT]])


def _all_fortunes() -> list[str]:
    """Every fortune of the plain-text files, in sorted file order. Symlinks (*.u8), the *.dat
    indexes and the off/ folder (the offensive ones) are skipped."""
    if not FORTUNES_MARKER.exists():
        raise FileNotFoundError("The fortunes corpus needs Debian's fortunes: "
                                "apt-get install -y --no-install-recommends fortunes")
    docs = []
    for path in sorted(FORTUNES_DIR.iterdir()):
        if path.is_symlink() or not path.is_file() or path.suffix in (".dat", ".u8"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        docs += [d.strip() for d in re.split(r"^%$", text, flags=re.MULTILINE) if d.strip()]
    return docs


def _fortune_part(doc: str) -> int:
    """0 held out, 1 validation, 2..9 calibration: by the text itself, so neither file order nor
    a fortune repeated in two files can move it across parts."""
    return zlib.crc32(doc.encode("utf-8")) % 10


def fortunes_corpus() -> Corpus:
    docs = _all_fortunes()
    return Corpus("fortunes", [d for d in docs if _fortune_part(d) >= 2], [d for d in docs if _fortune_part(d) == 1],
                  lambda: [d for d in _all_fortunes() if _fortune_part(d) == 0])


def wikitext2_corpus() -> Corpus:
    from datasets import load_dataset

    def split(name: str) -> list[str]:
        # Wanda/SparseGPT join the whole split with blank lines and tokenize it once.
        return ["\n\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split=name)["text"])]
    return Corpus("wikitext2", split("train"), split("validation"), lambda: split("test"))


def c4_corpus() -> Corpus:
    from datasets import load_dataset
    train = load_dataset("allenai/c4", data_files={"train": C4_TRAIN}, split="train")
    val = load_dataset("allenai/c4", data_files={"validation": C4_VALIDATION}, split="validation")
    # Wanda evaluates on the first 1100 validation documents joined with spaces; the next 1100 validate.
    n = C4_HELDOUT_DOCS
    return Corpus("c4", list(train["text"]), [" ".join(val[n:2 * n]["text"])],
                  lambda: [" ".join(val[:n]["text"])], sample_by_document=True)


def _read_documents(p: Path) -> list[str]:
    if p.suffix == ".txt":
        return [d for d in p.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    if p.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq
        return [str(t) for t in pq.read_table(p, columns=["text"]).column("text").to_pylist()]
    raise ValueError(f"{p}: unsupported corpus format {p.suffix!r} (use .txt, .jsonl or .parquet)")


def file_corpus(path: str, holdout: float = 0.1) -> Corpus:
    """The last `holdout` share of the documents is held out, the same share before it validates."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    docs = _read_documents(p)
    if len(docs) < 3:
        raise ValueError(f"{path}: needs at least three documents (paragraphs): calibration, validation, held-out")
    k = max(1, min((len(docs) - 1) // 2, round(len(docs) * holdout)))
    heldout = docs[-k:]
    return Corpus(p.name, docs[:-2 * k], docs[-2 * k:-k], lambda: heldout)


CORPORA: dict[str, Callable[[], Corpus]] = {
    "austen": austen_corpus, "fortunes": fortunes_corpus, "wikitext2": wikitext2_corpus, "c4": c4_corpus}


def corpus_label(name: str) -> str:
    """The name load_corpus(name) gives its corpus, without loading it."""
    return name if name in CORPORA else Path(name).name


def load_corpus(name: str) -> Corpus:
    if name in CORPORA:
        return CORPORA[name]()
    if Path(name).suffix in (".txt", ".jsonl", ".parquet") or Path(name).exists():
        return file_corpus(name)
    raise ValueError(f"unknown corpus {name!r}: use {', '.join(CORPORA)} or a .txt/.jsonl/.parquet path")


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


def calibration_windows(corpus: Corpus, tokenizer, nsamples: int, seqlen: int, seed: int) -> tuple[torch.Tensor, int]:
    """(windows drawn from the calibration part only, size of the stream they came from; -1: unknown)."""
    if corpus.sample_by_document:  # documents are tokenized lazily, so the stream size is not known
        return sample_document_windows(corpus.calibration_docs, tokenizer, nsamples, seqlen, seed), -1
    stream = _encode(tokenizer, "\n\n".join(corpus.calibration_docs))
    return sample_stream_windows(stream, nsamples, seqlen, seed), stream.numel()


def eval_stream(docs: list[str], tokenizer, seqlen: int, max_tokens: int | None,
                split: str = "evaluation") -> torch.Tensor:
    """Validation or held-out text joined with blank lines, tokenized once, cut to whole seqlen windows."""
    ids = _encode(tokenizer, "\n\n".join(docs))
    n_windows = ids.numel() // seqlen
    if max_tokens is not None:
        n_windows = min(n_windows, max_tokens // seqlen)
    if n_windows < 1:
        raise ValueError(f"{split} text has {ids.numel()} tokens, not one window of seqlen={seqlen}")
    return ids[: n_windows * seqlen].unsqueeze(0)


def load_token_data(tokenizer, calib_data: str = DEFAULT_CORPUS, eval_data: str | None = None,
                    nsamples: int = 128, seqlen: int = 2048, seed: int = 0, eval_tokens: int | None = None,
                    val_tokens: int | None = None, heldout: bool = True) -> TokenData:
    """Calibration windows and the validation stream of `calib_data`, and the held-out stream of
    `eval_data` (default: the same corpus). heldout=False, what a search uses, seals the held-out
    split: it is never read, and TokenData.evaluation raises HeldOutSealed."""
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"nsamples ({nsamples}) must be >= 1 and seqlen ({seqlen}) >= 2")
    calib_corpus = load_corpus(calib_data)
    windows, source_tokens = calibration_windows(calib_corpus, tokenizer, nsamples, seqlen, seed)
    validation = eval_stream(calib_corpus.validation_docs, tokenizer, seqlen, val_tokens, "validation")
    evaluation, eval_name = None, corpus_label(eval_data or calib_data)
    if heldout:
        eval_corpus = calib_corpus if eval_data in (None, calib_data) else load_corpus(eval_data)
        evaluation = eval_stream(eval_corpus.evaluation_docs, tokenizer, seqlen, eval_tokens)
        eval_name = eval_corpus.name
    return TokenData(windows, evaluation, seqlen, seed, calib_corpus.name, eval_name, source_tokens, validation)
