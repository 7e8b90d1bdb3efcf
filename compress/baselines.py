"""Run every baseline on one model into one table (one row per method × sparsity)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd

from .data import TokenData, load_token_data
from .eval import perplexity
from .models import load_model
from .protocol import Protocol
from .prune import PruneConfig, prune_model

# label -> (method, allocation); the order is the table's.
BASELINES = {
    "magnitude": ("magnitude", "uniform"),
    "wanda": ("wanda", "uniform"),
    "ria": ("ria", "uniform"),
    "sparsegpt": ("sparsegpt", "uniform"),
    "owl-wanda": ("wanda", "owl"),
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
        method, alloc = BASELINES[self.label]
        return PruneConfig(method=method, allocation=alloc, sparsity=self.sparsity or 0.0, pattern=self.pattern)


def plan(labels: list[str], sparsities: list[float], patterns: list[str]) -> list[BaselineRun]:
    unknown = [l for l in labels if l not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}: choose from {', '.join(BASELINES)}")
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


def run_one(model_spec: str, data: TokenData, run: BaselineRun, device=None, dtype=None) -> dict:
    lm = load_model(model_spec, device=device, dtype=dtype)
    cfg = run.config()
    start = time.perf_counter()
    result = prune_model(lm, data, cfg) if cfg else None
    prune_seconds = time.perf_counter() - start
    ppl = perplexity(lm, data.evaluation, data.seqlen)
    return {"method": run.label, "pattern": run.pattern or "unstructured",
            "target_sparsity": cfg.target_sparsity if cfg else 0.0,
            "sparsity": result.sparsity if result else 0.0, "perplexity": ppl,
            "prune_seconds": prune_seconds, "model": lm.name, **data.describe()}


def run_baselines(model_spec: str, protocol: Protocol, labels: list[str], sparsities: list[float],
                  patterns: list[str], device=None, dtype=None, on_row=None,
                  done: dict[str, dict] | None = None) -> pd.DataFrame:
    """`done` maps BaselineRun.key -> an already measured row (from an interrupted run); those are not redone."""
    runs = plan(labels, sparsities, patterns)
    done = done or {}
    lm = load_model(model_spec, device=device, dtype=dtype)
    data = load_token_data(lm.tokenizer, protocol.calib_data, protocol.eval_data, protocol.nsamples,
                           protocol.seqlen, protocol.seed, protocol.eval_tokens)
    del lm
    rows = []
    for run in runs:
        if run.key in done:
            rows.append(done[run.key])
            continue
        rows.append(run_one(model_spec, data, run, device, dtype))
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
