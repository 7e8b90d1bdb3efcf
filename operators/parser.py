"""The grammar of the candidate language: one `ast.FunctionDef` becomes an expression tree.

Nothing is executed. Every construct outside the grammar, every constant or exponent out of
range and every argument the language cannot give a meaning raises `CandidateError` with the
reason, written for the LLM. `operators.language` finds the function in the text and checks the
finished tree; this module knows the statements, calls and operators allowed inside it.
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass

from autoprune_ray.tree import expr
from autoprune_ray.tree.expr import Node
from autoprune_ray.operators.specs import LanguageSpec

MAX_SOURCE_CHARS = 4000
MAX_NODES = 64
MAX_DEPTH = 16
MAX_CONST = 1e4
MAX_EXPONENT = 4.0


class CandidateError(ValueError):
    """A candidate program is rejected; the message is the reason, written for the LLM."""


_UNARY = {"abs": "abs", "sqrt": "sqrt", "log1p": "log1p", "exp": "exp", "square": "square", "sigmoid": "sigmoid",
          "tanh": "tanh", "neg": "neg", "negative": "neg", "absolute": "abs", "fabs": "abs"}
_REDUCE = {"sum": "sum", "mean": "mean", "std": "std", "norm": "norm", "max": "max", "min": "min",
           "amax": "max", "amin": "min"}
_BINARY_FN = {"maximum": "max2", "minimum": "min2", "fmax": "max2", "fmin": "min2", "add": "add", "sub": "sub",
              "subtract": "sub", "mul": "mul", "multiply": "mul", "div": "div", "divide": "div",
              "true_divide": "div"}
_NAMESPACES = {"torch", "np", "numpy", "math", "F"}
ALLOWED_FUNCTIONS = set(_UNARY) | set(_REDUCE) | {"maximum", "minimum", "pow", "clamp", "clip"}


@dataclass
class _Built:
    node: Node
    size: int
    depth: int


def parse_function(fn: ast.FunctionDef, spec: LanguageSpec) -> Node:
    """The expression tree one function definition computes (not yet canonical or shape-checked)."""
    return _Parser(spec).function(fn).node


class _Parser:
    def __init__(self, task: LanguageSpec):
        self.task = task
        self.locals: dict[str, _Built] = {}

    # -- helpers ---------------------------------------------------------------
    def _make(self, op: str, args: list[_Built], value=None) -> _Built:
        size = 1 + sum(a.size for a in args)
        depth = 1 + max((a.depth for a in args), default=0)
        if size > MAX_NODES:
            raise CandidateError(f"program too large: more than {MAX_NODES} operations")
        if depth > MAX_DEPTH:
            raise CandidateError(f"program too deeply nested: more than {MAX_DEPTH} levels")
        return _Built(Node(op, tuple(a.node for a in args), value), size, depth)

    def _number(self, node: ast.AST, what: str) -> float:
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
            return sign * self._number(node.operand, what)
        if _is_number(node):
            return _constant(node)
        if isinstance(node, ast.Name) and node.id in self.locals and self.locals[node.id].node.op == "const":
            return float(self.locals[node.id].node.value)
        raise CandidateError(f"{what} must be a number literal, got `{snippet(node)}`")

    # -- statements ------------------------------------------------------------
    def function(self, fn: ast.FunctionDef) -> _Built:
        if fn.decorator_list:
            decorator = snippet(fn.decorator_list[0])
            raise CandidateError(f"decorators are not allowed (`@{decorator}`): write a plain function")
        self._parameters(fn)
        body = list(fn.body)
        if body and _is_string_line(body[0]):
            body = body[1:]  # docstring
        for stmt in body[:-1]:
            self.statement(stmt)
        if not body or not isinstance(body[-1], ast.Return):
            if body:
                self.statement(body[-1])  # says precisely what is wrong with it, if anything
            raise CandidateError("the function must end with a single `return <expression>`")
        if body[-1].value is None:
            raise CandidateError("`return` needs an expression")
        return self.expression(body[-1].value)

    def _parameters(self, fn: ast.FunctionDef) -> None:
        args = fn.args
        if args.vararg or args.kwarg or args.kwonlyargs or args.posonlyargs:
            raise CandidateError("only plain parameters are allowed (no *args, **kwargs or keyword-only)")
        names = [a.arg for a in args.args]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise CandidateError(f"parameter `{duplicate}` is listed twice")
        for annotation in [a.annotation for a in args.args] + [fn.returns]:
            _check_annotation(annotation)
        defaults = dict(zip(names[::-1], args.defaults[::-1]))
        for a in args.args:
            if a.arg in defaults:
                self.locals[a.arg] = self._make("const", [], self._number(defaults[a.arg], f"default of {a.arg}"))
                continue
            canonical = self.task.canonical_input(a.arg)
            if canonical is None:
                allowed = ", ".join(f"{k} ({v})" for k, v in self.task.describe.items())
                raise CandidateError(f"unknown parameter `{a.arg}`: the inputs are {allowed}")
            self.locals[a.arg] = self._make("input", [], canonical)

    def statement(self, stmt: ast.stmt) -> None:
        if isinstance(stmt, ast.Return):
            raise CandidateError("only one `return`, at the end, is allowed")
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            self._bind(stmt.targets[0].id, self.expression(stmt.value))
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            _check_annotation(stmt.annotation)
            self._bind(stmt.target.id, self.expression(stmt.value))
        elif isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name):
            current = self._name(stmt.target.id)
            self._bind(stmt.target.id, self._binop(stmt.op, current, self.expression(stmt.value), stmt))
        elif _is_string_line(stmt) or isinstance(stmt, ast.Pass):
            return  # a stray string/comment line
        else:
            raise CandidateError(f"statement `{snippet(stmt)}` is not allowed: "
                                 "use `name = expression` and one `return`")

    def _bind(self, name: str, value: _Built) -> None:
        if name in _NAMESPACES:
            raise CandidateError(f"`{name}` cannot be assigned")
        self.locals[name] = value

    def _name(self, name: str) -> _Built:
        if name in self.locals:
            return self.locals[name]
        if name in _NAMESPACES:
            raise CandidateError(f"`{name}` can only be used to call a function, e.g. {name}.sqrt(x)")
        if self.task.canonical_input(name):
            raise CandidateError(f"`{name}` is an input but not a parameter: add it to the function's parameters")
        raise CandidateError(f"unknown name `{name}`")

    # -- expressions -------------------------------------------------------------
    def expression(self, node: ast.AST) -> _Built:
        if isinstance(node, ast.Name):
            return self._name(node.id)
        if isinstance(node, ast.Constant):
            return self._make("const", [], _constant(node))
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Pow):
                return self._pow(self.expression(node.left), node.right)
            return self._binop(node.op, self.expression(node.left), self.expression(node.right), node)
        if isinstance(node, ast.UnaryOp):
            return self._unary(node)
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.Attribute) and node.attr == "values" and isinstance(node.value, ast.Call):
            return self._max_min_values(node.value)
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Call) and _is_index_zero(node.slice):
            return self._max_min_values(node.value)
        if isinstance(node, ast.Attribute):
            raise CandidateError(f"attribute `{snippet(node)}` is not allowed")
        raise CandidateError(f"`{snippet(node)}` is not allowed: {type(node).__name__} is outside the language")

    def _unary(self, node: ast.UnaryOp) -> _Built:
        if isinstance(node.op, ast.UAdd):
            return self.expression(node.operand)
        if not isinstance(node.op, ast.USub):
            raise CandidateError(f"operator in `{snippet(node)}` is not allowed (use + - * / **)")
        operand = self.expression(node.operand)
        if operand.node.op == "const":
            return self._make("const", [], -operand.node.value)
        return self._make("neg", [operand])

    def _max_min_values(self, call: ast.Call) -> _Built:
        name = _call_name(call)[1] if isinstance(call.func, ast.Attribute) else None
        if name not in ("max", "min"):
            raise CandidateError(f"`.values` / `[0]` only follow a max or min reduction, not `{snippet(call)}`")
        return self.call(call)

    def _binop(self, op: ast.operator, left: _Built, right: _Built, where: ast.AST) -> _Built:
        ops = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "div"}
        if type(op) not in ops:
            raise CandidateError(f"operator in `{snippet(where)}` is not allowed (use + - * / **)")
        return self._make(ops[type(op)], [left, right])

    def _pow(self, base: _Built, exponent: ast.AST) -> _Built:
        c = self._number(exponent, "an exponent")
        if abs(c) > MAX_EXPONENT:
            raise CandidateError(f"exponent {c:g} is out of range: keep it within ±{MAX_EXPONENT:g}")
        return self._make("pow", [base], c)

    def call(self, node: ast.Call) -> _Built:
        receiver, name = _call_name(node)
        if receiver is not None and not (isinstance(receiver, ast.Name) and receiver.id in _NAMESPACES):
            # method call: x.abs(), x.sum(dim=1, keepdim=True), x.pow(2), x.clamp(min=0)
            return self._apply(name, [receiver], node.args, node.keywords, node)
        if not node.args:
            raise CandidateError(f"`{snippet(node)}` needs an argument")
        return self._apply(name, [node.args[0]], node.args[1:], node.keywords, node)

    def _apply(self, name, first, args, keywords, node) -> _Built:
        kw = {k.arg: k.value for k in keywords}
        if None in kw:
            raise CandidateError("`**kwargs` in calls is not allowed")
        if name in _UNARY:
            _no_extra(args, kw, node)
            return self._make(_UNARY[name], [self.expression(first[0])])
        elementwise_pair = name in ("max", "min") and len(args) == 1 and "dim" not in kw and not _is_number(args[0])
        if name in _REDUCE and not elementwise_pair:
            return self._reduce(_REDUCE[name], self.expression(first[0]), args, kw, node)
        if name in ("max", "min") or name in _BINARY_FN:
            op = {"max": "max2", "min": "min2"}.get(name) or _BINARY_FN[name]
            if len(args) != 1 or kw:
                raise CandidateError(f"`{snippet(node)}`: {name} takes exactly two tensors")
            return self._make(op, [self.expression(first[0]), self.expression(args[0])])
        if name in ("pow", "power", "float_power"):
            if len(args) != 1 or kw:
                raise CandidateError(f"`{snippet(node)}`: pow takes a tensor and a constant exponent")
            return self._pow(self.expression(first[0]), args[0])
        if name in ("clamp", "clip"):
            return self._clamp(self.expression(first[0]), args, kw, node)
        if name in ("log", "log2", "log10"):
            raise CandidateError(f"`{name}` is unsafe at zero: use log1p(x), which is log(1 + |x|)")
        raise CandidateError(f"function `{name}` is not allowed; allowed: {', '.join(sorted(ALLOWED_FUNCTIONS))}")

    def _reduce(self, kind, x: _Built, args, kw, node) -> _Built:
        kw, args = dict(kw), list(args)
        if kind == "norm" and args:   # torch.norm(x, p, dim, keepdim): the first is p, not dim
            kw = {"p": args.pop(0), **kw}
        p = kw.pop("p", None)
        if p is not None and (kind != "norm" or self._number(p, "norm's p") != 2):
            raise CandidateError("only the L2 norm (p=2) is supported")
        dim_node = kw.pop("dim", kw.pop("axis", args[0] if args else None))
        kw.pop("keepdim", None)
        kw.pop("keepdims", None)
        if kw or len(args) > 2:
            raise CandidateError(f"`{snippet(node)}`: a reduction takes dim= and keepdim= only")
        out = x
        for axis in self._reduced_axes(kind, x, dim_node):
            out = self._make(f"{kind}_{axis}", [out])
        return out

    def _reduced_axes(self, kind: str, x: _Built, dim_node) -> list[str]:
        if dim_node is None:  # over everything the value varies along
            shape = expr.shape_of(x.node, self.task.inputs)
            axes = [ax for ax, varies in (("col", shape.rows), ("row", shape.cols)) if varies]
            if kind == "std" and len(axes) == 2:
                raise CandidateError("std over a whole matrix is not supported: give dim=0 or dim=1")
            return axes
        dim = self._number(dim_node, "dim")
        if dim not in (0, 1, -1, -2):
            raise CandidateError(f"dim must be 0 or 1 (tensors are 2-D), got {dim:g}")
        return ["row" if dim in (1, -1) else "col"]

    def _clamp(self, x: _Built, args, kw, node) -> _Built:
        lo, hi = _clamp_bounds(args, kw, node)
        low, high = (None if _is_none(b) else self._number(b, "a clamp bound") for b in (lo, hi))
        if low is None and high is None:
            raise CandidateError(f"`{snippet(node)}` has no bound: {_CLAMP_USAGE}")
        if low is not None and high is not None and low > high:
            raise CandidateError(f"clamp bounds are reversed: min {low:g} > max {high:g}")
        return self._make("clamp", [x], (low, high))


_CLAMP_USAGE = "use clamp(x, min=a, max=b) with number bounds; one of them may be left out"


def _clamp_bounds(args, kw, node) -> tuple:
    """The (min, max) argument nodes of a clamp, each None where absent."""
    given_twice = len(args) >= 1 and "min" in kw or len(args) >= 2 and "max" in kw
    if len(args) > 2 or set(kw) - {"min", "max"} or given_twice:
        raise CandidateError(f"`{snippet(node)}`: {_CLAMP_USAGE}")
    return kw.get("min", args[0] if args else None), kw.get("max", args[1] if len(args) > 1 else None)


# ---------------------------------------------------------------- constants

def _constant(node: ast.Constant) -> float:
    """A number literal as a checked float (bool, str, None, ... are not numbers)."""
    value = node.value
    if type(value) not in (int, float):
        raise CandidateError(f"constant `{snippet(node)}` is not a number")
    if type(value) is int and abs(value) > MAX_CONST:   # before float(): a 400-digit int overflows it
        raise CandidateError(f"constant `{snippet(node)}` is too large: keep |c| <= {MAX_CONST:g}")
    return check_constant(float(value))


def check_constant(x: float, after: str = "") -> float:
    """`x` if it is a finite number within ±MAX_CONST; `after` says where it came from."""
    if not math.isfinite(x):
        raise CandidateError(f"constants must be finite numbers{after}")
    if abs(x) > MAX_CONST:
        raise CandidateError(f"constant {x:g}{after} is too large: keep |c| <= {MAX_CONST:g}")
    return x


# ---------------------------------------------------------------- annotations

_MAX_ANNOTATION_DEPTH = 8


def _check_annotation(node: ast.AST | None) -> None:
    """Annotations are checked, never evaluated: they may only name a type."""
    if node is not None and not _is_type_name(node, _MAX_ANNOTATION_DEPTH):
        raise CandidateError(f"annotations may only name a type (like torch.Tensor or float), got `{snippet(node)}`")


def _is_type_name(node: ast.AST, depth: int) -> bool:
    """`torch.Tensor`, `"Tensor"`, `Optional[Tensor]`, `float | None`: public names only, no calls."""
    if depth <= 0:
        return False
    if isinstance(node, ast.Name):
        return not node.id.startswith("__")
    if isinstance(node, ast.Attribute):
        return not node.attr.startswith("_") and _is_type_name(node.value, depth - 1)
    if isinstance(node, ast.Constant):
        return node.value is None or isinstance(node.value, str) and _is_type_text(node.value, depth)
    if isinstance(node, ast.Subscript):
        return _is_type_name(node.value, depth - 1) and _is_type_name(node.slice, depth - 1)
    if isinstance(node, ast.Tuple):
        return all(_is_type_name(e, depth - 1) for e in node.elts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _is_type_name(node.left, depth - 1) and _is_type_name(node.right, depth - 1)
    return False


def _is_type_text(text: str, depth: int) -> bool:
    """A string annotation ("torch.Tensor") must itself be a type name."""
    try:
        return _is_type_name(ast.parse(text.strip(), mode="eval").body, depth - 1)
    except (SyntaxError, ValueError):
        return False


# ---------------------------------------------------------------- small predicates

def _call_name(node: ast.Call):
    if isinstance(node.func, ast.Name):
        return None, node.func.id
    if isinstance(node.func, ast.Attribute):
        value = node.func.value
        # torch.nn.functional.sigmoid(x) / F.sigmoid(x)
        while isinstance(value, ast.Attribute) and value.attr in ("nn", "functional", "special", "linalg"):
            value = value.value
        return value, node.func.attr
    raise CandidateError(f"call `{snippet(node)}` is not allowed")


def _is_number(node: ast.AST) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return _is_number(node.operand)
    return isinstance(node, ast.Constant) and type(node.value) in (int, float)


def _is_none(node: ast.AST | None) -> bool:
    return node is None or isinstance(node, ast.Constant) and node.value is None


def _is_index_zero(s) -> bool:
    return isinstance(s, ast.Constant) and s.value == 0 and type(s.value) is int


def _is_string_line(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _no_extra(args, kw, node) -> None:
    if args or kw:
        raise CandidateError(f"`{snippet(node)}` takes no extra arguments")


def snippet(node: ast.AST) -> str:
    """The first line of a node's source, shortened: what a rejection reason quotes."""
    try:
        text = ast.unparse(node).split("\n")[0]
    except Exception:  # noqa: BLE001 - unparse of odd trees (a 5000-digit int) must not crash the reason
        text = type(node).__name__
    return text if len(text) <= 80 else text[:77] + "..."
