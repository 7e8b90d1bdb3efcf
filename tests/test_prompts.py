"""Prompt builders: language description, required output, parents, feedback, lineage diffs."""
import re
from pathlib import Path

import pytest

from autoprune_ray.operators import prompts as P
from autoprune_ray.operators.language import parse
from autoprune_ray.operators.specs import ALLOCATE, PRUNE
from autoprune_ray.tasks import get_task
from autoprune_ray.operators.seeds import SCORE_SEEDS

SEEDS = [parse(src).code for src, _ in SCORE_SEEDS.values()]
REJECTIONS = [
    ("def score(W): return W.foo()", "attribute `W.foo` is not allowed"),
    ("Sure!\n```python\ndef score(W, A):\n    x = W\n    return log(x) * A\n```\nDone.",
     "`log` is unsafe at zero: use log1p(x), which is log(1 + |x|)"),
    ("def score(W, q): return W * q", "unknown parameter `q`"),
    ("def score(W): return W.bar()", "attribute `W.foo` is not allowed"),      # a repeated reason
]


def lineage() -> P.LineageGraph:
    codes = {1: "def score(W):\n    return W.abs()\n", 4: "def score(W, A):\n    return W.abs() * A\n",
             6: "def score(W, A):\n    return W.abs() * A.sqrt()\n", 7: "def score(W, A):\n    return W * A\n"}
    fitness = {1: -3.0, 4: -2.5, 6: -2.25, 7: None}
    nodes = [P.LineageNode(i, parse(c).code, fitness[i]) for i, c in codes.items()]
    edges = [P.LineageEdge(1, 4, "llm_mutate"), P.LineageEdge(4, 6, "gcot"), P.LineageEdge(4, 7, "symbolic_mutate")]
    return P.LineageGraph(nodes=nodes, edges=edges, rejections=P.feedback_lines(REJECTIONS))


TASK = get_task("prune").prompts


def all_prompts() -> dict[str, str]:
    feedback = P.feedback_lines(REJECTIONS)
    return {
        "init-scratch": P.init_prompt([], feedback, TASK),
        "init-seeds": P.init_prompt([(code, f) for code, f in zip(SEEDS, (-3.1, -2.4, -2.2, None))], feedback, TASK),
        "mutate": P.mutate_prompt(SEEDS[1], -2.4, feedback, TASK),
        "crossover": P.crossover_prompt(SEEDS[1], -2.4, SEEDS[2], -2.2, feedback, TASK),
        "gcot": P.gcot_prompt(lineage(), TASK),
    }


def test_every_prompt_describes_the_language_and_the_required_output():
    for name, prompt in all_prompts().items():
        assert prompt.startswith(TASK.preamble), name
        assert prompt.rstrip().endswith(P.OUTPUT_RULE), name
        for inp, meaning in PRUNE.describe.items():
            assert f"{inp}: {meaning}" in prompt
        for phrase in ("Higher score = keep the weight", "within each output row", "dim=1", "keepdim",
                       "```python fence", "at most 64 operations"):
            assert phrase in prompt, (name, phrase)
        assert len(prompt) <= P.MAX_PROMPT_CHARS, (name, len(prompt))


def test_programs_shown_in_prompts_parse():
    for name, prompt in all_prompts().items():
        programs = P.fenced_programs(prompt)
        assert programs, name
        for program in programs:
            parse(program)                      # raises CandidateError if a prompt shows a bad program
    assert len(P.fenced_programs(all_prompts()["init-seeds"])) == len(SEEDS)     # no format example beside them


def test_parents_code_and_fitness_appear():
    prompts = all_prompts()
    assert "Invent a new metric from scratch" in prompts["init-scratch"]
    assert len(P.fenced_programs(prompts["init-scratch"])) == 1            # only the format example
    assert all("Format example" not in prompt for name, prompt in prompts.items() if name != "init-scratch")
    for code in SEEDS:
        assert code.strip() in prompts["init-seeds"]
    assert "fitness -3.1000" in prompts["init-seeds"] and "fitness not evaluated" in prompts["init-seeds"]
    assert SEEDS[1].strip() in prompts["mutate"] and "fitness -2.4000" in prompts["mutate"]
    assert SEEDS[1].strip() in prompts["crossover"] and SEEDS[2].strip() in prompts["crossover"]
    assert "Parent A (fitness -2.4000" in prompts["crossover"] and "Parent B (fitness -2.2000" in prompts["crossover"]
    assert "higher is better" in prompts["mutate"]


