"""The candidate language: an LLM-written Python function, parsed (never executed) into an
expression tree over whitelisted inputs and operations.

    def score(W, A):                      # any function name; parameters by name or alias
        act = torch.sqrt(A)               # local assignments are inlined
        return W.abs() * act              # a single return

Every rejection is a `CandidateError` whose message says precisely what is not allowed; it is
fed back to the LLM. Limits bound size, depth, constants and exponents before anything runs.
Semantics that differ from eager torch, on purpose: reductions always keep their dimension (as
an LLM writing `W.sum(dim=1)` means), and sqrt/log/pow/division are guarded (see kernels.expr).
"""
from __future__ import annotations

import ast
import hashlib
import re
from dataclasses import dataclass, field

from autoprune_ray.kernels import expr
from autoprune_ray.kernels.expr import COLVEC, MATRIX, SCALAR, Node, Shape
from autoprune_ray.operators.canonical import canonicalize, pretty

MAX_SOURCE_CHARS = 4000
MAX_NODES = 64
MAX_DEPTH = 16
MAX_CONST = 1e4
MAX_EXPONENT = 4.0


class CandidateError(ValueError):
    """A candidate program is rejected; the message is the reason, written for the LLM."""


@dataclass(frozen=True)
class Task:
    """What a candidate computes: its inputs (canonical name -> shape), their aliases, and the
    shape its result must have."""
    name: str
    inputs: dict[str, Shape]
    aliases: dict[str, str]
    result_must_vary: str          # "matrix": a per-weight score; "rows": one value per layer
    describe: dict[str, str] = field(default_factory=dict)

    def canonical_input(self, name: str) -> str | None:
        if name in self.inputs:
            return name
        return self.aliases.get(name) or self.aliases.get(name.lower())


PRUNE = Task(
    name="prune",
    inputs={"W": MATRIX, "G": MATRIX, "A": COLVEC, "M": COLVEC, "V": COLVEC, "H": COLVEC, "d": SCALAR},
    aliases={"weight": "W", "weights": "W", "w": "W", "grad": "G", "g": "G", "grad_rms": "G", "gradient": "G",
             "act": "A", "a": "A", "norm": "A", "x_norm": "A", "act_norm": "A", "activation": "A", "x": "A",
             "mean": "M", "mu": "M", "m": "M", "x_mean": "M", "var": "V", "variance": "V", "v": "V", "x_var": "V",
             "hdiag": "H", "h_diag": "H", "gram_diag": "H", "h": "H", "depth": "d", "layer_frac": "d",
             "depth_frac": "d"},
    result_must_vary="matrix",
    describe={"W": "weight [out, in]", "G": "gradient RMS [out, in]", "A": "input-channel L2 norm [in]",
              "M": "input-channel mean [in]", "V": "input-channel variance [in]", "H": "Gram diagonal [in]",
              "d": "layer depth fraction in [0, 1] (scalar)"},
)

