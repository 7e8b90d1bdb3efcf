"""How well each fitness stage ranks pruning programs, what it costs, and evaluator throughput
before and after the staged fitness, in one run on one machine.

    python benchmarks/fitness_stages.py --programs 16      # ~15 min on 2 cores

Programs: the joint seeds (expert metric × expert allocation) and symbolic variations of them
(a fixed rng), so the set spans good and bad programs as a search's population does. For each:
  proxy        the forward-free reconstruction proxy (mean over levels)
  kl@T         KL divergence to the dense model on the first T validation tokens (geometric mean
               over levels)
  final        perplexity on `--final-tokens` validation tokens (geometric mean over levels), what
               promotion measures
Spearman's rank correlation of each stage with `final` is reported with a bootstrap 90% interval.

Throughput, same run: seconds per evaluation of the old default (one level, 0.5, perplexity on
4096 validation tokens) against the new one (levels 0.6 and 0.7, KL on 512 tokens), each the mean
over the same programs. Writes benchmarks/results/fitness-stages-cpu.json.
"""
from __future__ import annotations

import json
import platform
import random
import time
from pathlib import Path

import click
import numpy as np

RESULTS = Path(__file__).parent / "results"


def programs(count: int, seed: int = 0) -> list:
    from autoprune_ray.operators import symbolic
    from autoprune_ray.tasks import get_task
    seeds = list(get_task("joint").seeds().values())
    rng, out, seen = random.Random(seed), list(seeds), {c.hash for c in seeds}
    while len(out) < count:
        op = rng.choice(list(symbolic.MUTATIONS.values()))
        child = op(rng.choice(seeds), rng)
        if child is not None and child.hash not in seen:
            seen.add(child.hash)
            out.append(child)
    return out[:count]


def spearman_interval(x, y, rounds: int = 2000, seed: int = 0) -> dict:
    from scipy.stats import spearmanr
    x, y = np.asarray(x), np.asarray(y)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(rounds):
        idx = rng.integers(0, len(x), len(x))
        if len(set(idx)) > 2:
            boot.append(spearmanr(x[idx], y[idx]).statistic)
    boot = np.asarray([b for b in boot if np.isfinite(b)])
    return {"spearman": float(spearmanr(x, y).statistic), "ci90": [float(np.quantile(boot, 0.05)),
                                                                    float(np.quantile(boot, 0.95))]}


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


@click.command()
@click.option("--programs", "count", default=16, show_default=True)
@click.option("--kl-tokens", default="256,512", show_default=True)
@click.option("--final-tokens", default=2048, show_default=True)
@click.option("--throughput-programs", default=6, show_default=True, help="Programs timed under the old default.")
@click.option("--out", default=str(RESULTS / "fitness-stages-cpu.json"), show_default=True)
def main(count, kl_tokens, final_tokens, throughput_programs, out):
    import torch

    from autoprune_ray.compress.data import load_token_data
    from autoprune_ray.compress.fitness import PruneEvaluator, Stage
    from autoprune_ray.compress.models import load_model
    from autoprune_ray.engine.config import RunConfig, from_dict
    from autoprune_ray.tasks import get_task

    kl_sizes = [int(t) for t in kl_tokens.split(",")]
    cfg = from_dict(RunConfig, {"task": "joint", "target": {"sparsities": [0.6, 0.7], "val_tokens": 4096}}).validate()
    lm = load_model("smollm2")
    data = load_token_data(lm.tokenizer, "austen", None, 16, 256, 0, val_tokens=4096, heldout=False)
    evaluator, plugin = PruneEvaluator(lm, data), get_task("joint")
    rows = []
    for cand in programs(count):
        configs = [plugin.compression_config(cand, cfg.at_level(level)) for level in cfg.target.levels]
        try:
            screened, screen_s = timed(lambda: evaluator.screen_levels(configs))
            row = {"code": cand.code, "proxy": screened.proxy, "seconds": {"screen": screen_s}}
            for t in kl_sizes:
                measured, row["seconds"][f"kl@{t}"] = timed(lambda: evaluator.measure(screened.value, Stage("kl", t)))
                row[f"kl@{t}"] = measured["kl"]
            measured, row["seconds"]["final"] = timed(
                lambda: evaluator.measure(screened.value, Stage("perplexity", final_tokens)))
            row["final"] = measured["perplexity"]
        except (ValueError, FloatingPointError, RuntimeError) as exc:
            row = {"code": cand.code, "failed": f"{type(exc).__name__}: {exc}"[:200]}
        rows.append(row)
        click.echo(json.dumps({k: v for k, v in row.items() if k != "code"}), err=True)
    ok = [r for r in rows if "final" in r]
    stages = ["proxy"] + [f"kl@{t}" for t in kl_sizes]
    ranking = {stage: spearman_interval([r[stage] for r in ok], [r["final"] for r in ok]) for stage in stages}
    throughput = throughput_same_run(lm, data, cfg, plugin, programs(throughput_programs), kl=512)
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "model": "smollm2", "calibration": data.describe(), "levels": cfg.target.levels,
              "programs": len(rows), "measured": len(ok), "final_tokens": final_tokens,
              "rank_correlation_with_final": ranking, "throughput": throughput, "rows": rows}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    click.echo(json.dumps({"rank_correlation_with_final": ranking, "throughput": throughput}, indent=1))


def throughput_same_run(lm, data, cfg, plugin, cands, kl: int) -> dict:
    """Seconds per evaluation, old default against new, alternating on the same programs."""
    from dataclasses import replace

    from autoprune_ray.compress.fitness import PruneEvaluator, Stage
    evaluator = PruneEvaluator(lm, data)
    old_cfg = replace(cfg, target=replace(cfg.target, sparsity=0.5, sparsities=None))
    old, new = [], []
    for cand in cands:
        # the metric part alone, uniform allocation, as the old default searched
        _, seconds = timed(lambda: evaluator.measure(
            evaluator.screen_levels([_metric_only(cand, old_cfg)]).value, Stage("perplexity", 4096)))
        old.append(seconds)
        configs = [plugin.compression_config(cand, cfg.at_level(level)) for level in cfg.target.levels]
        _, seconds = timed(lambda: evaluator.measure(evaluator.screen_levels(configs).value, Stage("kl", kl)))
        new.append(seconds)
    return {"old": {"what": "one level (0.5), perplexity on 4096 validation tokens", "seconds_mean": float(np.mean(old)),
                    "evaluations_per_hour": 3600 / float(np.mean(old))},
            "new": {"what": f"levels {cfg.target.levels}, KL on {kl} validation tokens",
                    "seconds_mean": float(np.mean(new)), "evaluations_per_hour": 3600 / float(np.mean(new))},
            "speedup": float(np.mean(old) / np.mean(new)), "programs": len(cands)}


def _metric_only(cand, cfg):
    from autoprune_ray.compress.prune import PruneConfig
    return PruneConfig(method="program", program=cand.tree, sparsity=cfg.target.sparsity, mode="one-pass")


if __name__ == "__main__":
    main()
