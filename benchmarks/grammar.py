"""What grammar-constrained decoding does to the policy's completions: an A/B on the default CPU setup.

    python benchmarks/grammar.py --task joint --n 3 --seeds 0,1

The policy is the engine's default (SmolLM2-135M-Instruct, transformers backend, CPU) with the
task's system prompt and the engine's sampling settings (PolicyConfig: temperature, max_new_tokens).
The prompts are the ones a search sends at its start, built as engine/proposals.py builds them from
the task's seeds (fitness not yet known, no rejections yet): an init prompt with three known
programs, one from scratch, a mutation, a crossover and a graph-driven CoT prompt. Each prompt gets
`n` completions per seed, one batch per seed, with the grammar (policy.grammar: true) and without.
Per arm: the valid rate (what operators.language.parse accepts), distinct canonical programs per
100 completions, completions per minute, tokens, completions cut off at max_new_tokens, and the
commonest rejection reasons.

Writes benchmarks/results/grammar-cpu.json (or --out).
"""
from __future__ import annotations

import collections
import json
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
            "top_rejections": reasons.most_common(5), "examples": list(distinct.values())[:6]}


def run_arm(backend, prompts, ebnf, n, seeds, temperature, max_new_tokens, task_name) -> dict:
    t0 = time.perf_counter()
    backend.set_grammar(ebnf)
    compile_seconds = time.perf_counter() - t0
    completions, seconds = [], 0.0
    for seed in seeds:
        t0 = time.perf_counter()
        completions += backend.generate([p for _, p in prompts], n=n, temperature=temperature,
                                        max_new_tokens=max_new_tokens, seed=seed)
        seconds += time.perf_counter() - t0
    tokens = [c.tokens for c in completions]
    return {**judge([c.text for c in completions], task_name), "grammar": ebnf is not None,
            "compile_seconds": round(compile_seconds, 2), "generate_seconds": round(seconds, 1),
            "completions_per_minute": round(60 * len(completions) / seconds, 2),
            "mean_tokens": round(sum(tokens) / len(tokens), 1),
            "cut_at_max_new_tokens": sum(t >= max_new_tokens for t in tokens)}


@click.command()
@click.option("--task", "task_name", default="joint", show_default=True)
@click.option("--model", default="smollm2", show_default=True)
@click.option("--n", default=3, show_default=True, help="completions per prompt and seed")
@click.option("--seeds", default="0,1", show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "grammar-cpu.json", show_default=True)
def main(task_name, model, n, seeds, batch_size, out):
    from autoprune_ray.engine.config import PolicyConfig
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
    arms = {"grammar": run_arm(backend, ebnf=task.grammar(), **settings),
            "unconstrained": run_arm(backend, ebnf=None, **settings)}
    built = build(TASK_PARTS[task_name])
    result = {"benchmark": "grammar", "command": "python " + " ".join(sys.argv), "task": task_name, "model": model,
              "operators": [op for op, _ in prompts], "completions_per_prompt_and_seed": n, "seeds": seed_list,
              "temperature": policy.temperature, "max_new_tokens": policy.max_new_tokens,
              "grammar_chars": len(built.ebnf), "grammar_longest_completion_chars": built.longest, "arms": arms,
              "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch threads "
                         f"{__import__('torch').get_num_threads()}"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name, arm in arms.items():
        click.echo(f"{name}: valid {arm['valid']}/{arm['completions']}, distinct/100 {arm['distinct_per_100']}, "
                   f"{arm['completions_per_minute']} completions/min")


if __name__ == "__main__":
    main()
