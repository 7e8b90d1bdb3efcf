"""The candidate language: an LLM-written Python function, parsed (never executed) into an
expression tree over whitelisted inputs and operations.

    def score(W, A):                      # any function name; parameters by name or alias
        act = torch.sqrt(A)               # local assignments are inlined
        return W.abs() * act              # a single return

Every rejection is a `CandidateError` whose message says precisely what is not allowed; it is
fed back to the LLM. No text stops a search: an unexpected exception while parsing becomes a
`CandidateError` too. Limits bound size, depth, constants and exponents before anything runs.
Semantics that differ from eager torch, on purpose: reductions always keep their dimension (as
an LLM writing `W.sum(dim=1)` means), and sqrt/log/pow/division are guarded (see tree.expr).

Where the text comes from decides what surrounds the function:
  * `parse(completion)`: an LLM completion. The function is taken from the first code fence that
    defines one (or from the whole text); prose and other statements around it are ignored.
  * `parse(file_text, strict=True)`: a program file (`autoprune-ray check FILE`, `--program`).
    The whole text is the program (or, for a saved completion, its first code fence that defines a
    function: prose around the fence is fine): one function, and outside it nothing but a docstring,
    comments and imports of torch, numpy, math or typing. Any other top-level statement
    (`import os`, `os.system(...)`) is rejected.
In both, the program is exactly one function per part of its task: one for prune, allocate and
mpq; two for `joint` (a metric `def score(...)` and a layer-wise allocation `def allocate(...)`,
told apart by name, else by their parameters). A further definition is rejected, helper functions
are not inlined (the LLM is told to inline them), and decorators are rejected. Annotations are
checked, never evaluated: on parameters, the return and local assignments they may only name a
type (`torch.Tensor`, `float`, `Optional[Tensor]`, `"Tensor"`). Lines end where Python's tokenizer
ends them (\\n, \\r\\n, \\r), not at the other separators `str.splitlines` knows.
"""
from __future__ import annotations

import ast
import hashlib
import math
import re
import warnings
from dataclasses import dataclass

from autoprune_ray.tree import expr
from autoprune_ray.tree.expr import Node, Shape
from autoprune_ray.operators.canonical import canonicalize, expression_text, pretty
from autoprune_ray.operators.parser import (MAX_CONST, MAX_DEPTH, MAX_EXPONENT, MAX_NODES, MAX_SOURCE_CHARS,
                                            CandidateError, check_constant, parse_function, snippet)
from autoprune_ray.operators.specs import SPECS, LanguageSpec

__all__ = ["Candidate", "CandidateError", "parse", "parse_file", "extract_function", "check_tree", "tree_hash",
           "TASK_PARTS", "MAX_CONST", "MAX_DEPTH", "MAX_EXPONENT", "MAX_NODES", "MAX_SOURCE_CHARS"]

# What a task's program is made of: the language spec of each of its functions, in file order.
TASK_PARTS: dict[str, tuple[str, ...]] = {"prune": ("prune",), "allocate": ("allocate",), "mpq": ("mpq",),
                                          "joint": ("prune", "allocate")}


@dataclass(frozen=True)
class Candidate:
    task: str
    tree: Node            # canonical tree of the first part: what is hashed is what runs
    source: str
    granularity: str = "row"
    allocation: Node | None = None   # task joint: the layer-wise allocation beside the metric `tree`

    @property
    def parts(self) -> dict[str, Node]:
        """Language spec name -> canonical tree, one per function of the program."""
        return dict(zip(TASK_PARTS[self.task], (self.tree, self.allocation)))

    @property
    def hash(self) -> str:
        return tree_hash(*self.parts.values())

    @property
    def code(self) -> str:
        return "\n\n".join(pretty(tree, SPECS[name]) for name, tree in self.parts.items())

    @property
    def inputs(self) -> list[str]:
        return [name for part, tree in self.parts.items() for name in SPECS[part].inputs
                if name in expr.inputs_of(tree)]

    def with_part(self, part: str, tree: Node) -> "Candidate":
        """This program with the function of language `part` replaced (its other parts kept)."""
        trees = {**self.parts, part: tree}
        first, *rest = trees.values()
        new = Candidate(self.task, first, "", self.granularity, rest[0] if rest else None)
        return Candidate(self.task, first, new.code, self.granularity, new.allocation)


