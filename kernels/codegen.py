"""Generate the Triton source of one fused pruning kernel from a candidate's expression tree.

The kernel runs one program per output row. It reads that row of every per-weight input once,
computes the score elementwise, selects the row's k-th smallest score on chip (no sort) and
writes the mask, and optionally the pruned weights. Reductions (row/column sums, norms, ...) need
the whole matrix, so the host computes them with the torch reference before launch and the
kernel reads them like any other per-row or per-column input.

Semantics are those of `tree.expr` (guarded division, sqrt of |x|, ...) and `kernels.select`
(row r prunes its k_r lowest scores, equal scores left to right, with the per-row counts that
`row_mask` documents; N:M keeps the stable-sort order). Only `triton.language` operations the
interpreter also supports are used, so CPU tests exercise the very code a GPU runs.
"""
from __future__ import annotations

from dataclasses import dataclass

from autoprune_ray.tree import expr
from autoprune_ray.tree.expr import COLVEC, MATRIX, ROWVEC, Node, Shape


@dataclass(frozen=True)
class Leaf:
    """A kernel input: a tensor from the environment or a reduction the host precomputes."""
    node: Node
    shape: Shape

    @property
    def precomputed(self) -> bool:
        return self.node.op != "input"


@dataclass(frozen=True)
class KernelSource:
    source: str
    leaves: tuple[Leaf, ...]


def leaves_of(tree: Node, input_shapes: dict[str, Shape]) -> tuple[Leaf, ...]:
    """Inputs and outermost reductions, in first-visit order, each once."""
    found: dict[Node, Leaf] = {}

    def visit(node: Node) -> None:
        if node in found or node.op == "const":
            return
        if node.op == "input" or node.op.endswith(("_row", "_col")):
            found[node] = Leaf(node, expr.shape_of(node, input_shapes))
            return
        for arg in node.args:
            visit(arg)

    visit(tree)
    return tuple(found.values())


def _float(x: float) -> str:
    return repr(float(x))


def _pow(a: str, c: float) -> str:
    # The same special cases as torch's pow kernel, so that the common exponents round identically.
    if c == int(c) and c >= 0:
        return "(" + " * ".join([a] * int(c)) + ")" if c else f"({a} * 0.0 + 1.0)"
    guarded = f"(tl.abs({a}) + EPS)"
    special = {0.5: f"tl.sqrt_rn({guarded})", -0.5: f"tl.div_rn(1.0, tl.sqrt_rn({guarded}))",
               -1.0: f"tl.div_rn(1.0, {guarded})", -2.0: f"tl.div_rn(1.0, {guarded} * {guarded})"}
    return special.get(c, f"tl.exp2({_float(c)} * tl.log2({guarded}))")


def _clamp(a: str, lo: float | None, hi: float | None, nan_all: str) -> str:
    # A bound may be absent (x.clamp(min=0)): only the bounds given are applied, as torch does.
    if lo is not None:
        a = f"tl.maximum({a}, {_float(lo)}, {nan_all})"
    if hi is not None:
        a = f"tl.minimum({a}, {_float(hi)}, {nan_all})"
    return a


def _op(node: Node, a: list[str]) -> str:
    nan_all = "propagate_nan=tl.PropagateNan.ALL"
    simple = {
        "add": lambda: f"({a[0]} + {a[1]})", "sub": lambda: f"({a[0]} - {a[1]})",
        "mul": lambda: f"({a[0]} * {a[1]})", "div": lambda: f"_safe_div({a[0]}, {a[1]})",
        "max2": lambda: f"tl.maximum({a[0]}, {a[1]}, {nan_all})",
        "min2": lambda: f"tl.minimum({a[0]}, {a[1]}, {nan_all})",
        "neg": lambda: f"(-{a[0]})", "abs": lambda: f"tl.abs({a[0]})",
        "sqrt": lambda: f"tl.sqrt_rn(tl.abs({a[0]}))", "log1p": lambda: f"_log1p_abs({a[0]})",
        "exp": lambda: f"tl.exp(tl.minimum({a[0]}, EXP_CLAMP, {nan_all}))",
        "square": lambda: f"({a[0]} * {a[0]})", "sigmoid": lambda: f"_sigmoid({a[0]})",
        "tanh": lambda: f"_tanh({a[0]})",
    }
    if node.op in simple:
        return simple[node.op]()
    if node.op == "pow":
        return _pow(a[0], float(node.value))
    if node.op == "clamp":
        return _clamp(a[0], *node.value, nan_all)
    raise KeyError(f"no Triton template for operation {node.op!r}")


