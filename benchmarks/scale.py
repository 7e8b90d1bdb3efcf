"""The driver at scale: how fast the engine turns candidates into outcomes, and how its costs grow
with the run's length and the number of evaluators. Writes benchmarks/results/scale-cpu.json,
one key per arm.

    python benchmarks/scale.py driver --candidates 1000,10000,100000 --evaluators 4 --repeats 3
    python benchmarks/scale.py evaluators --counts 1,4,16,64 --cost 0.5
    python benchmarks/scale.py launched --counts 4,16 --cost 0.5

Every arm runs the real engine in this process (`run_search`: local Ray, the policy actor, the
population actor, evaluator actors, the Parquet tables) with
  * the scripted policy backend (a real backend class) fed distinct generated programs, written
    as LLM completions: every candidate goes through prompt building, parsing and dedup;
  * synthetic evaluators (`evaluators.synthetic_seconds`, engine/synthetic.py): no model, a known
    cost per evaluation (a sleep, so it takes no CPU) and a fitness derived from the program's hash.
So what is measured is the engine itself, not a model's forward pass.

`driver` (cost 0 by default): candidates per second through the driver, the engine's overhead per
candidate (`summary.overhead_per_candidate`: loop time not spent waiting on actors, per proposed
candidate), the driver's resident memory before and after the run (bytes per candidate), and the
Parquet writes (seconds, parts, bytes on disk). `evaluators` (cost 0.5 s by default): evaluations
per second in the steady state, from when the last evaluator became ready to the last outcome,
against one evaluator; evaluators share this machine's CPUs as fractions (num_cpus = CPUs / count).
`launched`: the same runs, local (in-process Ray with 4 CPUs) and through `autoprune-ray launch` on
a head + worker node (`ray start`, 2 CPUs each, token auth on, as tests/test_cluster.py starts
them; both on this machine), compared at the same evaluator count.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "scale-cpu.json"
# LLM-style completions; the constant makes each program distinct (its canonical hash too).
TEMPLATES = ("abs(W) * A ** {c}", "abs(W) * sqrt(A) + {c} * abs(W)", "W ** 2 * A + {c} * abs(W)")
OPERATORS = {"llm_init": 0.15, "llm_mutate": 0.3, "llm_crossover": 0.1, "gcot": 0.15}   # the default's LLM share


def programs(count: int) -> list[str]:
    out = []
    for k in range(count):
        body = TEMPLATES[k % len(TEMPLATES)].format(c=f"{0.5 + k * 1e-6:.7f}")
        out.append(f"A program:\n```python\ndef score(W, A):\n    return {body}\n```")
    return out


def scale_config(root: Path, name: str, evaluations: int, evaluators: int, cost: float, cpus: float):
    from autoprune_ray.engine.config import EvaluatorConfig, PolicyConfig, RunConfig, SearchConfig

    batch = 16 * 4   # completions per policy call
    return RunConfig(
        name=name, run_dir=str(root / "{name}"),
        policy=PolicyConfig(backend="scripted", scripted=programs(evaluations + 4 * batch), prompts_per_batch=16,
                            completions_per_prompt=4, grammar=False),
        search=SearchConfig(seeds=False, max_evaluations=evaluations, max_seconds=None, cascade=1e9,
                            queue_size=max(2 * batch, 4 * evaluators), operators=OPERATORS, eval_time_limit=120),
        evaluators=EvaluatorConfig(num=evaluators, num_cpus=min(1.0, cpus / evaluators), synthetic_seconds=cost),
    ).validate()


def rss() -> int:
    """This process's resident memory, bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> float:
    """This process's CPU time (user + system, every thread: the loop and Ray's core worker)."""
    t = os.times()
    return t.user + t.system


