"""Canonical form and pretty-printing of expression trees.

Two programs that differ only in names, whitespace, commutative order, grouping of + and *
chains or redundant parentheses get the same canonical tree, hence the same hash.
"""
from __future__ import annotations

from autoprune_ray.tree import expr
from autoprune_ray.tree.expr import Node

_ASSOCIATIVE = ("add", "mul", "max2", "min2")


def canonicalize(node: Node) -> Node:
    """Rewrite to a fixpoint: flattening can expose new rewrites (e.g. W * (X * W) -> square)."""
    for _ in range(16):
        new = _canonical_pass(node)
        if new == node:
            return new
        node = new
    return node


def _canonical_pass(node: Node) -> Node:
    args = tuple(_canonical_pass(a) for a in node.args)
    node = Node(node.op, args, node.value)
    node = _simplify(node)
    if node.op in _ASSOCIATIVE:
        operands = sorted(_flatten(node, node.op), key=expr.to_string)
        out = operands[0]
        for operand in operands[1:]:
            out = Node(node.op, (out, operand))
        node = out
    return _fold(node)


def _flatten(node: Node, op: str) -> list[Node]:
    if node.op != op:
        return [node]
    return [leaf for a in node.args for leaf in _flatten(a, op)]


def _simplify(node: Node) -> Node:
    """Rewrites that keep the value (within the guarded semantics of tree.expr)."""
    op, args = node.op, node.args
    if op == "pow" and node.value == 1.0:
        return args[0]
    if op == "pow" and node.value == 2.0:
        return Node("square", args)
    if op == "mul" and args[0] == args[1]:
        return Node("square", (args[0],))
    if op == "neg" and args[0].op == "neg":
        return args[0].args[0]
    if op == "abs" and args[0].op in ("abs", "square", "sqrt", "exp", "log1p"):
        return args[0]
    if op == "abs" and args[0].op == "neg":
        return Node("abs", args[0].args)
    return node


def _fold(node: Node) -> Node:
    """Constant subtrees become one constant, computed with the reference evaluator."""
    if node.op in ("input", "const") or not node.args or not all(a.op == "const" for a in node.args):
        return node
    value = float(expr.evaluate(node, {}))
    if value != value or abs(value) == float("inf"):
        return node  # left unfolded: language.check_tree rejects it with the reason
    return expr.const(value)


# ---------------------------------------------------------------- pretty printing

_INFIX = {"add": ("+", 1), "sub": ("-", 1), "mul": ("*", 2), "div": ("/", 2)}
_FUNCS = {"abs": "abs", "sqrt": "sqrt", "log1p": "log1p", "exp": "exp", "square": "square", "sigmoid": "sigmoid",
          "tanh": "tanh", "max2": "maximum", "min2": "minimum"}


def pretty(tree: Node, task) -> str:
    used = expr.inputs_of(tree)
    params = [name for name in task.inputs if name in used]
    return f"def {task.function}({', '.join(params)}):\n    return {_py(tree)}\n"


def expression_text(node: Node) -> str:
    """One expression in the syntax programs are printed in (what a rejection reason quotes)."""
    return _py(node)


def _py(node: Node, parent_prec: int = 0, right: bool = False) -> str:
    if node.op == "input":
        return str(node.value)
    if node.op == "const":
        text = repr(float(node.value))
        return f"({text})" if node.value < 0 and parent_prec else text
    if node.op in _INFIX:
        sym, prec = _INFIX[node.op]
        # left-associative: a right operand at equal precedence keeps its parentheses, so the
        # printed program parses back to the very same tree
        text = f"{_py(node.args[0], prec)} {sym} {_py(node.args[1], prec, True)}"
        needs = prec < parent_prec or (right and prec == parent_prec)
        return f"({text})" if needs else text
    if node.op == "neg":
        text = f"-{_py(node.args[0], 3)}"
        return f"({text})" if parent_prec >= 2 else text
    if node.op == "pow":
        text = f"{_py(node.args[0], 5)} ** {_py(expr.const(node.value), 4)}"
        return f"({text})" if parent_prec > 4 else text
    if node.op == "clamp":
        lo, hi = node.value
        return f"clamp({_py(node.args[0])}, min={lo!r}, max={hi!r})"
    if node.op.endswith(("_row", "_col")):
        kind, axis = node.op.rsplit("_", 1)
        return f"{_py(node.args[0], 5)}.{kind}(dim={1 if axis == 'row' else 0}, keepdim=True)"
    return f"{_FUNCS[node.op]}({', '.join(_py(a) for a in node.args)})"


