"""What the LLM adds: the same search with the LLM operators on and off, at the same evaluation budget.

    python benchmarks/llm_onoff.py run --config configs/local.yaml --seeds 0,1,2     # 6 searches
    python benchmarks/llm_onoff.py summarize runs/onoff

`on` is the config as written. `off` keeps only the symbolic operators, in the proportion of their
default rates (mutate 2 : crossover 1); the policy is never asked. Both arms run to the config's
`search.max_evaluations` with no time cap, with the same search seeds, one after the other.

Per run: the best first-stage fitness (the config's fitness.measure, −mean log over levels) after
every tenth of the budget, in the order evaluations finished; the operator of each evaluation
that raised it; the operators of the best program's ancestry; the promoted best's validation
perplexity under each calibration seed. Per arm: the mean over seeds with the range, and per seed
the difference on − off. Writes benchmarks/results/llm-onoff-cpu.json (or --out).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pandas as pd

RESULTS = Path(__file__).parent / "results"
OFF = {"search.operators.symbolic_mutate": "0.667", "search.operators.symbolic_crossover": "0.333"}


def best_so_far(evaluations: pd.DataFrame, budget: int, points: int = 10) -> dict[int, float | None]:
    """Best fitness after k evaluations (k = budget/points, 2·budget/points, …); screened and failed
    evaluations count towards k but have no fitness."""
    done = evaluations.sort_values("finished").fitness.to_numpy(dtype=float)
    best = np.fmax.accumulate(np.where(np.isfinite(done), done, -np.inf)) if len(done) else done
    out = {}
    for k in sorted({max(1, round(budget * i / points)) for i in range(1, points + 1)}):
        out[k] = float(best[k - 1]) if k <= len(best) and np.isfinite(best[k - 1]) else None
    return out


def new_bests(evaluations: pd.DataFrame, candidates: pd.DataFrame) -> list[dict]:
    """Each evaluation that raised the best fitness so far, in the order evaluations finished, with
    the operator that wrote the program: who made the progress (the parent's operator is not credited)."""
    operators = candidates.set_index("candidate_id").operator
    best, out = -np.inf, []
    for k, row in enumerate(evaluations.sort_values("finished").itertuples(), start=1):
        fitness = float(row.fitness)
        if np.isfinite(fitness) and fitness > best:
            best = fitness
            out.append({"evaluation": k, "candidate_id": int(row.candidate_id),
                        "operator": str(operators.get(row.candidate_id)), "fitness": fitness})
    return out


def lineage(candidates: pd.DataFrame, candidate_id: int) -> dict[int, str]:
    """The operator of a program and of each of its ancestors (parents, their parents, ...)."""
    from autoprune_ray.engine.plots import ancestry
    operators = candidates.set_index("candidate_id").operator
    return {cid: str(operators[cid]) for cid in sorted(ancestry(candidates, int(candidate_id), limit=len(candidates) + 1))}


def best_lineage(evaluations: pd.DataFrame, candidates: pd.DataFrame) -> dict | None:
    """Whether an LLM operator wrote the best program or any of its ancestors: the LLM can help
    by writing parents that symbolic operators then improve, which new bests alone do not show."""
    from autoprune_ray.engine.learning import LLM_OPERATORS
    fitness = evaluations.fitness.astype(float).where(lambda f: np.isfinite(f))
    if fitness.isna().all():
        return None
    best = int(evaluations.loc[fitness.idxmax(), "candidate_id"])
    ops = lineage(candidates, best)
    return {"candidate_id": best, "lineage": ops, "llm_in_lineage": any(o in LLM_OPERATORS for o in ops.values())}


def promoted(promotions: pd.DataFrame) -> dict | None:
    """The promoted best (highest mean fitness over calibration seeds) and its perplexity per seed."""
    ok = promotions[promotions.status == "ok"]
    if ok.empty:
        return None
    best = ok.groupby("candidate_id").fitness.mean().idxmax()
    rows = ok[ok.candidate_id == best]
    return {"candidate_id": int(best), "perplexity": {int(r.seed): float(r.perplexity) for r in rows.itertuples()},
            "levels": {int(r.seed): r.levels for r in rows.itertuples()}}


def run_summary(run_dir: Path, budget: int) -> dict:
    from autoprune_ray.engine.storage import RunStore
    store = RunStore(run_dir)
    evals, cands = store.read("evaluations"), store.read("candidates")
    return {"evaluations": len(evals), "proposals": len(cands), "best_fitness": best_so_far(evals, budget),
            "new_bests": new_bests(evals, cands), "best_lineage": best_lineage(evals, cands),
            "promoted": promoted(store.read("promotions"))}


def arm_table(runs: dict[int, dict]) -> dict:
    """Mean and range over seeds of the best fitness at each point."""
    points = sorted({k for r in runs.values() for k in r["best_fitness"]})
    table = {}
    for k in points:
        values = [r["best_fitness"].get(k) for r in runs.values()]
        values = [v for v in values if v is not None]
        table[k] = {"mean": float(np.mean(values)), "min": min(values), "max": max(values), "n": len(values)} \
            if values else None
    return table


@click.group()
def cli():
    pass


@cli.command()
@click.option("--config", default="configs/local.yaml", show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--root", default="runs/onoff", show_default=True, help="run directories go under it")
def run(config, seeds, root):
    """Both arms for every seed, one search at a time. Run it again after an interruption: finished
    searches are kept, a stopped one is resumed (six searches take longer than a session here)."""
    for seed in seeds.split(","):
        for arm, overrides in (("on", {}), ("off", OFF)):
            run_dir = Path(root) / f"{arm}-s{seed}"
            state = search_state(run_dir)
            if state == "finished":
                click.echo(f"{run_dir}: finished, kept")
                continue
            sets = {"search.seed": seed, "search.max_seconds": "null", "run_dir": str(run_dir), **overrides}
            command = ["autoprune-ray", "run", config] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
            command += ["--resume"] if state == "stopped" else []
            click.echo(" ".join(command))
            subprocess.run(command, check=True)


def search_state(run_dir: Path) -> str:
    """"new" (nothing there), "finished" (its last checkpoint has the reason it stopped, which only
    the end of a search writes) or "stopped" (interrupted: resume it)."""
    if not (run_dir / "config.yaml").exists():
        return "new"
    checkpoint = run_dir / "checkpoint.json"
    summary = json.loads(checkpoint.read_text()).get("summary", {}) if checkpoint.exists() else {}
    return "finished" if summary.get("stop_reason") else "stopped"


@cli.command()
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=RESULTS / "llm-onoff-cpu.json",
              show_default=True)
def summarize(root, out):
    """Read ROOT/{on,off}-s{seed} and write the comparison."""
    from autoprune_ray.engine.config import RunConfig, from_dict
    from autoprune_ray.engine.storage import RunStore
    arms: dict[str, dict[int, dict]] = {"on": {}, "off": {}}
    for run_dir in sorted(root.glob("o*-s*")):
        arm, seed = run_dir.name.rsplit("-s", 1)
        budget = from_dict(RunConfig, RunStore(run_dir).read_config()).search.max_evaluations
        arms[arm][int(seed)] = run_summary(run_dir, budget)
    seeds = sorted(set(arms["on"]) & set(arms["off"]))
    final = {s: (arms["on"][s]["best_fitness"], arms["off"][s]["best_fitness"]) for s in seeds}
    result = {"benchmark": "LLM operators on and off", "command": "python " + " ".join(sys.argv),
              "arms": {name: {"runs": runs, "best_fitness": arm_table(runs), "new_bests_by_operator":
                              credit(runs)} for name, runs in arms.items()},
              "on_minus_off_final": {s: _last(on) - _last(off) if None not in (_last(on), _last(off)) else None
                                     for s, (on, off) in final.items()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    click.echo(json.dumps({a: r["best_fitness"] for a, r in result["arms"].items()}, indent=1))


def credit(runs: dict[int, dict]) -> dict[str, int]:
    """How many new bests each operator made, over an arm's seeds (the seeds' own first measurements
    included, so that the counts add up to every step of every curve)."""
    counts = pd.Series([b["operator"] for r in runs.values() for b in r["new_bests"]], dtype=object)
    return {str(k): int(v) for k, v in counts.value_counts().items()}


def _last(curve: dict[int, float | None]) -> float | None:
    return curve[max(curve)] if curve else None


if __name__ == "__main__":
    cli()