def _load(i: int, leaf: Leaf) -> str:
    if leaf.shape == MATRIX:
        return f"tl.load(in{i} + BASE + OFFS, mask=VALID, other=0.0).to(tl.float32)"
    if leaf.shape == COLVEC:
        return f"tl.load(in{i} + OFFS, mask=VALID, other=0.0).to(tl.float32)"
    if leaf.shape == ROWVEC:
        return f"tl.load(in{i} + ROW).to(tl.float32)"
    return f"tl.load(in{i}).to(tl.float32)"


def _body(tree: Node, leaves: tuple[Leaf, ...]) -> list[str]:
    """Loads, then one temporary per distinct subexpression (shared subtrees are computed once)."""
    names = {leaf.node: f"x{i}" for i, leaf in enumerate(leaves)}
    lines = [f"x{i} = {_load(i, leaf)}" for i, leaf in enumerate(leaves)]

    def emit(node: Node) -> str:
        if node in names:
            return names[node]
        if node.op == "const":
            return _float(node.value)
        text = _op(node, [emit(arg) for arg in node.args])
        names[node] = f"t{len(lines)}"
        lines.append(f"{names[node]} = {text}")
        return names[node]

    lines.append(f"score = {emit(tree)} + tl.zeros(OFFS.shape, tl.float32)")
    return lines


_PRELUDE = '''\
import triton
import triton.language as tl

# Globals a @triton.jit function reads must be constexpr.
EPS = tl.constexpr({eps!r})
EXP_CLAMP = tl.constexpr({exp_clamp!r})
INF = tl.constexpr(float("inf"))


@triton.jit
def _safe_div(a, b):
    return tl.div_rn(a, tl.where(tl.abs(b) < EPS, tl.where(b < 0, -EPS, EPS), b))


@triton.jit
def _log1p_abs(x):
    # log1p(|x|) without libdevice (the interpreter lacks it): log(u)·x/(u-1) is exact to a few ulp.
    a = tl.abs(x)
    u = 1.0 + a
    return tl.where(u == 1.0, a, tl.log(u) * tl.div_rn(a, tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _sigmoid(x):
    return tl.div_rn(1.0, 1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = tl.div_rn(1.0 - e, 1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _bad_count(score, VALID):
    return tl.sum((((score != score) | (tl.abs(score) == INF)) & VALID).to(tl.int32))


@triton.jit
def _order_key(score, VALID):
    """An int32 whose order is the float order (-0.0 and +0.0 equal); padding sorts last."""
    bits = tl.where(score == 0.0, 0.0, score).to(tl.int32, bitcast=True)
    return tl.where(VALID, bits ^ ((bits >> 31) & 0x7FFFFFFF), 0x7FFFFFFF)


@triton.jit
def _kth_key(key, k, VALID):
    """The k-th smallest key of the row, and whether exactly k keys are <= it.

    Keeps a bracket [lo, hi] with count(key < lo) < k <= count(key <= hi). Each pass probes
    three points: two around the point interpolated from the counts, and the midpoint (so the
    bracket at least halves); their counts share one int64 reduction (20 bits each). It stops
    when a probe has exactly k keys at or below it, usually after a few passes."""
    lo = tl.min(key).to(tl.int64)
    hi = tl.max(tl.where(VALID, key, -2147483648)).to(tl.int64)
    c_lo = tl.zeros((), tl.int64)
    c_hi = tl.sum(VALID.to(tl.int64))
    while (lo < hi) & (c_hi != k):
        span = hi - lo
        guess = lo + span * (k - c_lo) // tl.maximum(c_hi - c_lo, 1)
        delta = (span >> 6) + 1
        a = tl.minimum(tl.maximum(guess - delta, lo), hi - 1)
        b = tl.minimum(tl.maximum(guess + delta, lo), hi - 1)
        m = lo + (span >> 1)
        t1 = tl.minimum(tl.minimum(a, b), m)
        t3 = tl.maximum(tl.maximum(a, b), m)
        t2 = tl.maximum(tl.minimum(a, b), tl.minimum(tl.maximum(a, b), m))
        packed = tl.sum((key <= t1.to(tl.int32)).to(tl.int64)
                        + ((key <= t2.to(tl.int32)).to(tl.int64) << 20)
                        + ((key <= t3.to(tl.int32)).to(tl.int64) << 40))
        c1, c2, c3 = packed & 0xFFFFF, (packed >> 20) & 0xFFFFF, packed >> 40
        new_lo = tl.where(c1 >= k, lo, tl.where(c2 >= k, t1 + 1, tl.where(c3 >= k, t2 + 1, t3 + 1)))
        c_lo = tl.where(c1 >= k, c_lo, tl.where(c2 >= k, c1, tl.where(c3 >= k, c2, c3)))
        hi = tl.where(c1 >= k, t1, tl.where(c2 >= k, t2, tl.where(c3 >= k, t3, hi)))
        c_hi = tl.where(c1 >= k, c1, tl.where(c2 >= k, c2, tl.where(c3 >= k, c3, c_hi)))
        lo = new_lo
    # the k-th key is the largest key <= hi (hi itself once the bracket has closed)
    return tl.max(tl.where(key <= hi.to(tl.int32), key, -2147483648)), c_hi == k
'''

