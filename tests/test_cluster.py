"""`autoprune-ray launch` on a real Ray cluster: a head started with `ray start --head` and a
second worker node process on this machine, with its own resources. The search is submitted
through Ray's Jobs API and checked in its run directory. Faults on the cluster: a stopped job
launched again resumes from its checkpoint; an evaluator actor killed with SIGKILL restarts and its
candidate is recorded once."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml
from click.testing import CliRunner

ray = pytest.importorskip("ray")

from autoprune_ray.engine.cli import main  # noqa: E402
from autoprune_ray.engine.storage import RunStore  # noqa: E402

from tests_support import COMPLETIONS, assert_one_outcome_each  # noqa: E402
from tests_support import (assert_resumed_cleanly, cli, client_env, job_id, local_ray_cluster,  # noqa: E402
                           ray_state, scaled, write_cluster_file)


@pytest.fixture(scope="module")
def cluster():
    """Head (2 CPUs) + worker node (1 CPU, resource `second_node`)."""
    with local_ray_cluster(head_cpus=2, worker_cpus=1, worker_resources={"second_node": 1}) as addresses:
        yield addresses


def small_search(name: str, run_dir, tiny_model_dir, corpus_file, evaluations: int) -> dict:
    return {"name": name, "run_dir": str(run_dir),
              "target": {"model": str(tiny_model_dir), "calib_data": str(corpus_file), "nsamples": 4, "seqlen": 32,
                         "val_tokens": 128, "device": "cpu"},
              "policy": {"backend": "scripted", "scripted": COMPLETIONS, "prompts_per_batch": 2,
                         "completions_per_prompt": 2},
              "search": {"islands": 2, "population_size": 6, "elites": 1, "max_evaluations": evaluations,
                         "max_seconds": scaled(300), "eval_time_limit": scaled(120), "cascade": 100.0, "checkpoint_every": 1,
                         "operators": {"llm_mutate": 0.5, "llm_init": 0.2, "symbolic_mutate": 0.3}}}


def costly_cluster_file(path, cluster, search: dict, sleep_seconds: float, pause_while_file=None):
    # a known cost per evaluation spreads the work over all three evaluators
    faults = {"sleep_seconds": str(sleep_seconds)} | ({"pause_while_file": str(pause_while_file)}
                                                      if pause_while_file else {})
    return write_cluster_file(path, cluster["jobs"], search, evaluators=3,
                              overrides={"evaluators.fault_injection": faults})


def wait_for_actors(cluster, names: set[str], timeout: float = 180) -> None:
    """Until every named actor is ALIVE (its constructor has finished)."""
    deadline = time.time() + scaled(timeout)
    while names - {a["name"] for a in ray_state("actors", cluster["gcs"]) if a["state"] == "ALIVE"}:
        assert time.time() < deadline, f"actors {sorted(names)} did not all come up"
        time.sleep(1)


def test_launch_runs_a_search_as_a_ray_job_on_two_nodes(cluster, tmp_path, tiny_model_dir, corpus_file):
    search = small_search("launched", tmp_path / "runs" / "{name}", tiny_model_dir, corpus_file, evaluations=9)
    # evaluations wait until all three evaluators are up: on a busy machine the worker node's
    # evaluator comes up last, and both nodes must evaluate (an event, not a longer sleep)
    pause = tmp_path / "pause"
    pause.touch()
    cluster_file = costly_cluster_file(tmp_path / "cluster.yaml", cluster, search, sleep_seconds=1,
                                       pause_while_file=pause)
    stdout, stderr = tmp_path / "launch.out", tmp_path / "launch.err"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        launch = subprocess.Popen([sys.executable, "-m", "autoprune_ray.engine.cli", "launch", str(cluster_file)],
                                  env=client_env(), stdout=out, stderr=err)
    try:
        wait_for_actors(cluster, {f"launched:evaluator-{i}" for i in range(3)})
        pause.unlink()
        assert launch.wait(timeout=scaled(600)) == 0, stdout.read_text()[-3000:] + stderr.read_text()[-2000:]
    finally:
        if launch.poll() is None:
            launch.kill()
    output = stdout.read_text()
    assert "dashboard: http://127.0.0.1" in output and "SUCCEEDED" in output
    job = job_id(output)
    store = RunStore(tmp_path / "runs" / "launched")
    cands, evals = store.read("candidates"), store.read("evaluations")
    assert len(evals) == 9
    assert_one_outcome_each(cands, evals)
    assert store.read_config()["ray"]["address"] == "auto" and store.read_config()["evaluators"]["num"] == 3
    # three 1-CPU evaluators need the worker node's CPU as well as the head's two
    assert evals.node.notna().all() and evals.node.nunique() == 2, evals[["worker", "node"]]
    status = cli("status", job, "--address", cluster["jobs"])
    assert status.returncode == 0 and '"status": "SUCCEEDED"' in status.stdout, status.stderr
    bad = CliRunner().invoke(main, ["launch", str(tmp_path / "missing.yaml")])
    assert bad.exit_code != 0 and "does not exist" in bad.output


def test_a_launched_run_shows_its_metrics_and_named_actors_and_stops(cluster, tmp_path, tiny_model_dir,
                                                                     corpus_file):
    search = small_search("watched", tmp_path / "runs" / "{name}", tiny_model_dir, corpus_file, evaluations=200)
    launched = cli("launch", str(costly_cluster_file(tmp_path / "c.yaml", cluster, search, sleep_seconds=2)),
                   "--no-wait")
    assert launched.returncode == 0, launched.stderr
    job = job_id(launched.stdout)
    names, text = set(), ""
    wanted = {"watched:policy", "watched:population", "watched:evaluator-0", "watched:evaluator-1",
              "watched:evaluator-2"}
    metrics = ("ray_autoprune_candidates_proposed_total", "ray_autoprune_eval_queue_depth",
               "ray_autoprune_candidates_evaluated_total")
    deadline = time.time() + scaled(180)
    while time.time() < deadline and not (all(m in text for m in metrics) and names == wanted):
        time.sleep(3)
        text = _get(cluster["metrics"])
        names = wanted & {a["name"] for a in ray_state("actors", cluster["gcs"])}
    # the engine's metrics in the head node's Prometheus export, its actors in Ray's state API
    for metric in metrics:
        assert metric in text, metric
    assert names == wanted
    assert cli("stop", job, "--address", cluster["jobs"]).returncode == 0
    assert wait_for_job(cluster, job) == "STOPPED"


def wait_for_job(cluster, job: str, timeout: float = 120) -> str:
    """The job's status once it has ended (or whatever it is at the deadline)."""
    deadline = time.time() + scaled(timeout)
    while True:
        status = json.loads(cli("status", job, "--address", cluster["jobs"]).stdout)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or time.time() > deadline:
            return status
        time.sleep(2)


