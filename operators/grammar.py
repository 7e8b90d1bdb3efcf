"""The candidate language as a grammar for constrained decoding: EBNF in xgrammar's dialect
(GBNF-like, `root ::= ...`), generated from the language specs, so that a change to a spec (its
inputs, the function's name, the shape its result must have) changes the grammar.

A completion the grammar allows is one ```python fence holding one function per part of the task,
in the printed form (`def score(W, A):\\n    return ...`). The grammar is a bounded SUBSET of what
`operators.language.parse` accepts, so every string it allows parses; the parser stays the gate.
  * Parameters: canonical input names in the spec's order, holding one the result needs. A body
    may only read its parameters and a context-free grammar cannot remember a set, so the grammar
    holds one copy of the expression rules per parameter set: the smallest sets, at most MAX_SETS
    of them (prune: up to two inputs; allocate: one), and the set of all inputs. The other sets of
    up to MAX_COMPOSED inputs (allocate's 91 pairs and 364 triples, prune's triples) get a composed
    body instead: a sum or product of one single-input operand per parameter (see _Composer).
  * The result varies as the spec requires: the expression reads one input of the required shape
    (W or G for a score, any per-layer input for an allocation) outside every reduction. A
    sensitivity (mpq: one number per layer) is such an expression over E reduced over every
    weight, times or plus at most one small factor: another input reduced to a number, a scalar
    input or a constant (see _scalar).
  * Size: each input, constant, call, reduction and exponent costs a unit; an expression has at
    most `units` of them (RIA takes 7), so every completion closes within `longest(...)` characters.
  * Constants are small (< 100) and never the sole operands of an operation (no `2 ** 99`, no
    `W / 0`): at most one coefficient per product, no constant divisors, bases or call arguments,
    and parentheses only around sums of two or more terms, so products never merge across them.
Left out of the language: local variables, docstrings and comments, annotations, default
parameters, aliases, `.values`/`[0]`, pow()/clamp as methods, two-sided clamps (their bounds could
be reversed), `std()` without dim, constants of 100 and more, and result shapes a score cannot
have.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from itertools import combinations, permutations
from typing import Mapping, Sequence

from autoprune_ray.operators.language import SENSITIVITY_READS
from autoprune_ray.operators.parser import MAX_DEPTH, MAX_EXPONENT
from autoprune_ray.operators.specs import SPECS, LanguageSpec
from autoprune_ray.tree.expr import COLVEC, ROWVEC, SCALAR

MAX_SETS = 16           # expression grammars per function: one per parameter set
MAX_COMPOSED = 3        # the most parameters of a composed signature (see _Composer)
# Expression size by the spec's result_must_vary. A unit nests at most two levels (a call and a
# free minus sign), so 2 * units + 1 levels, plus what sorting a flattened sum or product adds,
# stay within the parser's MAX_DEPTH. RIA takes 7 units.
UNITS = {"matrix": 7, "rows": 5, "scalar": 5}

assert 2 * max(UNITS.values()) + 1 < MAX_DEPTH
# a composed body (see _Composer) of k operands of UNITS // k + 1 units nests k - 1 levels more
assert all(2 * (u // k + 1) + 1 + k - 1 < MAX_DEPTH for u in UNITS.values() for k in range(2, MAX_COMPOSED + 1))

_UNARY = ("abs", "sqrt", "log1p", "exp", "square", "sigmoid", "tanh")   # names as the parser spells them
_REDUCE = ("sum", "mean", "max", "min", "norm")                       # std only with dim=


@dataclass(frozen=True)
class _E:
    """An EBNF expression and the most characters it matches."""
    text: str
    most: int


def _lit(s: str) -> _E:
    return _E(json.dumps(s), len(s))


def _seq(*xs: _E | None) -> _E | None:
    """A sequence; None (a rule that is empty at this size) makes the whole sequence empty."""
    if any(x is None for x in xs):
        return None
    return _E(" ".join(x.text for x in xs), sum(x.most for x in xs))


def _alt(xs) -> _E | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return xs[0] if len(xs) == 1 else _E("(" + " | ".join(x.text for x in xs) + ")", max(x.most for x in xs))


def _opt(x: _E) -> _E:
    return _E(f"({x.text})?", x.most)


class _Rules:
    """The grammar's rules in definition order; a rule's reference carries its longest match."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, name: str, alternatives) -> _E | None:
        alternatives = [a for a in alternatives if a is not None]
        if not alternatives:
            return None
        self.lines.append(f"{name} ::= " + " | ".join(a.text for a in alternatives))
        return _E(name, max(a.most for a in alternatives))


