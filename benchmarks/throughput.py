"""Evaluations per hour of the default search's evaluator, before and after the staged fitness,
in one run on one machine, and where a finished search spent its time.

    python benchmarks/throughput.py evaluator --config configs/local.yaml --rounds 3
    python benchmarks/throughput.py proxy --programs 14 --stride 4
    python benchmarks/throughput.py search --config configs/local.yaml --seconds 420
    python benchmarks/throughput.py run runs/local        # after `autoprune-ray run configs/local.yaml`
    python benchmarks/throughput.py select --rounds 5

`evaluator`: one evaluator (the target model, its cached statistics), as a search actor holds it.
Each round times, alternately on the same seed programs,
  before   what the default search evaluated before the discovery issue: the metric alone at
           one level (0.5, uniform), perplexity on 4096 validation tokens;
  after    what the config evaluates: every level (0.6 and 0.7), metric and allocation, the
           forward-free proxy, then `fitness.measure` on `fitness.tokens` validation tokens.
Both run the same code for masks and forwards, so the ratio is the protocol's, on today's code.
The first evaluation of each program is a warm-up, reported apart: an evaluator pays it once
(the KL reference, an allocation's inputs such as AlphaPruning's spectra), not per candidate.

`proxy`: the screening proxy read on every `--stride`-th output row against every row, on
the same programs (the joint seeds and symbolic variations): Spearman's rank correlation, the
largest relative difference, and the screen's seconds at each stride.

`search`: the default search itself, before and after, one arm after the other in one
invocation, each for `--seconds` of search: the old protocol (task prune, one level 0.5,
perplexity on 4096 tokens, one evaluator thread) and the config as it is, with one evaluator
thread and with `--threads`. Evaluations per hour are the steady state: evaluations finished
after the first one, over the time between the first and the last (start-up and the first
evaluation's warm-up are paid once per run). Each arm is also summarised as `run` does.

`run`: a finished search's wall time split into the policy (generation seconds), the evaluators
(busy seconds over the evaluator count) and the driver (the rest), with evaluations per hour.

`select`: the exact-count row selection every level of every candidate runs on every linear
(Wanda-style scores of SmolLM2's 210 linears at 0.6 and 0.7, one torch thread as in an evaluator
actor), with the k-th value found by `torch.kthvalue` (before) and by `kernels.select.kth_in_rows`
(after), alternating in each round; the masks must be identical.

Writes benchmarks/results/throughput-cpu.json (one key per subcommand).
"""
from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import click

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "throughput-cpu.json"


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def _write(key: str, result: dict) -> None:
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    data[key] = result
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    click.echo(json.dumps(result, indent=1))


@click.group()
def main():
    """Throughput benchmarks."""


def _before_config(cand, sparsity: float = 0.5):
    from autoprune_ray.compress.prune import PruneConfig
    return PruneConfig(method="program", program=cand.tree, sparsity=sparsity, mode="one-pass")


def _evaluate(evaluator, configs, stage) -> dict:
    screened, screen_s = timed(lambda: evaluator.screen_levels(configs))
    _, measure_s = timed(lambda: evaluator.measure(screened.value, stage))
    return {"screen": screen_s, "measure": measure_s, "total": screen_s + measure_s}


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def _summary(rows: list[dict], what: str) -> dict:
    total = _mean(rows, "total")
    return {"what": what, "evaluations": len(rows), "seconds_mean": total,
            "screen_seconds_mean": _mean(rows, "screen"), "measure_seconds_mean": _mean(rows, "measure"),
            "evaluations_per_hour": 3600 / total}


