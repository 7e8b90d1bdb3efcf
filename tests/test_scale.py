"""Batching keeps the engine's promise: every candidate has exactly one outcome, when evaluations
go to evaluators several per call, when an evaluator is killed in the middle of a batch, and when
a batch runs past the time limit. The runs use synthetic evaluators (engine/synthetic.py: a known
cost, no model), so they take seconds; everything else is the real engine on a local Ray."""
import gc
import json
import random
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from autoprune_ray.engine import database, runner  # noqa: E402
from autoprune_ray.engine.actors import MirroredPopulation  # noqa: E402
from autoprune_ray.engine.config import EvaluatorConfig, PolicyConfig, RunConfig, SearchConfig  # noqa: E402
from autoprune_ray.engine.database import Individual, Population  # noqa: E402
from autoprune_ray.engine.runner import run_search  # noqa: E402
from tests_support import assert_one_outcome_each, scaled, tables  # noqa: E402


def programs(count: int) -> list[str]:
    """Distinct valid programs, written as a policy's completions."""
    return [f"```python\ndef score(W, A):\n    return abs(W) * A ** {0.5 + k * 1e-4:.5f}\n```" for k in range(count)]


def synthetic_config(tmp_path, name: str, evaluations: int, script: list[str], evaluators: int = 2,
                     time_limit: float = 120, **faults) -> RunConfig:
    return RunConfig(
        name=name, run_dir=str(tmp_path / "{name}"),
        policy=PolicyConfig(backend="scripted", scripted=script, prompts_per_batch=8, completions_per_prompt=4,
                            grammar=False),
        search=SearchConfig(seeds=False, max_evaluations=evaluations, max_seconds=scaled(300), cascade=1e9,
                            queue_size=64, eval_time_limit=time_limit, operators={"llm_init": 0.5, "llm_mutate": 0.5}),
        evaluators=EvaluatorConfig(num=evaluators, num_cpus=0.5, synthetic_seconds=0.0, fault_injection=faults),
    ).validate()


def started_jobs(path) -> list[tuple[int, int, int, int]]:
    """(worker, candidate, position in batch, batch size) of every job an evaluator started."""
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()]


def test_batched_evaluations_record_each_candidate_once(local_ray, tmp_path):
    started = tmp_path / "started"
    cfg = synthetic_config(tmp_path, "batched", 300, programs(400), started_file=str(started))
    summary = run_search(cfg, progress=False)
    cands, evals = tables(cfg)
    assert_one_outcome_each(cands, evals, summary)
    assert len(evals) == summary["evaluated"] == 300
    jobs = started_jobs(started)
    assert any(size > 1 for *_, size in jobs), "fast evaluations went to the evaluators in batches"
    assert sorted(cid for _, cid, _, _ in jobs) == sorted(evals.candidate_id), "each evaluated exactly once"
    assert len(summary["evaluator_ready_seconds"]) == 2 and all(s >= 0 for s in summary["evaluator_ready_seconds"])


def test_an_evaluator_killed_mid_batch_loses_and_repeats_no_outcome(local_ray, tmp_path):
    marker = tmp_path / "mid-batch"
    cfg = synthetic_config(tmp_path, "killed", 200, programs(300), hang_mid_batch_marker=str(marker))
    killed = {}

    def kill_the_evaluator_in_its_batch():
        deadline = time.time() + scaled(120)
        while not marker.exists() and time.time() < deadline:   # the evaluator writes it, then hangs
            time.sleep(0.05)
        if marker.exists():
            killed.update(json.loads(marker.read_text()))
            ray.kill(ray.get_actor(f"killed:evaluator-{killed['worker']}"), no_restart=False)

    thread = threading.Thread(target=kill_the_evaluator_in_its_batch, daemon=True)
    thread.start()
    summary = run_search(cfg, progress=False)
    thread.join(timeout=scaled(30))
    cands, evals = tables(cfg)
    assert killed, "an evaluator reached the middle of a batch"
    assert len(killed["candidates"]) >= 2
    assert_one_outcome_each(cands, evals, summary)
    assert len(evals) == 200 and summary["evaluator_restarts"] >= 1
    lost = evals[evals.candidate_id.isin(killed["candidates"])]
    # every job of the killed batch was evaluated again, once, and is not blamed for the death
    assert sorted(lost.candidate_id) == sorted(killed["candidates"])
    assert (lost.status == "ok").all() and (lost.attempts == 0).all()