class Memory(threading.Thread):
    """The driver's RSS and CPU time while a run goes on, sampled every 0.2 s:
    (epoch seconds, bytes, CPU seconds)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples, self.done = [(time.time(), rss(), cpu_seconds())], threading.Event()

    def run(self):
        while not self.done.wait(0.2):
            self.samples.append((time.time(), rss(), cpu_seconds()))

    def _points(self, started: float, created) -> tuple[list[tuple[int, int, float]], int]:
        """(candidates proposed so far, RSS, CPU seconds) at each sample; the run's candidates."""
        import bisect
        times = sorted(float(c) for c in created)
        return [(bisect.bisect_right(times, t - started), b, c) for t, b, c in self.samples], len(times)

    def slope(self, started: float, created) -> float | None:
        """Bytes of RSS per candidate over the run's second half (start-up and warm-up, such as
        Ray's and Arrow's pools filling, excluded): a least-squares line through (candidates
        proposed so far, RSS) at each sample."""
        import numpy as np
        points, n = self._points(started, created)
        half = [(k, b) for k, b, _ in points if n / 2 <= k < n]
        if len({k for k, _ in half}) < 3:
            return None
        return float(np.polyfit([k for k, _ in half], [b for _, b in half], 1)[0])

    def cpu_by_tenth(self, started: float, created) -> list[float | None]:
        """The driver's CPU seconds per candidate in each tenth of the run's candidates (by count):
        does the driver's own work per candidate grow as the run grows? CPU time, unlike wall
        time, does not count the time the driver waits for a core it shares with the actors."""
        points, n = self._points(started, created)
        return [_cpu_rate(points, i * n / 10, (i + 1) * n / 10) for i in range(10)]

    def cpu_per_candidate(self, started: float, created) -> float | None:
        """CPU seconds per candidate from the first candidate to the last (start-up excluded)."""
        points, n = self._points(started, created)
        return _cpu_rate(points, 1, n)


def _cpu_rate(points: list[tuple[int, int, float]], low: float, high: float) -> float | None:
    """CPU seconds per candidate between the first and last sample with low <= candidates <= high."""
    inside = [(k, c) for k, _, c in points if low <= k <= high]
    done = inside[-1][0] - inside[0][0] if inside else 0
    return (inside[-1][1] - inside[0][1]) / done if done else None


class ParquetCost:
    """Seconds and parts spent in RunStore._write_part while it is active (serialising rows to
    Parquet and writing the part)."""

    def __enter__(self):
        from autoprune_ray.engine.storage import RunStore
        self.cls, self.original, self.seconds, self.parts, self.rows = RunStore, RunStore._write_part, 0.0, 0, 0

        def timed(store, table, rows):
            start = time.perf_counter()
            self.original(store, table, rows)
            self.seconds += time.perf_counter() - start
            self.parts, self.rows = self.parts + 1, self.rows + len(rows)
        RunStore._write_part = timed
        return self

    def __exit__(self, *exc):
        self.cls._write_part = self.original


class GcTime:
    """CPU seconds spent in Python's garbage collector, and collections run, by generation. A full
    (generation 2) collection walks every tracked object, the import-time heap of torch, Ray and
    pandas included, so its cost is set by the whole process, not by the run."""

    def __enter__(self):
        import gc
        self.seconds, self.collections, self._start = [0.0, 0.0, 0.0], [0, 0, 0], None
        gc.callbacks.append(self._callback)
        return self

    def _callback(self, phase: str, info: dict) -> None:
        # thread_time: the collecting thread's CPU time (a collection holds the GIL to its end)
        if phase == "start":
            self._start = time.thread_time()
        elif self._start is not None:
            self.seconds[info["generation"]] += time.thread_time() - self._start
            self.collections[info["generation"]] += 1

    def __exit__(self, *exc):
        import gc
        gc.callbacks.remove(self._callback)


