"""Status and report of a run directory: Markdown, PNG plots, and the best program measured
against the baselines under the full protocol."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from autoprune_ray.engine.config import RunConfig, from_dict
from autoprune_ray.engine.plots import plots
from autoprune_ray.engine.promotion import promoted_ranking, promotion_seeds
from autoprune_ray.engine.storage import RunStore
from autoprune_ray.tasks import TaskPlugin, get_task


def task_of(config: dict) -> TaskPlugin:
    """The plug-in of a run's task (RunConfig's default for a config that names none)."""
    return get_task(config.get("task", RunConfig.task))


def seed_names(plugin: TaskPlugin) -> dict[str, str]:
    """hash -> name of the task's expert seeds (how a run's candidates table knows them)."""
    return {cand.hash: name for name, cand in plugin.seeds().items()}


def measure_name(config: dict) -> str:
    """What the run's fitness measured, as tables and plots name it."""
    return {"kl": "KL", "perplexity": "ppl"}.get((config.get("fitness") or {}).get("measure", "perplexity"), "measure")


def open_run(run_dir: str | Path) -> tuple[dict, TaskPlugin, RunStore]:
    """A run's config, its task's plug-in and its tables, the evaluations with the plug-in's columns."""
    store = RunStore.open_existing(run_dir)   # NotARun without config.yaml; writes nothing
    config = store.read_config()
    return config, task_of(config), store


def load_tables(run_dir: str | Path) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    config, _, store = open_run(run_dir)
    return config, store.read("candidates"), store.read("evaluations")


def status(run_dir: str | Path) -> dict:
    """The run's summary; `corrupt_parts` names table parts that could not be read (set aside)."""
    config, _, store = open_run(run_dir)
    out = summary(config, store.read("candidates"), store.read("evaluations"), store.read("promotions"))
    corrupt = store.corrupt_parts()
    return out | ({"corrupt_parts": [str(p) for p in corrupt]} if corrupt else {})


def summary(config: dict, cands: pd.DataFrame, evals: pd.DataFrame, promotions: pd.DataFrame | None = None) -> dict:
    out = {"run": config["name"], "candidates": len(cands),
           "candidate_status": cands.status.value_counts().to_dict() if len(cands) else {},
           "evaluation_status": evals.status.value_counts().to_dict() if len(evals) else {},
           "valid_rate": float((cands.status != "rejected").mean()) if len(cands) else 0.0,
           "best": None}
    best = best_row(cands, evals, promotions=promotions, config=config)
    if best is not None:
        out["best"] = {"candidate_id": int(best.candidate_id), "fitness": float(best.fitness),
                       "perplexity": _float(best.perplexity), "promoted": bool(best.promoted), "code": best.code}
    return out


def best_row(cands: pd.DataFrame, evals: pd.DataFrame, discovered_only: bool = False,
             promotions: pd.DataFrame | None = None, config: dict | None = None):
    """The best evaluated candidate: after promotion (engine/promotion.py) the promoted best,
    else the highest search-stage fitness; `discovered_only` leaves out the seeds."""
    seeds = set(cands[cands.operator == "seed"].candidate_id) if discovered_only else set()
    ranking = _promoted(promotions, config)
    ranking = ranking[~ranking.candidate_id.isin(seeds)] if len(ranking) else ranking
    if len(ranking):
        row, promoted = ranking.iloc[0], True
    else:
        if evals.empty or evals.fitness.dropna().empty:
            return None
        ok = evals[(evals.status == "ok") & evals.fitness.notna() & ~evals.candidate_id.isin(seeds)]
        if ok.empty:
            return None
        row, promoted = ok.loc[ok.fitness.idxmax()], False
    return cands.set_index("candidate_id").loc[int(row.candidate_id)].to_frame().T.assign(
        candidate_id=int(row.candidate_id), fitness=float(row.fitness), perplexity=_float(row.perplexity),
        promoted=promoted).iloc[0]


def _promoted(promotions: pd.DataFrame | None, config: dict | None) -> pd.DataFrame:
    if promotions is None or promotions.empty or config is None:
        return pd.DataFrame()
    cfg = from_dict(RunConfig, config)
    return promoted_ranking(promotions, promotion_seeds(cfg))