_ROWS_KERNEL = '''

@triton.jit
def prune_rows({args}mask_ptr, w_ptr, out_ptr, score_ptr, bad_ptr, cols, k, extra_rows,
               BLOCK: tl.constexpr, WRITE_OUT: tl.constexpr, WRITE_SCORE: tl.constexpr):
    ROW = tl.program_id(0).to(tl.int64)
    # the first extra_rows rows prune one more, so the layer prunes round(rows·cols·s) exactly
    row_k = k + (ROW < extra_rows).to(tl.int64)
    BASE = ROW * cols
    OFFS = tl.arange(0, BLOCK)
    VALID = OFFS < cols
{body}
    bad = _bad_count(score, VALID)
    if bad > 0:
        tl.atomic_add(bad_ptr, bad)
    key = _order_key(score, VALID)
    kth, exact = _kth_key(key, row_k, VALID)
    if exact:
        prune = key <= kth
    else:   # ties straddle the k-th key: prune them left to right, as a stable sort would
        below = key < kth
        ties = key == kth
        room = row_k - tl.sum(below.to(tl.int32))
        prune = below | (ties & (tl.cumsum(ties.to(tl.int32), axis=0) <= room))
    _store(prune, score, mask_ptr, w_ptr, out_ptr, score_ptr, BASE + OFFS, VALID, WRITE_OUT, WRITE_SCORE)
'''

_NM_KERNEL = '''

@triton.jit
def prune_nm({args}mask_ptr, w_ptr, out_ptr, score_ptr, bad_ptr, cols, groups,
             N: tl.constexpr, M: tl.constexpr, BLOCK_G: tl.constexpr,
             WRITE_OUT: tl.constexpr, WRITE_SCORE: tl.constexpr):
    ROW = tl.program_id(0).to(tl.int64)
    BASE = ROW * cols
    G = tl.arange(0, BLOCK_G)[:, None]
    J = tl.arange(0, M)[None, :]
    OFFS = G * M + J
    VALID = (G < groups) & (J < M)
{body}
    bad = _bad_count(score, VALID)
    if bad > 0:
        tl.atomic_add(bad_ptr, bad)
    score = tl.where(score == 0.0, 0.0, score)
    # rank within the group = earlier-in-stable-sort members; the N lowest ranks are pruned
    rank = tl.zeros((BLOCK_G, M), tl.int32)
    for j in tl.static_range(M):
        other = tl.sum(tl.where(J == j, score, 0.0), axis=1)[:, None]
        rank += ((other < score) | ((other == score) & (J > j))).to(tl.int32)
    _store(rank < N, score, mask_ptr, w_ptr, out_ptr, score_ptr, BASE + OFFS, VALID, WRITE_OUT, WRITE_SCORE)
'''

_STORE = '''

@triton.jit
def _store(prune, score, mask_ptr, w_ptr, out_ptr, score_ptr, at, VALID,
           WRITE_OUT: tl.constexpr, WRITE_SCORE: tl.constexpr):
    tl.store(mask_ptr + at, prune.to(tl.int8), mask=VALID)
    if WRITE_OUT:
        w = tl.load(w_ptr + at, mask=VALID, other=0.0)
        tl.store(out_ptr + at, tl.where(prune, tl.zeros_like(w), w), mask=VALID)
    if WRITE_SCORE:
        tl.store(score_ptr + at, score, mask=VALID)
'''


def generate(tree: Node, input_shapes: dict[str, Shape]) -> KernelSource:
    leaves = leaves_of(tree, input_shapes)
    args = "".join(f"in{i}, " for i in range(len(leaves)))
    body = "\n".join("    " + line for line in _body(tree, leaves))
    source = (_PRELUDE.format(eps=expr.EPS, exp_clamp=expr.EXP_CLAMP) + _STORE
              + _ROWS_KERNEL.format(args=args, body=body) + _NM_KERNEL.format(args=args, body=body))
    return KernelSource(source, leaves)
