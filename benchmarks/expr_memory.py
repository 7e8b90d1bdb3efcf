"""Peak memory of the torch reference evaluator (tree.expr.evaluate) on a deep program.

    python benchmarks/expr_memory.py                     # 2048 x 2048 float32 layer
    python benchmarks/expr_memory.py --rows 512 --cols 512

Two ways to evaluate the same tree are measured on the same inputs:
  * keep-all: every intermediate stays in the memo until the end (the evaluator before reference
    counting; today's behaviour when a caller passes its own `memo`);
  * freed: the default, an intermediate is dropped as soon as its last reader has run.
Memory is counted, not sampled: a TorchDispatchMode sees every tensor an aten operation returns
(temporaries inside guarded operations included) and a finalizer subtracts its bytes when the
tensor dies, so the figure is the peak of live bytes allocated during the evaluation, inputs
excluded. It is reported in bytes and in units of one [rows, cols] float32 matrix, beside the
peak of Wanda's |W|·A for scale. Writes benchmarks/results/expr-memory.json.
"""
from __future__ import annotations

import json
import platform
import weakref
from pathlib import Path

import click
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from autoprune_ray.tree import expr
from autoprune_ray.operators.language import parse

RESULTS = Path(__file__).parent / "results"

# Four scores of the kind the search writes, summed: 58 nodes (39 distinct), nearly every
# intermediate a full matrix.
DEEP_PROGRAM = """def score(W, A, G, M, V, H):
    a = W.abs()
    ria = (a / a.sum(dim=0) + a / a.sum(dim=1)) * A.sqrt()
    smooth = torch.tanh(W * M) * torch.sigmoid(G * V)
    energy = W ** 2 * H + torch.log1p(a * A) * torch.exp(-G)
    shift = torch.maximum(a - a.mean(dim=1), G * 0.5) / (a.std(dim=1) + 0.01)
    return ria + smooth + energy + shift
"""
WANDA = "def score(W, A):\n    return W.abs() * A\n"


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensors aten operations return while they are alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.calls = 0
        self._storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls += 1
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._storages:   # a view of a tensor already counted
            return
        self._storages.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._storages.discard(key)
        self.live -= size


def peak_bytes(evaluate) -> tuple[int, int]:
    """(peak live bytes, aten calls) of `evaluate()`, its result included."""
    with LiveTensorBytes() as counter:
        result = evaluate()
    del result
    return counter.peak, counter.calls


def layer_inputs(rows: int, cols: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    env = {name: torch.randn(rows, cols, generator=g) for name in ("W", "G")}
    env.update({name: torch.rand(1, cols, generator=g) + 0.1 for name in ("A", "M", "V", "H")})
    return env


def measure(rows: int, cols: int) -> dict:
    env = layer_inputs(rows, cols)
    deep, wanda = parse(DEEP_PROGRAM).tree, parse(WANDA).tree
    matrix = rows * cols * 4
    keep_all, _ = peak_bytes(lambda: expr.evaluate(deep, env, memo={}))
    freed, calls = peak_bytes(lambda: expr.evaluate(deep, env))
    wanda_peak, _ = peak_bytes(lambda: expr.evaluate(wanda, env))
    torch.testing.assert_close(expr.evaluate(deep, env, memo={}), expr.evaluate(deep, env))
    return {"shape": [rows, cols], "program_nodes": expr.size(deep), "distinct_nodes": len(set(expr.walk(deep))),
            "aten_calls": calls, "matrix_bytes": matrix, "wanda_peak_bytes": wanda_peak,
            "keep_all": {"peak_bytes": keep_all, "matrices": round(keep_all / matrix, 2),
                         "vs_wanda": round(keep_all / wanda_peak, 2)},
            "freed": {"peak_bytes": freed, "matrices": round(freed / matrix, 2),
                      "vs_wanda": round(freed / wanda_peak, 2)}}


@click.command()
@click.option("--rows", default=2048)
@click.option("--cols", default=2048)
def main(rows: int, cols: int) -> None:
    result = measure(rows, cols)
    result.update(torch=torch.__version__, python=platform.python_version(), program=DEEP_PROGRAM)
    click.echo(json.dumps({k: v for k, v in result.items() if k != "program"}, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "expr-memory.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