# Layer-wise allocation (SDSA): per-layer statistics are vectors over layers, laid out as [L, 1].
_LAYERS = Shape(True, False)
ALLOCATE = Task(
    name="allocate",
    inputs={"skew": _LAYERS, "kurt": _LAYERS, "outlier": _LAYERS, "depth": _LAYERS, "size": _LAYERS},
    aliases={"skewness": "skew", "kurtosis": "kurt", "outlier_ratio": "outlier", "outliers": "outlier",
             "d": "depth", "depth_frac": "depth", "numel": "size", "n_params": "size"},
    result_must_vary="rows",
    describe={"skew": "skewness of the layer's Wanda scores", "kurt": "excess kurtosis of the scores",
              "outlier": "share of scores above 5× their mean (OWL's D)", "depth": "depth fraction",
              "size": "layer's share of parameters"},
)
# Mixed-precision sensitivity (TAP): evaluated once per (layer, bit width) on that layer's tensors,
# with E = Q_b(W) − W the layer's quantization error at the bit width being scored; reduces to one
# number. The allocator gives fewer bits where the sum of sensitivities grows least.
MPQ = Task(
    name="mpq",
    inputs={"E": MATRIX, "W": MATRIX, "G": MATRIX, "A": COLVEC, "H": COLVEC, "b": SCALAR, "d": SCALAR},
    aliases={"err": "E", "error": "E", "q_err": "E", "qerr": "E", "delta": "E", "dw": "E", "e": "E",
             "weight": "W", "weights": "W", "w": "W", "grad": "G", "g": "G", "grad_rms": "G", "gradient": "G",
             "act": "A", "a": "A", "norm": "A", "x_norm": "A", "act_norm": "A", "activation": "A", "x": "A",
             "hdiag": "H", "h_diag": "H", "gram_diag": "H", "h": "H", "bits": "b", "nbits": "b",
             "depth": "d", "layer_frac": "d", "depth_frac": "d"},
    result_must_vary="scalar",
    describe={"E": "quantization error Q(W) - W at the bit width being scored [out, in]",
              "W": "weight [out, in]", "G": "gradient RMS [out, in]", "A": "input-channel L2 norm [in]",
              "H": "Gram diagonal (sum over tokens of x_j^2) [in]", "b": "the bit width being scored (scalar)",
              "d": "layer depth fraction in [0, 1] (scalar)"},
)
TASKS = {"prune": PRUNE, "allocate": ALLOCATE, "mpq": MPQ}


@dataclass(frozen=True)
class Candidate:
    task: str
    tree: Node            # canonical tree: what is hashed is what runs
    source: str
    granularity: str = "row"

    @property
    def hash(self) -> str:
        return tree_hash(self.tree)

    @property
    def code(self) -> str:
        return pretty(self.tree, TASKS[self.task])

    @property
    def inputs(self) -> list[str]:
        used = {n.value for n in expr.walk(self.tree) if n.op == "input"}
        return [name for name in TASKS[self.task].inputs if name in used]


# ---------------------------------------------------------------- extraction from completions

_FENCE = re.compile(r"```[a-zA-Z0-9_+-]*\n(.*?)```", re.S)


_EXAMPLES = {"prune": "def score(W, A): return ...", "allocate": "def allocate(outlier): return ...",
             "mpq": "def sensitivity(E, H): return ..."}


def extract_function(text: str, task: str = "prune") -> str:
    """The first function definition in a chatty completion (inside a code fence or not)."""
    if not isinstance(text, str):
        raise CandidateError("the program must be text")
    blocks = [b for b in _FENCE.findall(text) if "def " in b] or [text]
    for block in blocks:
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if line.lstrip().startswith("def "):
                indent = len(line) - len(line.lstrip())
                body = [line[indent:]]
                for nxt in lines[i + 1:]:
                    if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                        break
                    body.append(nxt[indent:] if len(nxt) >= indent else nxt)
                return "\n".join(body).rstrip() + "\n"
    raise CandidateError(f"no function definition found: write `{_EXAMPLES.get(task, _EXAMPLES['prune'])}`")


# ---------------------------------------------------------------- parsing

_UNARY = {"abs": "abs", "sqrt": "sqrt", "log1p": "log1p", "exp": "exp", "square": "square", "sigmoid": "sigmoid",
          "tanh": "tanh", "neg": "neg", "negative": "neg", "absolute": "abs", "fabs": "abs"}
_REDUCE = {"sum": "sum", "mean": "mean", "std": "std", "norm": "norm", "max": "max", "min": "min",
           "amax": "max", "amin": "min"}
_BINARY_FN = {"maximum": "max2", "minimum": "min2", "fmax": "max2", "fmin": "min2", "add": "add", "sub": "sub",
              "subtract": "sub", "mul": "mul", "multiply": "mul", "div": "div", "divide": "div",
              "true_divide": "div"}
_NAMESPACES = {"torch", "np", "numpy", "math", "F"}


@dataclass
class _Built:
    node: Node
    size: int
    depth: int


