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


@torch.no_grad()
def _log_probs(lm: LoadedModel, window: torch.Tensor) -> torch.Tensor:
    logits = lm.model(window.unsqueeze(0).to(lm.device), use_cache=False).logits[0].float()
    return torch.log_softmax(logits, dim=-1).cpu()


def kl_divergence(dense_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p ‖ q) from log-probabilities [positions, vocab]."""
    return (dense_log_probs.exp() * (dense_log_probs - log_probs)).sum(-1)


@dataclass
class DenseReference:
    """The dense model's log-probabilities on fixed validation windows: [windows, seqlen, vocab]."""
    windows: torch.Tensor
    log_probs: list[torch.Tensor]

    @classmethod
    def compute(cls, lm: LoadedModel, tokens: torch.Tensor, seqlen: int) -> "DenseReference":
        windows = _windows(tokens, seqlen)
        return cls(windows, [_log_probs(lm, w) for w in windows])

    @property
    def tokens(self) -> int:
        return self.windows.numel()

    @torch.no_grad()
    def kl(self, lm: LoadedModel) -> float:
        """Mean per-position KL of `lm` (as it is now, e.g. pruned) to the dense reference."""
        total = 0.0
        for window, dense in zip(self.windows, self.log_probs):
            total += float(kl_divergence(dense, _log_probs(lm, window)).sum())
        value = total / self.tokens
        if not math.isfinite(value):
            raise FloatingPointError(f"KL divergence to the dense model is not finite ({value})")
        return max(value, 0.0)   # a rounding error below zero on an unchanged model
