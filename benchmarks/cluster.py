"""Cluster throughput, written to benchmarks/results/cluster-cpu.json.

    python benchmarks/cluster.py --evaluators 1,2,4 --cost 2 --evaluations 24

The config of `benchmarks/engine.py scaling` (a scripted policy of distinct valid programs, a tiny
target, a known cost per evaluation through `fault_injection.sleep_seconds`), run twice for each
evaluator count in one invocation:

* local: in-process on a single-node Ray (`run_search`, what `autoprune-ray run` calls) with as
  many CPUs as the cluster has in all;
* cluster: `autoprune-ray launch` (a Ray Job) on a real local cluster, a `ray start --head`
  process and a worker node process with 2 CPUs each, started as tests/test_cluster.py starts
  them. An evaluator takes 1 CPU, so 4 evaluators need both nodes.

Both nodes share this machine's cores, so the cluster adds no compute: the comparison measures
what launching and spreading the engine costs. Each evaluation records its Ray node.
"""
from __future__ import annotations

import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import click

# engine.py sits beside this script (sys.path[0]); the cluster helpers are the tests' own
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))
from engine import RESULTS, scaling_config, throughput, tiny_target  # noqa: E402
from tests_support import cli, local_ray_cluster, ray_state, write_cluster_file  # noqa: E402

NODE_CPUS = 2            # head and worker alike
CPUS_PER_EVALUATOR = 1


def search_config(model_dir: str, root: Path, mode: str, evaluators: int, cost: float, evaluations: int):
    cfg = scaling_config(model_dir, root / mode, evaluators, cost, evaluations, name=f"{mode}-{evaluators}")
    cfg.evaluators.num_cpus = CPUS_PER_EVALUATOR
    return cfg


def local_rows(model_dir: str, root: Path, counts: list[int], cost: float, evaluations: int) -> list[dict]:
    import ray

    from autoprune_ray.engine.runner import run_search
    from autoprune_ray.engine.storage import RunStore

    ray.init(address="local", num_cpus=2 * NODE_CPUS, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for n in counts:
            cfg = search_config(model_dir, root, "local", n, cost, evaluations)
            start = time.perf_counter()
            summary = run_search(cfg, progress=False)
            wall = time.perf_counter() - start
            rows.append(row(n, summary, RunStore(cfg.resolved_run_dir).read("evaluations"), wall, {}))
    finally:
        ray.shutdown()
    return rows


def cluster_rows(model_dir: str, root: Path, counts: list[int], cost: float, evaluations: int) -> list[dict]:
    with local_ray_cluster(head_cpus=NODE_CPUS, worker_cpus=NODE_CPUS) as cluster:
        roles = {n["node_id"]: "head" if n["is_head_node"] else "worker" for n in ray_state("nodes", cluster["gcs"])}
        return [launched_row(model_dir, root, cluster, roles, n, cost, evaluations) for n in counts]


def launched_row(model_dir: str, root: Path, cluster: dict, roles: dict, evaluators: int, cost: float,
                 evaluations: int) -> dict:
    from autoprune_ray.engine.storage import RunStore

    cfg = search_config(model_dir, root, "cluster", evaluators, cost, evaluations)
    path = write_cluster_file(root / f"cluster-{evaluators}.yaml", cluster["jobs"], cfg.to_dict(), evaluators,
                              CPUS_PER_EVALUATOR)
    start = time.perf_counter()
    launched = cli("launch", str(path), timeout=1800)
    wall = time.perf_counter() - start
    if launched.returncode != 0:
        raise RuntimeError(f"launch failed:\n{launched.stdout[-3000:]}\n{launched.stderr[-3000:]}")
    store = RunStore(cfg.resolved_run_dir)
    return row(evaluators, store.load_checkpoint()["summary"], store.read("evaluations"), wall, roles)


def row(evaluators: int, summary: dict, evals, wall: float, roles: dict) -> dict:
    """throughput() plus where the evaluations ran (head/worker on the cluster) and when each node's
    evaluators began, after the run's first evaluation: a node whose evaluators start late lowers
    the steady throughput. The load average says how busy the shared machine was."""
    node = evals.node.map(lambda n: roles.get(n, n))
    started = evals.finished - evals.seconds
    joined = started.groupby(evals.worker).min().max()   # the last evaluator's first evaluation
    return throughput(evaluators, summary, evals, wall) | {
        "evaluations_per_node": dict(Counter(node)),
        "first_start_per_node_seconds": (started.groupby(node).min() - started.min()).round(2).to_dict(),
        "all_joined_evaluations_per_second": float((started >= joined).sum() / (evals.finished.max() - joined)),
        "load_average_1m_after": os.getloadavg()[0]}


def add_ratios(local: list[dict], cluster: list[dict]) -> None:
    for rows in (local, cluster):
        for r in rows:
            r["speedup_over_one"] = r["evaluations_per_second"] / rows[0]["evaluations_per_second"]
            r["all_joined_speedup_over_one"] = (r["all_joined_evaluations_per_second"]
                                                / rows[0]["all_joined_evaluations_per_second"])
    for here, there in zip(local, cluster):
        for key in ("evaluations_per_second", "all_joined_evaluations_per_second", "wall_seconds"):
            there[f"{key}_over_local"] = there[key] / here[key]


@click.command()
@click.option("--evaluators", default="1,2,4", show_default=True)
@click.option("--cost", default=2.0, show_default=True, help="known extra seconds per evaluation")
@click.option("--evaluations", default=24, show_default=True)
def main(evaluators: str, cost: float, evaluations: int) -> None:
    # a terminated benchmark unwinds, so the cluster it started is torn down
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    counts = [int(x) for x in evaluators.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_target(Path(tmp) / "tiny")
        local = local_rows(model_dir, Path(tmp), counts, cost, evaluations)
        cluster = cluster_rows(model_dir, Path(tmp), counts, cost, evaluations)
    add_ratios(local, cluster)
    for r in local + cluster:
        click.echo(json.dumps(r))
    result = {"benchmark": "local run vs `autoprune-ray launch` on a two-node local Ray cluster, "
                           "a known cost per evaluation", "cost_seconds": cost, "evaluations": evaluations,
              "machine": f"{platform.machine()}, shared 2-core CPU; both nodes on this machine",
              "local_ray": f"in-process ray.init, num_cpus={2 * NODE_CPUS}",
              "cluster": f"ray start --head ({NODE_CPUS} CPUs) + worker node ({NODE_CPUS} CPUs), token auth on",
              "cpus_per_evaluator": CPUS_PER_EVALUATOR, "local": local, "launched": cluster,
              "note": "evaluations_per_second over the steady span (first evaluation start to last end); "
                      "all_joined_evaluations_per_second: evaluations started once every evaluator had begun "
                      "its first one, over the time from then to the last end (excludes evaluators that start "
                      "late, e.g. on the worker node); speedup_over_one against 1 evaluator of the same mode; "
                      "*_over_local against the local run with the same evaluators; a launched wall time "
                      "includes job submission, the driver's start and log polling (2 s). The machine was "
                      "shared: another developer's search ran throughout (see load_average_1m_after)."}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cluster-cpu.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
