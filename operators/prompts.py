"""Prompts for the policy LLM: plain strings (the backends apply chat templates).

Every prompt opens with the task's description of the candidate language (its plug-in's
`TaskPrompts.preamble`, laid out by `preamble_text`) and ends with the required output (`OUTPUT_RULE`). Variable parts (feedback, lineage edges) are fitted
into a character budget, dropping the oldest items first, so that a prompt stays well inside
SmolLM2's 8k-token context (~1500 tokens). Builders are pure: same inputs, same string.

A small policy copies what a prompt shows, so a prompt shows one fixed program only where it has
nothing else (the format example, in a from-scratch prompt), and it ends with a few signatures to
try (`Ideas`), drawn from a hash of the prompt's own content: prompts with other parents suggest
other inputs, and the completions of one prompt can pick among several.
"""
from __future__ import annotations

import difflib
import math
import random
import re
import zlib
from dataclasses import dataclass, field

from autoprune_ray.operators.language import MAX_CONST, MAX_DEPTH, MAX_EXPONENT, MAX_NODES, CandidateError, \
    extract_function
from autoprune_ray.operators.specs import LanguageSpec

MAX_PROMPT_CHARS = 3600        # ~1500 tokens: English runs ~3.4 characters a token, code ~2.1
FEEDBACK_CHARS = 700
FEEDBACK_ITEMS = 8
_SNIPPET_CHARS = 70
_REASON_CHARS = 160

IDEAS = 3                      # signatures suggested per prompt
_SHAPE_NOTES = {"A": "one value per input column", "M": "one value per input column",
                "V": "one value per input column", "H": "one value per input column"}
_FLAG = re.compile(r"1 if (.+), else 0")


def _inputs(task: LanguageSpec) -> str:
    """One line per input; indicator inputs (`1 if X, else 0`) share one line, so that they do
    not outweigh the inputs that carry statistics."""
    lines, flags = [], [(name, _FLAG.fullmatch(task.describe[name])) for name in task.inputs]
    for name, flag in flags:
        if not flag:
            lines.append(f"  {name}: {task.describe[name]}" + (f", {_SHAPE_NOTES[name]}" if name in _SHAPE_NOTES else ""))
    named = [(name, flag.group(1)) for name, flag in flags if flag]
    if named:
        lines.append(f"  {', '.join(n for n, _ in named)}: 1 if the layer is, respectively, "
                     f"{', '.join(w for _, w in named)}; else 0")
    return "\n".join(lines)


_RULES = f"""Allowed: + - * /, x ** c with a constant c in [-{MAX_EXPONENT:g}, {MAX_EXPONENT:g}], abs, sqrt, exp, log1p, \
square, sigmoid, tanh, maximum(a, b), minimum(a, b), clamp(x, min=a, max=b), numbers.
Reductions: x.sum, mean, std, norm, max, min with dim=1 (along a row, over inputs) or dim=0 (down a column, \
over outputs); they always keep the dimension, as with keepdim=True.
Division, sqrt and pow are guarded against zero; log is not allowed (use log1p). You may assign local \
variables; end with one return. No loops, if, imports or other functions.
Limits: at most {MAX_NODES} operations, {MAX_DEPTH} levels of nesting, constants up to {MAX_CONST:g}."""

OUTPUT_RULE = "Answer with ONE python function in a ```python fence. No prose needed."


@dataclass(frozen=True)
class Ideas:
    """The signatures a prompt suggests for one function: a `lead` input (one the function is
    about) and a second input from `others`, in the spec's order."""
    spec: LanguageSpec
    leads: tuple[str, ...]
    others: tuple[str, ...]

    def draw(self, rng: random.Random) -> str:
        lead = rng.choice(self.leads)
        other = rng.choice([name for name in self.others if name != lead])
        return f"def {self.spec.function}({', '.join(n for n in self.spec.inputs if n in (lead, other))})"


@dataclass(frozen=True)
class TaskPrompts:
    """What a task plug-in tells the policy: the language preamble every prompt opens with, the
    noun for one program ("metric", "proxy"), the ask for a program from scratch, the system
    prompt, the required output (one function, or both functions of a joint program), the format
    example a from-scratch prompt shows, and the signatures prompts suggest (one Ideas per function)."""
    preamble: str
    noun: str
    from_scratch: str
    system: str = "You write short Python functions in a restricted expression language."
    output: str = OUTPUT_RULE
    example: str = ""
    ideas: tuple[Ideas, ...] = ()


def system_prompt(programs: str, form: str = "one short Python function") -> str:
    """The policy's system prompt for a task whose programs are `programs`, each written as `form`."""
    return f"You write {programs} as {form}. Answer with the code in a ```python fence."


