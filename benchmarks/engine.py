"""Engine benchmarks, written to benchmarks/results/engine-*.json.

    python benchmarks/engine.py scaling --evaluators 1,2,4 --cost 2 --evaluations 24
    python benchmarks/engine.py local-run runs/local     # after `autoprune-ray run configs/local.yaml`

`scaling` runs the real engine (local Ray, policy actor, population manager, evaluator actors)
with a scripted policy of distinct valid programs and a tiny target model, and gives every
evaluation a known extra cost (`sleep_seconds`), so throughput should grow with the number of
evaluators until the engine itself is the bottleneck. It reports evaluations per second, the
speed-up over one evaluator, evaluator utilization and engine overhead per candidate.

`local-run` summarises a finished default search: wall time, valid rate, tokens/s, the best
program against the Wanda seed measured in the same run, and, when `autoprune-ray report` has
run, the full-protocol table.
"""
from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import click

RESULTS = Path(__file__).parent / "results"


def tiny_target(directory: Path) -> str:
    """A 2-block LLaMA with SmolLM2's tokenizer: evaluations cost milliseconds, so the known
    sleep dominates."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from autoprune_ray.compress.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def distinct_programs(count: int, seed: int = 0) -> list[str]:
    """LLM-style completions of `count` programs with distinct canonical hashes."""
    from autoprune_ray.operators import symbolic
    from autoprune_ray.operators.language import CandidateError, parse

    rng, seen, out = random.Random(seed), set(), []
    while len(out) < count:
        cand = symbolic.random_candidate(rng, "prune", depth=3, tries=1)
        if cand is None:
            continue
        try:
            text = f"```python\n{cand.source}```"
            digest = parse(text).hash
        except CandidateError:
            continue
        if digest not in seen:
            seen.add(digest)
            out.append(text)
    return out


def scaling_config(model_dir: str, run_root: Path, evaluators: int, cost: float, evaluations: int,
                   name: str | None = None):
    """The scaling run: every evaluation costs `cost` seconds more than the tiny model needs."""
    from autoprune_ray.engine.config import EvaluatorConfig, PolicyConfig, RunConfig, SearchConfig, TargetConfig

    return RunConfig(
        name=name or f"scale-{evaluators}", run_dir=str(run_root / "{name}"),
        target=TargetConfig(model=model_dir, calib_data="austen", nsamples=2, seqlen=32, eval_tokens=64,
                            device="cpu"),
        policy=PolicyConfig(backend="scripted", scripted=distinct_programs(evaluations * 2), prompts_per_batch=4,
                            completions_per_prompt=2),
        search=SearchConfig(seeds=False, max_evaluations=evaluations, max_seconds=1800, cascade=1e9,
                            queue_size=2 * evaluators, operators={"llm_init": 1.0}, eval_time_limit=120),
        evaluators=EvaluatorConfig(num=evaluators, num_cpus=0.25, fault_injection={"sleep_seconds": str(cost)}),
    ).validate()


def throughput(evaluators: int, summary: dict, evals, wall: float) -> dict:
    """Evaluations per second over the steady span, from the run's own evaluation records."""
    # steady state: from the first evaluation's start to the last one's end (actor start-up excluded)
    span = evals.finished.max() - (evals.finished - evals.seconds).min()
    return {"evaluators": evaluators, "evaluated": summary["evaluated"], "wall_seconds": wall,
            "search_seconds": summary["seconds"], "steady_seconds": float(span),
            "evaluations_per_second": summary["evaluated"] / span,
            "ideal_evaluations_per_second": evaluators / float(evals.seconds.mean()),
            "evaluator_utilization": summary["evaluator_utilization"],
            "overhead_per_candidate_seconds": summary["overhead_per_candidate"]}


def scaling_run(model_dir: str, run_root: Path, evaluators: int, cost: float, evaluations: int) -> dict:
    from autoprune_ray.engine.runner import run_search
    from autoprune_ray.engine.storage import RunStore

    cfg = scaling_config(model_dir, run_root, evaluators, cost, evaluations)
    start = time.perf_counter()
    summary = run_search(cfg, progress=False)
    wall = time.perf_counter() - start
    return throughput(evaluators, summary, RunStore(cfg.resolved_run_dir).read("evaluations"), wall)


@click.group()
def main() -> None:
    """Engine benchmarks (see the module docstring)."""


@main.command()
@click.option("--evaluators", default="1,2,4", show_default=True)
@click.option("--cost", default=2.0, show_default=True, help="known extra seconds per evaluation")
@click.option("--evaluations", default=24, show_default=True)
def scaling(evaluators: str, cost: float, evaluations: int) -> None:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_target(Path(tmp) / "tiny")
        for n in (int(x) for x in evaluators.split(",")):
            rows.append(scaling_run(model_dir, Path(tmp), n, cost, evaluations))
            rows[-1]["speedup_over_one"] = rows[-1]["evaluations_per_second"] / rows[0]["evaluations_per_second"]
            click.echo(json.dumps(rows[-1]))
    ray.shutdown()
    result = {"benchmark": "evaluator scaling with a known cost per evaluation", "cost_seconds": cost,
              "machine": "2-core CPU, local Ray (num_cpus=2)", "rows": rows,
              "note": "evaluations_per_second over the steady span (first evaluation start to last end); "
                      "ideal = evaluators / mean evaluation seconds; search_seconds includes actor start-up"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engine-scaling-cpu.json").write_text(json.dumps(result, indent=2) + "\n")


@main.command("local-run")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--note", default="", help="a remark stored with the result (e.g. the machine's load)")
def local_run(run_dir: str, note: str) -> None:
    from autoprune_ray.engine.report import load_tables, status
    from autoprune_ray.engine.storage import RunStore

    config, cands, evals = load_tables(run_dir)
    checkpoint = RunStore(run_dir).load_checkpoint() or {}
    prompts = RunStore(run_dir).read("prompts")
    ok = evals[evals.status == "ok"]
    from autoprune_ray.operators.seeds import score_seeds
    wanda_hash = score_seeds()["wanda"].hash
    wanda_ids = list(ok[ok.hash == wanda_hash].candidate_id)
    result = {"run_dir": run_dir, "note": note, "config": config, "summary": checkpoint.get("summary"), "status": status(run_dir),
              "completions": len(prompts), "completion_tokens": int(prompts.tokens.fillna(0).sum()),
              "operators": cands.operator.value_counts().to_dict(),
              "wanda_seed_search_perplexity": float(ok.set_index("candidate_id").perplexity[wanda_ids[0]])
              if wanda_ids else None}
    comparison = Path(run_dir) / "report" / "comparison.parquet"
    if comparison.exists():
        import pandas as pd
        result["full_protocol"] = pd.read_parquet(comparison).to_dict(orient="records")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "engine-local-run.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
