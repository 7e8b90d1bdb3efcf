"""Reproduce the README's baselines table: every baseline on the embedded SmolLM2-135M.

    python benchmarks/baselines.py                 # cpu protocol: 64×512 calibration, 32768 eval tokens
    python benchmarks/baselines.py --protocol paper
    python benchmarks/baselines.py --methods wanda,ria,owl-wanda,alpha-wanda,barber,sparsegpt \
        --sparsity 0.6,0.7 --patterns "" --tag high-sparsity   # the high-sparsity table

Writes benchmarks/results/baselines-<protocol>[-<tag>].{json,md} and, with --readme, replaces the
table between the README's `baselines` markers.
"""
from __future__ import annotations

import json
import platform
import re
import time
from dataclasses import asdict
from pathlib import Path

import click
import torch

from autoprune_ray.compress.baselines import markdown_table, run_baselines
from autoprune_ray.compress.protocol import preset

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parent.parent / "README.md"


def split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def environment() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"torch": torch.__version__, "python": platform.python_version(), "gpu": gpu,
            "cpu_threads": torch.get_num_threads()}


def update_readme(table: str, protocol: dict, command: str) -> None:
    text = README.read_text()
    block = (f"<!-- baselines:start -->\n{table}\n\nWikiText-style perplexity on held-out *Persuasion*; "
             f"calibration {protocol['nsamples']}×{protocol['seqlen']} tokens (seed {protocol['seed']}) from the other "
             f"five novels, evaluation on {protocol['eval_tokens']} held-out tokens. Reproduce with `{command}`.\n"
             "<!-- baselines:end -->")
    new, count = re.subn(r"<!-- baselines:start -->.*?<!-- baselines:end -->", block, text, flags=re.S)
    if count != 1:
        raise click.ClickException("README.md has no baselines markers")
    README.write_text(new)


@click.command()
@click.option("--protocol", "protocol_name", default="cpu", show_default=True)
@click.option("--methods", default="magnitude,wanda,ria,sparsegpt,owl-wanda,alpha-wanda,barber", show_default=True,
              help="Comma-separated baseline labels (compress.baselines.BASELINES).")
@click.option("--sparsity", default="0.5,0.7", show_default=True, help="Comma-separated unstructured sparsities.")
@click.option("--patterns", default="2:4", show_default=True, help="Comma-separated N:M patterns ('' for none).")
@click.option("--tag", default="", help="Suffix of the result files, so another table does not overwrite this one.")
@click.option("--readme", is_flag=True, help="Write the table into README.md.")
def main(protocol_name, methods, sparsity, patterns, tag, readme):
    proto = preset(protocol_name)
    start = time.time()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"baselines-{protocol_name}" + (f"-{tag}" if tag else "")
    # Rows are appended as they finish, so an interrupted benchmark resumes where it stopped.
    partial = RESULTS / f"{stem}.partial.jsonl"
    done = {}
    if partial.exists():
        done = {r["key"]: r["row"] for r in map(json.loads, partial.read_text().splitlines())
                if r["protocol"] == asdict(proto)}

    def on_row(run, row):
        print(f"{run.key}: ppl {row['perplexity']:.3f}", flush=True)
        with partial.open("a") as f:
            f.write(json.dumps({"key": run.key, "protocol": asdict(proto), "row": row}) + "\n")

    table = run_baselines("smollm2", proto, split(methods), [float(s) for s in split(sparsity)], split(patterns),
                          on_row=on_row, done=done)
    md = markdown_table(table)
    protocol = table.iloc[0][["calib_data", "eval_data", "nsamples", "seqlen", "seed", "calib_tokens",
                              "eval_tokens"]].to_dict()
    protocol = {k: (v.item() if hasattr(v, "item") else v) for k, v in protocol.items()}
    payload = {"protocol": protocol, "environment": environment(), "wall_seconds": time.time() - start,
               "rows": json.loads(table.to_json(orient="records"))}
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / f"{stem}.md").write_text(md + "\n")
    print(md)
    partial.unlink(missing_ok=True)
    if readme:
        update_readme(md, protocol, f"python benchmarks/baselines.py --protocol {protocol_name} --readme")


if __name__ == "__main__":
    main()