def test_feedback_is_deduped_newest_first_and_capped():
    lines = P.feedback_lines(REJECTIONS)
    assert len(lines) == 3                                   # the repeated reason appears once
    assert lines[0] == "`return W.bar()`: attribute `W.foo` is not allowed"   # newest first
    assert lines[1] == "`return W * q`: unknown parameter `q`"
    assert lines[2].startswith("`return log(x) * A`: `log` is unsafe")     # code pulled out of the chatter
    many = [(f"def score(W): return W * {i}" + " + W" * 100, f"reason {i}: " + "x" * 300) for i in range(60)]
    capped = P.feedback_lines(many)
    assert 0 < len(capped) <= P.FEEDBACK_ITEMS
    assert sum(len(line) + 1 for line in capped) <= P.FEEDBACK_CHARS
    assert capped[0].startswith("`def score(W): return W * 59") or "reason 59" in capped[0]   # newest kept
    assert all("reason 0:" not in line for line in capped)                                     # oldest dropped
    assert all(len(line) < 250 for line in capped)
    assert P.feedback_lines([]) == []
    # builders dedupe and bound whatever feedback they are given
    prompt = P.mutate_prompt(SEEDS[1], -2.4, ["same"] * 5 + [f"line {i} " + "y" * 200 for i in range(40)], TASK)
    assert prompt.count("- same") == 1 and "line 0 " in prompt and "line 39 " not in prompt
    assert len(prompt) <= P.MAX_PROMPT_CHARS


def test_gcot_lists_edges_with_diffs_and_fitness_deltas():
    prompt = P.gcot_prompt(lineage(), TASK)
    assert "fitness: higher is better" in prompt
    assert "#1 -> #4 by llm_mutate: fitness -3.0000 -> -2.5000 (+0.5000, better)" in prompt
    assert "#4 -> #6 by gcot: fitness -2.5000 -> -2.2500 (+0.2500, better)" in prompt
    assert "#4 -> #7 by symbolic_mutate: fitness -2.5000 -> not evaluated" in prompt
    a, b = parse("def s(W, A): return W.abs() * A").code, parse("def s(W, A): return W.abs() * A.sqrt()").code
    assert P.code_diff(a, b) == f"-{a.splitlines()[1]}\n+{b.splitlines()[1]}"
    assert P.code_diff(a, b) in prompt
    # one hunk: both removed lines, then both added lines
    assert "-def score(W):\n-    return abs(W)\n+def score(W, A):\n+    return A * abs(W)" in prompt
    assert "Best metric so far, #6 (fitness -2.2500" in prompt
    assert "unknown parameter `q`" in prompt                          # recent rejection reasons
    assert "reason briefly along the edges" in prompt
    worse = P.LineageGraph([P.LineageNode(1, SEEDS[1], -2.0), P.LineageNode(2, SEEDS[0], -2.5)],
                           [P.LineageEdge(1, 2, "llm_mutate")], [])
    assert "(-0.5000, worse)" in P.gcot_prompt(worse, TASK)
    assert P.code_diff(SEEDS[1], SEEDS[1]) == "(no code change)"
    assert "No metric has been evaluated yet." in P.gcot_prompt(P.LineageGraph([], [], []), TASK)


def test_gcot_drops_the_oldest_edges_to_stay_in_budget():
    big = " + ".join(f"W.abs() ** {k % 3 + 1} * A.sqrt()" for k in range(5))
    nodes = [P.LineageNode(i, f"def score(W, A):\n    return {big} + {i}.0\n", -3.0 + i / 100) for i in range(40)]
    edges = [P.LineageEdge(i, i + 1, "llm_mutate") for i in range(39)]
    prompt = P.gcot_prompt(P.LineageGraph(nodes, edges, P.feedback_lines(REJECTIONS)), TASK)
    assert len(prompt) <= P.MAX_PROMPT_CHARS
    assert "#38 -> #39 by" in prompt and "#0 -> #1 by" not in prompt
    assert "Best metric so far, #39" in prompt


def test_prompts_are_deterministic():
    assert all_prompts() == all_prompts()


