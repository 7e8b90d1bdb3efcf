"""`autoprune-ray launch cluster.yaml`: a search as a Ray Job on an existing Ray cluster.

The cluster file names the cluster (its dashboard/Jobs address, or `auto`), the job's runtime
environment, the resources (evaluators, GPUs per evaluator, GPU shares for the policy and DPO)
and the search config (a path, or the mapping itself), with overrides. `launch` resolves and
validates the search config here, so a broken config fails before anything is submitted, and
hands it to the job in an environment variable; the job's driver runs the same `run_search` as
a local run, connected to the cluster (`ray.address: auto`).

Ray's token authentication stays on: the client sends the token when RAY_AUTH_MODE=token (or
RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) is set, as Ray documents. Secrets such as an endpoint's API
key stay in the nodes' environment, under the name `policy.api_key_env` gives; they are never put
in the job, which the dashboard shows: a cluster file whose runtime_env or search config carries
one is refused (`refuse_secrets`).
"""
from __future__ import annotations

import collections
import math
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from autoprune_ray.engine.config import ConfigError, RunConfig, apply_overrides, from_dict, load_config, read_yaml

CONFIG_ENV = "AUTOPRUNE_RUN_CONFIG"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class ClusterResources:
    evaluators: int = 2
    cpus_per_evaluator: float = 1.0
    gpus_per_evaluator: float = 0.0
    policy_gpus: float = 0.0
    dpo_gpus: float = 0.0


@dataclass
class ClusterConfig:
    address: str = "auto"                      # http://HEAD:8265, or auto (RAY_ADDRESS, else a local head)
    runtime_env: dict[str, Any] = field(default_factory=dict)   # working_dir, pip, env_vars, ...
    resources: ClusterResources = field(default_factory=ClusterResources)
    search: str | dict[str, Any] = "configs/local.yaml"          # a config path, or the mapping itself
    overrides: dict[str, Any] = field(default_factory=dict)      # dotted keys, as `run --set`
    python: str = "python"                     # the interpreter on the head node that runs the driver
    submission_id: str | None = None           # default: autoprune-<name>-<time>


# -- no secret goes into a job ---------------------------------------------------------------
# Ray shows a job's runtime_env (and so the search config, which travels in its env_vars) on the
# dashboard and in its logs, and does not treat runtime_env as secret; Ray's documented way is to
# keep secrets on the nodes (their environment, or a netrc file for runtime_env URLs).
SECRET_ADVICE = ("Ray shows a job's runtime_env and config on its dashboard and in its logs: set the secret in the "
                 "environment of `ray start` on the cluster's nodes and name the variable in the search config "
                 "(e.g. policy.api_key_env), or, for a pip/working_dir URL, use a netrc file on the nodes")
# A word of a variable's name that says it holds a secret (OAUTH, APIKEY, HF_TOKEN, DB_PASSWORD, ...)
SECRET_WORD = re.compile(r"(KEYS?|TOKENS?|SECRETS?|PASSW(OR)?DS?|CREDENTIALS?|AUTH|AUTHORIZATION)$")
# A last word that says the variable names where a secret lives or how auth works, not the secret
HARMLESS_LAST_WORD = {"PATH", "FILE", "DIR", "MODE", "ENV"}
KNOWN_KEY = re.compile(r"(?<![A-Za-z0-9])(sk-|hf_|gh[pousr]_|github_pat_|glpat-|xox[abprs]-|AKIA|AIza)"
                       r"[A-Za-z0-9_\-]{16,}")
URL_PASSWORD = re.compile(r"://[^/\s:@]+:[^/\s@]+@")       # scheme://user:password@host
TOKEN_RUN = re.compile(r"[A-Za-z0-9+=]{24,}")


def secret_name(name: str) -> bool:
    words = [w for w in re.split(r"[^A-Z0-9]+", name.upper()) if w]
    return bool(words) and words[-1] not in HARMLESS_LAST_WORD and any(SECRET_WORD.search(w) for w in words)


def secret_value(value: str) -> bool:
    """An API key of a known form, a password in a URL, or a long random-looking token."""
    return bool(KNOWN_KEY.search(value) or URL_PASSWORD.search(value)) or any(map(_random, TOKEN_RUN.findall(value)))


def _random(run: str) -> bool:
    """Letters of both cases and digits, many distinct, mixed at random: not a CamelCase word."""
    kinds = [c.isdigit() + 2 * c.isupper() for c in run]
    switches = sum(a != b for a, b in zip(kinds, kinds[1:])) / (len(run) - 1)
    counts = collections.Counter(run).values()
    entropy = -sum(n / len(run) * math.log2(n / len(run)) for n in counts)
    return set(kinds) == {0, 1, 2} and entropy >= 3.8 and switches >= 0.45