def run_arm(cfg) -> tuple[dict, dict]:
    """Run one search; (summary, measurements)."""
    import gc

    from autoprune_ray.engine.runner import run_search
    from autoprune_ray.engine.storage import RunStore

    gc.collect()
    load_before, memory = os.getloadavg()[0], Memory()
    before = memory.samples[0][1]
    memory.start()
    start = time.perf_counter()
    with ParquetCost() as parquet, GcTime() as collector:
        summary = run_search(cfg, progress=False)
    wall = time.perf_counter() - start
    memory.done.set()
    peak = max(b for _, b, _ in memory.samples)
    store = RunStore(cfg.resolved_run_dir)
    cands, evals = store.read("candidates"), store.read("evaluations")
    disk = sum(p.stat().st_size for p in Path(cfg.resolved_run_dir, "tables").rglob("*.parquet"))
    n = len(cands)
    return summary, {
        "candidates": n, "evaluations": len(evals), "statuses": cands.status.value_counts().to_dict(),
        "outcomes": evals.status.value_counts().to_dict(), "wall_seconds": wall, "run_seconds": summary["seconds"],
        "evaluations_table": evals, "candidates_table": cands,
        "rss_before_mb": before / 2 ** 20, "rss_peak_mb": peak / 2 ** 20,
        "rss_peak_growth_bytes_per_candidate": (peak - before) / n,
        "rss_slope_bytes_per_candidate": memory.slope(summary["started"], cands.created),
        "driver_cpu_seconds_per_candidate": memory.cpu_per_candidate(summary["started"], cands.created),
        "driver_cpu_seconds_per_candidate_by_tenth": memory.cpu_by_tenth(summary["started"], cands.created),
        "code_chars_by_tenth": code_chars_by_tenth(cands),
        "parquet_seconds": parquet.seconds, "parquet_parts": parquet.parts, "parquet_rows": parquet.rows,
        "parquet_seconds_per_candidate": parquet.seconds / n,
        "gc_seconds_by_generation": collector.seconds, "gc_collections_by_generation": collector.collections,
        "gc_seconds_per_candidate": sum(collector.seconds) / n, "tables_bytes_on_disk": disk,
        "disk_bytes_per_candidate": disk / n, "load_average_1min": [load_before, os.getloadavg()[0]]}


def code_chars_by_tenth(cands) -> list[float]:
    """Mean length of the programs in each tenth of the run (by candidate id): parsing and
    canonicalising cost grows with a program's size, so a run whose programs grew would slow for
    that reason alone (measured flat in these arms: the scripted completions have one size)."""
    import numpy as np
    code = cands.sort_values("candidate_id").code.fillna("").str.len().to_numpy()
    return [float(part.mean()) for part in np.array_split(code, 10)]


def steady(evals, cands) -> dict:
    """Rates from the tables' own clocks, from when every evaluator had begun its first
    evaluation (actor and policy start-up excluded) to the last outcome: the rate a longer run
    keeps up. Evaluations count when they started in that span."""
    started = evals.finished - evals.seconds
    begin = float(started.groupby(evals.worker).min().max())
    span = float(evals.finished.max()) - begin
    made = cands[(cands.created >= begin) & (cands.created <= begin + span)]
    return {"steady_from_seconds": begin, "steady_seconds": span,
            "evaluations_per_second": int((started >= begin).sum()) / span if span > 0 else None,
            "candidates_per_second": len(made) / span if span > 0 else None,
            "candidates_per_second_by_tenth": _by_tenth(made.created, begin, span)}


def _by_tenth(created, begin: float, span: float) -> list[float] | None:
    """Candidates per second in each tenth of the steady span: within one run (one machine load),
    does the driver slow down as the run grows?"""
    if span <= 0:
        return None
    tenth = span / 10
    counts = ((created - begin) // tenth).clip(upper=9).value_counts()
    return [float(counts.get(i, 0)) / tenth for i in range(10)]


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30:.0f} GiB, "
            f"Python {platform.python_version()}")