def _shared(rules: _Rules) -> dict[str, _E]:
    """Rules no input appears in: numbers, exponents, operators and call names."""
    top = int(MAX_EXPONENT)
    digits = _E(f'([0-{top - 1}] ("." [0-9] [0-9]?)? | "{top}")', 4)   # within ±MAX_EXPONENT
    out = {
        "num": rules.add("num", [_E('("0" | [1-9] [0-9]?) ("." [0-9] [0-9]? [0-9]?)?', 6)]),
        "exp": rules.add("exponent", [_seq(_opt(_lit("-")), digits), _seq(_lit("(-"), digits, _lit(")"))]),
        "add": rules.add("addop", [_lit(" + "), _lit(" - ")]),
        "mul": rules.add("mulop", [_lit(" * "), _lit(" / ")]),
        "ufn": rules.add("ufn", [_alt(_lit(f) for f in _UNARY)]),
        "bfn": rules.add("bfn", [_alt(_lit(f) for f in ("maximum", "minimum"))]),
        "clamp": rules.add("clamp", [_lit("clamp(")]),
    }
    num = out["num"]
    out["method"] = rules.add("method", [_seq(_lit("."), out["ufn"], _lit("()"))])
    out["coef"] = rules.add("coef", [_seq(_opt(_lit("-")), num), _seq(_lit("(-"), num, _lit(")"))])
    out["bound"] = rules.add("bound", [_seq(_lit(", min="), num, _opt(_lit(", max=None"))),
                                       _seq(_lit(", min=None, max="), num), _seq(_lit(", max="), num)])
    return out


def _reductions(rules: _Rules, index: int, dims: Sequence[int]) -> _E | None:
    """`.sum(dim=1, keepdim=True)` & co over the dims that mean something for the spec's inputs;
    without dim they reduce everything (std then only with dim=: it refuses a whole matrix)."""
    if not dims:
        return None
    by_dim = _seq(_lit("dim="), _alt(_lit(str(d)) for d in dims), _opt(_lit(", keepdim=True")))
    return rules.add(f"f{index}_reduce", [_seq(_lit("."), _alt(_lit(r) for r in _REDUCE), _lit("("), _opt(by_dim),
                                               _lit(")")),
                                          _seq(_lit(".std("), by_dim, _lit(")"))])


