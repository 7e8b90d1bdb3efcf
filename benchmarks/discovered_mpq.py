"""A discovered mixed-precision proxy re-measured as a skeptical user would: `quantize`'s own path
(sequential GPTQ by default), beside uniform bits, HAWQ and APTQ-style with the same quantizer in
every row, on the search corpus and on a corpus no search read, with a second calibration seed.

    python benchmarks/discovered_mpq.py --programs benchmarks/results/discovered/mpq-3bit.py \\
        --budgets 3 --corpora austen,fortunes --seeds 0,1 --protocol cpu --quantizer gptq

Writes benchmarks/results/discovered/mpq-measured-<protocol>-<quantizer>.jsonl (rows appended as
they finish, so an interrupted run resumes) and a Markdown table beside it, each row against
uniform bits at the same budget with a paired interval over the held-out windows.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import click

from discovered import OUT, markdown

METHODS = ("uniform", "hawq", "aptq")


def configs(programs: list[str], methods: list[str], budget: int, quantizer: str) -> list[tuple[str, object]]:
    from autoprune_ray.compress.quantize import QuantConfig
    from autoprune_ray.operators.language import parse

    common = {"as_uniform": budget, "quantizer": quantizer}
    out = [(Path(p).name, QuantConfig(method="program", program=parse(Path(p).read_text(), "mpq").tree, **common))
           for p in programs]
    return out + [(m, QuantConfig(method=m, **common)) for m in methods]


@click.command()
@click.option("--programs", default="", help="Comma-separated sensitivity-proxy files (task mpq).")
@click.option("--methods", default=",".join(METHODS), show_default=True)
@click.option("--budgets", default="3", show_default=True, help="Each budget is what uniform B-bit costs.")
@click.option("--corpora", default="austen,fortunes", show_default=True)
@click.option("--seeds", default="0", show_default=True, help="Calibration seeds.")
@click.option("--protocol", "protocol_name", default="cpu", show_default=True)
@click.option("--quantizer", type=click.Choice(["rtn", "gptq"]), default="gptq", show_default=True)
@click.option("--model", default="smollm2", show_default=True)
def main(programs, methods, budgets, corpora, seeds, protocol_name, quantizer, model):
    from autoprune_ray.compress.measure import load_and_measure
    from autoprune_ray.compress.protocol import preset

    OUT.mkdir(parents=True, exist_ok=True)
    stem = OUT / f"mpq-measured-{protocol_name}-{quantizer}"
    path = stem.with_suffix(".jsonl")
    done = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    seen = {(r["corpus"], r["seed"], r["budget"], r["method"]) for r in done}
    for corpus in corpora.split(","):
        for seed in (int(s) for s in seeds.split(",")):
            protocol, data = replace(preset(protocol_name), calib_data=corpus, seed=seed), None
            for budget in (int(b) for b in budgets.split(",")):
                for label, cfg in configs([p for p in programs.split(",") if p], methods.split(","), budget,
                                          quantizer):
                    if (corpus, seed, budget, label) in seen:
                        continue
                    measured = load_and_measure(model, protocol, cfg.validate(), data=data)
                    data, result = measured.data, measured.result
                    row = {"corpus": corpus, "seed": seed, "budget": budget, "method": label,
                           "quantizer": quantizer, "gptq_mode": cfg.gptq_mode if quantizer == "gptq" else None,
                           "perplexity": measured.perplexity, "avg_bits": result.avg_bits,
                           "histogram": {str(b): n for b, n in result.histogram.items()},
                           "seconds": measured.seconds, **data.describe(), "window_nll": measured.window_nll}
                    if not math.isfinite(row["perplexity"]):
                        raise FloatingPointError(f"{label}: perplexity is not finite")
                    with path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    done.append(row)
                    click.echo(f"{corpus} seed {seed} {budget}-bit {label}: {row['perplexity']:.2f}", err=True)
    stem.with_suffix(".md").write_text(markdown(done, level="budget", reference="uniform"))
    click.echo(markdown(done, level="budget", reference="uniform"))


if __name__ == "__main__":
    main()