# ---------------------------------------------------------------- the text around the function

_FENCE = re.compile(r"```[a-zA-Z0-9_+-]*\n(.*?)```", re.S)
_INDENT = " \t\f"                                   # what Python's tokenizer counts as indentation
_DEFINITION = re.compile(r"[ \t\f]*def[ \t\f]")
_FILE_IMPORTS = {"torch", "numpy", "math", "typing", "__future__"}


def _lines(text: str) -> list[str]:
    """Lines as Python's tokenizer ends them: at \\n, \\r\\n and \\r only (str.splitlines would
    also split at \\x1c, \\x85, \\u2028, ... inside a comment or string)."""
    if not isinstance(text, str):
        raise CandidateError("the program must be text")
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def extract_function(text: str, task: str = "prune") -> str:
    """The function definitions of a chatty completion (one per part of the task): from the first
    code fence that defines a function, or from the whole text. A further definition is rejected;
    prose between two definitions is dropped."""
    lines = _lines(text)
    blocks = [block.split("\n") for block in _FENCE.findall("\n".join(lines))]
    lines = next((block for block in blocks if _definitions(block)), lines)
    starts = _definitions(lines)
    if not starts:
        raise CandidateError(f"no function definition found: write `{_example(task)}`")
    spans = []
    for start in starts:
        if spans and start < spans[-1][1]:
            continue   # a definition inside a body: the parser rejects it with its reason
        if len(spans) == len(TASK_PARTS.get(task, ("prune",))):
            raise CandidateError(_second_definition(lines[start].strip(_INDENT), len(spans)))
        spans.append(_definition_span(lines, start))
    return "\n\n".join(_dedent(lines[first:end], _indent(lines[first])) for first, end in spans)


def _dedent(lines: list[str], indent: int) -> str:
    body = [line[indent:] if not line[:indent].strip(_INDENT) else line.lstrip(_INDENT) for line in lines]
    return "\n".join(body).rstrip() + "\n"


def _example(task: str) -> str:
    """How a task's program looks, e.g. `def score(W, A): return ...` (the reasons quote it)."""
    return "` and `".join(SPECS[part].example for part in TASK_PARTS.get(task, ("prune",)))


def _definitions(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if _DEFINITION.match(line)]


def _definition_span(lines: list[str], at: int) -> tuple[int, int]:
    """Lines [first, end) of the definition on line `at`: its decorators above, its body below
    (blank and comment lines do not end a body, as they do not for Python)."""
    indent = _indent(lines[at])
    first = at
    while first > 0 and _indent(lines[first - 1]) == indent and lines[first - 1].lstrip(_INDENT).startswith("@"):
        first -= 1
    end = at + 1
    while end < len(lines) and (_is_blank_or_comment(lines[end]) or _indent(lines[end]) > indent):
        end += 1
    while _is_blank_or_comment(lines[end - 1]):   # comments after the body are not part of it
        end -= 1
    return first, end


def _is_blank_or_comment(line: str) -> bool:
    return not line.strip(_INDENT) or line.lstrip(_INDENT).startswith("#")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(_INDENT))


def _second_definition(line: str, count: int = 1) -> str:
    shown = line if len(line) <= 60 else line[:57] + "..."
    if count > 1:
        return (f"write exactly {count} functions: `{shown}` is one more. Helper functions are not "
                "supported: inline them")
    return (f"write exactly one function: `{shown}` is a second definition. Helper functions are not "
            "supported: inline them into the one function")


