"""`autoprune-ray launch` on a real Ray cluster: a head started with `ray start --head` and a
second worker node process on this machine, with its own resources. The search is submitted
through Ray's Jobs API and checked in its run directory."""
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

ray = pytest.importorskip("ray")

from autoprune_ray.engine.cli import main  # noqa: E402
from autoprune_ray.engine.storage import RunStore  # noqa: E402

from test_engine import COMPLETIONS, assert_one_outcome_each  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli() -> str:
    return os.path.join(os.path.dirname(sys.executable), "ray")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (2 CPUs) + worker node (1 CPU, resource `second_node`), each a `ray start --block`
    process group, terminated at the end (never `ray stop`, which would stop every Ray here)."""
    port, dashboard, metrics = free_port(), free_port(), free_port()
    # its own temp dir: the address file a plain ray.init() would join is left alone
    temp_dir = f"/tmp/rt{port}"
    common = ["--block", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    # The head keeps Ray's default (token auth on, token written to ~/.ray/auth_token); a joining
    # node and every client send that token with RAY_AUTH_MODE=token.
    node_env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    head = subprocess.Popen([ray_cli(), "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}",
                             "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2",
                             f"--metrics-export-port={metrics}",
                             "--num-gpus=0", *common], start_new_session=True, env=node_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [head]
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_dashboard(address, head)
        procs.append(subprocess.Popen([ray_cli(), "start", f"--address=127.0.0.1:{port}", "--num-cpus=1",
                                       "--num-gpus=0", '--resources={"second_node": 1}', *common],
                                      start_new_session=True, env=node_env | {"RAY_AUTH_MODE": "token"},
                                      stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        _wait_for_nodes(port, 2)
        yield {"jobs": address, "gcs": f"127.0.0.1:{port}", "metrics": f"http://127.0.0.1:{metrics}/metrics"}
    finally:
        for proc in procs[::-1]:
            os.killpg(proc.pid, 15)
        for proc in procs[::-1]:
            try:
                proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)


def _wait_for_dashboard(address: str, proc, timeout: float = 120) -> None:
    """Until the Jobs API answers an authenticated request (the token `ray start` wrote)."""
    deadline = time.time() + timeout
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
    env = os.environ | {"RAY_AUTH_MODE": "token"}
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run([ray_cli(), "status", f"--address=127.0.0.1:{port}"], env=env, capture_output=True,
                             text=True, timeout=60).stdout
        active = out.split("Active:")[-1].split("Pending:")[0] if "Active:" in out else ""
        if active.count("node_") >= count:
            return
        time.sleep(2)
    raise TimeoutError(f"the cluster did not reach {count} nodes")


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The CLI as its own process, as a user runs it: the client sends the cluster's token.
    `list-actors ADDRESS` is Ray's own state CLI (`ray list actors`)."""
    env = os.environ | {"RAY_AUTH_MODE": "token"}
    if args[0] == "list-actors":
        command = [ray_cli(), "list", "actors", f"--address={args[1]}", "--limit=100"]
    else:
        command = [sys.executable, "-m", "autoprune_ray.engine.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def small_search(name: str, run_dir, tiny_model_dir, corpus_file, evaluations: int) -> dict:
    return {"name": name, "run_dir": str(run_dir),
              "target": {"model": str(tiny_model_dir), "calib_data": str(corpus_file), "nsamples": 4, "seqlen": 32,
                         "eval_tokens": 128, "device": "cpu"},
              "policy": {"backend": "scripted", "scripted": COMPLETIONS, "prompts_per_batch": 2,
                         "completions_per_prompt": 2},
              "search": {"islands": 2, "population_size": 6, "elites": 1, "max_evaluations": evaluations,
                         "max_seconds": 300, "eval_time_limit": 120, "cascade": 100.0, "checkpoint_every": 1,
                         "operators": {"llm_mutate": 0.5, "llm_init": 0.2, "symbolic_mutate": 0.3}}}


def write_cluster_file(path, cluster, search: dict, sleep_seconds: float):
    path.write_text(yaml.safe_dump({
        "address": cluster["jobs"], "python": sys.executable,
        "runtime_env": {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}} if os.environ.get("PYTHONPATH") else {},
        "resources": {"evaluators": 3, "cpus_per_evaluator": 1}, "search": search,
        # a known cost per evaluation spreads the work over all three evaluators
        "overrides": {"evaluators.fault_injection": {"sleep_seconds": str(sleep_seconds)}}}))
    return path


