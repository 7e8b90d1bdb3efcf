"""Symbolic variation operators on expression trees: subtree mutation, constant perturbation,
operator swap and crossover. Each returns a *valid* candidate (or None after `tries` attempts),
so they serve when the LLM is weak and as extra diversity. A program of several parts (a joint
metric + allocation) is varied in one part, picked at random; the others are kept."""
from __future__ import annotations

import random

from autoprune_ray.tree import expr
from autoprune_ray.tree.expr import OPS, Node
from autoprune_ray.operators.canonical import canonicalize, pretty
from autoprune_ray.operators.language import MAX_CONST, MAX_EXPONENT, TASK_PARTS, Candidate, CandidateError, \
    check_tree
from autoprune_ray.operators.specs import SPECS

UNARY = ["abs", "sqrt", "log1p", "square", "sigmoid", "tanh", "neg", "exp"]
BINARY = ["add", "sub", "mul", "div", "max2", "min2"]
REDUCE = [f"{k}_{axis}" for k in ("sum", "mean", "std", "norm", "max") for axis in ("row", "col")]


def _paths(node: Node, prefix=()):
    yield prefix, node
    for i, a in enumerate(node.args):
        yield from _paths(a, prefix + (i,))


def _replace(node: Node, path: tuple, new: Node) -> Node:
    if not path:
        return new
    args = list(node.args)
    args[path[0]] = _replace(args[path[0]], path[1:], new)
    return Node(node.op, tuple(args), node.value)


def random_tree(rng: random.Random, task: str = "prune", depth: int = 3) -> Node:
    """A small random expression over the task's inputs."""
    names = list(SPECS[task].inputs)
    if depth <= 0 or rng.random() < 0.3:
        if rng.random() < 0.15:
            return expr.const(round(rng.uniform(0.1, 3), 2))
        # the first input (W, or skew) carries the per-element shape a valid result needs
        return expr.inp(names[0] if rng.random() < 0.4 else rng.choice(names))
    roll = rng.random()
    if roll < 0.4:
        return Node(rng.choice(UNARY), (random_tree(rng, task, depth - 1),))
    if roll < 0.5:
        return Node("pow", (random_tree(rng, task, depth - 1),), rng.choice([0.25, 0.5, 1.5, 2.0, 3.0, -0.5]))
    if roll < 0.6 and any(shape.cols for shape in SPECS[task].inputs.values()):   # something to reduce
        return Node(rng.choice(REDUCE), (random_tree(rng, task, depth - 1),))
    return Node(rng.choice(BINARY), (random_tree(rng, task, depth - 1), random_tree(rng, task, depth - 1)))


def _reduce_fully(tree: Node, task: str) -> Node:
    """A sensitivity (mpq) is one number per layer: sum whatever a variation left unreduced."""
    shape = expr.shape_of(tree, SPECS[task].inputs)
    if shape.cols:
        tree = Node("sum_row", (tree,))
    if shape.rows:
        tree = Node("sum_col", (tree,))
    return tree


def _finish(tree: Node, part: str, parents: tuple[Candidate, ...]) -> Candidate | None:
    """The first parent with its `part` replaced by `tree`, if that is a valid, changed program."""
    try:
        if SPECS[part].result_must_vary == "scalar":
            tree = _reduce_fully(tree, part)
        tree = canonicalize(tree)
        check_tree(tree, SPECS[part])
    except CandidateError:
        return None
    if not parents:
        return Candidate(task=part, tree=tree, source=pretty(tree, SPECS[part]))
    child = parents[0].with_part(part, tree)
    if any(child.hash == p.hash for p in parents):
        return None  # no change is no variation
    return child


def random_candidate(rng: random.Random, task: str = "prune", depth: int = 3, tries: int = 10) -> Candidate | None:
    """A valid random program of the task (symbolic_init), or None after `tries` attempts."""
    parts = [_retry(lambda: _finish(random_tree(rng, part, depth), part, ()), tries) for part in TASK_PARTS[task]]
    if any(p is None for p in parts):
        return None
    first, *rest = parts
    child = Candidate(task, first.tree, "", allocation=rest[0].tree if rest else None)
    return Candidate(task, child.tree, child.code, allocation=child.allocation)


def _pick_part(parent: Candidate, rng: random.Random) -> tuple[str, Node]:
    part = rng.choice(list(parent.parts))
    return part, parent.parts[part]


def _retry(make, tries: int):
    for _ in range(tries):
        child = make()
        if child is not None:
            return child
    return None


def subtree_mutation(parent: Candidate, rng: random.Random, tries: int = 20) -> Candidate | None:
    def make():
        part, tree = _pick_part(parent, rng)
        path, _ = rng.choice(list(_paths(tree)))
        return _finish(_replace(tree, path, random_tree(rng, part, 2)), part, (parent,))
    return _retry(make, tries)


def constant_perturbation(parent: Candidate, rng: random.Random, tries: int = 20) -> Candidate | None:
    """Scale constants by a log-normal factor and nudge exponents, within the language's limits."""
    targets = [(part, tree, p, n) for part, tree in parent.parts.items() for p, n in _paths(tree)
               if n.op == "const" or n.op == "pow"]
    if not targets:
        return None

    def make():
        part, tree, path, node = rng.choice(targets)
        if node.op == "const":
            value = max(-MAX_CONST, min(MAX_CONST, node.value * rng.lognormvariate(0, 0.5)))
            new = expr.const(round(value, 4))
        else:
            exponent = max(-MAX_EXPONENT, min(MAX_EXPONENT, node.value + rng.choice([-0.5, -0.25, 0.25, 0.5])))
            new = Node("pow", node.args, exponent)
        return _finish(_replace(tree, path, new), part, (parent,))
    return _retry(make, tries)


def operator_swap(parent: Candidate, rng: random.Random, tries: int = 20) -> Candidate | None:
    """Replace one operation by another of the same arity (abs→sqrt, mul→div, sum_row→mean_row…)."""
    def make():
        part, tree = _pick_part(parent, rng)
        path, node = rng.choice(list(_paths(tree)))
        pool = next((p for p in (UNARY, BINARY, REDUCE) if node.op in p), None)
        if pool is None:
            return None
        return _finish(_replace(tree, path, Node(rng.choice(pool), node.args)), part, (parent,))
    return _retry(make, tries)


def crossover(a: Candidate, b: Candidate, rng: random.Random, tries: int = 20) -> Candidate | None:
    """Graft a random subtree of `b` into a random place of `a` (within the same part)."""
    if a.task != b.task:
        raise ValueError("crossover needs two candidates of the same task")

    def make():
        part, tree = _pick_part(a, rng)
        path, _ = rng.choice(list(_paths(tree)))
        _, donor = rng.choice(list(_paths(b.parts[part])))
        return _finish(_replace(tree, path, donor), part, (a, b))
    return _retry(make, tries)


MUTATIONS = {"subtree": subtree_mutation, "constant": constant_perturbation, "operator": operator_swap}
assert set(UNARY + BINARY + REDUCE) <= set(OPS)