def preamble_text(intro: str, spec: LanguageSpec, result_rule: str) -> str:
    """The shared layout of a task's preamble: what a program is, its inputs, the rules."""
    return (f"{intro}\n\nInputs (take only those you use as parameters):\n{_inputs(spec)}\n"
            f"Vectors broadcast against [out, in] matrices.\n{_RULES} {result_rule}")


def joint_preamble_text(intro: str, parts: list[tuple[str, LanguageSpec, str]]) -> str:
    """The preamble of a program of several functions: each part's inputs and rule."""
    inputs = "\n".join(f"{title} (take only those you use as parameters):\n{_inputs(spec)}\n{rule}"
                        for title, spec, rule in parts)
    return f"{intro}\n\n{inputs}\nVectors broadcast against [out, in] matrices.\n{_RULES}"


def _format_example(task: "TaskPrompts") -> str:
    return (f"Format example (syntax only, not a good {task.noun}):\n```python\n{task.example.strip()}\n```"
            if task.example else "")


def _ideas(task: "TaskPrompts", *content: str) -> str:
    """IDEAS distinct signatures to try (one per function of the program, joined), drawn from a
    hash of the prompt's content: pure, yet different for prompts with different parents."""
    if not task.ideas:
        return ""
    rng, options = random.Random(zlib.crc32("\n".join(content).encode())), []
    for _ in range(8 * IDEAS):
        option = " with ".join(f"`{ideas.draw(rng)}`" for ideas in task.ideas)
        if option not in options:
            options.append(option)
        if len(options) == IDEAS:
            break
    return "Inputs to try, pick one: " + "; or ".join(options) + "."


# ---------------------------------------------------------------- helpers

def _fitness(value: float | None) -> str:
    if value is None:
        return "not evaluated"
    if not math.isfinite(value):
        return "failed"
    return f"{value:.4f}"


def _program(code: str, fitness: float | None, label: str) -> str:
    return f"{label} (fitness {_fitness(fitness)}; higher is better):\n```python\n{code.strip()}\n```"


def _fit_newest(items: list[str], budget: int) -> list[str]:
    """The newest items (list end) whose joined length fits the budget, in their original order."""
    kept, used = [], 0
    for item in reversed(items):
        if used + len(item) + 1 > budget:
            break
        kept.append(item)
        used += len(item) + 1
    return kept[::-1]


def _feedback_section(feedback: list[str], budget: int) -> str:
    """Feedback lines come newest first (see feedback_lines), so the oldest are the tail dropped."""
    lines = _fit_newest(list(dict.fromkeys(feedback))[::-1], budget)[::-1]   # dedupe, keep the head
    if not lines:
        return ""
    return "Recent programs were rejected; avoid these mistakes:\n" + "\n".join(f"- {line}" for line in lines)


def _assemble(*parts: str) -> str:
    return "\n\n".join(p for p in parts if p) + "\n"


def _room(*fixed: str) -> int:
    return max(0, MAX_PROMPT_CHARS - sum(len(p) + 2 for p in fixed))


def _snippet(code: str) -> str:
    """One short line naming the program: its return expression when it has one."""
    try:
        lines = extract_function(code).splitlines()
    except CandidateError:
        lines = code.splitlines()
    lines = [" ".join(line.split()) for line in lines if line.strip()]
    returns = [line[line.index("return "):] for line in lines if "return " in line]   # also `def f(W): return W`
    text = returns[-1] if returns else (lines[0] if lines else "")
    return text if len(text) <= _SNIPPET_CHARS else text[:_SNIPPET_CHARS - 3] + "..."


# ---------------------------------------------------------------- public builders

def feedback_lines(rejections: list[tuple[str, str]]) -> list[str]:
    """(code, reason) pairs, oldest first (as recorded), into short lines, NEWEST FIRST: one
    line per distinct reason, at most FEEDBACK_ITEMS lines and FEEDBACK_CHARS characters; the
    oldest are dropped first."""
    out, seen, used = [], set(), 0
    for code, reason in reversed(list(rejections)):
        reason = " ".join(str(reason).split())
        if not reason or reason in seen:
            continue
        seen.add(reason)
        reason = reason if len(reason) <= _REASON_CHARS else reason[:_REASON_CHARS - 3] + "..."
        snippet = _snippet(code or "")
        line = f"`{snippet}`: {reason}" if snippet else reason
        if len(out) >= FEEDBACK_ITEMS or used + len(line) + 1 > FEEDBACK_CHARS:
            break
        out.append(line)
        used += len(line) + 1
    return out


def _with_feedback(task: TaskPrompts, body: str, feedback: list[str]) -> str:
    head, ideas = task.preamble, _ideas(task, body)
    room = min(FEEDBACK_CHARS, _room(head, body, ideas, task.output))
    return _assemble(head, body, _feedback_section(list(feedback), room), ideas, task.output)


