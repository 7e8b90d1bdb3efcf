"""How well the screening proxy ranks the programs a real search measures, from its own tables.

    python benchmarks/stage_agreement.py runs/discover-s1 [runs/discover-s2 ...]

fitness_stages.py measures the stages on the seeds and symbolic variations of them, a set that
spans programs from good to catastrophic. A search's measured programs are narrower: the cascade
measures only those whose proxy is within `search.cascade` of the best so far, so this asks what
the proxy says about them. Per run, over the evaluations with both a proxy and a KL (status ok):
  - Spearman's rank correlation of proxy and KL, with a bootstrap 90% interval, over all of them
    and over the better half by KL;
  - of the run's fitness preference pairs (replayed from the tables, any distance apart), the
    share whose order the proxy agrees with.
Reads tables only: nothing is measured. Writes benchmarks/results/stage-agreement.json (or --out).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import pandas as pd

from fitness_stages import spearman_interval

RESULTS = Path(__file__).parent / "results"


def proxy_of(cands: pd.DataFrame, evals: pd.DataFrame) -> dict[int, float]:
    """candidate id -> its proxy (a duplicate has its original's)."""
    proxy = evals.dropna(subset=["proxy"]).set_index("candidate_id").proxy.to_dict()
    for row in cands[cands.duplicate_of.notna()].itertuples(index=False):
        if int(row.duplicate_of) in proxy:
            proxy[int(row.candidate_id)] = proxy[int(row.duplicate_of)]
    return proxy


def pair_agreement(pairs: list[dict], proxy: dict[int, float]) -> dict:
    """Of the fitness pairs whose sides both have a proxy: how many the proxy orders the same way."""
    judged = [(p, proxy[p["chosen_id"]], proxy[p["rejected_id"]]) for p in pairs
              if p["kind"] == "fitness" and p["chosen_id"] in proxy and p["rejected_id"] in proxy]
    agree = sum(chosen < rejected for _, chosen, rejected in judged)
    return {"pairs": len(judged), "proxy_agrees": agree, "share": agree / len(judged) if judged else None}


def run_agreement(run_dir: str) -> dict:
    from autoprune_ray.engine.storage import RunStore
    from autoprune_ray.llm.preferences import PreferenceLog, replay
    store = RunStore(run_dir)
    cands, evals, prompts = store.read("candidates"), store.read("evaluations"), store.read("prompts")
    measured = evals[(evals.status == "ok") & evals.proxy.notna() & evals.kl.notna()]
    better = measured[measured.kl <= measured.kl.median()]
    pairs = replay(PreferenceLog(margin=0.01, groupings=("prompt", "parents"), window=10 ** 9), cands, evals, prompts)
    return {"evaluations": len(evals), "status": evals.status.value_counts().to_dict(),
            "all_measured": {"n": len(measured), **spearman_interval(measured.proxy, measured.kl)},
            "better_half_by_kl": {"n": len(better), **spearman_interval(better.proxy, better.kl)},
            "fitness_pairs": pair_agreement(pairs, proxy_of(cands, evals))}


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=str(RESULTS / "stage-agreement.json"),
              show_default=True)
def main(run_dirs, out):
    result = {"benchmark": "proxy against KL on a search's measured programs",
              "command": "python " + " ".join(sys.argv), "runs": {r: run_agreement(r) for r in run_dirs}}
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    click.echo(json.dumps(result["runs"], indent=1))


if __name__ == "__main__":
    main()
