"""Helpers shared by several test files (and benchmarks/cluster.py, which starts the same cluster)."""
import contextlib
import functools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from autoprune_ray.compress.models import block_linears, decoder_layers
from autoprune_ray.engine.config import EvaluatorConfig, PolicyConfig, RunConfig, SearchConfig, TargetConfig
from autoprune_ray.engine.storage import RunStore

# Paragraphs of Austen-like words: a corpus file a tiny tokenizer and model can be trained on.
WORDS = ("the a of and to in was her she he his not it that with for had as but you be at on "
         "my have which by mr all they so were this been from would very no could there said "
         "emma anne elinor much must will more one do any such what an if me or when time").split()


def pseudo_text(n_paragraphs: int, seed: int) -> str:
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(n_paragraphs):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
                     for _ in range(rng.randint(2, 5))]
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


# A scripted policy's completions for the prune task (tests of the engine, faults and the cluster).
COMPLETIONS = [
    "Here is a new metric:\n```python\ndef score(W, A):\n    return W.abs() * A.sqrt()\n```",
    "```python\ndef score(W, A):\n    return W.abs() * A.sqrt()\n```",                    # duplicate
    "I think we should prune small weights.",                                               # no code
    "```python\ndef score(W, A):\n    import os\n    return W\n```",                         # rejected
    "```python\ndef score(W, A, M):\n    return W.abs() * A + 0.1 * M.abs()\n```",
    "```python\ndef score(W, V):\n    return W.abs() * (V + 1).log1p()\n```",
    "```python\ndef score(W, A):\n    return (W.abs() * A) ** 0.5 + W.abs().mean(dim=1)\n```",
    "```python\ndef score(W, A, H):\n    return W.abs() * H.sqrt() / (A + 1)\n```",
]


def assert_resumed_cleanly(store, before, total: int) -> None:
    """A run stopped with `before` evaluations recorded and then resumed: every proposed candidate
    has exactly one outcome, the earlier records are kept as they were and none is repeated, and
    the final population is what the records imply (its best is the best measured evaluation)."""
    from test_engine import assert_one_outcome_each   # imported here: it needs Ray and pytest

    cands, evals = store.read("candidates"), store.read("evaluations")
    summary = store.load_checkpoint()["summary"]
    assert len(evals) == total
    assert_one_outcome_each(cands, evals, summary)
    pd.testing.assert_frame_equal(evals.iloc[:len(before)].reset_index(drop=True), before.reset_index(drop=True))
    assert set(evals.candidate_id.iloc[len(before):]).isdisjoint(before.candidate_id)
    ok = evals[evals.status == "ok"]
    assert summary["best_perplexity"] == pytest.approx(ok.perplexity.min())


def explicit_linear_inputs(lm, windows):
    """Inputs of every linear, captured from ordinary full forward passes, one window at a time."""
    captured = {}
    handles = []
    for i, block in enumerate(decoder_layers(lm.model)):
        for name, lin in block_linears(block).items():
            def hook(_m, args, _o, key=(i, name)):
                captured.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]))
            handles.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        for w in windows:
            lm.model(w.unsqueeze(0))
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in captured.items()}


# -- a real local Ray cluster: a `ray start --head` process and a worker node process ----------

# A fixed CPU task takes about this long on an idle 2-core machine of CI's kind.
_REFERENCE_SECONDS = 0.25


@functools.lru_cache(maxsize=1)
def machine_slowdown() -> float:
    """How much slower than idle this machine runs now (1 to 10): the larger of the load per core
    and a fixed CPU task's time against its idle time. Measured once per session."""
    start = time.perf_counter()
    total = 0
    for i in range(1_500_000):
        total += i * i
    measured = (time.perf_counter() - start) / _REFERENCE_SECONDS
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    return min(10.0, max(1.0, measured, load))