class _Expression:
    """The rules of one function's return expression over one parameter set, by size in units:
    `m` expressions read a `must` input outside every reduction, `n` ones read some input. Rule
    names: the prefix, the kind (S sum, P sum of two or more terms, C product, F factor, R primary), the
    variant and the size."""

    def __init__(self, rules: _Rules, shared: dict[str, _E], prefix: str, params: Sequence[str],
                 must: Sequence[str]):
        self.rules, self.s, self.prefix = rules, shared, prefix
        self.r: dict[tuple[str, str, int], _E | None] = {}
        for v in ("m", "n"):
            names = _alt(_lit(p) for p in params if v == "n" or p in must)
            # an input alone or under one call: abs(W), W.abs(), torch.abs(W) cost what W costs
            self.r["L", v, 1] = rules.add(f"{prefix}L{v}", [
                _seq(names, _opt(shared["method"])), _seq(shared["ufn"], _lit("("), names, _lit(")"))])

    def get(self, kind: str, v: str, b: int) -> _E | None:
        return self.r.get((kind, v, b))

    def term(self, v: str, b: int) -> _E | None:
        """A product with an optional constant coefficient (at most one: products of constants
        could leave the constant range once folded)."""
        return _alt([self.get("C", v, b), _seq(self.s["coef"], _lit(" * "), self.get("C", v, b - 1))])

    def any_sum(self, b: int) -> _E | None:
        """A sum, or a lone constant (beside an operand that reads an input)."""
        return _alt([self.get("S", "n", b), self.s["coef"] if b == 1 else None])

    def build(self, units: int) -> _E:
        """The expression of `units` or fewer; smaller rules first, so every reference is defined."""
        kinds = (("P", self._pair), ("R", self._prim), ("F", self._factor), ("C", self._chain))
        for b in range(1, units + 1):
            for v in ("n", "m"):
                for kind, alternatives in kinds:
                    self.r[kind, v, b] = self.rules.add(f"{self.prefix}{kind}{v}{b}", alternatives(v, b))
                self.r["S", v, b] = self.rules.add(f"{self.prefix}S{v}{b}", [self.term(v, b), self.get("P", v, b)])
        return _alt(self.get("S", "m", b) for b in range(1, units + 1))

    def _pair(self, v: str, b: int) -> list:
        """Two or more terms, one of them a `v` term."""
        out = []
        for a in range(1, b):
            first_any = _alt([self.term("n", a), self.s["coef"] if a == 1 else None])
            out += [_seq(self.term(v, a), self.s["add"], self.any_sum(b - a)),
                    _seq(first_any, self.s["add"], self.get("S", v, b - a))]
        return out

    def _factor(self, v: str, b: int) -> list:
        """A primary, negated or raised to a constant power (never a method's receiver after that)."""
        neg = _opt(_lit("-"))
        return [_seq(neg, self.get("R", v, b)), _seq(neg, self.get("R", v, b - 1), _lit(" ** "), self.s["exp"])]

    def _chain(self, v: str, b: int) -> list:
        """Factors joined by * and /, none of them a constant, one of them a `v` factor."""
        out = [self.get("F", v, b)]
        for a in range(1, b):
            out += [_seq(self.get("F", v, a), self.s["mul"], self.get("C", "n", b - a)),
                    _seq(self.get("F", "n", a), self.s["mul"], self.get("C", v, b - a))] if v == "m" else \
                   [_seq(self.get("F", "n", a), self.s["mul"], self.get("C", "n", b - a))]
        return out

    def _prim(self, v: str, b: int) -> list:
        s, inner = self.s, (lambda k: self.get("S", v, k))
        out = [self.get("L", v, b),
               _seq(self.get("R", v, b - 1), s["method"]),
               _seq(self.get("R", "n", b - 1), s["reduce"]) if v == "n" and s["reduce"] else None,
               _seq(s["ufn"], _lit("("), inner(b - 1), _lit(")")),
               _seq(_lit("("), self.get("P", v, b), _lit(")")),
               _seq(s["clamp"], inner(b - 2), s["bound"], _lit(")"))]
        for a in range(1, b - 1):
            out += [_seq(s["bfn"], _lit("("), inner(a), _lit(", "), self.any_sum(b - 1 - a), _lit(")")),
                    _seq(s["bfn"], _lit("("), self.any_sum(a), _lit(", "), inner(b - 1 - a), _lit(")"))]
        return out


def _must_inputs(spec: LanguageSpec) -> list[str] | None:
    """The inputs whose presence outside reductions makes the result vary as the spec requires;
    for a sensitivity, the matrix among the inputs the parser requires it to read (E)."""
    if spec.result_must_vary == "scalar":
        return [name for name in SENSITIVITY_READS if name in spec.inputs and spec.inputs[name].is_matrix]
    wanted = {"matrix": lambda shape: shape.is_matrix, "rows": lambda shape: shape.rows}.get(spec.result_must_vary)
    return None if wanted is None else [name for name, shape in spec.inputs.items() if wanted(shape)]


def _dims(spec: LanguageSpec) -> list[int]:
    """The reduction dims that mean something: 0 where an input varies down columns, 1 along rows."""
    return [d for d, varies in ((0, any(s.rows for s in spec.inputs.values())),
                                (1, any(s.cols for s in spec.inputs.values()))) if varies]


def _parameter_sets(spec: LanguageSpec, must: Sequence[str]) -> list[tuple[str, ...]]:
    """The signatures a function may have: the smallest parameter sets that hold a `must` input,
    as many as MAX_SETS allows (whole sizes at a time), then every input at once."""
    names, sets = list(spec.inputs), []
    for size in range(1, len(names)):
        more = [params for params in combinations(names, size) if set(params) & set(must)]
        if len(sets) + len(more) > MAX_SETS:
            break
        sets += more
    return sets + [tuple(names)]


