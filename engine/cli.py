"""The `autoprune-ray` command line."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from autoprune_ray.compress import protocol as protocols

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def clear_errors(func):
    """Bad input ends in one clear line and a non-zero exit, not a traceback."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (ValueError, FileNotFoundError, FloatingPointError, OSError, KeyError) as exc:
            raise click.ClickException(str(exc)) from exc
    return wrapper


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


def resolve_protocol(protocol_name, **overrides):
    return protocols.preset(protocol_name).with_overrides(**overrides)


def torch_dtype(name):
    import torch
    return getattr(torch, DTYPES[name]) if name else None


def compress_and_measure(compress, save, report_name: str, *, model, device, dtype, protocol_name, **sizes):
    """Load the model and the protocol's data, compress in place with `compress(lm, data)`, measure
    held-out perplexity and, with `save`, export the model and its report (prune and quantize)."""
    from autoprune_ray.compress.data import load_token_data
    from autoprune_ray.compress.eval import perplexity
    from autoprune_ray.compress.export import save_pruned
    from autoprune_ray.compress.models import load_model

    proto = resolve_protocol(protocol_name, **sizes)
    lm = load_model(model, device=device, dtype=torch_dtype(dtype))
    data = load_token_data(lm.tokenizer, proto.calib_data, proto.eval_data, proto.nsamples, proto.seqlen,
                           proto.seed, proto.eval_tokens)
    result = compress(lm, data)
    ppl = perplexity(lm, data.evaluation, data.seqlen)
    report = {**result.to_dict(), "perplexity": ppl, "model": lm.name, "protocol": data.describe()}
    if save:
        save_pruned(lm, save, report, report_name)
    return lm, data, result, ppl, report


def parse_sparsities(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None
    for v in values:
        if not 0 <= v < 1:
            raise click.BadParameter(f"sparsity {v} is outside [0, 1)")
    return values


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="autoprune-ray")
def main():
    """autoprune-ray: an LLM designs model-compression algorithms and a Ray cluster tests them.

    \b
    Examples:
      autoprune-ray prune --method wanda --sparsity 0.5
      autoprune-ray baselines --sparsity 0.5,0.7 --patterns 2:4
    """


@main.command()
@click.option("--method", default="wanda", show_default=True,
              help="magnitude, wanda, ria, sparsegpt or barber (LLM-Barber).")
@click.option("--program", "program_file", default=None,
              help="A candidate pruning metric (Python file, `def score(W, A, ...)`) or RUN_DIR:best; "
                   "overrides --method.")
@click.option("--granularity", default="row", show_default=True, help="For --program: row or layer selection.")
@click.option("--sparsity", type=float, default=0.5, show_default=True, help="Target share of pruned weights.")
@click.option("--pattern", default=None, help="N:M semi-structured pattern, e.g. 2:4 or 4:8.")
@click.option("--allocation", default="uniform", show_default=True, help="Layer-wise allocation: uniform or owl.")
@click.option("--owl-lambda", type=float, default=0.08, show_default=True, help="OWL range λ.")
@click.option("--owl-m", type=float, default=5.0, show_default=True, help="OWL outlier threshold M.")
@click.option("--mode", default="sequential", show_default=True,
              help="Statistics: sequential (Wanda protocol) or one-pass (dense, cached).")
