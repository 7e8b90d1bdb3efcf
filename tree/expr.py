"""Expression trees of candidate programs, and their torch reference evaluator (the ground truth).

A tree is built from `Node`s. Every value is conceptually a 2-D tensor that broadcasts: a
per-weight matrix [rows, cols], a per-row column vector [rows, 1], a per-column row vector
[1, cols], or a scalar. `Shape(rows, cols)` records which axes a value varies along.

Operations are total: division, sqrt, log and pow are guarded so that any finite input gives a
finite output where possible; non-finite results are *reported* by the caller, never masked.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch

EPS = 1e-12
EXP_CLAMP = 60.0   # exp(60) ≈ 1e26: large but finite in fp32


@dataclass(frozen=True)
class Node:
    op: str                          # "input", "const", or a key of OPS
    args: tuple["Node", ...] = ()
    value: float | str | None = None  # input name for "input", number for "const", param for ops

    def __str__(self) -> str:
        return to_string(self)


@dataclass(frozen=True)
class Shape:
    rows: bool
    cols: bool

    @property
    def is_matrix(self) -> bool:
        return self.rows and self.cols


MATRIX, ROWVEC, COLVEC, SCALAR = Shape(True, True), Shape(True, False), Shape(False, True), Shape(False, False)


def inp(name: str) -> Node:
    return Node("input", value=name)


def const(x: float) -> Node:
    return Node("const", value=float(x))


def call(op: str, *args: Node, value=None) -> Node:
    return Node(op, tuple(args), value)


# ---------------------------------------------------------------- operations

def _safe_div(a, b):
    return a / torch.where(b.abs() < EPS, torch.where(b < 0, -EPS, EPS), b)


def _pow(a, c):
    c = float(c)
    if c == int(c) and c >= 0:
        return a ** int(c)
    return (a.abs() + EPS) ** c


def _reduce(kind):
    def fn(x, dim):
        # A value that does not vary along `dim` has length 1 there: reducing it is reducing one element.
        x = x.float().reshape(1, 1) if x.dim() < 2 else x.float()
        if kind == "sum":
            return x.sum(dim=dim, keepdim=True)
        if kind == "mean":
            return x.mean(dim=dim, keepdim=True)
        if kind == "std":
            return x.std(dim=dim, keepdim=True, unbiased=False) if x.shape[dim] > 1 else torch.zeros_like(x)
        if kind == "norm":
            return x.norm(dim=dim, keepdim=True)
        if kind == "max":
            return x.amax(dim=dim, keepdim=True)
        if kind == "min":
            return x.amin(dim=dim, keepdim=True)
        raise KeyError(kind)
    return fn


@dataclass(frozen=True)
class OpSpec:
    arity: int
    torch_fn: Callable
    commutative: bool = False
    param: str | None = None       # "exponent", "bounds" or "dim": what Node.value holds


OPS: dict[str, OpSpec] = {
    "add": OpSpec(2, torch.add, commutative=True),
    "mul": OpSpec(2, torch.mul, commutative=True),
    "sub": OpSpec(2, torch.sub),
    "div": OpSpec(2, _safe_div),
    "max2": OpSpec(2, torch.maximum, commutative=True),
    "min2": OpSpec(2, torch.minimum, commutative=True),
    "neg": OpSpec(1, torch.neg),
    "abs": OpSpec(1, torch.abs),
    "sqrt": OpSpec(1, lambda x: x.abs().sqrt()),
    "log1p": OpSpec(1, lambda x: torch.log1p(x.abs())),
    "exp": OpSpec(1, lambda x: torch.exp(x.clamp(max=EXP_CLAMP))),
    "square": OpSpec(1, torch.square),
    "sigmoid": OpSpec(1, torch.sigmoid),
    "tanh": OpSpec(1, torch.tanh),
    "pow": OpSpec(1, _pow, param="exponent"),
    "clamp": OpSpec(1, lambda x, b: x.clamp(min=b[0], max=b[1]), param="bounds"),
}
REDUCTIONS = ("sum", "mean", "std", "norm", "max", "min")
for _kind in REDUCTIONS:
    OPS[f"{_kind}_row"] = OpSpec(1, (lambda f: lambda x: f(x, 1))(_reduce(_kind)))   # over inputs: per row
    OPS[f"{_kind}_col"] = OpSpec(1, (lambda f: lambda x: f(x, 0))(_reduce(_kind)))   # over outputs: per column


# ---------------------------------------------------------------- shapes, evaluation, printing

def shape_of(node: Node, input_shapes: dict[str, Shape]) -> Shape:
    if node.op == "input":
        return input_shapes[node.value]
    if node.op == "const":
        return SCALAR
    shapes = [shape_of(a, input_shapes) for a in node.args]
    if node.op.endswith("_row"):
        return Shape(shapes[0].rows, False)
    if node.op.endswith("_col"):
        return Shape(False, shapes[0].cols)
    return Shape(any(s.rows for s in shapes), any(s.cols for s in shapes))


def evaluate(node: Node, env: dict[str, torch.Tensor], memo: dict | None = None) -> torch.Tensor:
    """Torch reference: inputs in `env` are 2-D broadcastable float tensors (or 0-d scalars).

    A common subtree is computed once. Without `memo`, an intermediate is freed as soon as the
    last operation that reads it has run, so peak memory follows the live values, not the size
    of the program. A caller passing a `memo` dict shares values across calls instead: every value
    computed is kept in it, and values already in it are reused."""
    values = {} if memo is None else memo
    order = _post_order(node, values)
    readers_left = Counter(arg for n in order for arg in n.args)
    for n in order:
        values[n] = _apply(n, [values[a] for a in n.args], env)
        if memo is None:
            for arg in n.args:
                readers_left[arg] -= 1
                if readers_left[arg] == 0:
                    del values[arg]
    return values[node]


def _apply(node: Node, args: list[torch.Tensor], env: dict[str, torch.Tensor]) -> torch.Tensor:
    if node.op == "input":
        return env[node.value].float()
    if node.op == "const":
        return torch.tensor(node.value, dtype=torch.float32)
    spec = OPS[node.op]
    return spec.torch_fn(*args, node.value) if spec.param else spec.torch_fn(*args)


def _post_order(root: Node, known: dict) -> list[Node]:
    """The distinct nodes under `root` that are not in `known`, each after its arguments."""
    order, seen, stack = [], set(known), [(root, False)]
    while stack:
        node, args_done = stack.pop()
        if args_done:
            order.append(node)
        elif node not in seen:
            seen.add(node)
            stack.append((node, True))
            stack.extend((arg, False) for arg in reversed(node.args))
    return order


def to_string(node: Node) -> str:
    """An unambiguous prefix form, used for canonical ordering and hashing."""
    if node.op == "input":
        return str(node.value)
    if node.op == "const":
        return repr(float(node.value))
    inner = ",".join(to_string(a) for a in node.args)
    param = f"|{node.value!r}" if node.value is not None else ""
    return f"{node.op}({inner}{param})"


def walk(node: Node):
    yield node
    for a in node.args:
        yield from walk(a)


def inputs_of(node: Node) -> set[str]:
    """The names of the inputs a tree reads."""
    return {n.value for n in walk(node) if n.op == "input"}


def size(node: Node) -> int:
    return sum(1 for _ in walk(node))


def depth(node: Node) -> int:
    return 1 + max((depth(a) for a in node.args), default=0)
