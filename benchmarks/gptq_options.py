"""Uniform-bit GPTQ with its options against round-to-nearest, as `quantize` runs it (sequential
protocol): act-order and the damping, on the held-out windows, each row against RTN with a paired
interval over the windows.

    python benchmarks/gptq_options.py --bits 4,3 --variants rtn,gptq,gptq+act,gptq@0.1 --protocol cpu

A variant is `rtn`, or `gptq` with `+act` (act-order) and `@DAMP` (default 0.01). Writes
benchmarks/results/gptq-options-<protocol>.jsonl (rows appended as they finish, so an interrupted
run resumes) and a Markdown table beside it.
"""
from __future__ import annotations

from pathlib import Path

import click
from discovered import markdown, measure_grid

OUT = Path(__file__).parent / "results"


def variant_config(variant: str, bits: int):
    """`rtn`, `gptq`, `gptq+act`, `gptq@0.1` or `gptq+act@0.1` as a uniform-bits QuantConfig."""
    from autoprune_ray.compress.quantize import QuantConfig
    name, _, damp = variant.partition("@")
    quantizer, _, flag = name.partition("+")
    if quantizer not in ("rtn", "gptq") or flag not in ("", "act") or (quantizer == "rtn" and (flag or damp)):
        raise click.BadParameter(f"{variant}: write rtn, or gptq with +act and/or @DAMP")
    return QuantConfig(method="uniform", as_uniform=bits, quantizer=quantizer, gptq_act_order=flag == "act",
                       gptq_damp=float(damp) if damp else 0.01).validate()


@click.command()
@click.option("--bits", default="4", show_default=True, help="Uniform bit widths.")
@click.option("--variants", default="rtn,gptq,gptq+act", show_default=True)
@click.option("--corpora", default="austen", show_default=True)
@click.option("--seeds", default="0", show_default=True, help="Calibration seeds.")
@click.option("--protocol", "protocol_name", default="cpu", show_default=True)
@click.option("--model", default="smollm2", show_default=True)
def main(bits, variants, corpora, seeds, protocol_name, model):
    stem = OUT / f"gptq-options-{protocol_name}"
    names = variants.split(",")
    done = measure_grid(stem.with_suffix(".jsonl"), "bits", [int(b) for b in bits.split(",")], corpora, seeds,
                        protocol_name, model, lambda b: [(v, variant_config(v, b)) for v in names],
                        lambda cfg, measured: {"label": cfg.label, "gptq_act_order": cfg.gptq_act_order,
                                               "gptq_damp": cfg.gptq_damp, "avg_bits": measured.result.avg_bits})
    stem.with_suffix(".md").write_text(markdown(done, level="bits", reference="rtn"))
    click.echo(markdown(done, level="bits", reference="rtn"))


if __name__ == "__main__":
    main()