@protocol_options
@click.option("--save", type=click.Path(file_okay=False), default=None, help="Write the pruned model (HF format) here.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a table.")
@clear_errors
def prune(method, program_file, granularity, sparsity, pattern, allocation, owl_lambda, owl_m, mode, model, calib_data, eval_data,
          protocol_name, nsamples, seqlen, seed, eval_tokens, device, dtype, save, as_json):
    """Prune a model with one baseline and report its perplexity.

    \b
    Examples:
      autoprune-ray prune --method wanda --sparsity 0.5
      autoprune-ray prune --method sparsegpt --pattern 2:4 --save pruned/
      autoprune-ray prune --method wanda --allocation owl --sparsity 0.7
      autoprune-ray prune --model meta-llama/Llama-2-7b-hf --data c4 --eval-data wikitext2 --protocol paper
    """
    from autoprune_ray.compress.prune import PruneConfig, prune_model

    program = load_program(program_file, granularity) if program_file else None
    cfg = PruneConfig(method="program" if program else method, sparsity=sparsity, pattern=pattern,
                      allocation=allocation, mode=mode, owl_lambda=owl_lambda, owl_m=owl_m,
                      program=program.tree if program else None,
                      granularity=program.granularity if program else "row").validate()
    lm, data, result, ppl, report = compress_and_measure(
        lambda lm, data: prune_model(lm, data, cfg), save, "pruning.json", model=model, device=device, dtype=dtype,
        protocol_name=protocol_name, calib_data=calib_data, eval_data=eval_data, nsamples=nsamples, seqlen=seqlen,
        seed=seed, eval_tokens=eval_tokens)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    _print_table([{"method": cfg.label, "target": f"{cfg.target_sparsity:.2%}", "achieved": f"{result.sparsity:.4%}",
                   "perplexity": f"{ppl:.3f}", "seconds": f"{result.seconds:.1f}"}], title=lm.name)
    d = data.describe()
    click.echo(f"calibration {d['nsamples']}×{d['seqlen']} tokens of {d['calib_data']} (seed {d['seed']}); "
               f"evaluation {d['eval_tokens']} held-out tokens of {d['eval_data']}")
    if save:
        click.echo(f"saved to {save}")


@main.command()
@click.option("--sparsity", "sparsities", default="0.5,0.7", show_default=True,
              help="Comma-separated unstructured sparsities.")
@click.option("--patterns", default="2:4", show_default=True, help="Comma-separated N:M patterns ('' for none).")
@click.option("--methods", default="magnitude,wanda,ria,sparsegpt,owl-wanda,barber", show_default=True,
              help="Comma-separated baselines.")
@protocol_options
@click.option("--out", type=click.Path(dir_okay=False), default="baselines.parquet", show_default=True,
              help="Parquet file for the table.")
@clear_errors
def baselines(sparsities, patterns, methods, model, calib_data, eval_data, protocol_name, nsamples, seqlen,
              seed, eval_tokens, device, dtype, out):
    """Run every baseline on one model into one table (Markdown on screen, Parquet on disk).

    \b
    Examples:
      autoprune-ray baselines --sparsity 0.5,0.6,0.7
      autoprune-ray baselines --methods wanda,sparsegpt --patterns 2:4,4:8 --out table.parquet
    """
    from autoprune_ray.compress.baselines import markdown_table, run_baselines

    proto = resolve_protocol(protocol_name, calib_data=calib_data, eval_data=eval_data, nsamples=nsamples,
                             seqlen=seqlen, seed=seed, eval_tokens=eval_tokens)
    labels = [m.strip() for m in methods.split(",") if m.strip()]
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    table = run_baselines(model, proto, labels, parse_sparsities(sparsities), pats, device=device,
                          dtype=torch_dtype(dtype),
                          on_row=lambda run, r: click.echo(f"{r['method']} {r['pattern']} {r['target_sparsity']:.2f}: "
                                                      f"ppl {r['perplexity']:.3f}", err=True))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out)
    click.echo(markdown_table(table))
    click.echo(f"\nwritten to {out}")


def load_program(path: str, granularity: str = "row", task: str = "prune"):
    """A program file, or RUN_DIR:best for the best program a search found."""
    from autoprune_ray.operators.language import CandidateError, parse
    if path.endswith(":best") and Path(path[:-5]).is_dir():
        from autoprune_ray.engine.report import best_row, load_tables
        config, cands, evals = load_tables(path[:-5])
        if config.get("task", "prune") != task:
            raise click.ClickException(f"{path[:-5]} searched task {config.get('task')!r}, not {task!r}")
        best = best_row(cands, evals)
        if best is None:
            raise click.ClickException(f"{path[:-5]} has no evaluated program yet")
        return parse(best.code, task, best.granularity or granularity)
    if not Path(path).exists():
        raise FileNotFoundError(f"program file {path} does not exist")
    try:
        return parse(Path(path).read_text(encoding="utf-8", errors="replace"), task, granularity)
    except CandidateError as exc:
        raise click.ClickException(f"program rejected: {exc}") from None


