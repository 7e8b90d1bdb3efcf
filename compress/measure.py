"""Load a model, compress it with one config, measure its held-out perplexity: the one path the
prune and quantize commands, the baselines table and a run's report all take, so that a number
in any of them means the same thing."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .data import TokenData, load_token_data
from .eval import perplexity_of, window_nll
from .models import LoadedModel, load_model
from .protocol import Protocol
from .prune import PruneConfig, PruneResult, prune_model
from .quantize import QuantConfig, QuantResult, quantize_model

CompressionConfig = PruneConfig | QuantConfig | None      # None: the dense model
CompressionResult = PruneResult | QuantResult | None


@dataclass
class Measured:
    lm: LoadedModel               # compressed in place
    data: TokenData               # pass it to the next call of the same model and protocol
    result: CompressionResult
    perplexity: float             # on data.evaluation
    seconds: float                # wall-clock of the compression alone
    window_nll: list[float]       # mean NLL of each held-out window, for paired intervals


def protocol_data(tokenizer, protocol: Protocol) -> TokenData:
    """The calibration windows and held-out tokens a protocol names."""
    return load_token_data(tokenizer, protocol.calib_data, protocol.eval_data, protocol.nsamples,
                           protocol.seqlen, protocol.seed, protocol.eval_tokens)


def apply_compression(lm: LoadedModel, data: TokenData | None, cfg: CompressionConfig) -> CompressionResult:
    """Prune or quantize `lm` in place as `cfg` says; None leaves it dense."""
    if cfg is None:
        return None
    if isinstance(cfg, PruneConfig):
        return prune_model(lm, data, cfg)
    if isinstance(cfg, QuantConfig):
        return quantize_model(lm, data, cfg)
    raise TypeError(f"not a compression config: {type(cfg).__name__}")


def load_and_measure(model: str, protocol: Protocol, cfg: CompressionConfig, *, device: str | None = None,
                     dtype: torch.dtype | None = None, data: TokenData | None = None) -> Measured:
    """A fresh copy of `model` compressed by `cfg` and measured under `protocol`. `data`: the
    protocol's tokens from an earlier call, so a table of configs tokenizes its corpora once."""
    lm = load_model(model, device=device, dtype=dtype)
    if data is None:
        data = protocol_data(lm.tokenizer, protocol)
    start = time.perf_counter()
    result = apply_compression(lm, data, cfg)
    seconds = time.perf_counter() - start
    nll = window_nll(lm, data.evaluation, data.seqlen)
    return Measured(lm, data, result, perplexity_of(nll), seconds, nll)