def _the_functions(module: ast.Module, task: str) -> list[ast.FunctionDef]:
    """The module's functions, one per part of the task; beside them only docstrings and imports
    of torch & co."""
    functions = [stmt for stmt in module.body if isinstance(stmt, ast.FunctionDef)]
    stray = [stmt for stmt in module.body if not isinstance(stmt, ast.FunctionDef) and not _declarative(stmt)]
    if stray:
        raise CandidateError(f"top-level statement `{snippet(stray[0])}` (line {stray[0].lineno}) "
                             "is not allowed: a program is its function(s), with nothing outside but a "
                             "docstring and imports of torch, numpy, math or typing")
    count = len(TASK_PARTS[task])
    if len(functions) > count:
        raise CandidateError(_second_definition(f"def {functions[count].name}(...)", count))
    if not functions:
        raise CandidateError(f"no function definition found: write `{_example(task)}`")
    return functions


def _part_of(fn: ast.FunctionDef, parts: tuple[str, ...]) -> str:
    """Which part a function of a multi-part program is: by its name, else by its parameters."""
    name = fn.name.lower()
    for part in parts:
        if SPECS[part].function in name or part in name:
            return part
    params = [a.arg for a in fn.args.args]
    fits = [part for part in parts if params and all(SPECS[part].canonical_input(p) for p in params)]
    return fits[0] if len(fits) == 1 else parts[0]


def _function_trees(functions: list[ast.FunctionDef], task: str) -> dict[str, Node]:
    """Each function parsed in its part's language; every part present exactly once."""
    parts = TASK_PARTS[task]
    if len(parts) == 1:
        return {parts[0]: parse_function(functions[0], SPECS[parts[0]])}
    trees: dict[str, Node] = {}
    for fn in functions:
        part = _part_of(fn, parts)
        if part in trees:
            raise CandidateError(f"two functions look like the {SPECS[part].function} part; write "
                                 f"`{_example(task)}`")
        trees[part] = parse_function(fn, SPECS[part])
    missing = [SPECS[p].function for p in parts if p not in trees]
    if missing:
        raise CandidateError(f"the `{missing[0]}` function is missing: a {task} program is `{_example(task)}`")
    return trees


def _declarative(stmt: ast.stmt) -> bool:
    """A docstring or an import of a namespace the language knows: nothing a program runs."""
    if isinstance(stmt, ast.Expr):
        return isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)
    if isinstance(stmt, ast.Import):
        return all(alias.name.split(".")[0] in _FILE_IMPORTS for alias in stmt.names)
    if isinstance(stmt, ast.ImportFrom):
        return not stmt.level and (stmt.module or "").split(".")[0] in _FILE_IMPORTS
    return False


# ---------------------------------------------------------------- public API

def parse(text: str, task: str = "prune", granularity: str = "row", *, strict: bool = False) -> Candidate:
    """Parse an LLM completion (or, with strict=True, a program file) into a canonical
    candidate, or raise CandidateError with the reason. Nothing else escapes."""
    if task not in TASK_PARTS:
        raise CandidateError(f"unknown task {task!r}")
    try:
        return _parse(text, task, granularity, strict)
    except CandidateError:
        raise
    except (RecursionError, MemoryError):
        raise CandidateError("program too deeply nested or too large") from None
    except Exception as exc:  # noqa: BLE001 - the boundary: no text may stop a search
        raise CandidateError(f"the program cannot be parsed: {type(exc).__name__}") from exc


def _file_program(text: str) -> str:
    """A program file's code: a saved completion's first code fence that defines a function (its
    prose around it is fine), else the whole text. Either way, all of that code is the program."""
    text = "\n".join(_lines(text))
    return next((block for block in _FENCE.findall(text) if _definitions(block.split("\n"))), text)


def _parse(text: str, task: str, granularity: str, strict: bool) -> Candidate:
    source = _file_program(text) if strict else extract_function(text, task)
    if len(source) > MAX_SOURCE_CHARS:
        raise CandidateError(f"program too long: {len(source)} characters, at most {MAX_SOURCE_CHARS}")
    trees = _function_trees(_the_functions(_syntax_tree(source), task), task)
    for part, tree in trees.items():
        trees[part] = canonicalize(tree)
        check_tree(trees[part], SPECS[part])
    first, *rest = (trees[part] for part in TASK_PARTS[task])
    return Candidate(task=task, tree=first, source=source, granularity=granularity,
                     allocation=rest[0] if rest else None)