def scaled(seconds: float) -> float:
    """A deadline for waiting on an event, stretched on a busy machine (the event still ends the wait)."""
    return seconds * machine_slowdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli() -> str:
    """The `ray` script of this interpreter's installation; in a virtualenv that sees the system's
    packages (--system-site-packages), the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "ray")
    return beside if os.path.exists(beside) else (shutil.which("ray") or beside)


def client_env() -> dict:
    """A client process sends the cluster's token only when asked to (Ray's documented switch)."""
    return os.environ | {"RAY_AUTH_MODE": "token"}


@contextlib.contextmanager
def local_ray_cluster(head_cpus: int, worker_cpus: int, worker_resources: dict | None = None):
    """Head + one worker node, each a `ray start --block` process group with its own CPUs, torn
    down at the end even on failure. Yields the Jobs, GCS and metrics addresses.

    Never `ray stop`: it stops every Ray on this machine, other people's included. Every port a
    second Ray here could already hold is chosen free: the dashboard agent's HTTP port defaults to
    52365, and when another Ray (e.g. an in-process `ray.init` of an earlier test) has it, the
    head's agent runs without HTTP and the Jobs API answers "No available agent" until `submit`
    gives up."""
    port, dashboard, metrics = free_port(), free_port(), free_port()
    # its own temp dir: the address file a plain ray.init() would join is left alone
    temp_dir = f"/tmp/rt{port}"
    common = ["--block", "--disable-usage-stats", f"--temp-dir={temp_dir}", "--num-gpus=0"]
    # The head keeps Ray's default (token auth on, token written to ~/.ray/auth_token); a joining
    # node and every client send that token with RAY_AUTH_MODE=token. An in-process ray.init()
    # exports RAY_AUTH_MODE=token, so it is dropped here, not inherited.
    head_env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    procs = [_node(["--head", f"--port={port}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
                    "--include-dashboard=true", f"--num-cpus={head_cpus}", f"--metrics-export-port={metrics}",
                    f"--ray-client-server-port={free_port()}", *common], head_env)]
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_dashboard(address, procs[0])
        procs.append(_node([f"--address=127.0.0.1:{port}", f"--num-cpus={worker_cpus}",
                            f"--resources={json.dumps(worker_resources or {})}", *common], client_env()))
        _wait_for_nodes(port, 2)
        yield {"jobs": address, "gcs": f"127.0.0.1:{port}", "metrics": f"http://127.0.0.1:{metrics}/metrics",
               "temp_dir": temp_dir}
    finally:
        _stop(procs, temp_dir)


def _node(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([ray_cli(), "start", f"--dashboard-agent-listen-port={free_port()}", *args],
                            start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(procs: list[subprocess.Popen], temp_dir: str) -> None:
    for proc in procs[::-1]:
        os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs[::-1]:
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    # anything of this cluster that left the process groups (it names the cluster's temp dir)
    for pid in _pids_naming(temp_dir + "/"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _pids_naming(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
    return [p for p in pids if p != os.getpid()]


def _wait_for_dashboard(address: str, proc, timeout: float = 120) -> None:
    """Until the Jobs API answers an authenticated request (the token `ray start` wrote)."""
    deadline = time.time() + scaled(timeout)
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("ray start --head exited")
        try:
            token = (Path.home() / ".ray" / "auth_token").read_text().strip()
            request = urllib.request.Request(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(2)
    raise TimeoutError("the Ray head's Jobs API did not come up")


def _wait_for_nodes(port: int, count: int, timeout: float = 120) -> None:
    """Until `ray status` lists `count` active nodes."""
    deadline = time.time() + scaled(timeout)
    while time.time() < deadline:
        out = subprocess.run([ray_cli(), "status", f"--address=127.0.0.1:{port}"], env=client_env(),
                             capture_output=True, text=True, timeout=60).stdout
        active = out.split("Active:")[-1].split("Pending:")[0] if "Active:" in out else ""
        if active.count("node_") >= count:
            return
        time.sleep(2)
    raise TimeoutError(f"the cluster did not reach {count} nodes")


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`autoprune-ray ARGS` as its own process, as a user runs it: the client sends the token."""
    return subprocess.run([sys.executable, "-m", "autoprune_ray.engine.cli", *args], env=client_env(),
                          capture_output=True, text=True, timeout=scaled(timeout))


