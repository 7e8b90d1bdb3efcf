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

from pathlib import Path

import click
from discovered import OUT, markdown, measure_grid

METHODS = ("uniform", "hawq", "aptq")


def configs(programs: list[str], methods: list[str], budget: int, quantizer: str,
            act_order: bool = False) -> list[tuple[str, object]]:
    from autoprune_ray.compress.quantize import QuantConfig
    from autoprune_ray.operators.language import parse

    common = {"as_uniform": budget, "quantizer": quantizer, "gptq_act_order": act_order}
    out = [(Path(p).name, QuantConfig(method="program", program=parse(Path(p).read_text(), "mpq").tree, **common))
           for p in programs]
    out += [(m, QuantConfig(method=m, **common)) for m in methods if m != "dense"]
    # "dense" is the unquantized model on the same held-out windows: the floor every row is read against
    return [(label, cfg.validate()) for label, cfg in out] + [("dense", None)] * ("dense" in methods)


def row_columns(quantizer: str):
    def columns(cfg, measured) -> dict:
        if cfg is None:
            return {"quantizer": None, "gptq_mode": None, "avg_bits": None, "histogram": {}}
        return {"quantizer": quantizer, "gptq_mode": cfg.gptq_mode if quantizer == "gptq" else None,
                "gptq_act_order": cfg.gptq_act_order,
                "avg_bits": measured.result.avg_bits,
                "histogram": {str(b): n for b, n in measured.result.histogram.items()}}
    return columns


@click.command()
@click.option("--programs", default="", help="Comma-separated sensitivity-proxy files (task mpq).")
@click.option("--methods", default=",".join(METHODS), show_default=True, help="Also: dense (unquantized).")
@click.option("--budgets", default="3", show_default=True, help="Each budget is what uniform B-bit costs.")
@click.option("--corpora", default="austen,fortunes", show_default=True)
@click.option("--seeds", default="0", show_default=True, help="Calibration seeds.")
@click.option("--protocol", "protocol_name", default="cpu", show_default=True)
@click.option("--quantizer", type=click.Choice(["rtn", "gptq"]), default="gptq", show_default=True)
@click.option("--act-order", is_flag=True, help="GPTQ with act-order (rows go to a -act file of their own).")
@click.option("--model", default="smollm2", show_default=True)
def main(programs, methods, budgets, corpora, seeds, protocol_name, quantizer, act_order, model):
    stem = OUT / f"mpq-measured-{protocol_name}-{quantizer}{'-act' * act_order}"
    done = measure_grid(stem.with_suffix(".jsonl"), "budget", [int(b) for b in budgets.split(",")], corpora, seeds,
                        protocol_name, model,
                        lambda budget: configs([p for p in programs.split(",") if p],
                                               [m for m in methods.split(",") if m], budget, quantizer, act_order),
                        row_columns(quantizer))
    stem.with_suffix(".md").write_text(markdown(done, level="budget", reference="uniform"))
    click.echo(markdown(done, level="budget", reference="uniform"))


if __name__ == "__main__":
    main()