def parse_bits(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of bit widths") from None


@main.command()
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
@click.option("--hessian", type=click.Choice(["gram", "hutchinson"]), default="gram", show_default=True,
              help="HAWQ's trace: the layer-output Hessian X Xᵀ, or Hutchinson on the LM loss.")
@protocol_options
@click.option("--save", type=click.Path(file_okay=False), default=None,
              help="Write the (fake-)quantized model (HF format) here.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a table.")
@clear_errors
def quantize(method, program_file, avg_bits, as_uniform, group_size, choices, allocator, quantizer, hessian, model, calib_data,
             eval_data, protocol_name, nsamples, seqlen, seed, eval_tokens, device, dtype, save, as_json):
    """Mixed-precision weight-only quantization under an average-bits budget; prints perplexity, the
    achieved average bits and the per-layer bits.

    \b
    Examples:
      autoprune-ray quantize --method hawq --avg-bits 3.25
      autoprune-ray quantize --method aptq --as-uniform 4 --quantizer gptq --save q4/
      autoprune-ray quantize --program runs/mpq:best --avg-bits 3.25
    """
    from autoprune_ray.compress.quantize import QuantConfig, quantize_model

    program = load_program(program_file, task="mpq") if program_file else None
    cfg = QuantConfig(method="program" if program else method, avg_bits=avg_bits, as_uniform=as_uniform,
                      group_size=group_size,
                      choices=parse_bits(choices), allocator=allocator, quantizer=quantizer, hessian=hessian,
                      program=program.tree if program else None).validate()
    lm, data, result, ppl, report = compress_and_measure(
        lambda lm, data: quantize_model(lm, data, cfg), save, "quantization.json", model=model, device=device,
        dtype=dtype, protocol_name=protocol_name, calib_data=calib_data, eval_data=eval_data, nsamples=nsamples,
        seqlen=seqlen, seed=seed, eval_tokens=eval_tokens)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    _print_table([{"method": cfg.label, "budget": f"{result.budget:.4f}", "achieved": f"{result.avg_bits:.4f}",
                   "bits": " ".join(f"{b}:{n}" for b, n in result.histogram.items()),
                   "perplexity": f"{ppl:.3f}", "seconds": f"{result.seconds:.1f}"}], title=lm.name)
    _print_table(_bits_by_block(result.layers, result.bits), title="bits per layer")
    if save:
        click.echo(f"saved to {save}")


@main.command()
@click.argument("program_file", type=click.Path(dir_okay=False))
@click.option("--task", default="prune", show_default=True,
              help="prune (a score), allocate (SDSA) or mpq (a quantization sensitivity).")
def check(program_file, task):
    """Parse a candidate program (never executed): print its canonical form and hash, or why it is rejected.

    \b
    Examples:
      autoprune-ray check my_metric.py
      echo 'def score(W, A): return W.abs() * A' > m.py && autoprune-ray check m.py
    """
    from autoprune_ray.operators.language import CandidateError, parse
    if not Path(program_file).exists():
        raise click.ClickException(f"program file {program_file} does not exist")
    try:
        cand = parse(Path(program_file).read_text(encoding="utf-8", errors="replace"), task)
    except CandidateError as exc:
        raise click.ClickException(f"rejected: {exc}") from None
    click.echo(f"# hash {cand.hash}; inputs {', '.join(cand.inputs)}")
    click.echo(cand.code, nl=False)


@main.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--resume", is_flag=True, help="Continue a stopped run in the same run directory.")
@click.option("--set", "overrides", multiple=True, help="Override a config key: --set search.max_evaluations=10.")
@click.option("--no-progress", is_flag=True, help="No live progress display (logs only).")
@clear_errors
def run(config_file, resume, overrides, no_progress):
    """Run a search locally (a single-node Ray instance), or on the cluster named by ray.address.

    \b
    Examples:
      autoprune-ray run configs/local.yaml
      autoprune-ray run configs/local.yaml --set search.max_evaluations=8 --set name=quick
      autoprune-ray run configs/local.yaml --resume
    """
    from autoprune_ray.engine.config import load_config
    from autoprune_ray.engine.controller import RunExists
    from autoprune_ray.engine.runner import run_search

    cfg = load_config(config_file, _parse_overrides(overrides))
    try:
        summary = run_search(cfg, resume=resume, progress=not no_progress)
    except RunExists as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps({k: v for k, v in summary.items() if k != "best_code"}, indent=2, default=str))
    if summary.get("best_code"):
        click.echo(summary["best_code"])