def _strings(node, where: str):
    """(path, text) of every string in a mapping/list tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{where}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _strings(value, f"{where}[{i}]")
    elif isinstance(node, str):
        yield where, node


def refuse_secrets(runtime_env: dict, search: dict | None = None) -> None:
    """ConfigError, naming the first place, when the job would carry a secret: an env_vars name that
    says so, or a value that looks like one in runtime_env or in the search config."""
    for name in runtime_env.get("env_vars") or {}:
        if secret_name(str(name)):
            raise ConfigError(f"runtime_env.env_vars.{name}: its name says it holds a secret; {SECRET_ADVICE}")
    for where, text in [*_strings(runtime_env, "runtime_env"), *_strings(search or {}, "search")]:
        if secret_value(text):
            raise ConfigError(f"{where}: its value looks like a secret (an API key, a token or a password in a URL); "
                              f"{SECRET_ADVICE}")


# -- the cluster file and the job ----------------------------------------------------------------
def load_cluster(path: str | Path) -> ClusterConfig:
    p = Path(path)
    cluster = from_dict(ClusterConfig, read_yaml(p, "cluster file"))
    refuse_secrets(cluster.runtime_env)
    if isinstance(cluster.search, str) and not Path(cluster.search).is_absolute():
        cluster.search = str((p.parent / cluster.search).resolve()) if (p.parent / cluster.search).exists() \
            else cluster.search
    return cluster


def resolve_search(cluster: ClusterConfig) -> RunConfig:
    """The search config the job will run: the file or mapping, the overrides, the resources."""
    r = cluster.resources
    overrides = dict(cluster.overrides) | {
        "evaluators.num": r.evaluators, "evaluators.num_cpus": r.cpus_per_evaluator,
        "evaluators.num_gpus": r.gpus_per_evaluator, "policy.num_gpus": r.policy_gpus, "dpo.num_gpus": r.dpo_gpus,
        "ray.address": "auto"}
    if isinstance(cluster.search, dict):
        data = yaml.safe_load(yaml.safe_dump(cluster.search))   # a deep copy
        return from_dict(RunConfig, apply_overrides(data, overrides)).validate()
    return load_config(cluster.search, overrides)


def job_spec(cluster: ClusterConfig, cfg: RunConfig, resume: bool = False) -> dict:
    """Arguments of JobSubmissionClient.submit_job; ConfigError when they would carry a secret."""
    refuse_secrets(cluster.runtime_env, cfg.to_dict())
    env = dict(cluster.runtime_env)
    env["env_vars"] = dict(env.get("env_vars") or {}) | {CONFIG_ENV: yaml.safe_dump(cfg.to_dict(), sort_keys=False)}
    entry = [cluster.python, "-m", "autoprune_ray.engine.launch"] + (["--resume"] if resume else [])
    return {"entrypoint": " ".join(shlex.quote(x) for x in entry), "runtime_env": env,
            "submission_id": cluster.submission_id or f"autoprune-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            "metadata": {"autoprune_run": cfg.name, "run_dir": str(cfg.resolved_run_dir)}}


def client(address: str):
    from ray.job_submission import JobSubmissionClient
    return JobSubmissionClient(None if address == "auto" else address)


def submit(jobs, spec: dict, attempts: int = 60, wait_seconds: float = 3.0) -> str:
    """Submit, retrying while the head's job agent is still starting (a fresh cluster answers
    "No available agent to submit job, please try again later")."""
    for _ in range(attempts - 1):
        try:
            return jobs.submit_job(**spec)
        except RuntimeError as exc:
            if "try again later" not in str(exc):
                raise
            time.sleep(wait_seconds)
    return jobs.submit_job(**spec)


def follow_logs(jobs, job_id: str, echo, poll_seconds: float = 2.0) -> str:
    """Print the job's logs as they grow until it ends; returns its final status."""
    shown = 0
    while True:
        status = str(jobs.get_job_status(job_id)).split(".")[-1]
        logs = jobs.get_job_logs(job_id)
        if len(logs) > shown:
            echo(logs[shown:], nl=False)
            shown = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll_seconds)


def _job_main() -> int:
    """The job's driver: the resolved config from the environment, run as a local run would."""
    from autoprune_ray.engine.runner import run_search

    text = os.environ.get(CONFIG_ENV)
    if not text:
        print(f"{CONFIG_ENV} is not set: this module is the driver of `autoprune-ray launch`", file=sys.stderr)
        return 2
    cfg = from_dict(RunConfig, yaml.safe_load(text)).validate()
    resume = "--resume" in sys.argv[1:] or (cfg.resolved_run_dir / "config.yaml").exists()
    summary = run_search(cfg, resume=resume, progress=False)
    print({k: v for k, v in summary.items() if k != "best_code"})
    from autoprune_ray.engine.display import show_outcome
    from autoprune_ray.engine.outcome import run_outcome
    show_outcome(run_outcome(cfg.resolved_run_dir, summary))
    return 0


if __name__ == "__main__":
    sys.exit(_job_main())
