"""Fitness: perplexity (Wanda's eval_ppl protocol) and the forward-free reconstruction proxy."""
from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .models import LoadedModel, block_linears, decoder_layers
from .stats import CalibrationStats


@torch.no_grad()
def window_nll(lm: LoadedModel, tokens: torch.Tensor, seqlen: int, batch_size: int = 4,
               progress: bool = True) -> list[float]:
    """Mean NLL of each non-overlapping `seqlen` window of `tokens` [1, N] (the tail is dropped):
    Wanda's eval_ppl windows, kept apart so that two models measured on the same windows can be
    compared with an interval (`perplexity_ratio_interval`)."""
    n_windows = tokens.shape[1] // seqlen
    if n_windows == 0:
        raise ValueError(f"{tokens.shape[1]} evaluation tokens make no window of {seqlen}")
    windows = tokens[0, : n_windows * seqlen].view(n_windows, seqlen).to(lm.device)
    out: list[float] = []
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=None if progress else True, leave=False):
        logits = lm.model(batch, use_cache=False).logits.float()
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           batch[:, 1:].reshape(-1), reduction="none")
        out += loss.view(batch.shape[0], -1).double().mean(dim=1).tolist()
    return out


def perplexity_of(nll: list[float]) -> float:
    """exp(mean NLL) over equal windows; every window has seqlen − 1 predicted tokens."""
    value = math.exp(sum(nll) / len(nll))
    if not math.isfinite(value):
        raise FloatingPointError(f"perplexity is not finite (mean NLL {sum(nll) / len(nll)})")
    return value


def perplexity(lm: LoadedModel, tokens: torch.Tensor, seqlen: int, batch_size: int = 4,
               progress: bool = True) -> float:
    """exp(mean NLL) over non-overlapping `seqlen` windows of `tokens` [1, N]; the tail is dropped."""
    return perplexity_of(window_nll(lm, tokens, seqlen, batch_size, progress))


def perplexity_ratio_interval(nll_a: list[float], nll_b: list[float], resamples: int = 10000,
                              seed: int = 0) -> tuple[float, float, float]:
    """Perplexity of A over that of B on the same windows, with a 95% paired bootstrap interval
    (windows resampled with replacement, both models' values of a window together): (ratio, low,
    high). It covers the held-out sample only, not the calibration draw."""
    import numpy as np
    a, b = np.asarray(nll_a, dtype=np.float64), np.asarray(nll_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired windows needed, got {a.shape} and {b.shape}")
    diff = a - b
    picks = np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))
    low, high = np.percentile(diff[picks].mean(axis=1), [2.5, 97.5])
    return float(np.exp(diff.mean())), float(np.exp(low)), float(np.exp(high))


def reconstruction_error(dense: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> float:
    """||(W_dense − W_pruned) X||²_F = Σ_rows ΔW G ΔWᵀ with G = Σ_t x_t x_tᵀ, no forward pass."""
    delta = (dense.float() - pruned.float())
    return float(((delta @ gram.float()) * delta).sum())


def proxy_fitness(dense_weights: list[dict[str, torch.Tensor]], model: nn.Module,
                  stats: CalibrationStats) -> dict:
    """Layer-wise output reconstruction error of the (pruned) `model` against the dense weights,
    from cached Gram matrices. `relative` divides by ||W_dense X||², so layers weigh alike."""
    absolute, relative, per_layer = 0.0, 0.0, {}
    for index, block in enumerate(decoder_layers(model)):
        for name, linear in block_linears(block).items():
            gram = stats.blocks[index][name].gram
            if gram is None:
                raise ValueError("proxy fitness needs statistics collected with Gram matrices")
            w0 = dense_weights[index][name]
            err = reconstruction_error(w0, linear.weight, gram)
            base = float(((w0.float() @ gram.float()) * w0.float()).sum())
            per_layer[f"{index}.{name}"] = err / base if base > 0 else 0.0
            absolute += err
            relative += per_layer[f"{index}.{name}"]
    return {"absolute": absolute, "relative": relative / max(len(per_layer), 1), "per_layer": per_layer}
