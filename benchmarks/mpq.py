"""Mixed-precision quantization of the embedded SmolLM2-135M at 3- and 4-bit budgets: uniform bits,
HAWQ (Gram and Hutchinson traces), APTQ-style attention-aware sensitivity, and TAP proxies (the
best a search discovered, and the expert seeds written in the candidate language).

    python benchmarks/mpq.py --program runs/mpq:best          # cpu protocol, 3- and 4-bit budgets

A budget counts each group's fp16 scale and zero, and equals exactly what uniform 3-bit (4-bit)
costs the model: 3.27 (4.27) bits per weight on SmolLM2, whose 576-wide layers hold 4.5 groups of
128. Every method's sensitivity table is computed once on the dense
model and allocated (exact ILP) at each budget; rounding is RTN unless --quantizer gptq, which here
runs on the dense model's one-pass Gram matrices (as a search's fitness does; `quantize` defaults
to GPTQ's sequential protocol, see benchmarks/results/gptq-check.json). Each
table's rank correlation with the measured per-layer sensitivity (held-out NLL increase with one
layer at --measure-bits, the rest dense) is recorded too. Writes benchmarks/results/mpq-<protocol>.json.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click
import torch

from autoprune_ray.compress.data import load_token_data
from autoprune_ray.compress.eval import perplexity
from autoprune_ray.compress.models import load_model
from autoprune_ray.compress.protocol import preset
from autoprune_ray.compress.quantize import QuantConfig, allocate_bits, apply_bits, layer_sizes, sensitivity_table
from autoprune_ray.compress import bits as bitalloc
from autoprune_ray.compress.sensitivity import measured_sensitivity, quant_layers, rank_correlation, sample_layers
from autoprune_ray.compress.stats import calibration_stats
from autoprune_ray.operators.language import parse
from autoprune_ray.operators.seeds import SENSITIVITY_SEEDS

RESULTS = Path(__file__).parent / "results"


def discovered_program(spec: str) -> tuple[str, str]:
    """(label, code) of RUN_DIR:best (the best non-seed proxy of an mpq run) or a program file."""
    if spec.endswith(":best"):
        from autoprune_ray.engine.report import best_row, load_tables
        _, cands, evals = load_tables(spec[:-5])
        best = best_row(cands, evals, discovered_only=True)
        if best is None:
            raise click.ClickException(f"{spec[:-5]} has no evaluated discovered proxy")
        return f"best discovered (#{int(best.candidate_id)}, {best.operator})", best.code
    return f"program {Path(spec).name}", Path(spec).read_text()


def methods(program: str | None, seeds: bool) -> list[tuple[str, dict]]:
    rows = [("uniform", {"method": "uniform"}), ("hawq (gram)", {"method": "hawq"}),
            ("hawq (hutchinson)", {"method": "hawq", "hessian": "hutchinson"}), ("aptq-style", {"method": "aptq"})]
    if seeds:
        rows += [(f"seed {name}", {"method": "program", "program": parse(src, "mpq").tree})
                 for name, src in SENSITIVITY_SEEDS.items() if name != "hawq"]   # hawq is the row above
    if program:
        label, code = discovered_program(program)
        rows.append((label, {"method": "program", "program": parse(code, "mpq").tree, "code": code}))
    return rows


def merged_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """The earlier rows with those re-measured now replaced in place (same method and budget)."""
    fresh = {(r["method"], r["as_uniform"]): r for r in new}
    kept = [fresh.pop((r["method"], r["as_uniform"]), r) for r in old]
    return kept + list(fresh.values())


@click.command()
@click.option("--protocol", "protocol_name", default="cpu", show_default=True)
@click.option("--budgets", default="3,4", show_default=True,
              help="Bit widths: each budget is what uniform quantization at that width costs.")
@click.option("--program", default=None, help="RUN_DIR:best of an mpq search, or a proxy file.")
@click.option("--seeds/--no-seeds", default=True, show_default=True, help="Also the other expert seed proxies.")
@click.option("--quantizer", type=click.Choice(["rtn", "gptq"]), default="rtn", show_default=True)
@click.option("--measure-layers", default=32, show_default=True)
@click.option("--measure-bits", default=2, show_default=True)
@click.option("--measure-tokens", default=4096, show_default=True)
@click.option("--only", default=None,
              help="Comma-separated label prefixes of the methods to measure (e.g. 'uniform,best').")
@click.option("--update", is_flag=True, help="Replace those rows in the existing results file; keep the rest.")
def main(protocol_name, budgets, program, seeds, quantizer, measure_layers, measure_bits, measure_tokens, only,
         update):
    proto = preset(protocol_name)
    budgets = [int(b) for b in budgets.split(",")]
    start = time.time()
    lm = load_model("smollm2", device="cpu")
    data = load_token_data(lm.tokenizer, proto.calib_data, proto.eval_data, proto.nsamples, proto.seqlen,
                           proto.seed, proto.eval_tokens)
    layers = quant_layers(lm.model)
    dense = [layer.linear.weight.data.clone() for layer in layers]
    sizes = layer_sizes(layers)
    stats = calibration_stats(lm, data, "one-pass", with_gram=True)
    out = RESULTS / f"mpq-{protocol_name}{'-gptq' if quantizer == 'gptq' else ''}.json"
    previous = json.loads(out.read_text()) if update and out.exists() else None
    if previous and previous["protocol"] != json.loads(json.dumps(data.describe())):
        raise click.ClickException(f"{out} was measured under another protocol; drop --update")
    sample = sample_layers(len(layers), measure_layers)
    if previous:   # the same model, data and sample: dense and measured values are deterministic
        dense_ppl, measured = previous["dense_perplexity"], previous["measured"]["nll_increase"]
    else:
        dense_ppl = perplexity(lm, data.evaluation, data.seqlen)
        measured = measured_sensitivity(lm, data.evaluation[:, :measure_tokens], data.seqlen, sample,
                                        measure_bits, 128)
    rows = []
    wanted = [w.strip() for w in only.split(",")] if only else []
    chosen_methods = [(label, spec) for label, spec in methods(program, seeds)
                      if not wanted or any(label.startswith(w) for w in wanted)]
    for label, spec in chosen_methods:
        code = spec.pop("code", None)
        cfg = QuantConfig(group_size=128, quantizer=quantizer, gptq_mode="one-pass", **spec).validate()
        t0 = time.time()
        table = sensitivity_table(lm, data, cfg, layers, stats)
        seconds = time.time() - t0
        rho, tau = (rank_correlation([float(table[i, list(cfg.choices).index(measure_bits)]) for i in sample],
                                     measured) if table is not None else (math.nan, math.nan))
        for budget in budgets:
            cfg.as_uniform = budget
            chosen = allocate_bits(table, cfg, sizes)
            apply_bits(layers, chosen, cfg, stats, dense)
            ppl = perplexity(lm, data.evaluation, data.seqlen)
            for layer, w in zip(layers, dense):
                layer.linear.weight.data.copy_(w)
            rows.append({"method": label, "as_uniform": budget, "budget": float(cfg.budget(sizes)),
                         "avg_bits": bitalloc.average_bits(sizes, chosen, 128),
                         "bits": {b: chosen.count(b) for b in cfg.choices}, "perplexity": ppl,
                         "spearman": rho, "kendall": tau, "sensitivity_seconds": seconds, "code": code})
            click.echo(f"{label:40s} budget {rows[-1]['budget']:.4f}  avg {rows[-1]['avg_bits']:.4f}  ppl {ppl:10.3f}  "
                       f"rho {rho:.3f}  {rows[-1]['bits']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if previous:
        rows = merged_rows(previous["rows"], rows)
    out.write_text(json.dumps({
        "model": lm.name, "protocol": data.describe(), "group_size": 128, "quantizer": quantizer,
        "gptq_mode": "one-pass" if quantizer == "gptq" else None,
        "dense_perplexity": dense_ppl, "measured": {"layers": [layers[i].key for i in sample], "bits": measure_bits,
                                                    "tokens": measure_tokens, "nll_increase": measured},
        "rows": rows, "seconds": time.time() - start, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "gpu": None}, indent=2, default=str))
    click.echo(f"written to {out}")


if __name__ == "__main__":
    main()