def parse_file(text: str, granularity: str = "row") -> Candidate:
    """A program file whose task follows from what it defines: a metric (prune), an allocation
    (allocate), both (joint), or a function named `sensitivity` (mpq). Strict, as
    `parse(..., strict=True)`."""
    try:
        functions = _the_functions(_syntax_tree(_file_program(text)), "joint")
    except CandidateError:
        return parse(text, "prune", granularity, strict=True)   # its reason, in the metric's words
    if len(functions) == 2:
        return parse(text, "joint", granularity, strict=True)
    if SPECS["mpq"].function in functions[0].name.lower():
        return parse(text, "mpq", granularity, strict=True)
    return parse(text, _part_of(functions[0], TASK_PARTS["joint"]), granularity, strict=True)


def _syntax_tree(source: str) -> ast.Module:
    try:
        with warnings.catch_warnings():   # "invalid decimal literal" & co. in LLM junk: noise, not reasons
            warnings.simplefilter("ignore", SyntaxWarning)
            return ast.parse(source)
    except SyntaxError as exc:
        raise CandidateError(f"syntax error on line {exc.lineno}: {exc.msg}") from None
    except ValueError as exc:   # Python 3.10: "source code string cannot contain null bytes"
        raise CandidateError(f"the program cannot be parsed: {exc}") from None


def check_tree(tree: Node, task: LanguageSpec) -> None:
    """Shape and limit checks on a (canonical) tree, before anything runs."""
    if expr.size(tree) > MAX_NODES:
        raise CandidateError(f"program too large: more than {MAX_NODES} operations")
    if expr.depth(tree) > MAX_DEPTH:
        raise CandidateError(f"program too deeply nested: more than {MAX_DEPTH} levels")
    for node in expr.walk(tree):
        _check_node(node)
    shape = expr.shape_of(tree, task.inputs)
    if task.result_must_vary == "matrix" and not shape.is_matrix:
        raise CandidateError("the score must give one value per weight: use W or G (shape [out, in]) "
                             "and avoid reducing them away")
    if task.result_must_vary == "rows" and not shape.rows:
        raise CandidateError("the allocation must give one value per layer: use the per-layer inputs")
    if task.result_must_vary == "scalar":
        _check_sensitivity(tree, shape)


def _check_node(node: Node) -> None:
    """Constants finite and in range, no division by the constant 0, clamps with a bound."""
    if node.op == "const":
        check_constant(node.value, " (after folding constant arithmetic)")
    elif node.args and all(a.op == "const" for a in node.args):
        # canonicalize folds constant arithmetic unless the result is inf or NaN (0.0 ** -4)
        value = float(expr.evaluate(node, {}).reshape(-1)[0])
        if not math.isfinite(value):
            raise CandidateError(f"the constant `{expression_text(node)}` is not a finite number ({value})")
    if node.op == "div" and node.args[1].op == "const" and node.args[1].value == 0:
        raise CandidateError("division by the constant 0")
    if node.op == "clamp":
        bounds = [b for b in node.value if b is not None]
        if not bounds:
            raise CandidateError("clamp needs a min or a max bound")
        for bound in bounds:
            check_constant(bound, " (a clamp bound)")


# A sensitivity that reads neither scores every bit width alike.
SENSITIVITY_READS = frozenset({"E", "b"})


def _check_sensitivity(tree: Node, shape: Shape) -> None:
    if shape.rows or shape.cols:
        raise CandidateError("the sensitivity must reduce to one number per layer: sum or mean over all "
                             "weights, e.g. (E ** 2 * H).sum()")
    used = expr.inputs_of(tree)
    if not used & SENSITIVITY_READS:
        raise CandidateError("the sensitivity must depend on the quantization error E (or the bits b), "
                             "otherwise every bit width looks the same")


def tree_hash(*trees: Node) -> str:
    """A program's identity: its canonical trees (one per part). A one-part program hashes as before."""
    return hashlib.sha256("\n".join(expr.to_string(t) for t in trees).encode()).hexdigest()[:16]
