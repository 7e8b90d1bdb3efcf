"""Score weights with a candidate program (an expression tree from the candidate language)."""
from __future__ import annotations

import torch

from autoprune_ray.kernels import expr
from autoprune_ray.kernels.expr import Node

from .stats import InputStats


def score_inputs(weight: torch.Tensor, stats: InputStats, grad_rms: torch.Tensor | None = None,
                 depth: float = 0.0) -> dict[str, torch.Tensor]:
    """The candidate language's inputs for one linear layer (see operators.language.PRUNE)."""
    env = {"W": weight.float(), "A": stats.wanda_norm.unsqueeze(0), "M": stats.mean.unsqueeze(0),
           "V": stats.var.unsqueeze(0), "H": stats.gram_diag.float().unsqueeze(0),
           "d": torch.tensor(float(depth))}
    if grad_rms is not None:
        env["G"] = grad_rms.float()
    return env


def uses_input(tree: Node, name: str) -> bool:
    return any(n.op == "input" and n.value == name for n in expr.walk(tree))


def program_score(tree: Node, env: dict[str, torch.Tensor]) -> torch.Tensor:
    """Evaluate with the torch reference; a non-finite score is an error, never masked."""
    missing = {n.value for n in expr.walk(tree) if n.op == "input"} - set(env)
    if missing:
        raise ValueError(f"program needs input(s) {sorted(missing)} that were not collected")
    score = expr.evaluate(tree, env)
    bad = ~torch.isfinite(score)
    if bad.any():
        raise FloatingPointError(f"program score has {int(bad.sum())} NaN/Inf values of {score.numel()}")
    return score.expand(env["W"].shape) if score.shape != env["W"].shape else score