def init_prompt(examples: list[tuple[str, float | None]], feedback: list[str], task: TaskPrompts) -> str:
    """A new program: from scratch when `examples` is empty (no expert knowledge), otherwise
    shown the (code, fitness) examples."""
    noun = task.noun
    if examples:
        shown = "\n".join(_program(code, fit, f"Known {noun} {k + 1}") for k, (code, fit) in enumerate(examples))
        body = (f"{shown}\nWrite a NEW {noun}, different from these, that could get a higher fitness "
                "(it may combine their ideas or use other inputs).")
    else:
        body = "\n".join(p for p in (_format_example(task), task.from_scratch) if p)
    return _with_feedback(task, body, feedback)


def mutate_prompt(parent_code: str, parent_fitness: float | None, feedback: list[str], task: TaskPrompts) -> str:
    body = (_program(parent_code, parent_fitness, f"Parent {task.noun}") +
            "\nWrite an improved variant of the parent: change one idea (a term, an exponent, a normalization "
            "or an input), not just names or formatting.")
    return _with_feedback(task, body, feedback)


def crossover_prompt(parent_a: str, fitness_a: float | None, parent_b: str, fitness_b: float | None,
                     feedback: list[str], task: TaskPrompts) -> str:
    body = (_program(parent_a, fitness_a, "Parent A") + "\n" + _program(parent_b, fitness_b, "Parent B") +
            f"\nWrite a child {task.noun} that combines the strongest parts of A and B into one program.")
    return _with_feedback(task, body, feedback)


# ---------------------------------------------------------------- graph-driven chain of thought

@dataclass
class LineageNode:
    id: int
    code: str
    fitness: float | None


@dataclass
class LineageEdge:
    parent_id: int
    child_id: int
    operator: str


@dataclass
class LineageGraph:
    nodes: list[LineageNode]
    edges: list[LineageEdge]            # oldest first; the oldest are dropped when space is short
    rejections: list[str] = field(default_factory=list)   # feedback_lines(), newest first


def code_diff(before: str, after: str) -> str:
    """A compact unified diff (no headers, no context) of two programs."""
    lines = [line for line in difflib.unified_diff(before.strip().splitlines(), after.strip().splitlines(),
                                                   lineterm="", n=0)
             if not line.startswith(("---", "+++", "@@"))]
    return "\n".join(lines) if lines else "(no code change)"


def _delta(parent: float | None, child: float | None) -> str:
    if parent is None or child is None or not (math.isfinite(parent) and math.isfinite(child)):
        return f"fitness {_fitness(parent)} -> {_fitness(child)}"
    change = child - parent
    verdict = "better" if change > 0 else "worse" if change < 0 else "same"
    return f"fitness {_fitness(parent)} -> {_fitness(child)} ({change:+.4f}, {verdict})"


def _edge_text(edge: LineageEdge, nodes: dict[int, LineageNode]) -> str:
    parent, child = nodes[edge.parent_id], nodes[edge.child_id]
    return (f"#{parent.id} -> #{child.id} by {edge.operator}: {_delta(parent.fitness, child.fitness)}\n"
            f"{code_diff(parent.code, child.code)}")


def gcot_prompt(graph: LineageGraph, task: TaskPrompts) -> str:
    """Reason along the lineage edges (what change helped, what hurt), then write the next program."""
    nodes, noun, head_text = {n.id: n for n in graph.nodes}, task.noun, task.preamble
    scored = [n for n in graph.nodes if n.fitness is not None and math.isfinite(n.fitness)]
    if scored:
        best = max(scored, key=lambda n: (n.fitness, -n.id))
        head = _program(best.code, best.fitness, f"Best {noun} so far, #{best.id}")
    elif graph.nodes:
        head = _program(graph.nodes[-1].code, None, f"Latest {noun}, #{graph.nodes[-1].id}")
    else:
        head = f"No {noun} has been evaluated yet."
    ask = ("First reason briefly along the edges: which code change raised fitness, which lowered it, and why. "
           f"Then write the next {noun}, one that should beat the best so far.")
    rejected = _feedback_section(list(graph.rejections)[:5], 600)
    ideas = _ideas(task, head, *(n.code for n in graph.nodes))
    room = _room(head_text, head, rejected, ask, ideas, task.output) - 80
    edges = [_edge_text(e, nodes) for e in graph.edges if e.parent_id in nodes and e.child_id in nodes]
    edges = _fit_newest(edges, room)
    lineage = (f"How the {noun}s evolved (fitness: higher is better), each edge with its code diff:\n" +
               "\n".join(edges)) if edges else ""
    return _assemble(head_text, head, lineage, rejected, ask, ideas, task.output)


_FENCED = re.compile(r"```python\n(.*?)```", re.S)


def fenced_programs(prompt: str) -> list[str]:
    """The programs shown in a prompt's ```python fences (for checks)."""
    return [block for block in _FENCED.findall(prompt) if "def " in block]