@main.command()
@click.option("--config", "config_path", default="configs/local.yaml", show_default=True)
@click.option("--rounds", default=3, show_default=True, help="Timed passes over the seed programs.")
def evaluator(config_path: str, rounds: int) -> None:
    import torch

    from autoprune_ray.compress.data import load_token_data
    from autoprune_ray.compress.fitness import Stage
    from autoprune_ray.compress.models import load_model
    from autoprune_ray.engine.config import load_config
    from autoprune_ray.tasks import get_task

    cfg = load_config(config_path)
    plugin, t = get_task(cfg.task), cfg.target
    lm = load_model(t.model)
    data = load_token_data(lm.tokenizer, t.calib_data, None, t.nsamples, t.seqlen, t.seed,
                           val_tokens=max(t.val_tokens, 4096), heldout=False)
    ev = plugin.make_evaluator(lm, data, cfg)
    seeds = plugin.seeds()
    after_stage, before_stage = Stage(cfg.fitness.measure, cfg.fitness.tokens), Stage("perplexity", 4096)
    after_configs = {name: [plugin.compression_config(c, cfg.at_level(level)) for level in t.levels]
                     for name, c in seeds.items()}
    warm = {name: _evaluate(ev, after_configs[name], after_stage)["total"] for name in seeds}
    before, after = [], []
    for _ in range(rounds):
        for name, cand in seeds.items():
            before.append(_evaluate(ev, [_before_config(cand)], before_stage))
            after.append(_evaluate(ev, after_configs[name], after_stage))
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {torch.__version__}",
              "config": config_path, "model": t.model, "calibration": data.describe(),
              "programs": list(seeds), "rounds": rounds, "warm_up_seconds": warm,
              "before": _summary(before, "one level (0.5), metric only, perplexity on 4096 validation tokens"),
              "after": _summary(after, f"levels {t.levels}, metric + allocation, proxy, "
                                       f"{cfg.fitness.measure} on {cfg.fitness.tokens} validation tokens")}
    result["speedup"] = result["before"]["seconds_mean"] / result["after"]["seconds_mean"]
    _write("evaluator", result)


def _screen_all(ev, plugin, cfg, cands, stride: int) -> tuple[list[float], float]:
    ev.proxy_row_stride, ev._base = stride, {}
    proxies, seconds = [], 0.0
    for cand in cands:
        configs = [plugin.compression_config(cand, cfg.at_level(level)) for level in cfg.target.levels]
        try:
            screened, s = timed(lambda: ev.screen_levels(configs))
        except (ValueError, FloatingPointError, RuntimeError):
            proxies.append(float("nan"))
            continue
        proxies.append(screened.proxy)
        seconds += s
    return proxies, seconds


@main.command()
@click.option("--config", "config_path", default="configs/local.yaml", show_default=True)
@click.option("--programs", "count", default=14, show_default=True)
@click.option("--stride", default=4, show_default=True)
def proxy(config_path: str, count: int, stride: int) -> None:
    import math

    from scipy.stats import spearmanr

    from autoprune_ray.compress.data import load_token_data
    from autoprune_ray.compress.models import load_model
    from autoprune_ray.engine.config import load_config
    from autoprune_ray.tasks import get_task
    from fitness_stages import programs

    cfg = load_config(config_path)
    plugin, t = get_task(cfg.task), cfg.target
    lm = load_model(t.model)
    data = load_token_data(lm.tokenizer, t.calib_data, None, t.nsamples, t.seqlen, t.seed,
                           val_tokens=t.val_tokens, heldout=False)
    ev, cands = plugin.make_evaluator(lm, data, cfg), programs(count)
    _screen_all(ev, plugin, cfg, cands[:1], stride)   # warm-up: allocation inputs, first kernels
    exact, exact_s = _screen_all(ev, plugin, cfg, cands, 1)
    strided, strided_s = _screen_all(ev, plugin, cfg, cands, stride)
    both = [(a, b) for a, b in zip(exact, strided) if math.isfinite(a) and math.isfinite(b)]
    result = {"config": config_path, "programs": len(cands), "screened": len(both), "stride": stride,
              "spearman": float(spearmanr([a for a, _ in both], [b for _, b in both]).statistic),
              "largest_relative_difference": max(abs(b / a - 1) for a, b in both),
              "screen_seconds": {"every_row": exact_s, f"every_{stride}th_row": strided_s},
              "proxies": {"every_row": exact, f"every_{stride}th_row": strided}}
    _write("proxy", result)


BEFORE = {"task": "prune", "target.sparsities": [0.5], "target.val_tokens": 4096,
          "fitness.measure": "perplexity", "fitness.tokens": 4096}


def _arms(threads: int) -> dict[str, dict]:
    return {"before": BEFORE | {"evaluators.threads": 1}, "after, 1 thread": {"evaluators.threads": 1},
            f"after, {threads} threads": {"evaluators.threads": threads}}


def _search(config_path: str, run_dir: Path, overrides: dict, seconds: float) -> None:
    import subprocess
    import sys

    sets = overrides | {"run_dir": str(run_dir), "fitness.promote": 0, "search.max_seconds": seconds,
                        "search.max_evaluations": 100000}
    args = [a for key, value in sets.items() for a in ("--set", f"{key}={json.dumps(value)}")]
    subprocess.run([sys.executable, "-m", "autoprune_ray.engine.cli", "run", config_path, "--no-progress",
                    "--json", *args], check=True, stdout=subprocess.DEVNULL)