def test_a_batch_past_the_time_limit_finds_its_hung_program_alone(local_ray, tmp_path, caplog):
    caplog.set_level("WARNING", logger="autoprune_ray")
    script = programs(120)
    hung = script[60] = "```python\ndef score(W, A):\n    return abs(W) * tanh(A)\n```"
    cfg = synthetic_config(tmp_path, "hung", 100, script, time_limit=scaled(4), hang_if_code_contains="tanh")
    summary = run_search(cfg, progress=False)
    cands, evals = tables(cfg)
    assert_one_outcome_each(cands, evals, summary)
    by_code = evals.merge(cands[["candidate_id", "code", "source"]], on="candidate_id")
    timed_out = by_code[by_code.status == "timeout"]
    assert len(timed_out) == 1 and timed_out.source.iloc[0] == hung
    assert (by_code[by_code.status != "timeout"].status == "ok").all()
    # it hung inside a batch first (the script puts it well after batching starts), then alone
    assert any("exceeded the" in r.getMessage() and "re-queued to run alone" in r.getMessage()
               for r in caplog.records)


def test_novelty_reads_a_bounded_window_however_long_the_run(monkeypatch):
    """Selection with ties (where novelty is read) parses at most the window, not the archive."""
    parsed = []
    real_parse = database.parse
    monkeypatch.setattr(database, "parse", lambda *a, **k: parsed.append(a[0]) or real_parse(*a, **k))
    pop = Population(islands=1, population_size=8, elites=1, migration_interval=10 ** 9, seed=0)
    for k, text in enumerate(programs(3 * database.NOVELTY_WINDOW)):
        code = text.split("```python\n")[1].rstrip("`\n")
        pop.add(Individual(k, f"{k:08x}", code, 1.0, None, None, 0, "llm_init"))   # every fitness ties
    pop.sample_parents(0, k=4)
    assert 0 < len(parsed) <= database.NOVELTY_WINDOW + 8
    assert sum(ind.features is not None for ind in pop.archive.values()) <= database.NOVELTY_WINDOW + 8


def test_the_population_actor_mirrors_the_driver(local_ray):
    """The `population` actor, sent the driver's updates in batches, holds the driver's population."""
    actor = ray.remote(Population).remote(islands=2, population_size=3, elites=1, migration_interval=2, seed=1)
    local = Population(islands=2, population_size=3, elites=1, migration_interval=2, seed=1)
    mirror = MirroredPopulation(local, actor)
    rng = random.Random(0)
    for k in range(40):
        if mirror.claim(f"h{k % 30}", k) is None:
            if rng.random() < 0.2:
                mirror.record_failure()
            else:
                mirror.add(Individual(k, f"h{k}", "W", rng.random(), rng.random(), 1.0, k % 2, "llm_init"))
        if k % 7 == 0:
            mirror.sync(force=True)
    mirror.sync(force=True)
    assert ray.get(actor.summary.remote(), timeout=scaled(60)) == local.summary()
    assert ray.get(actor.snapshot.remote(), timeout=scaled(60)) == local.snapshot()
    ray.kill(actor)


def test_the_loop_keeps_the_startup_heap_out_of_full_collections(local_ray, tmp_path, monkeypatch):
    """While the loop runs, what was alive before the run (the imports' million objects) sits in
    the permanent generation, so a full collection walks only the run's own objects; after the run
    the process's collector is as it was."""
    frozen_in_loop, dispatch = [], runner.dispatch

    def counting_dispatch(search, pool):
        frozen_in_loop.append(gc.get_freeze_count())
        return dispatch(search, pool)
    monkeypatch.setattr(runner, "dispatch", counting_dispatch)
    gc.collect()
    alive_before = len(gc.get_objects())
    run_search(synthetic_config(tmp_path, "frozen", 20, programs(40)), progress=False)
    assert frozen_in_loop and min(frozen_in_loop) >= 0.9 * alive_before
    assert gc.get_freeze_count() == 0


def test_a_heap_the_caller_froze_stays_frozen():
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with runner._startup_heap_frozen():
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
