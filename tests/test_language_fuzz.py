"""Property-based fuzzing of the language's boundary. Whatever the text, `parse` returns a valid
Candidate or raises CandidateError with a precise reason, nothing else. A valid candidate
evaluates without an exception on small random inputs of its task's shapes, and its printed form
parses back to the same program.

Three strategies: programs built from random Python expression ASTs, random text and bytes, and
character-level mutations of the seeds and the hostile corpus. CI runs a sample of each;
`python benchmarks/fuzz_language.py` runs the same strategies at scale."""
from __future__ import annotations

import ast
import functools
import os

import pytest
import torch
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from autoprune_ray.tree import expr
from autoprune_ray.tree.expr import MATRIX, SCALAR
from autoprune_ray.operators.language import CandidateError, parse
from autoprune_ray.operators.parser import ALLOWED_FUNCTIONS
from autoprune_ray.operators.seeds import ALLOCATION_SEEDS, SCORE_SEEDS, SENSITIVITY_SEEDS
from autoprune_ray.operators.specs import SPECS
from hostile_programs import TOLERATED, hostile_programs

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 400))
TASKS = sorted(SPECS)


# ---------------------------------------------------------------- the property

def classify(text: str, task: str, strict: bool) -> str:
    """'accepted' or 'rejected' when the boundary holds; otherwise what went wrong:
    'crash: <type>' (an exception escaped parse), 'guarded: <type>' (the boundary caught an
    exception the parser did not explain), 'evaluation: <type>' or 'round trip'."""
    try:
        cand = parse(text, task, strict=strict)
    except CandidateError as err:
        return "rejected" if err.__cause__ is None else f"guarded: {type(err.__cause__).__name__}"
    except Exception as exc:  # noqa: BLE001 - exactly what the fuzzing looks for
        return f"crash: {type(exc).__name__}"
    try:
        expr.evaluate(cand.tree, small_inputs(task))
    except Exception as exc:  # noqa: BLE001
        return f"evaluation: {type(exc).__name__}"
    try:
        return "accepted" if parse(cand.code, task).hash == cand.hash else "round trip"
    except CandidateError:
        return "round trip"


def small_inputs(task: str) -> dict[str, torch.Tensor]:
    """Random inputs with the task's shapes: [3, 4] per weight, [1, 4] per column, [3, 1] per row."""
    g = torch.Generator().manual_seed(0)
    env = {}
    for name, shape in SPECS[task].inputs.items():
        size = (3 if shape.rows else 1, 4 if shape.cols else 1)
        env[name] = torch.tensor(0.3) if shape == SCALAR else torch.randn(size, generator=g)
        if shape != MATRIX and shape != SCALAR:
            env[name] = env[name].abs() + 0.1
    return env


# ---------------------------------------------------------------- (a) programs from random ASTs
# Strategies are built once, at import: building them inside every draw makes generation slow.

_NAMES = st.sampled_from(["W", "A", "G", "M", "V", "H", "d", "E", "b", "skew", "outlier", "depth", "weight", "act",
                          "x", "y", "torch", "np", "math", "F", "os", "self", "__builtins__", "None"])
_TARGETS = st.sampled_from(["s", "t", "s", "t", "W", "torch"])
_FUNCTIONS = st.sampled_from(sorted(ALLOWED_FUNCTIONS) * 2 + ["log", "item", "sort", "eval", "open", "getattr",
                                                             "where", "relu", "add", "div", "float_power"])
_CALL_STYLES = st.sampled_from(["plain", "torch", "method", "nn"])
_KEYWORDS = st.sampled_from(["dim", "axis", "keepdim", "keepdims", "min", "max", "p", "out", "dtype", None])
_ATTRIBUTES = st.sampled_from(["values", "T", "shape", "data", "__class__", "abs", "real", "_private"])
_BINARY = st.sampled_from([ast.Add, ast.Sub, ast.Mult, ast.Div] * 3 + [ast.Pow, ast.FloorDiv, ast.Mod, ast.MatMult,
                                                                      ast.BitOr])
_UNARY = st.sampled_from([ast.USub, ast.UAdd, ast.Not, ast.Invert])
_KINDS = st.sampled_from(["binary"] * 12 + ["call"] * 8 + ["unary", "attribute", "subscript", "lambda", "list",
                                                          "generator", "compare", "and", "if", "tuple", "walrus"])
