"""Calibration and evaluation sizes, as named presets that any flag can override."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .data import DEFAULT_CORPUS


@dataclass
class Protocol:
    calib_data: str = DEFAULT_CORPUS
    eval_data: str | None = None       # None: the held-out split of calib_data
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    eval_tokens: int | None = None     # None: the whole held-out split
    val_tokens: int | None = None      # None: the whole validation split (what a search selects on)

    def validate(self) -> "Protocol":
        if self.nsamples < 1:
            raise ValueError(f"nsamples must be positive, got {self.nsamples}")
        if self.seqlen < 2:
            raise ValueError(f"seqlen must be at least 2, got {self.seqlen}")
        for name in ("eval_tokens", "val_tokens"):
            tokens = getattr(self, name)
            if tokens is not None and tokens < self.seqlen:
                raise ValueError(f"{name} ({tokens}) is less than one window of seqlen {self.seqlen}")
        return self

    def with_overrides(self, **overrides) -> "Protocol":
        return replace(self, **{k: v for k, v in overrides.items() if v is not None}).validate()

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    # Wanda/SparseGPT's published protocol: 128 windows of 2048 tokens, the full held-out split.
    "paper": Protocol(nsamples=128, seqlen=2048),
    # What a 2-core CPU finishes in minutes per method; the README table uses it.
    "cpu": Protocol(nsamples=64, seqlen=512, eval_tokens=32768),
    # cpu's calibration, the whole held-out split (Persuasion: 107,520 tokens, ~15 min per method).
    "cpu-full": Protocol(nsamples=64, seqlen=512),
    # A quarter of cpu's tokens: many programs × levels × corpora × seeds in one sitting.
    "quick": Protocol(nsamples=32, seqlen=256, eval_tokens=16384),
    # Seconds: tests and smoke runs.
    "smoke": Protocol(nsamples=8, seqlen=128, eval_tokens=2048, val_tokens=1024),
}


def preset(name: str) -> Protocol:
    if name not in PRESETS:
        raise ValueError(f"unknown protocol {name!r}: choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name])   # a copy: callers may override its fields