class _Parser:
    def __init__(self, task: Task):
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
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return self._check_const(float(node.value))
        if isinstance(node, ast.Name) and node.id in self.locals and self.locals[node.id].node.op == "const":
            return float(self.locals[node.id].node.value)
        raise CandidateError(f"{what} must be a number literal, got `{_src(node)}`")

    @staticmethod
    def _check_const(x: float) -> float:
        if x != x or abs(x) == float("inf"):
            raise CandidateError("constants must be finite numbers")
        if abs(x) > MAX_CONST:
            raise CandidateError(f"constant {x:g} is too large: keep |c| <= {MAX_CONST:g}")
        return x

    # -- statements ------------------------------------------------------------
    def function(self, fn: ast.FunctionDef) -> _Built:
        if fn.decorator_list:
            raise CandidateError("decorators are not allowed")
        args = fn.args
        if args.vararg or args.kwarg or args.kwonlyargs or args.posonlyargs:
            raise CandidateError("only plain parameters are allowed (no *args, **kwargs or keyword-only)")
        names = [a.arg for a in args.args]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise CandidateError(f"parameter `{duplicate}` is listed twice")
        for annotation in [a.annotation for a in args.args] + [fn.returns]:
            if annotation is not None and not _is_type_name(annotation):
                raise CandidateError(f"annotations may only name a type (like torch.Tensor), got `{_src(annotation)}`")
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
        body = list(fn.body)
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
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

    def statement(self, stmt: ast.stmt) -> None:
        if isinstance(stmt, ast.Return):
            raise CandidateError("only one `return`, at the end, is allowed")
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            self._bind(stmt.targets[0].id, self.expression(stmt.value))
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            self._bind(stmt.target.id, self.expression(stmt.value))
        elif isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name):
            current = self._name(stmt.target.id)
            self._bind(stmt.target.id, self._binop(stmt.op, current, self.expression(stmt.value), stmt))
        elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
            return  # a stray string/comment line
        elif isinstance(stmt, ast.Pass):
            return
        else:
            raise CandidateError(f"statement `{_src(stmt)}` is not allowed: use `name = expression` and one `return`")

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
            if type(node.value) not in (int, float):
                raise CandidateError(f"constant `{_src(node)}` is not a number")
            return self._make("const", [], self._check_const(float(node.value)))
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Pow):
                return self._pow(self.expression(node.left), node.right)
            return self._binop(node.op, self.expression(node.left), self.expression(node.right), node)
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.UAdd):
                return self.expression(node.operand)
            if isinstance(node.op, ast.USub):
                operand = self.expression(node.operand)
                if operand.node.op == "const":
                    return self._make("const", [], -operand.node.value)
                return self._make("neg", [operand])
            raise CandidateError(f"operator in `{_src(node)}` is not allowed (use + - * / **)")
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.Attribute) and node.attr == "values" and isinstance(node.value, ast.Call):
            return self._max_min_values(node.value)
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Call) and _is_index_zero(node.slice):
            return self._max_min_values(node.value)
        if isinstance(node, ast.Attribute):
            raise CandidateError(f"attribute `{_src(node)}` is not allowed")
        raise CandidateError(f"`{_src(node)}` is not allowed: {type(node).__name__} is outside the language")

    def _max_min_values(self, call: ast.Call) -> _Built:
        name = _call_name(call)[1] if isinstance(call.func, ast.Attribute) else None
        if name not in ("max", "min"):
            raise CandidateError(f"`.values` / `[0]` only follow a max or min reduction, not `{_src(call)}`")
        return self.call(call)

    def _binop(self, op: ast.operator, left: _Built, right: _Built, where: ast.AST) -> _Built:
        ops = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "div"}
        if type(op) not in ops:
            raise CandidateError(f"operator in `{_src(where)}` is not allowed (use + - * / **)")
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
            raise CandidateError(f"`{_src(node)}` needs an argument")
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
                raise CandidateError(f"`{_src(node)}`: {name} takes exactly two tensors")
            return self._make(op, [self.expression(first[0]), self.expression(args[0])])
        if name in ("pow", "power", "float_power"):
            if len(args) != 1 or kw:
                raise CandidateError(f"`{_src(node)}`: pow takes a tensor and a constant exponent")
            return self._pow(self.expression(first[0]), args[0])
        if name in ("clamp", "clip"):
            return self._clamp(self.expression(first[0]), args, kw, node)
        if name in ("log", "log2", "log10"):
            raise CandidateError(f"`{name}` is unsafe at zero: use log1p(x), which is log(1 + |x|)")
        raise CandidateError(f"function `{name}` is not allowed; allowed: {', '.join(sorted(ALLOWED_FUNCTIONS))}")

    def _reduce(self, kind, x: _Built, args, kw, node) -> _Built:
        kw = dict(kw)
        dim_node = kw.pop("dim", kw.pop("axis", args[0] if args else None))
        kw.pop("keepdim", None)
        kw.pop("keepdims", None)
        p = kw.pop("p", None)
        if p is not None and not (kind == "norm" and self._number(p, "norm's p") == 2):
            raise CandidateError("only the L2 norm (p=2) is supported")
        if kw or len(args) > 1 and not (len(args) == 2 and kind != "norm"):
            raise CandidateError(f"`{_src(node)}`: a reduction takes dim= and keepdim= only")
        shape = expr.shape_of(x.node, self.task.inputs)
        if dim_node is None:  # over everything the value varies along
            axes = [ax for ax, varies in (("col", shape.rows), ("row", shape.cols)) if varies]
            if kind == "std" and len(axes) == 2:
                raise CandidateError("std over a whole matrix is not supported: give dim=0 or dim=1")
        else:
            dim = int(self._number(dim_node, "dim"))
            if dim not in (0, 1, -1, -2):
                raise CandidateError(f"dim must be 0 or 1 (tensors are 2-D), got {dim}")
            axes = ["row" if dim in (1, -1) else "col"]
        out = x
        for axis in axes:
            out = self._make(f"{kind}_{axis}", [out])
        return out

    def _clamp(self, x: _Built, args, kw, node) -> _Built:
        lo = kw.pop("min", args[0] if len(args) > 0 else None)
        hi = kw.pop("max", args[1] if len(args) > 1 else None)
        if kw or len(args) > 2 or (lo is None and hi is None):
            raise CandidateError(f"`{_src(node)}`: use clamp(x, min=a, max=b) with number bounds")
        low = None if lo is None or (isinstance(lo, ast.Constant) and lo.value is None) else self._number(lo, "min")
        high = None if hi is None or (isinstance(hi, ast.Constant) and hi.value is None) else self._number(hi, "max")
        if low is not None and high is not None and low > high:
            raise CandidateError(f"clamp bounds are reversed: min {low:g} > max {high:g}")
        return self._make("clamp", [x], (low, high))


