"""What grammar-constrained decoding does to the policy's completions: an A/B on the default CPU setup.

    python benchmarks/grammar.py --task joint --n 3 --seeds 0,1

The policy is the engine's default (SmolLM2-135M-Instruct, transformers backend, CPU) with the
task's system prompt and the engine's sampling settings (PolicyConfig: temperature, max_new_tokens).
The prompts are the ones a search sends at its start, built as engine/proposals.py builds them from
the task's seeds (fitness not yet known, no rejections yet): an init prompt with three known
programs, one from scratch, a mutation, a crossover and a graph-driven CoT prompt. Each prompt gets
`n` completions per seed, one batch per seed, with the grammar (policy.grammar: true) and without.
Per arm: the valid rate (what operators.language.parse accepts), distinct canonical programs per
100 completions, completions per minute, tokens, completions cut off at max_new_tokens, the
commonest rejection reasons, and what each part of the valid programs reads: the share of
allocations that read an input other than `depth` (the allocation inputs are what make an
allocation more than a depth schedule) and the commonest input sets per part. Beside the arms:
each grammar task's size and its compile time for the policy's tokenizer.

The grammar leaves out the inputs the default config does not collect (G, unless
target.gradients), as the engine's policy does; `--grammar-inputs all` measures the whole language
(the README's first tables were measured so, before the engine left G out).

Writes the result under --key (default "after") of benchmarks/results/grammar-cpu.json (or
--out), keeping the file's other keys, so that runs before and after a change sit side by side.
"""
from __future__ import annotations

import collections
import json
import os
import platform
import sys
import time
from pathlib import Path

import click

RESULTS = Path(__file__).parent / "results"


def start_prompts(task) -> list[tuple[str, str]]:
    """(operator, prompt) pairs as a search's first LLM proposals see them: seeds as the population."""
    from autoprune_ray.operators import prompts as P
    seeds = list(task.seeds().values())
    codes = [c.code for c in seeds]
    graph = P.LineageGraph(nodes=[P.LineageNode(i, code, None) for i, code in enumerate(codes[:4])], edges=[])
    return [("llm_init", P.init_prompt([(code, None) for code in codes[:3]], [], task.prompts)),
            ("llm_init", P.init_prompt([], [], task.prompts)),
            ("llm_mutate", P.mutate_prompt(codes[0], None, [], task.prompts)),
            ("llm_crossover", P.crossover_prompt(codes[1], None, codes[-1], None, [], task.prompts)),
            ("gcot", P.gcot_prompt(graph, task.prompts))]


def judge(texts: list[str], task_name: str) -> dict:
    from autoprune_ray.operators.language import CandidateError, parse
    valid, reasons = [], collections.Counter()
    for text in texts:
        try:
            valid.append(parse(text, task_name))
        except CandidateError as exc:
            reasons[str(exc)[:100]] += 1
    distinct = {c.hash: c.code for c in valid}
    return {"completions": len(texts), "valid": len(valid), "valid_rate": round(len(valid) / len(texts), 3),
            "distinct_valid": len(distinct), "distinct_per_100": round(100 * len(distinct) / len(texts), 1),
            **inputs_read(valid), "top_rejections": reasons.most_common(5), "examples": list(distinct.values())[:6]}


def inputs_read(valid) -> dict:
    """Per part of the valid programs: the commonest input sets it reads, in spec order; for an
    allocation also the share that reads an input other than depth."""
    from autoprune_ray.operators.specs import SPECS
    from autoprune_ray.tree.expr import inputs_of
    out = {}
    for part in (valid[0].parts if valid else ()):
        sets = [[name for name in SPECS[part].inputs if name in inputs_of(c.parts[part])] for c in valid]
        out[f"{part}_inputs"] = collections.Counter(", ".join(s) for s in sets).most_common(8)
        if part == "allocate":
            out["allocate_reads_not_only_depth"] = round(sum(s != ["depth"] for s in sets) / len(sets), 3)
            out["allocate_reads_two_or_more"] = round(sum(len(s) >= 2 for s in sets) / len(sets), 3)
    return out


def grammar_sizes(backend, without: frozenset[str]) -> dict:
    """Each grammar task's EBNF size and its compile time for the policy's tokenizer (what
    set_grammar does when a search starts)."""
    from autoprune_ray.llm.grammar_backends import HFGrammar
    from autoprune_ray.operators.grammar import build
    from autoprune_ray.operators.language import TASK_PARTS
    out = {}
    for task in ("prune", "allocate", "joint"):
        built = build(TASK_PARTS[task], without=without)
        t0 = time.perf_counter()
        HFGrammar.compile(built.ebnf, backend.tokenizer, backend.model.config.vocab_size, backend._stop_ids)
        out[task] = {"kb": round(len(built.ebnf) / 1000, 1), "rules": built.ebnf.count("\n"),
                     "longest_chars": built.longest, "compile_seconds": round(time.perf_counter() - t0, 2),
                     "load_average": round(os.getloadavg()[0], 1)}
    return out


