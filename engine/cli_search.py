"""The search commands: run or launch a search, follow and stop it, and read its run directory
(status, the report, offline DPO on its preference pairs)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from autoprune_ray.compress import protocol as protocols
from autoprune_ray.engine.cli_common import clear_errors


def parse_overrides(items) -> dict:
    import yaml
    out = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"--set {item!r}: write key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


@click.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--resume", is_flag=True, help="Continue a stopped run in the same run directory.")
@click.option("--set", "overrides", multiple=True, help="Override a config key: --set search.max_evaluations=10.")
@click.option("--no-progress", is_flag=True, help="Plain log lines, no live display (for CI, jobs, files).")
@click.option("--json", "as_json", is_flag=True, help="End with the run's summary as JSON instead of a table.")
@clear_errors
def run(config_file, resume, overrides, no_progress, as_json):
    """Run a search locally (a single-node Ray instance), or on the cluster named by ray.address.

    It ends with the best program beside the reference seed (Wanda, for pruning), as measured on the
    validation split, and the commands to run next. configs/quick.yaml takes about 10 minutes on
    2 CPU cores, configs/local.yaml about 30.

    \b
    Examples:
      autoprune-ray run configs/quick.yaml
      autoprune-ray run configs/local.yaml --set search.max_evaluations=8 --set name=short
      autoprune-ray run configs/local.yaml --resume
    """
    from autoprune_ray.engine.config import load_config
    from autoprune_ray.engine.controller import RunExists
    from autoprune_ray.engine.runner import ActorsFailed, run_search
    from autoprune_ray.engine.storage import RunLocked

    cfg = load_config(config_file, parse_overrides(overrides))
    try:
        summary = run_search(cfg, resume=resume, progress=not no_progress)
    except (RunExists, RunLocked, ActorsFailed) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({k: v for k, v in summary.items() if k != "best_code"}, indent=2, default=str))
        return
    from autoprune_ray.engine.display import show_outcome
    from autoprune_ray.engine.outcome import run_outcome
    show_outcome(run_outcome(cfg.resolved_run_dir, summary))


@click.command()
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


@click.command()
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
    cluster.overrides = dict(cluster.overrides) | parse_overrides(overrides)
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


@click.command()
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


@click.command()
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


@click.command()
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
    from autoprune_ray.engine.report import open_run
    from autoprune_ray.llm.dpo import DPOConfig, train_round

    config, _, store = open_run(run_dir)
    wanted = tuple(g.strip() for g in groupings.split(",") if g.strip())
    pairs = preference_pairs(store, margin, wanted)
    adapters = Path(run_dir) / "adapters"
    out = Path(out) if out else adapters / f"offline-{len(list(adapters.glob('offline-*'))) + 1}"
    click.echo(f"{len(pairs)} pairs ({pairs.kind.value_counts().to_dict()}); training {out}")
    metrics = train_round(model or config["policy"]["model"],
                          pairs[["prompt", "chosen", "rejected"]].to_dict("records"), str(out),
                          DPOConfig(beta=beta, lr=lr, epochs=epochs, reference=reference), init_adapter)
    click.echo(json.dumps({k: metrics[k] for k in ("train_pairs", "train", "held_out_before", "held_out")}, indent=1))


def preference_pairs(store, margin: float, wanted: tuple[str, ...]):
    """The run's logged pairs of the wanted groupings, fitness pairs wider than `margin`."""
    import pandas as pd

    from autoprune_ray.llm.preferences import PreferenceLog, replay

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
    return pairs


COMMANDS = [run, status, launch, stop, report, dpo]