def test_prompts_fit_smollm2_token_budget():
    """With the real SmolLM2 tokenizer where it is cached: the largest prompts stay under 1500 tokens."""
    path = Path.home() / ".cache" / "autoprune-ray" / "models" / "SmolLM2-135M-Instruct"
    if not (path / "tokenizer.json").exists():
        pytest.skip("SmolLM2 not converted yet (run `autoprune-ray prune` once)")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    big = " + ".join(f"W.abs() ** {k % 3 + 1} * A.sqrt() / (G.mean(dim=1, keepdim=True) + 0.5)" for k in range(4))
    nodes = [P.LineageNode(i, f"def score(W, A, G):\n    return {big} + {i}.0\n", -3.0 + i / 100) for i in range(30)]
    graph = P.LineageGraph(nodes, [P.LineageEdge(i, i + 1, "gcot") for i in range(29)],
                           [f"`return W.q{i}()`: " + "z " * 80 for i in range(5)])
    feedback = P.feedback_lines([(f"def score(W): return W * {i} + W.q()", f"reason {i} " + "w " * 70)
                                 for i in range(30)])
    prompts = [P.gcot_prompt(graph, TASK), P.mutate_prompt(nodes[0].code, -2.0, feedback, TASK),
               P.crossover_prompt(nodes[0].code, -2.0, nodes[1].code, -2.1, feedback, TASK),
               P.init_prompt([(n.code, n.fitness) for n in nodes[:3]], feedback, TASK)]
    for prompt in prompts:
        assert len(tok(prompt)["input_ids"]) < 1500


def test_joint_prompts_show_both_functions_ask_for_both_and_fit_the_budget():
    joint = get_task("joint")
    seeds = [s.code for s in joint.seeds().values()]
    feedback = P.feedback_lines(REJECTIONS)
    built = {"init-seeds": P.init_prompt([(c, -6.0) for c in seeds[:3]], feedback, joint.prompts),
             "mutate": P.mutate_prompt(seeds[1], -6.1, feedback, joint.prompts),
             "crossover": P.crossover_prompt(seeds[1], -6.1, seeds[2], -6.2, feedback, joint.prompts)}
    for name, prompt in built.items():
        assert len(prompt) <= P.MAX_PROMPT_CHARS, (name, len(prompt))
        assert prompt.startswith(joint.prompts.preamble) and prompt.rstrip().endswith(joint.prompts.output)
        assert "BOTH functions" in prompt and "is_down: " in prompt and "W: weight" in prompt
    shown = P.fenced_programs(built["mutate"])[-1]
    assert parse(shown, "joint").hash == parse(seeds[1], "joint").hash   # the parent, both parts, re-parses


def ideas_of(prompt: str) -> list[str]:
    line = next(line for line in prompt.splitlines() if line.startswith("Inputs to try"))
    return re.findall(r"`(def \w+\([^)]*\))`", line)


def test_prompts_suggest_signatures_that_vary_with_the_parents():
    """Every prompt ends with a few signatures to try, just before the required output, in the
    spec's parameter order; prompts with other parents suggest other inputs."""
    for name, prompt in all_prompts().items():
        ideas = ideas_of(prompt)
        assert len(ideas) == P.IDEAS, name
        line = next(line for line in prompt.splitlines() if line.startswith("Inputs to try"))
        assert prompt.rstrip().endswith(f"{line}\n\n{P.OUTPUT_RULE}"), name
    allocate = get_task("allocate").prompts
    drawn = [ideas_of(P.mutate_prompt(f"def allocate(depth):\n    return {k}.0 * depth\n", None, [], allocate))
             for k in range(20)]
    signatures = {idea for ideas in drawn for idea in ideas}
    assert len({tuple(ideas) for ideas in drawn}) >= 15 and len(signatures) >= 15
    order = list(ALLOCATE.inputs)
    for signature in signatures:
        params = signature[len("def allocate("):-1].split(", ")
        assert len(params) == 2 and params == sorted(params, key=order.index) and params != ["depth"]


def test_joint_ideas_name_both_functions_and_indicators_share_a_line():
    prompt = P.mutate_prompt(get_task("joint").seeds()["owl-wanda"].code, None, [], get_task("joint").prompts)
    ideas = ideas_of(prompt)
    assert [idea.split("(")[0] for idea in ideas] == ["def score", "def allocate"] * P.IDEAS
    assert all("G" not in idea for idea in ideas[::2])          # G needs target.gradients: never suggested
    flags = [line for line in prompt.splitlines() if "is_q" in line]
    assert len(flags) == 1 and flags[0].startswith("  is_q, is_k, is_v, is_o, is_gate, is_up, is_down: 1 if")