_COUNTS = st.sampled_from([0, 0, 0, 1, 1, 2, 3])


def _one_in(n: int):
    """True about once in n draws (a list, not st.integers: hypothesis favours boundary integers)."""
    return st.sampled_from([False] * (n - 1) + [True])


_ONE_IN_FOUR, _ONE_IN_FIVE, _ONE_IN_TEN, _ONE_IN_TWENTY = _one_in(4), _one_in(5), _one_in(10), _one_in(20)
_TYPE_NAMES = st.sampled_from(["torch.Tensor", "float", "'Tensor'", "Optional[Tensor]", "float | None", "W.__class__",
                               "'os.system(1)'", "torch.Tensor[lambda: 0]"])
_ANNOTATION_KINDS = st.sampled_from(["none"] * 57 + ["type", "type", "expression"])
_STATEMENT_KINDS = st.sampled_from(["assign"] * 4 + ["augment", "annotated", "docstring", "pass", "expression"])
_AROUND = st.lists(st.sampled_from(["import torch", "import os", "x = 1", "def helper(x):\n    return x",
                                    "os.system('true')", "'doc'"]), max_size=2)

_SMALL = st.one_of(st.integers(-4, 4), st.sampled_from([0.0, -0.0, 0.5, 2.0, 1e-3, 1e4, 1e4 + 1, 4.5, -4.0]))
numbers = st.one_of(_SMALL, _SMALL, _SMALL, st.integers(), st.floats(), st.sampled_from([2 ** 1024, 10 ** 400, 1e308]))
_CONSTANTS = st.one_of(numbers, numbers, numbers, st.sampled_from([None, True, False, "W", b"W", ..., 1j]))
_CONSTANTS = _CONSTANTS.map(ast.Constant)


def _name(identifier: str, store: bool = False) -> ast.Name:
    return ast.Name(id=identifier, ctx=ast.Store() if store else ast.Load())


@functools.lru_cache(maxsize=4096)
def expressions(names: tuple[str, ...] = ("W", "A"), depth: int = 3):
    """Random Python expression ASTs whose leaves are mostly `names` (so that some programs are
    valid). Depth-bounded by hand: st.recursive's repr grows exponentially with nested composites."""
    own = st.sampled_from(names).map(_name)
    leaves = st.one_of(own, own, own, _CONSTANTS, _NAMES.map(_name))
    return leaves if depth == 0 else _expressions(leaves, expressions(names, depth - 1))


@st.composite
def _expressions(draw, leaves, child):
    if draw(st.booleans()):
        return draw(leaves)
    kind = draw(_KINDS)
    if kind == "call":
        return draw(_calls(child))
    a, b = draw(child), draw(child)
    load, x = ast.Load(), _name("x", store=True)
    loop = [ast.comprehension(target=x, iter=b, ifs=[], is_async=0)]
    nodes = {
        "binary": lambda: ast.BinOp(a, draw(_BINARY)(), b),
        "unary": lambda: ast.UnaryOp(draw(_UNARY)(), a),
        "attribute": lambda: ast.Attribute(a, draw(_ATTRIBUTES), load),
        "subscript": lambda: ast.Subscript(a, draw(st.sampled_from([ast.Constant(0), ast.Constant(-1), b])), load),
        "lambda": lambda: ast.Lambda(ast.arguments(posonlyargs=[], args=[ast.arg("x")], kwonlyargs=[],
                                                   kw_defaults=[], defaults=[]), a),
        "list": lambda: ast.ListComp(a, loop),
        "generator": lambda: ast.GeneratorExp(a, loop),
        "compare": lambda: ast.Compare(a, [ast.Gt()], [b]),
        "and": lambda: ast.BoolOp(ast.And(), [a, b]),
        "if": lambda: ast.IfExp(a, b, a),
        "tuple": lambda: ast.Tuple([a, b], load),
        "walrus": lambda: ast.NamedExpr(x, a),
    }
    return nodes[kind]()


@functools.lru_cache(maxsize=None)
def _calls(children):
    return _call(children)


