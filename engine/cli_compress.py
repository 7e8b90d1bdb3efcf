"""The compression commands: prune, quantize or run every baseline on one model under one
calibration and evaluation protocol, and check a candidate program."""
from __future__ import annotations

import json
from pathlib import Path

import click

from autoprune_ray.compress import protocol as protocols
from autoprune_ray.engine.cli_common import clear_errors

# compress.prune.METHODS but "program" (it comes with --program); named here so that the CLI
# starts without importing torch (tests/test_cli.py keeps the two in step)
BASELINE_METHODS = ("magnitude", "wanda", "ria", "sparsegpt", "barber")
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def protocol_options(func):
    """Shared options: model, corpora and calibration/evaluation sizes."""
    options = [
        click.option("--model", default="smollm2", show_default=True,
                     help="'smollm2' (embedded), a local HF directory or a hub id."),
        click.option("--data", "calib_data", default=None, help="Calibration corpus: austen (offline default), "
                     "wikitext2, c4, or a .txt/.jsonl/.parquet file."),
        click.option("--eval-data", default=None, help="Evaluation corpus (default: held-out split of --data)."),
        click.option("--protocol", "protocol_name", default="cpu", show_default=True,
                     type=click.Choice(sorted(protocols.PRESETS)),
                     help="Size preset: paper (128×2048, full split), cpu (64×512, 32768 eval tokens), smoke."),
        click.option("--nsamples", type=int, default=None, help="Calibration windows (overrides the preset)."),
        click.option("--seqlen", type=int, default=None, help="Tokens per window (overrides the preset)."),
        click.option("--seed", type=int, default=None, help="Calibration sampling seed (preset: 0)."),
        click.option("--eval-tokens", type=int, default=None, help="Cap on held-out tokens (overrides the preset)."),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)."),
        click.option("--dtype", type=click.Choice(sorted(DTYPES)), default=None,
                     help="Weights dtype (default: fp32 on CPU, bf16/fp16 on GPU)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def torch_dtype(name):
    import torch
    return getattr(torch, DTYPES[name]) if name else None


def measure_args(model, device, dtype, protocol_name, **sizes) -> dict:
    """protocol_options' values as load_and_measure's arguments (model, protocol, device, dtype)."""
    protocol = protocols.preset(protocol_name).with_overrides(**sizes)
    return {"model": model, "protocol": protocol, "device": device, "dtype": torch_dtype(dtype)}


def measure_and_show(cfg, save, report_name: str, as_json: bool, show_tables, **options) -> None:
    """Compress and measure as protocol_options say; with `save`, export the model and its report;
    print the report as JSON, or as the tables `show_tables(measured)` prints."""
    from autoprune_ray.compress.export import save_pruned
    from autoprune_ray.compress.measure import load_and_measure

    measured = load_and_measure(cfg=cfg, **measure_args(**options))
    report = {**measured.result.to_dict(), "perplexity": measured.perplexity, "model": measured.lm.name,
              "protocol": measured.data.describe(), "window_nll": measured.window_nll}
    if save:
        save_pruned(measured.lm, save, report, report_name)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    show_tables(measured)
    if save:
        click.echo(f"saved to {save}")


def load_program(path: str, granularity: str, task: str | None = None):
    """A program file, or RUN_DIR:best for the best program a search found. task None: a pruning
    file whose functions say what it is (a metric, an allocation, or both: tasks prune, allocate,
    joint)."""
    from autoprune_ray.operators.language import CandidateError, parse, parse_file
    from autoprune_ray.tasks import get_task
    if best_of_run(path):
        return best_program(best_of_run(path), granularity, task)
    if not Path(path).exists():
        raise FileNotFoundError(f"program file {path} does not exist")
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    try:
        # strict: a file holds its function(s) and nothing else (top-level statements are rejected)
        cand = parse_file(text, granularity) if task is None else parse(text, task, granularity, strict=True)
    except CandidateError as exc:
        raise click.ClickException(f"program rejected: {exc}") from None
    plugin = get_task(cand.task)
    if task is None and not plugin.leveled:   # not applied at a sparsity: not a pruning program
        raise click.ClickException(f"{path} is a program of task {cand.task}: apply it with "
                                   f"`autoprune-ray {plugin.apply_command} --program {path}`")
    return cand


def best_of_run(path: str | None) -> str | None:
    """The run directory of RUN_DIR:best, else None (a program file)."""
    return path[:-5] if path and path.endswith(":best") and Path(path[:-5]).is_dir() else None


def program_band(path: str | None) -> float:
    """The band an allocation program is applied with: the one its search ran with (RUN_DIR:best),
    else the default, which is the search configs' (a program file's docstring says its band)."""
    from autoprune_ray.compress.prune import PruneConfig
    if best_of_run(path):
        from autoprune_ray.engine.report import open_run
        # a run directory written before the band was saved ran with the old default, 0.16
        return float(open_run(best_of_run(path))[0].get("allocation", {}).get("lam", 0.16))
    return PruneConfig.allocation_lambda


def best_program(run_dir: str, granularity: str, task: str | None):
    from autoprune_ray.engine.report import best_row, open_run
    from autoprune_ray.operators.language import parse

    from autoprune_ray.operators.language import TASK_PARTS

    config, plugin, store = open_run(run_dir)
    pruning = set(TASK_PARTS[plugin.name]) <= {"prune", "allocate"}   # a metric, an allocation, or both
    if (task is None and not pruning) or (task is not None and plugin.name != task):
        raise click.ClickException(f"{run_dir} searched task {plugin.name!r}, not {task or 'a pruning task'}")
    best = best_row(store.read("candidates"), store.read("evaluations"), promotions=store.read("promotions"),
                    config=config)
    if best is None:
        raise click.ClickException(f"{run_dir} has no evaluated program yet")
    return parse(best.code, plugin.name, best.granularity or granularity)


def program_prune_config(program, method: str, **settings):
    """The PruneConfig that applies a metric, an allocation (with `method` as its metric), or both."""
    from autoprune_ray.compress.prune import PruneConfig
    metric, allocation = program.parts.get("prune"), program.parts.get("allocate")   # by language, not task
    if allocation is not None:
        settings["allocation"] = "program"
    return PruneConfig(method="program" if metric is not None else method, program=metric,
                       granularity=program.granularity, allocation_program=allocation,
                       name=f"program {program.hash[:8]}", **settings)


def parse_sparsities(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None
    for v in values:
        if not 0 <= v < 1:
            raise click.BadParameter(f"sparsity {v} is outside [0, 1)")
    return values


def parse_bits(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of bit widths") from None


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


@click.command()
@click.option("--method", default="wanda", show_default=True, type=click.Choice(BASELINE_METHODS),
              help="A baseline (barber: LLM-Barber). A program file comes with --program.")
@click.option("--program", "program_file", default=None,
              help="A pruning program file or RUN_DIR:best: a metric (`def score(W, A, ...)`, overrides --method), "
                   "an allocation (`def allocate(outlier, ...)`, overrides --allocation), or both in one file.")
@click.option("--granularity", default="row", show_default=True, help="For --program: row or layer selection.")
@click.option("--sparsity", type=float, default=0.5, show_default=True, help="Target share of pruned weights.")
@click.option("--pattern", default=None, help="N:M semi-structured pattern, e.g. 2:4 or 4:8.")
@click.option("--allocation", default="uniform", show_default=True,
              help="Layer-wise allocation: uniform, owl or alpha (AlphaPruning-style).")
@click.option("--allocation-lambda", type=float, default=None,
              help="For an allocation program: its layers' sparsities lie within sparsity ± λ "
                   "[default: the run's allocation.lam for RUN_DIR:best, else 0.25].")
@click.option("--alpha-lambda", type=float, default=0.1, show_default=True,
              help="AlphaPruning-style allocation: block sparsities within sparsity ± λ.")
@click.option("--owl-lambda", type=float, default=0.08, show_default=True, help="OWL range λ.")
@click.option("--owl-m", type=float, default=5.0, show_default=True, help="OWL outlier threshold M.")
@click.option("--mode", default="sequential", show_default=True,
              help="Statistics: sequential (Wanda protocol) or one-pass (dense, cached).")
@protocol_options
@click.option("--save", type=click.Path(file_okay=False), default=None, help="Write the pruned model (HF format) here.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a table.")
@clear_errors
def prune(method, program_file, granularity, sparsity, pattern, allocation, allocation_lambda, alpha_lambda,
          owl_lambda, owl_m, mode, save, as_json, **options):
    """Prune a model with one baseline or a program file and report its perplexity.

    \b
    Examples:
      autoprune-ray prune --method wanda --sparsity 0.5
      autoprune-ray prune --method sparsegpt --pattern 2:4 --save pruned/
      autoprune-ray prune --method wanda --allocation owl --sparsity 0.7
      autoprune-ray prune --program benchmarks/results/discovered/best-70.py --sparsity 0.7 --data fortunes
      autoprune-ray prune --model meta-llama/Llama-2-7b-hf --data c4 --eval-data wikitext2 --protocol paper
    """
    from autoprune_ray.compress.prune import PruneConfig

    if allocation_lambda is None:
        allocation_lambda = program_band(program_file)
    settings = dict(sparsity=sparsity, pattern=pattern, allocation=allocation, mode=mode, owl_lambda=owl_lambda,
                    owl_m=owl_m, allocation_lambda=allocation_lambda, alpha_lambda=alpha_lambda)
    if program_file:
        cfg = program_prune_config(load_program(program_file, granularity), method, **settings).validate()
    else:
        cfg = PruneConfig(method=method, **settings).validate()
    measure_and_show(cfg, save, "pruning.json", as_json, show_pruning, **options)


def show_pruning(measured) -> None:
    result, cfg = measured.result, measured.result.config
    print_table([{"method": cfg.label, "target": f"{cfg.target_sparsity:.2%}", "achieved": f"{result.sparsity:.4%}",
                  "perplexity": f"{measured.perplexity:.3f}", "seconds": f"{result.seconds:.1f}"}],
                title=measured.lm.name)
    d = measured.data.describe()
    click.echo(f"calibration {d['nsamples']}×{d['seqlen']} tokens of {d['calib_data']} (seed {d['seed']}); "
               f"evaluation {d['eval_tokens']} held-out tokens of {d['eval_data']}")


@click.command()
@click.option("--sparsity", "sparsities", default="0.5,0.7", show_default=True,
              help="Comma-separated unstructured sparsities.")
@click.option("--patterns", default="2:4", show_default=True, help="Comma-separated N:M patterns ('' for none).")
@click.option("--methods", default="magnitude,wanda,ria,sparsegpt,owl-wanda,barber", show_default=True,
              help="Comma-separated baselines.")
@protocol_options
@click.option("--out", type=click.Path(dir_okay=False), default="baselines.parquet", show_default=True,
              help="Parquet file for the table.")
@clear_errors
def baselines(sparsities, patterns, methods, out, **options):
    """Run every baseline on one model into one table (Markdown on screen, Parquet on disk).

    \b
    Examples:
      autoprune-ray baselines --sparsity 0.5,0.6,0.7
      autoprune-ray baselines --methods wanda,sparsegpt --patterns 2:4,4:8 --out table.parquet
    """
    from autoprune_ray.compress.baselines import markdown_table, run_baselines

    args = measure_args(**options)
    table = run_baselines(args.pop("model"), args.pop("protocol"), split_list(methods), parse_sparsities(sparsities),
                          split_list(patterns), **args,
                          on_row=lambda run, r: click.echo(f"{r['method']} {r['pattern']} {r['target_sparsity']:.2f}: "
                                                      f"ppl {r['perplexity']:.3f}", err=True))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out)
    click.echo(markdown_table(table))
    click.echo(f"\nwritten to {out}")


@click.command()
@click.option("--method", default="hawq", show_default=True, type=click.Choice(["uniform", "hawq", "aptq"]),
              help="uniform bits, HAWQ (Hessian trace × quantization error) or APTQ-style (attention-aware).")
@click.option("--program", "program_file", default=None,
              help="A sensitivity proxy (Python file, `def sensitivity(E, H, ...)`) or RUN_DIR:best of an mpq "
                   "search; overrides --method.")
@click.option("--avg-bits", type=float, default=3.25, show_default=True,
              help="Budget: average bits per weight, each group's fp16 scale and zero included "
                   "(uniform 3-bit at group 128 costs 3.25).")
@click.option("--as-uniform", type=int, default=None,
              help="Instead of --avg-bits: the budget is what uniform B-bit quantization costs this model.")
@click.option("--group-size", type=int, default=128, show_default=True)
@click.option("--bits", "choices", default="2,3,4,8", show_default=True, help="Bit widths a layer may get.")
@click.option("--allocator", type=click.Choice(["ilp", "greedy"]), default="ilp", show_default=True)
@click.option("--quantizer", type=click.Choice(["rtn", "gptq"]), default="rtn", show_default=True)
@click.option("--gptq-mode", type=click.Choice(["sequential", "one-pass"]), default="sequential", show_default=True,
              help="GPTQ's calibration: each block on the quantized blocks' outputs (upstream), or the dense model's.")
@click.option("--act-order", is_flag=True,
              help="GPTQ: round columns by decreasing input energy (upstream's actorder, static group grids).")
@click.option("--gptq-damp", type=float, default=0.01, show_default=True,
              help="GPTQ: damping added to the Hessian diagonal, as a fraction of its mean.")
@click.option("--hessian", type=click.Choice(["gram", "hutchinson"]), default="gram", show_default=True,
              help="HAWQ's trace: the layer-output Hessian X Xᵀ, or Hutchinson on the LM loss.")
@protocol_options
@click.option("--save", type=click.Path(file_okay=False), default=None,
              help="Write the (fake-)quantized model (HF format) here.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a table.")
@clear_errors
def quantize(method, program_file, avg_bits, as_uniform, group_size, choices, allocator, quantizer, gptq_mode,
             act_order, gptq_damp, hessian, save, as_json, **options):
    """Mixed-precision weight-only quantization under an average-bits budget; prints perplexity, the
    achieved average bits and the per-layer bits.

    \b
    Examples:
      autoprune-ray quantize --method hawq --avg-bits 3.25
      autoprune-ray quantize --method aptq --as-uniform 4 --quantizer gptq --save q4/
      autoprune-ray quantize --program runs/mpq:best --avg-bits 3.25
    """
    from autoprune_ray.compress.quantize import QuantConfig

    program = load_program(program_file, "row", "mpq") if program_file else None
    cfg = QuantConfig(method="program" if program else method, avg_bits=avg_bits, as_uniform=as_uniform,
                      group_size=group_size,
                      choices=parse_bits(choices), allocator=allocator, quantizer=quantizer, gptq_mode=gptq_mode,
                      gptq_act_order=act_order, gptq_damp=gptq_damp, hessian=hessian,
                      program=program.tree if program else None).validate()
    measure_and_show(cfg, save, "quantization.json", as_json, show_quantization, **options)


def show_quantization(measured) -> None:
    result = measured.result
    print_table([{"method": result.config.label, "budget": f"{result.budget:.4f}", "achieved": f"{result.avg_bits:.4f}",
                  "bits": " ".join(f"{b}:{n}" for b, n in result.histogram.items()),
                  "perplexity": f"{measured.perplexity:.3f}", "seconds": f"{result.seconds:.1f}"}],
                title=measured.lm.name)
    print_table(bits_by_block(result.layers, result.bits), title="bits per layer")


class TaskChoice(click.Choice):
    """The registered tasks, read only when `check` parses or shows its --task: the registry
    imports every plug-in (scipy, the evaluators), which no other command should wait for."""

    def __init__(self):   # no fixed tuple of choices to store
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        from autoprune_ray.tasks import TASKS
        return tuple(TASKS)


@click.command()
@click.argument("program_file", type=click.Path(dir_okay=False))
@click.option("--task", default=None, type=TaskChoice(),
              help="The search task whose language the program is written in (default: a pruning program, "
                   "told by its functions: a metric, an allocation or both).")
def check(program_file, task):
    """Parse a candidate program (never executed): print its canonical form and hash, or why it is rejected.

    \b
    Examples:
      autoprune-ray check my_metric.py
      echo 'def score(W, A): return W.abs() * A' > m.py && autoprune-ray check m.py
    """
    from autoprune_ray.operators.language import CandidateError, parse, parse_file
    if not Path(program_file).exists():
        raise click.ClickException(f"program file {program_file} does not exist")
    text = Path(program_file).read_text(encoding="utf-8", errors="replace")
    try:
        cand = parse_file(text) if task is None else parse(text, task, strict=True)
    except CandidateError as exc:
        raise click.ClickException(f"rejected: {exc}") from None
    click.echo(f"# task {cand.task}; hash {cand.hash}; inputs {', '.join(cand.inputs)}")
    click.echo(cand.code, nl=False)


def bits_by_block(layers: list[str], bits: list[int]) -> list[dict]:
    """One row per block, one column per linear ('3.self_attn.q_proj' -> block 3, q_proj)."""
    rows: dict[str, dict] = {}
    for key, b in zip(layers, bits):
        block, _, name = key.partition(".")
        rows.setdefault(block, {"block": block})[name.rpartition(".")[2]] = b
    return list(rows.values())


def print_table(rows: list[dict], title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for key in rows[0]:
        table.add_column(key)
    for row in rows:
        table.add_row(*[str(v) for v in row.values()])
    Console().print(table)


COMMANDS = [prune, baselines, quantize, check]