@main.command()
@click.argument("target")
@click.option("--address", default="auto", show_default=True, help="Jobs address, for a job id.")
@clear_errors
def status(target, address):
    """Counts, outcomes and the best program of a run directory, or the state of a launched job.

    \b
    Examples:
      autoprune-ray status runs/local
      autoprune-ray status autoprune-cluster-20261126-061500 --address http://127.0.0.1:8265
    """
    if Path(target).is_dir() or "/" in target:
        from autoprune_ray.engine.report import status as run_status
        click.echo(json.dumps(run_status(target), indent=2, default=str))
        return
    from autoprune_ray.engine.launch import client
    info = client(address).get_job_info(target)
    click.echo(json.dumps({"job": target, "status": str(info.status).split(".")[-1], "message": info.message,
                           "metadata": info.metadata, "entrypoint": info.entrypoint}, indent=2, default=str))


@main.command()
@click.argument("cluster_file", type=click.Path(dir_okay=False))
@click.option("--no-wait", is_flag=True, help="Submit and return; follow with `status JOB_ID`.")
@click.option("--resume", is_flag=True, help="Continue the run in the config's run directory.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a search config key.")
@clear_errors
def launch(cluster_file, no_wait, resume, overrides):
    """Run a search on an existing Ray cluster, as a Ray Job.

    CLUSTER_FILE names the cluster address, the runtime environment, the resources and the search
    config (see configs/cluster.yaml). Prints the job id and the dashboard URL, then streams the
    job's logs until it ends. Token authentication stays on: export RAY_AUTH_MODE=token (and
    RAY_AUTH_TOKEN_PATH if the token is not in ~/.ray/auth_token) so the client sends it.

    \b
    Examples:
      autoprune-ray launch configs/cluster.yaml
      autoprune-ray launch configs/cluster.yaml --no-wait --set search.max_evaluations=200
    """
    from autoprune_ray.engine.launch import client, follow_logs, job_spec, load_cluster, resolve_search, submit

    cluster = load_cluster(cluster_file)
    cluster.overrides = dict(cluster.overrides) | _parse_overrides(overrides)
    cfg = resolve_search(cluster)
    jobs = client(cluster.address)
    job_id = submit(jobs, job_spec(cluster, cfg, resume))
    click.echo(f"job {job_id}: run {cfg.name} -> {cfg.resolved_run_dir} (on the head node)")
    click.echo(f"dashboard: {jobs.get_address()}")
    if no_wait:
        return
    final = follow_logs(jobs, job_id, click.echo)
    click.echo(f"job {job_id} {final}")
    if final != "SUCCEEDED":
        sys.exit(1)


@main.command()
@click.argument("job_id")
@click.option("--address", default="auto", show_default=True)
@clear_errors
def stop(job_id, address):
    """Stop a launched search; `launch --resume` (or re-launching) continues it.

    \b
    Examples:
      autoprune-ray stop autoprune-cluster-20261126-061500 --address http://127.0.0.1:8265
    """
    from autoprune_ray.engine.launch import client
    click.echo(f"job {job_id}: {'stop requested' if client(address).stop_job(job_id) else 'not running'}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--protocol", "protocol_name", default="cpu", show_default=True,
              type=click.Choice(sorted(protocols.PRESETS) + ["none"]),
              help="Size preset for the side-by-side table; 'none' skips it.")
@click.option("--full-split/--capped", default=True, show_default=True,
              help="Evaluate on the whole held-out split (the full protocol) or the preset's cap.")
@click.option("--baselines", default=None,
              help="Comma-separated; default wanda,magnitude (prune) or uniform,hawq,aptq (mpq).")