@st.composite
def _call(draw, children):
    """f(x), torch.f(x), x.f(), F.nn.f(x) with a few arguments and keywords (some invented)."""
    name, style = draw(_FUNCTIONS), draw(_CALL_STYLES)
    receiver = {"plain": None, "torch": _name("torch"), "nn": ast.Attribute(_name("F"), "nn", ast.Load()),
                "method": draw(children)}[style]
    func = _name(name) if receiver is None else ast.Attribute(receiver, name, ast.Load())
    args = [draw(children) for _ in range(draw(_COUNTS))]
    if args and draw(_ONE_IN_TEN):
        args[-1] = ast.Starred(args[-1], ast.Load())
    keywords = {draw(_KEYWORDS): draw(st.one_of(children, _CONSTANTS)) for _ in range(draw(_COUNTS))}
    return ast.Call(func, args, [ast.keyword(arg=k, value=v) for k, v in keywords.items()])


@st.composite
def annotations(draw):
    """Mostly none; else a type name (some hostile) or, rarely, any expression."""
    kind = draw(_ANNOTATION_KINDS)
    if kind == "type":
        return ast.parse(draw(_TYPE_NAMES), mode="eval").body
    return draw(expressions(depth=1)) if kind == "expression" else None


@st.composite
def _statement(draw, names: tuple[str, ...]):
    target = _name(draw(_TARGETS), store=True)
    value = draw(expressions(names))
    return {"assign": lambda: ast.Assign([target], value),
            "augment": lambda: ast.AugAssign(target, draw(_BINARY)(), value),
            "annotated": lambda: ast.AnnAssign(target, draw(annotations()) or _name("float"), value, simple=1),
            "docstring": lambda: ast.Expr(ast.Constant("note")), "pass": ast.Pass,
            "expression": lambda: ast.Expr(value)}[draw(_STATEMENT_KINDS)]()


@st.composite
def _parameters(draw, task: str) -> ast.arguments:
    """Usually the task's first input (a valid result needs it), then others, aliases or strangers."""
    spec = SPECS[task]
    first = next(iter(spec.inputs))
    strangers = draw(st.sampled_from(["self", "eps", "Q"]))
    names = draw(st.lists(st.sampled_from(list(spec.inputs) * 4 + list(spec.aliases)[:6] + [strangers]),
                          max_size=4, unique=True))
    if not draw(_ONE_IN_FOUR) and first not in names:
        names.insert(0, first)
    args = [ast.arg(name, draw(annotations())) for name in names]
    defaults = [draw(_CONSTANTS)] if args and draw(_ONE_IN_TEN) else []
    return ast.arguments(posonlyargs=[], args=args, kwonlyargs=[], kw_defaults=[], defaults=defaults)


def _function(name: str, arguments: ast.arguments, body: list, decorators: list, returns) -> ast.FunctionDef:
    fields = dict(name=name, args=arguments, body=body, decorator_list=decorators, returns=returns)
    if "type_params" in ast.FunctionDef._fields:   # Python 3.12+
        fields["type_params"] = []
    return ast.FunctionDef(**fields)


@st.composite
def ast_programs(draw):
    """(text, task, strict) for a function built from random ASTs, sometimes among other statements."""
    task = draw(st.sampled_from(TASKS))
    arguments = draw(_parameters(task))
    names, body = tuple(a.arg for a in arguments.args), []
    for _ in range(draw(_COUNTS)):
        body.append(draw(_statement(names or ("W",))))
        target = getattr(body[-1], "target", None) or getattr(body[-1], "targets", [None])[0]
        names += (target.id,) if target is not None and target.id not in names else ()
    body.append(ast.Return(draw(expressions(names or ("W",)))))
    decorators = [draw(expressions(depth=1))] if draw(_ONE_IN_TWENTY) else []
    fn = _function(draw(st.sampled_from(["score", "f", "sensitivity"])), arguments, body, decorators,
                   draw(annotations()))
    around = [ast.parse(text).body[0] for text in draw(_AROUND)] if draw(_ONE_IN_FIVE) else []
    module = ast.Module(body=around[:1] + [fn] + around[1:], type_ignores=[])
    text, strict = ast.unparse(ast.fix_missing_locations(module)), draw(st.booleans())
    if not strict and draw(st.booleans()):   # a file is code; a completion may have prose around it
        text = f"Here is my metric:\n```python\n{text}\n```\nIt should prune well."
    return text, task, strict