def _composed_sets(spec: LanguageSpec, must: Sequence[str], full: Sequence[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """The signatures of two to MAX_COMPOSED inputs that have no whole expression grammar of
    their own (a copy per set would not fit: allocate has 91 pairs), each holding a `must` input."""
    names = list(spec.inputs)
    return [params for size in range(2, min(MAX_COMPOSED, len(names) - 1) + 1)
            for params in combinations(names, size) if set(params) & set(must) and params not in full]


class _Composer:
    """Bodies of composed signatures: one operand per parameter, each an expression of that
    input alone that reads it outside every reduction (so every parameter is used and, with a
    `must` input among them, the result varies as required), joined into a sum or a product.
    An operand of a k-input body has at most UNITS // k + 1 units, so a body stays within
    UNITS + k units. The operands' rules are the single-input sets' (or built here once), so a
    composed signature costs one alternative of references, not a copy of the expression rules."""

    def __init__(self, rules: _Rules, shared: dict[str, _E], index: int, spec: LanguageSpec,
                 single: dict[str, _Expression]):
        self.rules, self.shared, self.index, self.spec, self.single = rules, shared, index, spec, single
        self.operands: dict[tuple[str, str, int], _E | None] = {}

    def _operand(self, name: str, kind: str, units: int) -> _E | None:
        """The union over sizes of one input's sums (kind "s") or products (kind "c")."""
        key, j = (name, kind, units), list(self.spec.inputs).index(name)
        if key not in self.operands:
            if name not in self.single:      # an input without a single-input signature (prune's A):
                # built at its first request, which has the largest operands (bodies come by size)
                self.single[name] = _Expression(self.rules, self.shared, f"f{self.index}x{j}", (name,), (name,))
                self.single[name].build(units)
            e = self.single[name]
            parts = [e.get("S", "m", b) if kind == "s" else e.get("C", "m", b) for b in range(1, units + 1)]
            self.operands[key] = self.rules.add(f"f{self.index}o{j}{kind}{units}", parts)
        return self.operands[key]

    def body(self, params: tuple[str, ...]) -> _E | None:
        """A sum or a product of one operand per parameter: in either order for two inputs, in the
        signature's order for more (their orders would multiply xgrammar's compile time)."""
        units = UNITS[self.spec.result_must_vary] // len(params) + 1
        orders = permutations(params) if len(params) == 2 else [params]
        out = []
        for order in orders:
            sums = [self._operand(name, "s", units) for name in order]
            products = [self._operand(name, "c", units) for name in order]
            out += [_join(sums, self.shared["add"]),
                    _seq(_opt(_seq(self.shared["coef"], _lit(" * "))), _join(products, self.shared["mul"]))]
        return _alt(out)


def _join(operands: list[_E | None], op: _E) -> _E | None:
    """`a op b op c`."""
    out = operands[0]
    for operand in operands[1:]:
        out = _seq(out, op, operand)
    return out


_WHOLE = (".sum()", ".mean()", ".max()", ".norm()",        # a reduction over every weight, also as the
          ".sum(dim=0, keepdim=True).sum(dim=1, keepdim=True)",    # canonical form prints it
          ".mean(dim=0, keepdim=True).mean(dim=1, keepdim=True)")


def _scalar(rules: _Rules, shared: dict[str, _E], prefix: str, spec: LanguageSpec, params: Sequence[str],
            expression: _Expression | None, body: _E) -> _E:
    """A sensitivity's body: the expression `body` (or a primary of `expression`) reduced over every
    weight, optionally with a coefficient, times or plus one small factor: a non-scalar parameter
    (under a call) reduced to one number, a vector reduced along the dim it varies on, or a scalar
    parameter; or plus a constant."""
    whole = shared["whole"]
    reduced = [_seq(_lit("("), body, _lit(")"), whole)]
    if expression is not None:
        units = UNITS[spec.result_must_vary]
        reduced.append(_seq(_alt(expression.get("R", "m", b) for b in range(1, units + 1)), whole))
    main = rules.add(f"{prefix}M", reduced)
    small = [_lit(p) for p in params if spec.inputs[p] == SCALAR]
    for p in (p for p in params if spec.inputs[p] != SCALAR):
        small.append(_seq(_alt([_lit(p), _seq(shared["ufn"], _lit(f"({p})"))]), _opt(shared["method"]), whole))
        dim = {COLVEC: "1", ROWVEC: "0"}.get(spec.inputs[p])
        if dim is not None:
            small.append(_seq(_lit(f"{p}."), _alt(_lit(r) for r in _REDUCE), _lit(f"(dim={dim}, keepdim=True)")))
    small = rules.add(f"{prefix}Q", small)
    coef = _opt(_seq(shared["coef"], _lit(" * ")))
    term = rules.add(f"{prefix}T", [_seq(coef, main, _opt(_seq(shared["mul"], small))),
                                    _seq(coef, small, shared["mul"], main)])
    other = _alt([small, shared["coef"]])
    return _alt([term, _seq(term, shared["add"], other), _seq(other, shared["add"], term)])


def _function(rules: _Rules, shared: dict[str, _E], index: int, spec: LanguageSpec, must: list[str]) -> _E:
    """One function: a whole expression grammar per parameter set of `_parameter_sets`, a
    composed body per set of `_composed_sets`; a sensitivity reduces either to one number."""
    shared = {**shared, "reduce": _reductions(rules, index, _dims(spec))}
    if spec.result_must_vary == "scalar":
        shared["whole"] = rules.add(f"f{index}whole", [_lit(w) for w in _WHOLE])
    bodies, single = {}, {}
    for k, params in enumerate(_parameter_sets(spec, must)):
        expression = _Expression(rules, shared, f"f{index}p{k}", params, must)
        bodies[params] = expression.build(UNITS[spec.result_must_vary])
        if spec.result_must_vary == "scalar":
            bodies[params] = _scalar(rules, shared, f"f{index}p{k}", spec, params, expression, bodies[params])
        if len(params) == 1:
            single[params[0]] = expression
    composer = _Composer(rules, shared, index, spec, single)
    for k, params in enumerate(_composed_sets(spec, must, list(bodies))):
        bodies[params] = composer.body(params)
        if spec.result_must_vary == "scalar":
            bodies[params] = _scalar(rules, shared, f"f{index}c{k}", spec, params, None, bodies[params])
    return rules.add(f"f{index}", [_seq(_lit(f"def {spec.function}({', '.join(params)}):\n    return "), body,
                                        _lit("\n")) for params, body in bodies.items()])


@dataclass(frozen=True)
class Grammar:
    ebnf: str
    longest: int        # the most characters a completion can have: a bound on its tokens too


def build(task_parts: Sequence[str], spec_by_part: Mapping[str, LanguageSpec] = SPECS,
          without: frozenset[str] = frozenset()) -> Grammar | None:
    """The grammar of a program whose functions are `task_parts` (language spec names, in file
    order) and that reads none of the inputs `without`, or None when a part's result shape has
    no grammar."""
    spec_by_part = {part: _without(spec_by_part[part], without) for part in task_parts}
    musts = [_must_inputs(spec_by_part[part]) for part in task_parts]
    if any(m is None for m in musts):
        return None
    rules = _Rules()
    shared = _shared(rules)
    functions = [_function(rules, shared, i, spec_by_part[part], must)
                 for i, (part, must) in enumerate(zip(task_parts, musts))]
    gap = _E('("\\n")?  ("\\n")?', 2)          # the printed form leaves two blank lines between functions
    body = [functions[0]]
    for f in functions[1:]:
        body += [gap, f]
    root = _seq(_lit("```python\n"), *body, _lit("```"))
    rules.lines.insert(0, f"root ::= {root.text}")
    return Grammar("\n".join(rules.lines) + "\n", root.most)


def grammar_for(task_parts: Sequence[str], spec_by_part: Mapping[str, LanguageSpec] = SPECS,
                without: frozenset[str] = frozenset()) -> str | None:
    """The EBNF text (None where a part has no grammar)."""
    built = build(task_parts, spec_by_part, without)
    return built.ebnf if built else None


def _without(spec: LanguageSpec, names: frozenset[str]) -> LanguageSpec:
    if not names & spec.inputs.keys():
        return spec
    return replace(spec, inputs={k: v for k, v in spec.inputs.items() if k not in names},
                   aliases={k: v for k, v in spec.aliases.items() if v not in names})