@clear_errors
def report(run_dir, protocol_name, full_split, baselines):
    """Markdown report with plots; the best program re-measured beside the baselines.

    \b
    Examples:
      autoprune-ray report runs/local
      autoprune-ray report runs/local --protocol paper --baselines wanda,sparsegpt,magnitude
      autoprune-ray report runs/mpq            # the best proxy beside uniform, HAWQ and APTQ-style bits
    """
    from autoprune_ray.engine.report import write_report
    proto = None
    if protocol_name != "none":
        proto = protocols.preset(protocol_name)
        if full_split:
            from dataclasses import replace
            proto = replace(proto, eval_tokens=None)
    path = write_report(run_dir, proto, [b for b in baselines.split(",") if b] if baselines else None)
    click.echo(path.read_text())
    click.echo(f"written to {path}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--margin", default=0.01, show_default=True,
              help="Least fitness gap (−log perplexity) for a pair of measured programs.")
@click.option("--groupings", default="prompt,parents", show_default=True,
              help="Pairs from the same prompt and/or prompts built from the same parents.")
@click.option("--beta", default=0.1, show_default=True)
@click.option("--lr", default=5e-5, show_default=True)
@click.option("--epochs", default=1, show_default=True)
@click.option("--reference", type=click.Choice(["base", "previous"]), default="base", show_default=True)
@click.option("--continue-from", "init_adapter", default=None, type=click.Path(exists=True, file_okay=False),
              help="Continue from this adapter (e.g. the run's newest, RUN_DIR/adapters/v3).")
@click.option("--model", default=None, help="Policy model (default: the run's policy.model).")
@click.option("--out", default=None, help="Adapter directory (default: RUN_DIR/adapters/offline-N).")
@clear_errors
def dpo(run_dir, margin, groupings, beta, lr, epochs, reference, init_adapter, model, out):
    """Train the policy's LoRA adapter by DPO, offline, from a run's logged preference pairs.

    The pairs are the run's `preferences` table, logged while it searched (same prompt or same
    parents: a measurably better program against a worse one, a measured one against a failed
    one, a valid one against a rejected one). Runs from before that table existed get their
    pairs derived from the candidate tables, with the same rules.

    \b
    Examples:
      autoprune-ray dpo runs/local
      autoprune-ray dpo runs/local --beta 0.2 --epochs 2 --margin 0.02 --continue-from runs/local/adapters/v2
    """
    from autoprune_ray.engine.storage import RunStore
    from autoprune_ray.llm.dpo import DPOConfig, train_round
    from autoprune_ray.llm.preferences import PreferenceLog, replay

    import pandas as pd

    store = RunStore(run_dir)
    wanted = tuple(g.strip() for g in groupings.split(",") if g.strip())
    pairs = store.read("preferences")
    if pairs.empty:
        pairs = pd.DataFrame(replay(PreferenceLog(margin, wanted), store.read("candidates"),
                                    store.read("evaluations"), store.read("prompts")))
        click.echo("no logged pairs (a run from before the preference log): derived from the tables")
    if not pairs.empty:
        pairs = pairs[pairs.grouping.isin(wanted) & ((pairs.kind != "fitness") | (pairs.gap > margin))]
    if pairs.empty:
        raise click.ClickException("this run has no preference pairs yet (it needs completions that differ in "
                                   "validity or measured fitness)")
    adapters = Path(run_dir) / "adapters"
    out = Path(out) if out else adapters / f"offline-{len(list(adapters.glob('offline-*'))) + 1}"
    click.echo(f"{len(pairs)} pairs ({pairs.kind.value_counts().to_dict()}); training {out}")
    metrics = train_round(model or store.read_config()["policy"]["model"],
                          pairs[["prompt", "chosen", "rejected"]].to_dict("records"), str(out),
                          DPOConfig(beta=beta, lr=lr, epochs=epochs, reference=reference), init_adapter)
    click.echo(json.dumps({k: metrics[k] for k in ("train_pairs", "train", "held_out_before", "held_out")}, indent=1))


def _parse_overrides(items) -> dict:
    import yaml
    out = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"--set {item!r}: write key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _bits_by_block(layers: list[str], bits: list[int]) -> list[dict]:
    """One row per block, one column per linear ('3.self_attn.q_proj' -> block 3, q_proj)."""
    rows: dict[str, dict] = {}
    for key, b in zip(layers, bits):
        block, _, name = key.partition(".")
        rows.setdefault(block, {"block": block})[name.rpartition(".")[2]] = b
    return list(rows.values())


def _print_table(rows: list[dict], title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for key in rows[0]:
        table.add_column(key)
    for row in rows:
        table.add_row(*[str(v) for v in row.values()])
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
