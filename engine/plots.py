"""The report's plots (PNG, matplotlib): the best program so far against evaluations, with the
seeds as labelled lines; the valid rate of LLM and symbolic proposals; the best program's
ancestry, both parents of every crossover."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from autoprune_ray.engine.learning import LLM_OPERATORS

MAX_ANCESTORS = 14


def measures(evals: pd.DataFrame) -> dict[int, float]:
    """Each measured candidate's measure (KL or perplexity, geometric mean over levels)."""
    ok = evals[(evals.status == "ok") & evals.fitness.notna()] if len(evals) else evals
    return {int(r.candidate_id): math.exp(-float(r.fitness)) for r in ok.itertuples()}


def plots(cands: pd.DataFrame, evals: pd.DataFrame, best_id: int | None, seed_names: dict[str, str],
          measure: str, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    files = []
    if len(evals) and (evals.status == "ok").any():
        files.append(_best_so_far(cands, evals, seed_names, measure, out / "best_fitness.png"))
    if len(cands):
        files.append(_valid_rate(cands, out / "valid_rate.png"))
    if best_id is not None:
        files.append(_lineage(cands, evals, best_id, seed_names, measure, out / "lineage.png"))
    return files


def _best_so_far(cands, evals, seed_names, measure, path: Path) -> str:
    import matplotlib.pyplot as plt
    order = evals.sort_values("finished").reset_index(drop=True)
    values = order.fitness.where(order.status == "ok").map(lambda f: math.exp(-f) if pd.notna(f) else math.nan)
    best = values.cummin().ffill()
    seeds = _seed_values(cands, evals, seed_names)
    # the scale is set by the search's own range, from just under its best to a little above the
    # best seeds; a seed far off (magnitude pruning at 70%) is named in a note, not drawn
    low = best.min() * 0.97
    high = max(sorted(seeds.values())[:3] + [best.dropna().iloc[-1]]) * 1.12 if seeds else best.max() * 1.05
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(range(1, len(values) + 1), values, s=10, color="0.75", label="each measured program", zorder=1)
    ax.plot(range(1, len(best) + 1), best, drawstyle="steps-post", color="C0", lw=2, label="best so far", zorder=3)
    off = []
    for i, (name, value) in enumerate(sorted(seeds.items(), key=lambda kv: kv[1])):
        if value > high:
            off.append(f"{name} {value:.3g}")
            continue
        ax.axhline(value, color=f"C{i % 8 + 1}", ls="--", lw=1, zorder=2)
        ax.text(len(values) + 0.5, value, f" {name}", va="center", fontsize=7, color=f"C{i % 8 + 1}")
    if off:
        ax.text(0.01, 0.98, "off scale: " + ", ".join(off), transform=ax.transAxes, va="top", fontsize=7)
    ax.set_ylim(low, high)
    ax.set_xlim(0.5, len(values) * 1.18 + 1)
    ax.set_xlabel("evaluations, in the order they finished")
    ax.set_ylabel(f"validation {measure} (lower is better)")
    ax.set_title("Best program so far, against the expert seeds (dashed)")
    ax.legend(loc="upper right", fontsize=7)
    return _save(fig, path)


def _seed_values(cands, evals, seed_names) -> dict[str, float]:
    measured = measures(evals)
    return {seed_names[r.hash]: measured[int(r.candidate_id)] for r in cands.itertuples()
            if r.hash in seed_names and int(r.candidate_id) in measured}


def _valid_rate(cands, path: Path) -> str:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    groups = {"LLM": cands[cands.operator.isin(LLM_OPERATORS)],
              "symbolic": cands[~cands.operator.isin(LLM_OPERATORS) & (cands.operator != "seed")]}
    for i, (name, group) in enumerate(groups.items()):
        if group.empty:
            continue
        valid = (group.status != "rejected").astype(float).reset_index(drop=True)
        ax.plot(range(1, len(valid) + 1), valid.expanding().mean(), color=f"C{i}",
                label=f"{name}: {int(valid.sum())} of {len(valid)} valid ({valid.mean():.0%})")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("proposals of that kind, in order")
    ax.set_ylabel("valid so far (parsed and accepted)")
    ax.set_title("Valid programs: LLM completions and symbolic operators")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def ancestry(cands: pd.DataFrame, best_id: int, limit: int = MAX_ANCESTORS) -> dict[int, int]:
    """The best program's ancestors (every parent, crossovers' both) by generations back from it;
    the nearest `limit` (a figure has room for MAX_ANCESTORS)."""
    parents_of = {int(r.candidate_id): [int(p) for p in (r.parents if r.parents is not None else [])]
                  for r in cands.itertuples()}
    depth, frontier = {best_id: 0}, [best_id]
    while frontier and len(depth) < limit:
        nxt = []
        for node in frontier:
            for parent in parents_of.get(node, []):
                if parent not in depth and len(depth) < limit:
                    depth[parent] = depth[node] + 1
                    nxt.append(parent)
        frontier = nxt
    return depth


def _lineage(cands, evals, best_id, seed_names, measure, path: Path) -> str:
    import matplotlib.pyplot as plt
    depth = ancestry(cands, best_id)
    by_id = cands.set_index("candidate_id")
    measured = measures(evals)
    rows: dict[int, list[int]] = {}
    for node, d in sorted(depth.items()):
        rows.setdefault(d, []).append(node)
    deepest = max(rows)
    width = max(len(r) for r in rows.values())
    fig, ax = plt.subplots(figsize=(max(6, 2.3 * width), 1.0 + 1.2 * (deepest + 1)))
    place = {node: ((i + 1) / (len(row) + 1), deepest - d) for d, row in rows.items() for i, node in enumerate(row)}
    for node, (x, y) in place.items():
        for parent in by_id.parents.get(node) if by_id.parents.get(node) is not None else []:
            if int(parent) in place:
                px, py = place[int(parent)]
                ax.annotate("", xy=(x, y + 0.22), xytext=(px, py - 0.22), arrowprops={"arrowstyle": "->", "color": "0.4"})
        row = by_id.loc[node]
        name = seed_names.get(row.hash) or row.operator
        value = f"{measure} {measured[node]:.3g}" if node in measured else "not measured"
        ax.text(x, y, f"#{node} {name}\n{value}", ha="center", va="center", fontsize=8,
                bbox={"boxstyle": "round", "fc": "#dbe9f6" if node == best_id else "white", "ec": "0.5"})
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.6, deepest + 0.6)
    ax.axis("off")
    ax.set_title(f"Ancestry of the best program #{best_id} (arrows: parent to child)")
    return _save(fig, path)


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name