def test_launch_runs_a_search_as_a_ray_job_on_two_nodes(cluster, tmp_path, tiny_model_dir, corpus_file):
    search = small_search("launched", tmp_path / "runs" / "{name}", tiny_model_dir, corpus_file, evaluations=9)
    cluster_file = write_cluster_file(tmp_path / "cluster.yaml", cluster, search, sleep_seconds=1)
    result = cli("launch", str(cluster_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dashboard: http://127.0.0.1" in result.stdout and "SUCCEEDED" in result.stdout
    job_id = result.stdout.split()[1].rstrip(":")
    store = RunStore(tmp_path / "runs" / "launched")
    cands, evals = store.read("candidates"), store.read("evaluations")
    assert len(evals) == 9
    assert_one_outcome_each(cands, evals)
    assert store.read_config()["ray"]["address"] == "auto" and store.read_config()["evaluators"]["num"] == 3
    # three 1-CPU evaluators need the worker node's CPU as well as the head's two
    assert evals.node.notna().all() and evals.node.nunique() == 2, evals[["worker", "node"]]
    status = cli("status", job_id, "--address", cluster["jobs"])
    assert status.returncode == 0 and '"status": "SUCCEEDED"' in status.stdout, status.stderr
    bad = CliRunner().invoke(main, ["launch", str(tmp_path / "missing.yaml")])
    assert bad.exit_code != 0 and "does not exist" in bad.output


def test_a_launched_run_shows_its_metrics_and_named_actors_and_stops(cluster, tmp_path, tiny_model_dir,
                                                                     corpus_file):
    search = small_search("watched", tmp_path / "runs" / "{name}", tiny_model_dir, corpus_file, evaluations=200)
    launched = cli("launch", str(write_cluster_file(tmp_path / "c.yaml", cluster, search, sleep_seconds=2)),
                   "--no-wait")
    assert launched.returncode == 0, launched.stderr
    job_id = launched.stdout.split()[1].rstrip(":")
    names, text = set(), ""
    deadline = time.time() + 180
    while time.time() < deadline and not ("ray_autoprune_candidates_proposed" in text and len(names) >= 5):
        time.sleep(3)
        text = _get(cluster["metrics"])
        actors = cli("list-actors", cluster["gcs"]).stdout
        names = {n for n in ("watched:policy", "watched:population", "watched:evaluator-0", "watched:evaluator-1",
                             "watched:evaluator-2") if n in actors}
    # the engine's metrics in the head node's Prometheus export, its actors in Ray's state API
    for metric in ("ray_autoprune_candidates_proposed_total", "ray_autoprune_eval_queue_depth",
                   "ray_autoprune_candidates_evaluated_total"):
        assert metric in text, metric
    assert len(names) == 5, names
    assert cli("stop", job_id, "--address", cluster["jobs"]).returncode == 0
    deadline = time.time() + 120
    while time.time() < deadline and '"status": "STOPPED"' not in cli("status", job_id, "--address",
                                                                         cluster["jobs"]).stdout:
        time.sleep(2)
    assert '"status": "STOPPED"' in cli("status", job_id, "--address", cluster["jobs"]).stdout


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except (OSError, urllib.error.URLError):
        return ""


def test_launch_validates_the_search_and_keeps_secrets_out_of_the_job(tmp_path, monkeypatch):
    from autoprune_ray.engine.config import ConfigError, RunConfig, from_dict
    from autoprune_ray.engine.launch import CONFIG_ENV, job_spec, load_cluster, resolve_search
    monkeypatch.setenv("MY_ENDPOINT_KEY", "sk-secret-value")
    search = {"name": "c", "policy": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1",
                                      "api_key_env": "MY_ENDPOINT_KEY"}}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"address": "http://127.0.0.1:8265", "search": search,
                                    "resources": {"evaluators": 5, "gpus_per_evaluator": 0.5, "dpo_gpus": 0.25},
                                    "overrides": {"search.max_evaluations": 7}}))
    cluster = load_cluster(path)
    spec = job_spec(cluster, resolve_search(cluster))
    cfg = from_dict(RunConfig, yaml.safe_load(spec["runtime_env"]["env_vars"][CONFIG_ENV]))
    assert (cfg.evaluators.num, cfg.evaluators.num_gpus, cfg.dpo.num_gpus) == (5, 0.5, 0.25)
    assert cfg.search.max_evaluations == 7 and cfg.ray.address == "auto"
    assert spec["entrypoint"].endswith("-m autoprune_ray.engine.launch")
    assert "sk-secret-value" not in repr(spec)            # the key stays in the environment
    path.write_text(yaml.safe_dump({"search": {"search": {"max_evaluatons": 3}}}))
    with pytest.raises(ConfigError, match="max_evaluatons"):
        resolve_search(load_cluster(path))
    path.write_text(yaml.safe_dump({"resources": {"evaluators": "many"}}))
    with pytest.raises(ConfigError, match="resources.evaluators"):
        load_cluster(path)