def _float(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def lineage_of(cands: pd.DataFrame, evals: pd.DataFrame, candidate_id: int) -> list[dict]:
    """The chain of first parents from the root to `candidate_id`."""
    by_id = cands.set_index("candidate_id")
    ppl = evals.set_index("candidate_id").perplexity.to_dict() if len(evals) else {}
    chain, node = [], candidate_id
    while node is not None and node in by_id.index and len(chain) < 50:
        row = by_id.loc[node]
        chain.append({"candidate_id": int(node), "operator": row.operator, "perplexity": ppl.get(node),
                      "code": row.code})
        parents = list(row.parents) if row.parents is not None else []
        node = int(parents[0]) if parents else None
    return chain[::-1]


def _runs(plugin: TaskPlugin, cfg: RunConfig, programs: list[tuple[str, str, str]],
          baselines: list[str]) -> list[tuple[str, object]]:
    """(label, compression config) for each program and baseline of the run's task."""
    from autoprune_ray.operators.language import parse

    return ([(label, plugin.compression_config(parse(code, plugin.name, granularity), cfg))
             for label, code, granularity in programs] +
            [(name, plugin.baseline_config(name, cfg)) for name in baselines])


def compare_with_baselines(cfg: RunConfig, programs: list[tuple[str, str, str]], protocol,
                           baselines: list[str]) -> pd.DataFrame:
    """Re-measure programs (label, code, granularity) and the baselines under one protocol
    (pruning: sequential statistics; quantization: one-pass statistics, the same budget), at each
    of the run's levels (column `level`)."""
    from autoprune_ray.compress.measure import load_and_measure

    plugin = get_task(cfg.task)
    levels = cfg.target.levels if plugin.leveled else [None]
    runs = [("dense", None, None)] + [(label, compression, level) for level in levels for label, compression in
                                      _runs(plugin, cfg.at_level(level) if level else cfg, programs, baselines)]
    rows, data = [], None   # the protocol's tokens, loaded by the first row
    for label, compression, level in runs:
        measured = load_and_measure(cfg.target.model, protocol, compression, device=cfg.target.device, data=data)
        data = measured.data
        amount = {plugin.amount: getattr(measured.result, plugin.amount)} if measured.result is not None else {}
        rows.append({"level": level, "method": label, **amount, "perplexity": measured.perplexity,
                     **data.describe()})
    return pd.DataFrame(rows)


def write_report(run_dir: str | Path, protocol=None, baselines: list[str] | None = None) -> Path:
    run_dir = Path(run_dir)
    config, plugin, store = open_run(run_dir)
    cands, evals = store.read("candidates"), store.read("evaluations")
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    promotions = store.read("promotions")
    st = summary(config, cands, evals, promotions)
    best = best_row(cands, evals, promotions=promotions, config=config)
    chain = lineage_of(cands, evals, int(best.candidate_id)) if best is not None else []
    images = plots(cands, evals, int(best.candidate_id) if best is not None else None, seed_names(plugin),
                   measure_name(config), out)
    lines = [f"# Run `{config['name']}`", "",
             f"{st['candidates']} candidates proposed, valid rate {st['valid_rate']:.0%}; "
             f"candidates by status {st['candidate_status']}; evaluations by status {st['evaluation_status']}.", ""]
    lines += [f"![{name}]({name})" for name in images] + [""]
    if best is None:
        lines.append("No candidate reached a perplexity measurement.")
    else:
        lines += [f"## Best program (#{int(best.candidate_id)}, {_measured_text(best)})", "",
                  "```python", best.code.rstrip(), "```", "", "## Its lineage", ""]
        lines += [f"{i + 1}. #{n['candidate_id']} ({n['operator']}), perplexity "
                  f"{n['perplexity'] if n['perplexity'] is None else round(n['perplexity'], 3)}"
                  for i, n in enumerate(chain)]
        programs = [("best program", best.code, best.granularity or "row")]
        discovered = best_row(cands, evals, discovered_only=True, promotions=promotions, config=config)
        if best.operator == "seed" and discovered is not None:
            lines += ["", f"The best program is an expert seed. The best program the search found itself is "
                          f"#{int(discovered.candidate_id)} ({discovered.operator}, {_measured_text(discovered)}):",
                      "", "```python", discovered.code.rstrip(), "```"]
            programs.append(("best discovered", discovered.code, discovered.granularity or "row"))
        if protocol is not None:
            # parsed only here: a report without the comparison reads any run's config
            lines += _comparison(from_dict(RunConfig, config), programs, protocol,
                                 baselines or list(plugin.baselines), out)
        lines += _rank_correlation(evals, best)
    lines += promotion_section(promotions)
    lines += policy_section(store, cands)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


def _comparison(cfg: RunConfig, programs, protocol, baselines: list[str], out: Path) -> list[str]:
    table = compare_with_baselines(cfg, programs, protocol, baselines)
    table.to_parquet(out / "comparison.parquet")
    plugin = get_task(cfg.task)
    how = plugin.protocol_note(cfg)
    first = table.iloc[0]
    columns = (["level"] if plugin.leveled else []) + ["method", plugin.amount, "perplexity"]
    verdicts = [_verdict(table[(table.level == level) | (table.method == "dense")])
                for level in table.level.dropna().unique()] if plugin.leveled else [_verdict(table)]
    return ["", "## Re-measured beside the baselines", "", _markdown(table[columns]), "", *verdicts, "",
            f"Protocol: {first.nsamples}×{first.seqlen} calibration tokens of {first.calib_data}, {how}, "
            f"{first.eval_tokens} held-out tokens of {first.eval_data}."]


def _rank_correlation(evals: pd.DataFrame, best) -> list[str]:
    """mpq: how the best proxy ranked layers against their measured sensitivity, at search time."""
    if best is None or "spearman" not in evals or evals.spearman.dropna().empty:
        return []
    row = evals[evals.candidate_id == int(best.candidate_id)].iloc[0]
    ok = evals[evals.status == "ok"].dropna(subset=["spearman"])
    return ["", f"Rank correlation of the best proxy with the measured per-layer sensitivity (NLL increase "
                f"with one layer quantized, a fixed sample of layers): Spearman {row.spearman:.3f}, Kendall "
                f"{row.kendall:.3f}. Across the {len(ok)} proxies measured: Spearman median "
                f"{ok.spearman.median():.3f}, max {ok.spearman.max():.3f}; the rank correlation between a "
                f"proxy's Spearman and its perplexity is {ok.spearman.corr(ok.perplexity, method='spearman'):.3f} "
                f"(negative: proxies that rank layers better build better models)."]


def _measured_text(row) -> str:
    where = "promoted: validation perplexity under two calibration seeds" if row.promoted else "search stage"
    ppl = f", perplexity {row.perplexity:.3f}" if row.perplexity is not None else ""
    return f"{where}, fitness {row.fitness:.4f}{ppl}"


def promotion_section(promotions: pd.DataFrame) -> list[str]:
    if promotions.empty:
        return []
    return ["", "## Promotion: the fittest programs measured again (validation split)", "",
            _markdown(promotions[["candidate_id", "seed", "tokens", "status", "perplexity", "levels"]])]


def policy_section(store: RunStore, cands: pd.DataFrame) -> list[str]:
    """Preference pairs, DPO rounds, valid rate by adapter, and the strategy controller's state."""
    pairs, rounds, strategies = store.read("preferences"), store.read("adapters"), store.read("strategies")
    if pairs.empty and rounds.empty:
        return []
    lines = ["", "## The policy: preference pairs, DPO rounds, prompt strategies", "",
             f"{len(pairs)} preference pairs logged: {pairs.kind.value_counts().to_dict()} "
             f"(by grouping {pairs.grouping.value_counts().to_dict()})."]
    if not rounds.empty:
        lines += ["", _markdown(rounds[["version", "status", "pairs_total", "train_pairs", "train_loss",
                                        "train_accuracy", "heldout_pairs", "heldout_accuracy"]])]
    written = cands[cands.prompt_id.notna()]
    if len(written):
        by_adapter = written.assign(adapter=written.adapter.fillna("base"), valid=written.status != "rejected")
        table = by_adapter.groupby("adapter", sort=False).valid.agg(["count", "mean"]).reset_index()
        lines += ["", "Valid rate of the policy's completions by the adapter that wrote them "
                      "(later adapters also face later, harder prompts):", "",
                  _markdown(table.rename(columns={"count": "completions", "mean": "valid_rate"}))]
    if not strategies.empty:
        last = strategies[strategies.time == strategies.time.max()]
        lines += ["", f"Prompt-strategy controller after {int(last.comparisons.iloc[0])} comparisons:", "",
                  _markdown(last[["strategy", "strength", "probability"]])]
    return lines


def _markdown(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(df.columns) + " |"
    rows = ["| " + " | ".join(_cell(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join([head, "|---" * len(df.columns) + "|", *rows])


def _cell(v) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _verdict(table: pd.DataFrame) -> str:
    label = "best discovered" if (table.method == "best discovered").any() else "best program"
    ours = table[table.method == label].perplexity.iloc[0]
    others = table[~table.method.isin(["best program", "best discovered", "dense"])]
    if others.empty:
        return ""
    champion = others.loc[others.perplexity.idxmin()]
    at = f"At sparsity {table.level.dropna().iloc[0]:g}: " if "level" in table and table.level.notna().any() else ""
    if ours < champion.perplexity:
        return f"{at}The {label} beats the best baseline ({champion.method}, {champion.perplexity:.3f}) by " \
               f"{(1 - ours / champion.perplexity):.1%}."
    return f"{at}The {label} does not beat {champion.method} ({ours:.3f} vs {champion.perplexity:.3f})."
