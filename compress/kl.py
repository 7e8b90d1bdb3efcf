"""KL divergence of a compressed model to the dense one, on cached dense next-token distributions.

EvoPress ranks candidates by the KL divergence to the dense model on a few hundred tokens rather
than by perplexity: the dense model's own distribution is a far less noisy target than the next
token alone, so a few hundred tokens rank candidates about as well as thousands for perplexity.

    reference = DenseReference.compute(lm, tokens, seqlen)     # once, on the dense model
    kl = reference.kl(lm)                                       # each candidate, applied to lm

KL(p_dense ‖ p_model) per position = Σ_v p_dense(v)·(log p_dense(v) − log p_model(v)), averaged
over every position of the non-overlapping `seqlen` windows (the tail is dropped, as in perplexity).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .models import LoadedModel


def _windows(tokens: torch.Tensor, seqlen: int) -> torch.Tensor:
    n_windows = tokens.shape[1] // seqlen
    if n_windows == 0:
        raise ValueError(f"{tokens.shape[1]} tokens make no window of {seqlen}")
    return tokens[0, : n_windows * seqlen].view(n_windows, seqlen)


WINDOWS_PER_FORWARD = 4   # windows batched into one forward: fewer, larger matmuls on a CPU


@torch.no_grad()
def _log_probs(lm: LoadedModel, windows: torch.Tensor) -> torch.Tensor:
    """[windows, seqlen, vocab] next-token log-probabilities."""
    logits = lm.model(windows.to(lm.device), use_cache=False).logits.float()
    return torch.log_softmax(logits, dim=-1).cpu()


def _chunks(windows: torch.Tensor):
    return windows.split(WINDOWS_PER_FORWARD)


def kl_divergence(dense_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p ‖ q) from log-probabilities [positions, vocab]."""
    return (dense_log_probs.exp() * (dense_log_probs - log_probs)).sum(-1)


def _cross_term(probs: torch.Tensor, log_probs: torch.Tensor) -> float:
    return float((probs * log_probs).sum(dtype=torch.float64))


@dataclass
class DenseReference:
    """The dense model's next-token probabilities on fixed validation windows (one tensor
    [windows, seqlen, vocab] per forward chunk), and Σ p·log p over all of them.

    KL = Σ p·log p − Σ p·log q: the first term is the dense model's own, so each candidate
    costs one forward and one product, with no exp or subtraction over the vocabulary."""
    windows: torch.Tensor
    probs: list[torch.Tensor]
    self_term: float

    @classmethod
    def compute(cls, lm: LoadedModel, tokens: torch.Tensor, seqlen: int) -> "DenseReference":
        windows = _windows(tokens, seqlen)
        probs, self_term = [], 0.0
        for chunk in _chunks(windows):
            log_probs = _log_probs(lm, chunk)
            probs.append(log_probs.exp())
            self_term += _cross_term(probs[-1], log_probs)
        return cls(windows, probs, self_term)

    @property
    def tokens(self) -> int:
        return self.windows.numel()

    @torch.no_grad()
    def kl(self, lm: LoadedModel) -> float:
        """Mean per-position KL of `lm` (as it is now, e.g. pruned) to the dense reference."""
        cross = sum(_cross_term(p, _log_probs(lm, chunk)) for p, chunk in zip(self.probs, _chunks(self.windows)))
        value = (self.self_term - cross) / self.tokens
        if not math.isfinite(value):
            raise FloatingPointError(f"KL divergence to the dense model is not finite ({value})")
        return max(value, 0.0)   # a rounding error below zero on an unchanged model