def _write(key: str, result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    data[key] = result
    OUT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    click.echo(f"{key}: {json.dumps(result)}")


def _ray(cpus: int, log_level: str):
    import ray
    # The engine logs every outcome at INFO: at hundreds a second that is a terminal's worth of
    # text, not engine work. --log-level INFO measures it too. (A handler here keeps the run's
    # display from attaching its own at INFO.)
    engine = logging.getLogger("autoprune_ray.engine")
    engine.addHandler(logging.StreamHandler(sys.stderr))
    engine.setLevel(log_level)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return ray


@click.group()
def main():
    """Scale benchmarks of the engine (see the module docstring)."""


@main.command()
@click.option("--candidates", default="1000,10000", show_default=True, help="Evaluations per arm (comma list).")
@click.option("--evaluators", default=4, show_default=True)
@click.option("--cost", default=0.0, show_default=True, help="Seconds per evaluation.")
@click.option("--cpus", default=2, show_default=True, help="CPUs of the local Ray instance.")
@click.option("--repeats", default=3, show_default=True, help="Runs of each length, each in a fresh process.")
@click.option("--log-level", default="WARNING", show_default=True)
@click.option("--gc-freeze/--no-gc-freeze", default=True, show_default=True,
              help="--no-gc-freeze: the ablation, the loop without runner._startup_heap_frozen "
                   "(written as driver-N-nofreeze).")
@click.option("--run-key", default=None, hidden=True, help="(internal) one run, written under this key.")
def driver(candidates: str, evaluators: int, cost: float, cpus: int, repeats: int, log_level: str,
           gc_freeze: bool, run_key: str | None) -> None:
    """Throughput, overhead, memory and Parquet cost of runs of growing length. Each run gets a
    fresh process (one run's leftovers must not tax the next), and each length the median of
    `repeats` runs: on a shared 2-core machine, runs of the same length differ by ~20%."""
    if run_key is not None:
        return _driver_run(int(candidates), evaluators, cost, cpus, log_level, run_key, gc_freeze)
    freeze = "--gc-freeze" if gc_freeze else "--no-gc-freeze"
    for n in (int(x) for x in candidates.split(",")):
        name = f"driver-{n}" + ("" if gc_freeze else "-nofreeze")
        keys = [f"{name}/run{i}" for i in range(repeats)]
        for key in keys:
            subprocess.run([sys.executable, __file__, "driver", "--candidates", str(n), "--evaluators", str(evaluators),
                            "--cost", str(cost), "--cpus", str(cpus), "--log-level", log_level, freeze,
                            "--run-key", key], check=True)
        data = json.loads(OUT.read_text())
        runs = [data.pop(k) for k in keys]
        OUT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        _write(name, _median_of(runs))


def _median_of(runs: list[dict]) -> dict:
    """The run of median overhead, whole, with every run's headline figures beside it."""
    import statistics
    ranked = sorted(runs, key=lambda r: r["overhead_per_candidate_seconds"])
    headline = ("overhead_per_candidate_seconds", "driver_cpu_seconds_per_candidate", "candidates_per_second")
    return ranked[len(ranked) // 2] | {"repeats": len(runs)} | {
        f"{k}_runs": [r[k] for r in runs] for k in headline} | {
        f"median_{k}": statistics.median(r[k] for r in runs if r[k] is not None) for k in headline}


def _driver_run(n: int, evaluators: int, cost: float, cpus: int, log_level: str, key: str, gc_freeze: bool) -> None:
    if not gc_freeze:
        from autoprune_ray.engine import runner
        runner._startup_heap_frozen = contextlib.nullcontext
    ray = _ray(cpus, log_level)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = scale_config(Path(tmp), f"driver-{n}", n, evaluators, cost, cpus)
        summary, m = run_arm(cfg)
        evals, cands = m.pop("evaluations_table"), m.pop("candidates_table")
        _write(key, m | steady(evals, cands) | {
            "overhead_per_candidate_seconds": summary["overhead_per_candidate"],
            "overall_candidates_per_second": m["candidates"] / summary["seconds"],
            "evaluator_ready_seconds": [min(summary["evaluator_ready_seconds"]), max(summary["evaluator_ready_seconds"])],
            "evaluators": evaluators, "cost_seconds": cost, "log_level": log_level, "gc_freeze": gc_freeze,
            "machine": machine()})
    ray.shutdown()


@main.command("evaluators")
@click.option("--counts", default="1,4,16", show_default=True)
@click.option("--cost", default=0.5, show_default=True, help="Seconds per evaluation.")
@click.option("--per-evaluator", default=20, show_default=True, help="Evaluations per evaluator in each arm.")
@click.option("--cpus", default=2, show_default=True, help="CPUs of the local Ray instance.")
@click.option("--log-level", default="WARNING", show_default=True)
def evaluators_(counts: str, cost: float, per_evaluator: int, cpus: int, log_level: str) -> None:
    """Evaluator scaling at a known cost: speed-up over one evaluator."""
    ray = _ray(cpus, log_level)
    one = None
    with tempfile.TemporaryDirectory() as tmp:
        for count in (int(x) for x in counts.split(",")):
            n = max(40, per_evaluator * count)
            cfg = scale_config(Path(tmp), f"evaluators-{count}", n, count, cost, cpus)
            summary, m = run_arm(cfg)
            evals, cands = m.pop("evaluations_table"), m.pop("candidates_table")
            rates = steady(evals, cands)
            one = rates["evaluations_per_second"] if count == 1 else one
            result = {k: m[k] for k in ("candidates", "evaluations", "outcomes", "wall_seconds", "load_average_1min")}
            result |= rates | {
                "ideal_evaluations_per_second": count / cost if cost else None,
                "speedup_over_one": rates["evaluations_per_second"] / one if one else None,
                "evaluator_utilization": summary["evaluator_utilization"],
                "overhead_per_candidate_seconds": summary["overhead_per_candidate"],
                "evaluator_ready_seconds": [min(summary["evaluator_ready_seconds"]),
                                            max(summary["evaluator_ready_seconds"])],
                "num_cpus_per_evaluator": cfg.evaluators.num_cpus, "cost_seconds": cost, "machine": machine()}
            _write(f"evaluators-{cost:g}s-{count}", result)
    ray.shutdown()


def _local_rates(root: Path, count: int, n: int, cost: float, cpus: int) -> dict:
    cfg = scale_config(root, f"local-{count}", n, count, cost, cpus)
    summary, m = run_arm(cfg)
    return steady(m["evaluations_table"], m["candidates_table"]) | {
        "overhead_per_candidate_seconds": summary["overhead_per_candidate"],
        "evaluator_ready_seconds": [min(summary["evaluator_ready_seconds"]), max(summary["evaluator_ready_seconds"])]}


def _launched_rates(root: Path, cluster: dict, count: int, n: int, cost: float, cpus: int) -> dict:
    from autoprune_ray.engine.storage import RunStore
    from tests_support import cli, ray_state, write_cluster_file

    cfg = scale_config(root, f"launched-{count}", n, count, cost, cpus)
    path = write_cluster_file(root / f"cluster-{count}.yaml", cluster["jobs"], cfg.to_dict(), count,
                              cfg.evaluators.num_cpus)
    done = cli("launch", str(path), timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"launch failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    store = RunStore(cfg.resolved_run_dir)
    summary = store.load_checkpoint()["summary"]
    evals = store.read("evaluations")
    roles = {n["node_id"]: "head" if n["is_head_node"] else "worker" for n in ray_state("nodes", cluster["gcs"])}
    return steady(evals, store.read("candidates")) | {
        "overhead_per_candidate_seconds": summary["overhead_per_candidate"],
        "evaluations_per_node": evals.node.map(lambda n: roles.get(n, n)).value_counts().to_dict(),
        "evaluator_ready_seconds": [min(summary["evaluator_ready_seconds"]), max(summary["evaluator_ready_seconds"])]}


@main.command()
@click.option("--counts", default="4,16", show_default=True)
@click.option("--cost", default=0.5, show_default=True, help="Seconds per evaluation.")
@click.option("--per-evaluator", default=20, show_default=True, help="Evaluations per evaluator in each arm.")
def launched(counts: str, cost: float, per_evaluator: int) -> None:
    """A local run against `autoprune-ray launch` on head + worker node, at each evaluator count."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from tests_support import local_ray_cluster
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # unwind, so the cluster is torn down
    sizes = [(int(c), max(40, per_evaluator * int(c))) for c in counts.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        ray = _ray(4, "WARNING")
        local = {c: _local_rates(Path(tmp), c, n, cost, 4) for c, n in sizes}
        ray.shutdown()
        with local_ray_cluster(head_cpus=2, worker_cpus=2) as cluster:
            remote = {c: _launched_rates(Path(tmp), cluster, c, n, cost, 4) for c, n in sizes}
    for c, n in sizes:
        rate = remote[c]["evaluations_per_second"] / local[c]["evaluations_per_second"]
        _write(f"launched-{cost:g}s-{c}", {
            "evaluators": c, "evaluations": n, "cost_seconds": cost, "local": local[c], "launched": remote[c],
            "launched_over_local": rate, "load_average_1min": os.getloadavg()[0], "machine": machine(),
            "setup": "local: in-process Ray, 4 CPUs; launched: head + worker node, 2 CPUs each, one machine"})


if __name__ == "__main__":
    main()