def wait_for_evaluations(store_dir, count: int, timeout: float = 180) -> None:
    timeout = scaled(timeout)
    deadline = time.time() + timeout
    while not ((store_dir / "config.yaml").exists() and len(RunStore(store_dir).read("evaluations")) >= count):
        assert time.time() < deadline, f"fewer than {count} evaluations recorded in {timeout:.0f} s"
        time.sleep(1)


def test_a_stopped_job_launched_again_resumes_from_its_checkpoint(cluster, tmp_path, tiny_model_dir, corpus_file):
    search = small_search("relaunched", tmp_path / "runs" / "{name}", tiny_model_dir, corpus_file, evaluations=12)
    pause = tmp_path / "pause"
    cluster_file = costly_cluster_file(tmp_path / "c.yaml", cluster, search, sleep_seconds=1.5,
                                       pause_while_file=pause)
    store_dir = tmp_path / "runs" / "relaunched"
    first = cli("launch", str(cluster_file), "--no-wait")
    assert first.returncode == 0, first.stderr
    wait_for_evaluations(store_dir, 3)
    pause.touch()   # evaluations not yet started wait: the job is stopped mid-run however slow `stop` is
    # `stop` ends the driver (SIGTERM, then SIGKILL) wherever it is: the checkpoint is all that is left
    assert cli("stop", job_id(first.stdout), "--address", cluster["jobs"]).returncode == 0
    assert wait_for_job(cluster, job_id(first.stdout)) == "STOPPED"
    before = RunStore(store_dir).read("evaluations")
    assert 3 <= len(before) < 12
    pause.unlink()

    again = cli("launch", str(cluster_file))   # the same file: the driver finds the run directory and resumes
    assert again.returncode == 0 and "SUCCEEDED" in again.stdout, again.stdout[-3000:] + again.stderr[-2000:]
    assert_resumed_cleanly(RunStore(store_dir), before, total=12)


def test_an_evaluator_killed_on_the_cluster_restarts_and_its_candidate_is_recorded_once(
        cluster, tmp_path, tiny_model_dir, corpus_file):
    search = small_search("shot", tmp_path / "runs" / "{name}", tiny_model_dir, corpus_file, evaluations=12)
    store_dir = tmp_path / "runs" / "shot"
    log = tmp_path / "launch.log"
    with open(log, "w") as out:
        launch = subprocess.Popen([sys.executable, "-m", "autoprune_ray.engine.cli", "launch",
                                   str(costly_cluster_file(tmp_path / "c.yaml", cluster, search, sleep_seconds=2))],
                                  env=client_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_evaluations(store_dir, 2)
        victim = next(a for a in ray_state("actors", cluster["gcs"])
                      if a["name"] == "shot:evaluator-0" and a["state"] == "ALIVE")
        # evaluations are mostly the 2 s sleep and the queue is never empty: the kill lands mid-evaluation
        os.kill(victim["pid"], signal.SIGKILL)
        assert launch.wait(timeout=scaled(300)) == 0, log.read_text()[-3000:]
    finally:
        if launch.poll() is None:
            launch.kill()
    store = RunStore(store_dir)
    cands, evals = store.read("candidates"), store.read("evaluations")
    summary = store.load_checkpoint()["summary"]
    assert len(evals) == 12
    assert_one_outcome_each(cands, evals, summary)
    assert summary["evaluator_restarts"] >= 1
    # the candidate in flight on the dead evaluator was queued again and recorded on its second attempt
    assert evals.attempts.max() == 1, evals[["status", "reason", "attempts", "worker"]]


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