def ray_state(kind: str, gcs: str) -> list[dict]:
    """Ray's state API through its own CLI (`ray list actors|nodes`)."""
    out = subprocess.run([ray_cli(), "list", kind, f"--address={gcs}", "--limit=1000", "--format=json"],
                         env=client_env(), capture_output=True, text=True, timeout=scaled(120), check=True).stdout
    return [] if out.startswith("No resource") else json.loads(out)   # what it prints before any exists


def write_cluster_file(path: Path, jobs: str, search: dict, evaluators: int, cpus_per_evaluator: float = 1,
                       overrides: dict | None = None) -> Path:
    """A cluster file for `autoprune-ray launch` whose job finds this checkout (PYTHONPATH)."""
    env = {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}} if os.environ.get("PYTHONPATH") else {}
    path.write_text(yaml.safe_dump({
        "address": jobs, "python": sys.executable, "runtime_env": env, "search": search,
        "resources": {"evaluators": evaluators, "cpus_per_evaluator": cpus_per_evaluator},
        "overrides": overrides or {}}))
    return path


def job_id(launch_output: str) -> str:
    """From `job ID: run ...`, the first line `launch` prints."""
    return launch_output.split()[1].rstrip(":")


# ---------------------------------------------------------------- searches on the tiny model

def make_config(tmp_path, tiny_model_dir, corpus_file, name="t", **search) -> RunConfig:
    # the run's own time limits are deadlines too: they stretch on a busy machine
    defaults = dict(islands=2, population_size=6, elites=1, migration_interval=3, max_evaluations=8,
                    max_seconds=scaled(300), eval_time_limit=scaled(60), queue_size=4, cascade=100.0,
                    checkpoint_every=1, operators={"llm_mutate": 0.5, "llm_init": 0.2, "symbolic_mutate": 0.3})
    defaults.update(search)
    return RunConfig(
        name=name, run_dir=str(tmp_path / "{name}"),
        target=TargetConfig(model=str(tiny_model_dir), calib_data=str(corpus_file), nsamples=4, seqlen=32,
                            val_tokens=128, device="cpu"),
        policy=PolicyConfig(backend="scripted", scripted=COMPLETIONS, prompts_per_batch=2, completions_per_prompt=2),
        search=SearchConfig(**defaults),
        evaluators=EvaluatorConfig(num=2, num_cpus=1)).validate()


def tables(cfg):
    store = RunStore(cfg.resolved_run_dir)
    return store.read("candidates"), store.read("evaluations")


def assert_one_outcome_each(cands: pd.DataFrame, evals: pd.DataFrame, summary: dict | None = None):
    assert cands.candidate_id.is_unique
    accepted = set(cands[cands.status == "accepted"].candidate_id)
    assert evals.candidate_id.is_unique, "a candidate was recorded twice"
    assert set(evals.candidate_id) <= accepted, "only accepted candidates are evaluated"
    if summary is not None:   # the rest are pending, and the run says how many
        assert len(accepted - set(evals.candidate_id)) == summary["pending"]
    assert not evals[evals.status.isin(["ok", "screened"])].hash.duplicated().any(), "a program was evaluated twice"
    dups = cands[cands.status == "duplicate"]
    first = cands.set_index("candidate_id")
    for row in dups.itertuples():
        assert first.loc[int(row.duplicate_of)].hash == row.hash
    assert (cands[cands.status == "rejected"].reason.str.len() > 0).all()


def run_task_search(cfg: RunConfig, task: str, completions: list[str]):
    """A search of `task` with a scripted policy; its tables after every outcome was checked."""
    from autoprune_ray.engine.runner import run_search
    cfg.task = task
    cfg.policy.scripted = completions
    summary = run_search(cfg.validate(), progress=False)
    cands, evals = tables(cfg)
    assert_one_outcome_each(cands, evals, summary)
    return cands, evals


def correlated_inputs(seed, tokens=1024, width=72):
    """Low-rank mixing plus noise, with a few outlier channels (as LLM activations have)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 24, generator=g) @ torch.randn(24, width, generator=g)
    x = x + 0.3 * torch.randn(tokens, width, generator=g)
    x[:, [3, 17, width - 5]] *= 10
    return x


BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load_benchmark(name: str):
    """A script under benchmarks/ as a module; the folder goes on sys.path because the scripts
    import their siblings (discovered.py)."""
    import importlib.util
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