# ---------------------------------------------------------------- (b) random text and bytes

_CODE = "WAGdEbMVH()[]{}.,:;=+-*/%@<>!~^&|'\"#\\\n\r\t\x0c\x1c\x1e\x85\u2028\x00\ufeff 0123456789eE_defnortuw"
_WRAPPERS = st.sampled_from(["{}", "def score(W, A):\n    return {}\n", "```python\n{}\n```",
                             "def score(W):\n    x = W  # {}\n    return x", "def score(W):\n    return W.clamp({})\n",
                             "def score(W):\n    return W ** {}\n"])
_TEXTS = st.one_of(st.text(max_size=300), st.text(alphabet=_CODE, max_size=300),
                   st.binary(max_size=300).map(lambda raw: raw.decode("latin-1")))


@st.composite
def random_texts(draw):
    text = draw(_TEXTS)
    return draw(_WRAPPERS).replace("{}", text), draw(st.sampled_from(TASKS)), draw(st.booleans())


# ---------------------------------------------------------------- (c) mutated seeds and hostile programs

_EXTRA_SEEDS = [
    "def score(W, A):\n    return W.clamp(min=0) * A.clamp(max=2.0)\n",
    "def score(W: torch.Tensor, A: 'Tensor') -> torch.Tensor:\n    s: torch.Tensor = W.abs()\n    return s * A\n",
    "import torch\n\ndef score(W, H):\n    a = W.abs()\n    return a / a.norm(dim=0, keepdim=True) * H.max(dim=1)[0]\n",
    "def score(W, A, eps=1e-3):\n    x = W ** 2\n    x += eps\n    return torch.sqrt(x) * A ** -0.5\n",
]
VALID_SEEDS = ([(src, "prune") for src, _ in SCORE_SEEDS.values()] + [(src, "prune") for src in _EXTRA_SEEDS]
               + [(src, "mpq") for src in SENSITIVITY_SEEDS.values()]
               + [(src, "allocate") for src in ALLOCATION_SEEDS.values()]
               + [(src, "prune") for src, _ in TOLERATED if len(src) < 2000])
HOSTILE_SEEDS = [(src, "prune") for _, src in hostile_programs() if len(src) < 2000]
_SEEDS = st.one_of(st.sampled_from(VALID_SEEDS), st.sampled_from(HOSTILE_SEEDS))
_EDITS = st.sampled_from([1, 1, 1, 2, 3, 6])
_EDIT_KINDS = st.sampled_from(["insert", "delete", "replace"])
_PIECES = st.sampled_from(list(_CODE) + ["9" * 400, "**", " ** -4", "0.0 ** -4", "clamp(", "None", ", min=None",
                                         "dim=", "@", "def h(x):\n", "\nimport os\n", "1e308", ": float",
                                         " -> W.__class__", "```", "\r\n", "\x1c"])


@st.composite
def mutated_programs(draw):
    """A seed or hostile program after a few character-level edits (a piece inserted, deleted, replaced)."""
    text, task = draw(_SEEDS)
    for _ in range(draw(_EDITS)):
        i, kind, piece = draw(st.integers(0, len(text))), draw(_EDIT_KINDS), draw(_PIECES)
        text = {"insert": text[:i] + piece + text[i:], "delete": text[:i] + text[i + 1:],
                "replace": text[:i] + piece + text[i + 1:]}[kind]
    return text, task, draw(st.booleans())


STRATEGIES = {"ast": ast_programs(), "text": random_texts(), "mutation": mutated_programs()}


# ---------------------------------------------------------------- the tests: a sample of each

@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_text_is_a_candidate_or_rejected_with_a_reason(strategy, data):
    case = data.draw(STRATEGIES[strategy], label="(text, task, strict)")
    assert classify(*case) in ("accepted", "rejected")


@pytest.mark.parametrize("strategy", ["ast", "mutation"])
def test_the_strategies_also_reach_valid_programs(strategy):
    """A fuzzer that produced only syntax errors would test little of the language."""
    find(STRATEGIES[strategy], lambda case: classify(*case) == "accepted",
         settings=settings(max_examples=2000, database=None, derandomize=True, deadline=None))