def _steady_rate(evals) -> float:
    finished = sorted(evals.finished)
    return 3600 * (len(finished) - 1) / (finished[-1] - finished[0]) if len(finished) > 1 else float("nan")


@main.command()
@click.option("--config", "config_path", default="configs/local.yaml", show_default=True)
@click.option("--seconds", default=420.0, show_default=True, help="Search time of each arm.")
@click.option("--threads", default=2, show_default=True, help="Evaluator threads of the last arm.")
def search(config_path: str, seconds: float, threads: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="throughput-"))
    arms = {}
    for i, (name, overrides) in enumerate(_arms(threads).items()):
        click.echo(f"arm {name}: {overrides}", err=True)
        _search(config_path, root / f"arm{i}", overrides, seconds)
        arms[name] = _run_summary(root / f"arm{i}") | {"overrides": overrides}
    first = arms["before"]["steady_evaluations_per_hour"]
    result = {"config": config_path, "seconds_per_arm": seconds, "arms": arms,
              "speedup_over_before": {name: arm["steady_evaluations_per_hour"] / first for name, arm in arms.items()}}
    _write("search", result)


@main.command()
@click.option("--rounds", default=5, show_default=True)
def select(rounds: int) -> None:
    import torch

    import autoprune_ray.kernels.select as sel
    from autoprune_ray.compress.models import block_linears, decoder_layers, load_model

    torch.set_num_threads(1)
    lm, g = load_model("smollm2", device="cpu"), torch.Generator().manual_seed(0)
    scores = [lin.weight.detach().abs() * torch.rand(lin.weight.shape[1], generator=g)
              for block in decoder_layers(lm.model) for lin in block_linears(block).values()]
    after = sel.kth_in_rows
    arms = {"before": lambda s, k: s.kthvalue(k, dim=1, keepdim=True).values, "after": after}
    seconds, masks = {name: [] for name in arms}, {}
    for _ in range(rounds):
        for name, kth in arms.items():
            sel.kth_in_rows = kth
            masks[name], t = timed(lambda: [sel.row_mask(s, level) for level in (0.6, 0.7) for s in scores])
            seconds[name].append(t)
    sel.kth_in_rows = after
    same = all(torch.equal(a, b) for a, b in zip(masks["before"], masks["after"]))
    best = {name: min(v) for name, v in seconds.items()}
    _write("select", {"linears": len(scores), "levels": [0.6, 0.7], "threads": 1, "rounds": rounds,
                      "seconds_per_candidate": seconds, "best_seconds": best, "masks_identical": same,
                      "speedup": best["before"] / best["after"], "machine": platform.platform()})


@main.command()
@click.argument("run_dir")
def run(run_dir: str) -> None:
    _write(f"run:{Path(run_dir).name}", _run_summary(Path(run_dir)))


def _run_summary(run_dir: Path) -> dict:
    import pyarrow.dataset as ds

    from autoprune_ray.engine.config import load_config

    summary = json.loads((Path(run_dir) / "checkpoint.json").read_text())["summary"]
    cfg = load_config(Path(run_dir) / "config.yaml")
    prompts = ds.dataset(Path(run_dir) / "tables" / "prompts", format="parquet").to_table().to_pandas()
    evals = ds.dataset(Path(run_dir) / "tables" / "evaluations", format="parquet").to_table().to_pandas()
    wall = summary["seconds"]
    policy = float(prompts.drop_duplicates("seconds").seconds.sum())   # one generation serves a batch's rows
    evaluators = float(evals.seconds.sum()) / cfg.evaluators.num
    return {"run_dir": str(run_dir), "wall_seconds": wall, "evaluations": len(evals),
              "evaluations_per_hour": 3600 * len(evals) / wall, "steady_evaluations_per_hour": _steady_rate(evals),
              "statuses": evals.status.value_counts().to_dict(),
              "evaluation_seconds_mean": float(evals.seconds.mean()),
              "share": {"policy_generating": policy / wall, "evaluators_busy": evaluators / wall},
              "driver_overhead_per_candidate_seconds": summary.get("overhead_per_candidate"),
              "note": "policy and evaluators run at once on a shared CPU, so shares overlap and can sum past 1"}


if __name__ == "__main__":
    main()
