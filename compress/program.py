"""Score weights with a candidate program (an expression tree from the candidate language)."""
from __future__ import annotations

import torch

from autoprune_ray.tree import expr
from autoprune_ray.tree.expr import Node
from autoprune_ray.kernels.fused import prune_mask, reference_score

from .masks import select_mask
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
    return name in expr.inputs_of(tree)


def program_score(tree: Node, env: dict[str, torch.Tensor]) -> torch.Tensor:
    """Evaluate with the torch reference; a non-finite score is an error, never masked."""
    return reference_score(tree, env)


def program_mask(tree: Node, env: dict[str, torch.Tensor], sparsity: float, nm: tuple[int, int] | None = None,
                 granularity: str = "row", backend: str = "auto") -> torch.Tensor:
    """Row-wise and N:M masks go through the fused kernel on a GPU; a whole-layer threshold
    (magnitude style) needs a global selection and stays on the torch path."""
    if nm is None and granularity != "row":
        return select_mask(program_score(tree, env), sparsity, None, granularity)
    return prune_mask(tree, env, sparsity, nm, backend=backend)
