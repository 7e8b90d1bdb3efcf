"""Run every baseline on one model into one table (one row per method × sparsity)."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from .measure import Measured, load_and_measure
from .protocol import Protocol
from .prune import PruneConfig

# label -> (method, allocation); the order is the table's.
BASELINES = {
    "magnitude": ("magnitude", "uniform"),
    "wanda": ("wanda", "uniform"),
    "ria": ("ria", "uniform"),
    "sparsegpt": ("sparsegpt", "uniform"),
    "owl-wanda": ("wanda", "owl"),
    "alpha-wanda": ("wanda", "alpha"),     # AlphaPruning-style block sparsities (PruneConfig.alpha_lambda)
    "barber": ("barber", "uniform"),
}


@dataclass
class BaselineRun:
    label: str
    sparsity: float | None
    pattern: str | None

    @property
    def key(self) -> str:
        return f"{self.label}/{self.pattern or self.sparsity}"

    def config(self) -> PruneConfig | None:
        if self.label == "dense":
            return None
        check_labels([self.label])
        method, alloc = BASELINES[self.label]
        return PruneConfig(method=method, allocation=alloc, sparsity=self.sparsity or 0.0, pattern=self.pattern)


def check_labels(labels: list[str]) -> None:
    unknown = [label for label in labels if label not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}: choose from {', '.join(BASELINES)}")


def plan(labels: list[str], sparsities: list[float], patterns: list[str]) -> list[BaselineRun]:
    check_labels(labels)
    runs = [BaselineRun("dense", None, None)]
    for label in labels:
        runs += [BaselineRun(label, s, None) for s in sparsities]
        for p in patterns:
            cfg = BaselineRun(label, 0.0, p).config()
            try:
                cfg.validate()
            except ValueError:
                continue  # e.g. OWL or LLM-Barber with N:M: not defined, so no cell
            runs.append(BaselineRun(label, None, p))
    for run in runs:
        if run.config() is not None:
            run.config().validate()
    return runs


def table_row(run: BaselineRun, measured: Measured) -> dict:
    cfg, result = run.config(), measured.result
    return {"method": run.label, "pattern": run.pattern or "unstructured",
            "target_sparsity": cfg.target_sparsity if cfg else 0.0,
            "sparsity": result.sparsity if result else 0.0, "perplexity": measured.perplexity,
            "prune_seconds": measured.seconds, "model": measured.lm.name, **measured.data.describe()}


def run_baselines(model_spec: str, protocol: Protocol, labels: list[str], sparsities: list[float],
                  patterns: list[str], device=None, dtype=None, on_row=None,
                  done: dict[str, dict] | None = None) -> pd.DataFrame:
    """`done` maps BaselineRun.key -> an already measured row (from an interrupted run); those are not redone."""
    runs = plan(labels, sparsities, patterns)
    done = done or {}
    rows, data = [], None
    for run in runs:
        if run.key in done:
            rows.append(done[run.key])
            continue
        measured = load_and_measure(model_spec, protocol, run.config(), device=device, dtype=dtype, data=data)
        data = measured.data
        rows.append(table_row(run, measured))
        if on_row:
            on_row(run, rows[-1])
    return pd.DataFrame(rows)


def markdown_table(df: pd.DataFrame) -> str:
    """Methods as rows, one perplexity column per sparsity setting."""
    def column(row):
        return row["pattern"] if row["pattern"] != "unstructured" else f"{row['target_sparsity']:.0%}"
    df = df.assign(setting=df.apply(column, axis=1))
    dense = df[df.method == "dense"].perplexity
    body = df[df.method != "dense"]
    settings = list(dict.fromkeys(body.setting))
    lines = ["| method | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
    if len(dense):
        lines.append("| dense | " + " | ".join(f"{dense.iloc[0]:.2f}" for _ in settings) + " |")
    for method in dict.fromkeys(body.method):
        cells = []
        for s in settings:
            hit = body[(body.method == method) & (body.setting == s)]
            cells.append(f"{hit.perplexity.iloc[0]:.2f}" if len(hit) else "–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