ALLOWED_FUNCTIONS = set(_UNARY) | set(_REDUCE) | {"maximum", "minimum", "pow", "clamp", "clip"}


def _call_name(node: ast.Call):
    if isinstance(node.func, ast.Name):
        return None, node.func.id
    if isinstance(node.func, ast.Attribute):
        value = node.func.value
        # torch.nn.functional.sigmoid(x) / F.sigmoid(x)
        while isinstance(value, ast.Attribute) and value.attr in ("nn", "functional", "special", "linalg"):
            value = value.value
        return value, node.func.attr
    raise CandidateError(f"call `{_src(node)}` is not allowed")


def _is_type_name(node: ast.AST) -> bool:
    """`torch.Tensor`, `"Tensor"`, `Optional[Tensor]`, `float | None`: names only, no calls."""
    if isinstance(node, ast.Name) or (isinstance(node, ast.Constant) and isinstance(node.value, (str, type(None)))):
        return True
    if isinstance(node, ast.Attribute):
        return _is_type_name(node.value)
    if isinstance(node, ast.Subscript):
        return _is_type_name(node.value) and _is_type_name(node.slice)
    if isinstance(node, ast.Tuple):
        return all(_is_type_name(e) for e in node.elts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _is_type_name(node.left) and _is_type_name(node.right)
    return False


def _is_number(node: ast.AST) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return _is_number(node.operand)
    return isinstance(node, ast.Constant) and type(node.value) in (int, float)


def _is_index_zero(s) -> bool:
    return isinstance(s, ast.Constant) and s.value == 0 and type(s.value) is int


def _no_extra(args, kw, node) -> None:
    if args or kw:
        raise CandidateError(f"`{_src(node)}` takes no extra arguments")


def _src(node: ast.AST) -> str:
    try:
        text = ast.unparse(node)
    except Exception:  # noqa: BLE001 - unparse of odd trees must not crash the reason
        text = type(node).__name__
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------- public API

def parse(text: str, task: str = "prune", granularity: str = "row") -> Candidate:
    """Parse an LLM completion or a bare function into a canonical candidate, or raise
    CandidateError with the reason."""
    if task not in TASKS:
        raise CandidateError(f"unknown task {task!r}")
    source = extract_function(text, task)
    if len(source) > MAX_SOURCE_CHARS:
        raise CandidateError(f"program too long: {len(source)} characters, at most {MAX_SOURCE_CHARS}")
    try:
        module = ast.parse(source)
    except SyntaxError as exc:
        raise CandidateError(f"syntax error on line {exc.lineno}: {exc.msg}") from None
    except (RecursionError, MemoryError, ValueError) as exc:
        raise CandidateError(f"the program cannot be parsed: {type(exc).__name__}") from None
    functions = [n for n in module.body if isinstance(n, ast.FunctionDef)]
    if len(module.body) != 1 or not functions:
        raise CandidateError("write exactly one function definition and nothing else")
    spec = TASKS[task]
    try:
        built = _Parser(spec).function(functions[0])
    except RecursionError:
        raise CandidateError("program too deeply nested") from None
    tree = canonicalize(built.node)
    check_tree(tree, spec)
    return Candidate(task=task, tree=tree, source=source, granularity=granularity)


def check_tree(tree: Node, task: Task) -> None:
    """Shape and limit checks on a (canonical) tree, before anything runs."""
    if expr.size(tree) > MAX_NODES:
        raise CandidateError(f"program too large: more than {MAX_NODES} operations")
    if expr.depth(tree) > MAX_DEPTH:
        raise CandidateError(f"program too deeply nested: more than {MAX_DEPTH} levels")
    for node in expr.walk(tree):
        if node.op == "const" and abs(node.value) > MAX_CONST:
            raise CandidateError(f"constant {node.value:g} (after folding constant arithmetic) is too large: "
                                 f"keep |c| <= {MAX_CONST:g}")
        if node.op == "div" and node.args[1].op == "const" and node.args[1].value == 0:
            raise CandidateError("division by the constant 0")
    shape = expr.shape_of(tree, task.inputs)
    if task.result_must_vary == "matrix" and not shape.is_matrix:
        raise CandidateError("the score must give one value per weight: use W or G (shape [out, in]) "
                             "and avoid reducing them away")
    if task.result_must_vary == "rows" and not shape.rows:
        raise CandidateError("the allocation must give one value per layer: use the per-layer inputs")
    if task.result_must_vary == "scalar":
        _check_sensitivity(tree, shape)


def _check_sensitivity(tree: Node, shape: Shape) -> None:
    if shape.rows or shape.cols:
        raise CandidateError("the sensitivity must reduce to one number per layer: sum or mean over all "
                             "weights, e.g. (E ** 2 * H).sum()")
    used = {n.value for n in expr.walk(tree) if n.op == "input"}
    if not used & {"E", "b"}:
        raise CandidateError("the sensitivity must depend on the quantization error E (or the bits b), "
                             "otherwise every bit width looks the same")


def tree_hash(tree: Node) -> str:
    return hashlib.sha256(expr.to_string(tree).encode()).hexdigest()[:16]