def run_arm(backend, prompts, ebnf, n, seeds, temperature, max_new_tokens, task_name) -> dict:
    t0 = time.perf_counter()
    backend.set_grammar(ebnf)
    compile_seconds = time.perf_counter() - t0
    completions, seconds, cpu = [], 0.0, time.process_time()
    for seed in seeds:
        t0 = time.perf_counter()
        completions += backend.generate([p for _, p in prompts], n=n, temperature=temperature,
                                        max_new_tokens=max_new_tokens, seed=seed)
        seconds += time.perf_counter() - t0
    tokens = [c.tokens for c in completions]
    # CPU seconds beside wall seconds: on a shared machine the wall clock also counts other jobs
    cpu = time.process_time() - cpu
    return {**judge([c.text for c in completions], task_name), "grammar": ebnf is not None,
            "compile_seconds": round(compile_seconds, 2), "generate_seconds": round(seconds, 1),
            "completions_per_minute": round(60 * len(completions) / seconds, 2),
            "cpu_seconds_per_completion": round(cpu / len(completions), 1),
            "load_average_at_end": round(os.getloadavg()[0], 1),
            "prompt_chars": [len(p) for _, p in prompts],
            "mean_tokens": round(sum(tokens) / len(tokens), 1),
            "cut_at_max_new_tokens": sum(t >= max_new_tokens for t in tokens)}


@click.command()
@click.option("--task", "task_name", default="joint", show_default=True)
@click.option("--model", default="smollm2", show_default=True)
@click.option("--n", default=3, show_default=True, help="completions per prompt and seed")
@click.option("--seeds", default="0,1", show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--arms", default="grammar,unconstrained", show_default=True, help="which arms to run")
@click.option("--grammar-inputs", type=click.Choice(["collected", "all"]), default="collected", show_default=True,
              help="collected: leave out what the default config does not collect, as the engine does")
@click.option("--key", default="after", show_default=True, help="where in --out the result goes")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "grammar-cpu.json", show_default=True)
def main(task_name, model, n, seeds, batch_size, arms, grammar_inputs, key, out):
    from autoprune_ray.engine.config import PolicyConfig, TargetConfig
    from autoprune_ray.llm.backends import make_backend
    from autoprune_ray.operators.grammar import build
    from autoprune_ray.operators.language import TASK_PARTS
    from autoprune_ray.tasks import get_task

    task, policy, seed_list = get_task(task_name), PolicyConfig(), [int(s) for s in seeds.split(",")]
    prompts = start_prompts(task)
    backend = make_backend("transformers", system_prompt=task.prompts.system, model=model, device="cpu",
                           batch_size=batch_size)
    settings = dict(prompts=prompts, n=n, seeds=seed_list, temperature=policy.temperature,
                    max_new_tokens=policy.max_new_tokens, task_name=task_name)
    without = TargetConfig().uncollected_inputs if grammar_inputs == "collected" else frozenset()
    grammars = {"grammar": task.grammar(without), "unconstrained": None}
    arms = {name: run_arm(backend, ebnf=grammars[name], **settings) for name in arms.split(",")}
    built = build(TASK_PARTS[task_name], without=without)
    result = {"benchmark": "grammar", "command": "python " + " ".join(sys.argv), "task": task_name, "model": model,
              "operators": [op for op, _ in prompts], "completions_per_prompt_and_seed": n, "seeds": seed_list,
              "temperature": policy.temperature, "max_new_tokens": policy.max_new_tokens,
              "grammar_without": sorted(without), "grammar_chars": len(built.ebnf), "grammar_longest_completion_chars": built.longest,
              "grammars": grammar_sizes(backend, without), "arms": arms,
              "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch threads "
                         f"{__import__('torch').get_num_threads()}"}
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps({**kept, key: result}, indent=2) + "\n")
    for name, arm in arms.items():
        click.echo(f"{name}: valid {arm['valid']}/{arm['completions']}, distinct/100 {arm['distinct_per_100']}, "
                   f"not only depth {arm.get('allocate_reads_not_only_depth')}, "
                   f"{arm['completions_per_minute']} completions/min")
    click.echo(json.dumps(result["grammars"]))


if __name__ == "__main__":
    main()
