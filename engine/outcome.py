"""What a finished run found, in a few rows: the best program the search wrote, the best expert
seed, and the task's reference seed (Wanda, for pruning), as measured on the validation split;
and the commands to run next. `autoprune-ray run` ends with it; `report` re-measures on held-out
text."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from autoprune_ray.engine.report import best_row, measure_name, open_run, seed_names

def run_outcome(run_dir: str | Path, summary: dict | None = None) -> dict:
    """Title, caption, columns, rows, notes and next commands of the closing table."""
    config, plugin, store = open_run(run_dir)
    cands, evals = store.read("candidates"), store.read("evaluations")
    promotions = store.read("promotions")
    fitness = config.get("fitness") or {}
    measure, names = measure_name(config), seed_names(plugin)
    ok = evals[(evals.status == "ok") & evals.fitness.notna()] if len(evals) else evals
    picked = _picked_rows(cands, ok, names, plugin.reference_seed, promotions, config)
    reference = next((row for label, row in picked if label.startswith("reference")), None)
    levels = _level_names(ok)
    level_columns = {f"{measure} @{lv}": lv for lv in levels}
    mean_column = f"{measure} (mean)" if levels else measure
    columns = ["", "#", "program", *level_columns, mean_column, "vs ref"]
    rows = [_row(label, row, cands, names, level_columns, mean_column, reference) for label, row in picked]
    tokens = fitness.get("tokens") or config.get("target", {}).get("val_tokens")
    caption = (f"{measure} on {tokens} validation tokens, lower is better (mean: geometric over levels); "
               f"{len(ok)} programs measured of {len(cands)} proposed")
    return {"title": f"run {config['name']}: the best program beside {plugin.reference_seed or 'the seeds'}",
            "caption": caption, "columns": columns, "rows": rows,
            "notes": _notes(summary, reference, any(label == "best found" for label, _ in picked)), "code": _found_code(cands, picked),
            "next": _next_commands(str(run_dir), plugin, levels)}


def _picked_rows(cands, ok, names, reference_name, promotions, config) -> list[tuple[str, pd.Series]]:
    if ok.empty:
        return []
    fittest = ok.sort_values("fitness", ascending=False).drop_duplicates("candidate_id")
    seeds = fittest[fittest.hash.isin(names)]
    found = best_row(cands, ok, discovered_only=True, promotions=promotions, config=config)
    picked = []
    if found is not None:
        picked.append(("best found", fittest[fittest.candidate_id == int(found.candidate_id)].iloc[0]))
    if len(seeds):
        picked.append(("best seed", seeds.iloc[0]))
    ref = seeds[seeds.hash.map(names) == reference_name]
    if len(ref):
        if picked and picked[-1][0] == "best seed" and int(picked[-1][1].candidate_id) == int(ref.iloc[0].candidate_id):
            picked.pop()
        picked.append(("reference", ref.iloc[0]))
    return picked


def _level_names(ok: pd.DataFrame) -> list[str]:
    texts = ok.levels.dropna() if "levels" in ok else pd.Series(dtype=object)
    return [] if texts.empty else [part.split(":")[0] for part in str(texts.iloc[0]).split(",")]


def _level_values(text) -> dict[str, float]:
    if not isinstance(text, str) or not text:
        return {}
    return {level: float(value) for level, value in (part.split(":") for part in text.split(","))}


def _row(label: str, row: pd.Series, cands: pd.DataFrame, names: dict, level_columns: dict, mean_column: str,
         reference) -> dict:
    values = _level_values(row.get("levels"))
    operator = cands.set_index("candidate_id").operator.get(int(row.candidate_id), "")
    out = {"": label, "#": int(row.candidate_id), "program": names.get(row.hash) or f"({operator})"}
    out |= {column: f"{values[lv]:.4g}" for column, lv in level_columns.items() if lv in values}
    out[mean_column] = f"{math.exp(-float(row.fitness)):.4g}"   # fitness = −mean log(measure)
    if reference is not None:
        out["vs ref"] = f"{math.exp(float(reference.fitness) - float(row.fitness)) - 1:+.1%}"
    return out


def _found_code(cands: pd.DataFrame, picked) -> str:
    found = [row for label, row in picked if label == "best found"]
    if not found:
        return ""
    code = cands.set_index("candidate_id").code.get(int(found[0].candidate_id), "")
    return f"# best found, #{int(found[0].candidate_id)}\n{code.rstrip()}"


def _notes(summary: dict | None, reference, found: bool) -> list[str]:
    notes = []
    if not found:
        notes.append("No program the search wrote itself was measured yet (each was rejected, screened or "
                     "still queued): give it more time, e.g. configs/local.yaml, or --resume this run.")
    if reference is None:
        notes.append("The reference seed was not measured in this run (search.seeds: false, or it failed).")
    if summary:
        notes.append(f"Stopped: {summary.get('stop_reason')}; {summary.get('evaluated')} evaluations in "
                     f"{summary.get('seconds', 0) / 60:.1f} min, valid rate {summary.get('valid_rate', 0):.0%}.")
        if summary.get("promoted"):
            p = summary["promoted"]
            notes.append(f"Promoted best (re-measured on two calibration seeds): #{p['candidate_id']}, "
                         f"perplexity {p['perplexity']:.4g}.")
    return notes


def _next_commands(run_dir: str, plugin, levels: list[str]) -> list[tuple[str, str]]:
    at = f" --sparsity {levels[-1]}" if levels else ""
    return [(f"autoprune-ray report {run_dir}", "re-measure on held-out text beside the baselines"),
            (f"autoprune-ray {plugin.apply_command} --program {run_dir}:best{at} --save {run_dir}/model",
             "apply the best program, export in HF format"),
            (f"autoprune-ray status {run_dir}", "counts and the best program, as JSON")]
