"""Discovered programs re-measured as a skeptical user would: under a named protocol (sequential
statistics, held-out text the search never read), at each sparsity, beside the mask-only
baselines, on the search corpus and on a corpus no search read, with a second calibration seed.

    python benchmarks/discovered.py --programs benchmarks/results/discovered/best-70.py \\
        --sparsity 0.6,0.7 --corpora austen,fortunes --seeds 0,1 --protocol cpu

Writes benchmarks/results/discovered/measured-<protocol>.json (rows appended as they finish, so
an interrupted run resumes) and a Markdown table beside it.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import click

OUT = Path(__file__).parent / "results" / "discovered"


def configs(programs: list[str], baselines: list[str], sparsity: float) -> list[tuple[str, object]]:
    from autoprune_ray.engine.cli_compress import program_prune_config
    from autoprune_ray.operators.language import parse_file

    out = [(Path(p).name, program_prune_config(parse_file(Path(p).read_text()), "wanda", sparsity=sparsity))
           for p in programs]
    return out + [(name, baseline_config(name, sparsity)) for name in baselines]


def baseline_config(label: str, sparsity: float):
    """A baseline by its label; "owl-wanda@0.25" or "alpha-wanda@0.25" widens its allocation to the
    same spread (highest minus lowest sparsity) as a program's band allocation.lam = 0.25, so that
    a program's gain is not only a wider band. OWL's λ is half its spread (S ± λ)."""
    from autoprune_ray.compress.baselines import BaselineRun
    name, _, spread = label.partition("@")
    cfg = BaselineRun(name, sparsity, None).config()
    if not spread:
        return cfg
    if cfg.allocation not in ("owl", "alpha"):
        raise click.BadParameter(f"{label}: only owl-wanda and alpha-wanda take a spread")
    return replace(cfg, owl_lambda=float(spread) / 2, alpha_lambda=float(spread))


def markdown(rows: list[dict], level: str = "sparsity", reference: str = "wanda") -> str:
    """One row per measurement; "vs `reference`" (same corpus, seed and level) with a paired 95%
    bootstrap interval over the held-out windows where both rows kept their windows' NLL (the
    held-out sample's noise only)."""
    lines = [f"| corpus | seed | {level} | method | perplexity | vs {reference} (95% interval) |",
             "|---|---|---|---|---|---|"]
    refs = {(r["corpus"], r["seed"], r[level]): r for r in rows if r["method"] == reference}
    for r in sorted(rows, key=lambda r: (r["corpus"], r["seed"], r[level], r["perplexity"])):
        ref = refs.get((r["corpus"], r["seed"], r[level]))
        rel = versus(r, ref) if ref and r["method"] != reference else ""
        lines.append(f"| {r['corpus']} | {r['seed']} | {r[level]:g} | {r['method']} | {r['perplexity']:.2f} | {rel} |")
    return "\n".join(lines) + "\n"


def versus(row: dict, ref: dict) -> str:
    """Relative perplexity change of `row` against `ref`, with its paired interval when both
    rows have their windows."""
    from autoprune_ray.compress.eval import perplexity_ratio_interval
    text = f"{row['perplexity'] / ref['perplexity'] - 1:+.1%}"
    if row.get("window_nll") and ref.get("window_nll"):
        _, low, high = perplexity_ratio_interval(row["window_nll"], ref["window_nll"])
        text += f" ({low - 1:+.1%} to {high - 1:+.1%})"
    return text


def measure_grid(path: Path, level: str, levels: list, corpora: str, seeds: str, protocol_name: str, model: str,
                 configs_at, columns) -> list[dict]:
    """Every (corpus, calibration seed, level, config) measured once, `configs_at(level)` giving
    (label, config) pairs and `columns(cfg, measured)` the row's own columns. Rows are appended to
    `path` as they finish, so an interrupted run resumes; returns all of its rows."""
    from autoprune_ray.compress.measure import load_and_measure
    from autoprune_ray.compress.protocol import preset

    path.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    seen = {(r["corpus"], r["seed"], r[level], r["method"]) for r in done}
    for corpus in corpora.split(","):
        for seed in (int(s) for s in seeds.split(",")):
            protocol, data = replace(preset(protocol_name), calib_data=corpus, seed=seed), None
            for value in levels:
                for label, cfg in configs_at(value):
                    if (corpus, seed, value, label) in seen:
                        continue
                    measured = load_and_measure(model, protocol, cfg, data=data)
                    data = measured.data
                    row = {"corpus": corpus, "seed": seed, level: value, "method": label,
                           "perplexity": measured.perplexity, **columns(cfg, measured),
                           "seconds": measured.seconds, **data.describe(), "window_nll": measured.window_nll}
                    if not math.isfinite(row["perplexity"]):
                        raise FloatingPointError(f"{label}: perplexity is not finite")
                    with path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    done.append(row)
                    click.echo(f"{corpus} seed {seed} {level} {value:g} {label}: {row['perplexity']:.2f}", err=True)
    return done


@click.command()
@click.option("--programs", required=True, help="Comma-separated program files (metric, allocation or both).")
@click.option("--baselines", default="wanda,owl-wanda,alpha-wanda", show_default=True)
@click.option("--sparsity", "sparsities", default="0.7", show_default=True)
@click.option("--corpora", default="austen,fortunes", show_default=True)
@click.option("--seeds", default="0", show_default=True, help="Calibration seeds.")
@click.option("--protocol", "protocol_name", default="cpu", show_default=True)
@click.option("--model", default="smollm2", show_default=True)
def main(programs, baselines, sparsities, corpora, seeds, protocol_name, model):
    path = OUT / f"measured-{protocol_name}.jsonl"
    done = measure_grid(path, "sparsity", [float(s) for s in sparsities.split(",")], corpora, seeds, protocol_name,
                        model, lambda sparsity: configs(programs.split(","), baselines.split(","), sparsity),
                        lambda cfg, measured: {"achieved": measured.result.sparsity, "band": (
                            cfg.allocation_lambda if cfg.allocation == "program" else None)})
    (OUT / f"measured-{protocol_name}.md").write_text(markdown(done))
    click.echo(markdown(done))


if __name__ == "__main__":
    main()
