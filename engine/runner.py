"""Drive a `Search` with Ray actors: one policy, one population manager, N evaluators.

The loop works in batches: each turn collects every call that has finished (one `ray.wait`), then
sends work to every idle evaluator (engine/dispatch.py), and makes no synchronous Ray call per
candidate (the population is read locally, engine/actors.py). Tables are written at most once a second
(`CHECKPOINT_MIN_SECONDS`), so a fast search writes large parts rather than one per evaluation."""
from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections import deque

import ray

from autoprune_ray.engine.actors import QUIET_ACTORS, ActorPool, MirroredPopulation, SyncActor, ensure_ray
from autoprune_ray.engine.config import RunConfig
from autoprune_ray.engine.controller import LLM_OPERATORS, Inflight, Search
from autoprune_ray.engine.database import Population
from autoprune_ray.engine.dispatch import (MAX_ATTEMPTS, batch_died, batch_failed, batch_timed_out, dispatch,
                                           record_batch, requeue)
from autoprune_ray.engine.display import Display
from autoprune_ray.llm.dpo import train_round

__all__ = ["MAX_ATTEMPTS", "QUIET_ACTORS", "ActorPool", "ActorsFailed", "SyncActor", "ensure_ray", "run_search"]
log = logging.getLogger("autoprune_ray.engine")
# Tables and checkpoint are written every `search.checkpoint_every` evaluations, but at most this
# often: at hundreds of evaluations a second, a part per few evaluations was most of the cost.
CHECKPOINT_MIN_SECONDS = 1.0


def run_search(cfg: RunConfig, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) a search to its end; `progress`: the live display, else plain log lines."""
    with Display(cfg.search.max_evaluations, cfg.fitness.measure, live=progress) as display:
        ensure_ray(cfg)
        pool = ActorPool(cfg)
        s = cfg.search
        population = MirroredPopulation(Population(s.islands, s.population_size, s.elites, s.migration_interval,
                                                   s.seed), pool.population)
        try:
            search = Search.open(cfg, resume=resume, progress=progress, population=population)
        except BaseException:
            pool.kill()   # e.g. RunExists: named actors must not outlive a run that never started
            raise
        return _run(search, pool, display)


def _run(search: Search, pool: "ActorPool", display: Display) -> dict:
    if not search.resumed:
        search.seed_population()
    _serve_adapter(search, pool)   # a resumed run's policy serves the newest adapter from its first batch
    try:
        with _startup_heap_frozen():
            reason = _loop(search, pool, display)
        display.stop()
        _drain_and_close(search, pool)
        _promote(search, pool)
        # promoted: read from the promotions table once, at the end (summary() runs on every loop turn)
        summary = search.summary() | {"stop_reason": reason, "evaluator_restarts": pool.restarts,
                                      "promoted": search.promoted()} | pool.start_up()
        search.store.save_checkpoint({"summary": summary, "next_id": search.next_id})
    finally:
        search.store.flush()   # whatever happened, every recorded outcome reaches the tables
        search.store.unlock()
        pool.kill()
    return summary


@contextlib.contextmanager
def _startup_heap_frozen():
    """Keep what is alive when the loop starts (the imports of torch, Ray, pandas and the engine:
    270,000 tracked objects before Ray starts) out of Python's full garbage collections while the
    loop runs. A full collection walks every tracked object, so without this a run pays for the
    startup heap again and again: a 10,000-candidate run spent 0.48 s in one such collection, a
    1,000-candidate run none. A heap the caller froze is left as it is."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _loop(search: Search, pool: ActorPool, display: Display) -> str:
    cfg = search.cfg
    generating = False
    checkpoints = _Checkpoints(cfg.search.checkpoint_every)
    while True:
        reason = search.stop_reason()
        if reason:
            return reason
        loop_start = time.perf_counter()
        if not generating and len(search.queue) < cfg.search.queue_size:
            generating = _request_generation(search, pool)
        if generating:
            _fill_idle(search, pool)
        dispatch(search, pool)
        search.population.sync()
        waiting = time.perf_counter()
        ready = _ready_batch(pool)
        loop_start += time.perf_counter() - waiting   # waiting on actors is not engine overhead
        recorded = 0
        for ref in ready:
            call = pool.inflight.pop(ref)
            generating = generating and call.kind != "generate"
            recorded += _collect(search, pool, ref, call)
        checkpoints.count(search, recorded + _enforce_time_limits(search, pool))
        _maybe_train(search, pool)
        search.metrics.flush()
        search.metrics.set("eval_queue_depth", len(search.queue))
        search.metrics.set("evaluators_busy", sum(1 for c in pool.inflight.values() if c.kind == "eval"))
        search.stats["overhead_seconds"] += time.perf_counter() - loop_start
        display.update(search.summary, len(search.queue))   # summary: read only when live
        if not pool.inflight and not search.queue and not generating:
            # nothing can make progress (e.g. every operator needs parents and none survived)
            if not _request_generation(search, pool):
                return "nothing left to evaluate"
            generating = True


class _Checkpoints:
    """Tables and checkpoint after every `checkpoint_every` outcomes, at most every
    `CHECKPOINT_MIN_SECONDS`."""

    def __init__(self, every: int):
        self.every, self.since, self.last = every, 0, time.monotonic()

    def count(self, search: Search, recorded: int) -> None:
        self.since += recorded
        if self.since >= self.every and time.monotonic() - self.last >= CHECKPOINT_MIN_SECONDS:
            search.store.save_checkpoint({"summary": search.summary(), "next_id": search.next_id})
            self.since, self.last = 0, time.monotonic()


def _ready_batch(pool: ActorPool) -> list:
    """Every in-flight call that has finished, waiting up to half a second for the first: one
    loop turn handles a whole batch of outcomes, not one."""
    if not pool.inflight:
        return []
    refs = list(pool.inflight)
    ready, rest = ray.wait(refs, num_returns=1, timeout=0.5)
    if ready and rest:
        ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
    return ready


def _request_generation(search: Search, pool: ActorPool) -> bool:
    """Fill one batch of prompts; symbolic operators add their children straight to the queue."""
    meta = {"prompts": [], "ops": [], "islands": [], "parents": [], "prompt_ids": [], "temperatures": []}
    for _ in range(search.cfg.policy.prompts_per_batch):
        op, temperature = search.choose_operator()
        if op in LLM_OPERATORS:
            prompt, island, parents = search.build_prompt(op)
            for key, value in zip(("prompts", "ops", "islands", "parents", "prompt_ids", "temperatures"),
                                  (prompt, op, island, parents, search.next_prompt_id(), temperature)):
                meta[key].append(value)
        else:
            search.symbolic_child(op)
    if not meta["prompts"]:
        return False
    ref = pool.policy.generate.remote(meta["prompts"], search.rng.randrange(2 ** 31), meta["temperatures"])
    pool.inflight[ref] = Inflight("generate", None, time.time(), meta)
    return True


def _fill_idle(search: Search, pool: ActorPool) -> None:
    """While the policy writes (minutes on a CPU), idle evaluators get symbolic children rather
    than wait; a rejected or duplicate child leaves the evaluator for the next loop turn."""
    if search.queue or not pool.idle or search.dispatched >= search.cfg.search.max_evaluations:
        return
    op = search.choose_symbolic()
    if op is not None:
        search.symbolic_child(op)


def _collect(search: Search, pool: ActorPool, ref, call: Inflight) -> int:
    if call.kind == "dpo":
        _finish_round(search, pool, ref, call)
        return 0
    try:
        result = ray.get(ref)
    except ray.exceptions.RayActorError as exc:
        return _actor_died(search, pool, call, exc)
    except ray.exceptions.RayTaskError as exc:   # a bug in our own code: recorded, never fatal
        if call.kind == "generate":
            raise
        pool.idle.add(call.worker)
        return batch_failed(search, call, f"evaluator error: {exc}"[:500]) if call.kind == "eval" else 0
    if call.kind == "ping":
        pool.mark_ready(call.worker, result)
        return 0
    if call.kind == "generate":
        search.handle_completions(call.payload, result)
        return 0
    return record_batch(search, pool, call, result)


class ActorsFailed(RuntimeError):
    """An actor's constructor raised. Ray does not restart such an actor, and without a policy or
    any evaluator the run cannot go on."""


def _actor_died(search: Search, pool: ActorPool, call: Inflight, exc) -> int:
    if getattr(exc, "actor_init_failed", False):
        return _cannot_start(search, pool, call, _last_line(exc))
    if call.kind == "generate":
        log.warning("policy actor died (%s); it restarts and the batch is asked again", type(exc).__name__)
        _serve_adapter(search, pool)   # the restarted actor starts from the base model
        return 0
    recorded = batch_died(search, call) if call.kind == "eval" else 0
    pool.restarts += 1
    _ping_later(pool, call.worker)
    return recorded


def _cannot_start(search: Search, pool: ActorPool, call: Inflight, reason: str) -> int:
    if call.kind == "generate":
        raise ActorsFailed(f"the policy actor failed to start: {reason}")
    if call.kind == "eval":   # its jobs go back to the queue for the evaluators that did start
        search.dispatched -= len(call.payload["jobs"])
        requeue(search, call.payload["jobs"])
    pool.dead.add(call.worker)
    log.error("evaluator-%d failed to start: %s", call.worker, reason)
    if len(pool.dead) == len(pool.evaluators):
        raise ActorsFailed(f"every evaluator failed to start: {reason}")
    return 0


def _last_line(exc) -> str:
    """The root error of a failed constructor (Ray's message ends with it)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(exc).__name__


def _ping_later(pool: ActorPool, worker: int) -> None:
    """A restarted evaluator rejoins once its constructor has run again."""
    actor = pool.evaluators[worker]
    try:
        pool.inflight[actor.ping.remote()] = Inflight("ping", worker, time.time())
    except ray.exceptions.RayActorError:
        log.error("evaluator-%d is gone for good", worker)


def _enforce_time_limits(search: Search, pool: ActorPool) -> int:
    """Kill and restart evaluators past the limit; returns the outcomes recorded."""
    limit = search.cfg.search.eval_time_limit
    now, recorded = time.time(), 0
    for ref, call in list(pool.inflight.items()):
        if call.kind != "eval" or now - call.started <= limit:
            continue
        del pool.inflight[ref]
        ray.kill(pool.evaluators[call.worker], no_restart=False)   # interrupts the hung task
        recorded += batch_timed_out(search, call, now, limit)
        pool.restarts += 1
        _ping_later(pool, call.worker)
    return recorded


def _maybe_train(search: Search, pool: ActorPool) -> None:
    """Start a DPO round as a Ray task when enough new pairs are logged; the search goes on."""
    if not search.dpo_due() or any(c.kind == "dpo" for c in pool.inflight.values()):
        return
    job = search.next_dpo_round()
    d = search.cfg.dpo
    task = ray.remote(train_round).options(num_cpus=d.num_cpus, num_gpus=d.num_gpus, max_retries=0,
                                           name=f"{search.cfg.name}:dpo-{job['version']}", runtime_env=QUIET_ACTORS)
    ref = task.remote(search.cfg.policy.model, job["pairs"], job["path"], job["config"], job["init_adapter"])
    pool.inflight[ref] = Inflight("dpo", None, time.time(), job)
    log.info("DPO round %s started on %d pairs", job["version"], len(job["pairs"]))


def _finish_round(search: Search, pool: ActorPool, ref, call: Inflight) -> None:
    job = call.payload
    try:
        metrics, error = ray.get(ref), ""
    except ray.exceptions.RayError as exc:   # a failed round is recorded; the search goes on
        metrics, error = None, f"{type(exc).__name__}: {exc}"
        log.warning("DPO round %s failed: %s", job["version"], error[:300])
    search.record_dpo_round(job, metrics, error)
    if metrics is not None:
        search.metrics.inc("dpo_rounds")
        search.metrics.set("adapter_round", job["round"])
        _serve_adapter(search, pool)


def _serve_adapter(search: Search, pool: ActorPool) -> None:
    """Hot-load the newest adapter into the policy actor; later generate calls use it (actor
    calls from one caller run in order)."""
    if search.dpo["adapter"] is not None:
        version, path = search.dpo["adapter"]
        pool.policy.load_adapter.remote(path, version)


def _drain_and_close(search: Search, pool: ActorPool) -> None:
    """Finish in-flight evaluations (bounded by the time limit) and a running DPO round (bounded
    by dpo.drain_seconds), then flush; queued candidates stay pending."""
    now = time.time()
    deadline = {"eval": now + search.cfg.search.eval_time_limit, "dpo": now + search.cfg.dpo.drain_seconds}
    while any(c.kind in deadline and time.time() < deadline[c.kind] for c in pool.inflight.values()):
        ready, _ = ray.wait(list(pool.inflight), num_returns=1, timeout=1.0)
        for ref in ready:
            call = pool.inflight.pop(ref)
            if call.kind in deadline:
                _collect(search, pool, ref, call)
        _enforce_time_limits(search, pool)
    for ref, call in list(pool.inflight.items()):
        if call.kind == "dpo":   # not recorded: a resumed run trains this round again
            ray.cancel(ref, force=True)
    if search.queue:
        # Left as accepted and unevaluated: a resumed run evaluates them, so no program is lost to a stop.
        log.info("%d accepted candidates are pending evaluation", len(search.queue))
    search.population.sync(force=True)
    search.metrics.flush()
    search.store.flush()


def _promote(search: Search, pool: ActorPool) -> None:
    """Measure the fittest programs again (engine/promotion.py) on the evaluators, each
    measurement recorded as it ends; bounded by four times the evaluation time limit each."""
    jobs = deque(search.promotion_jobs())
    if jobs:
        log.info("promotion: %d measurements of the fittest programs", len(jobs))
    limit = 4 * search.cfg.search.eval_time_limit
    while jobs or any(c.kind == "promote" for c in pool.inflight.values()):
        while pool.idle and jobs:
            worker, job = pool.idle.pop(), jobs.popleft()
            pool.inflight[pool.evaluators[worker].evaluate.remote(job)] = Inflight("promote", worker, time.time(), job)
        if not pool.inflight:   # every evaluator is gone for good
            for job in jobs:
                search.record_promotion(job, {"status": "failed", "reason": "no evaluator left"})
            break
        ready, _ = ray.wait(list(pool.inflight), num_returns=1, timeout=1.0)
        for ref in ready:
            _collect_promotion(search, pool, ref, pool.inflight.pop(ref))
        for ref, call in list(pool.inflight.items()):
            if call.kind == "promote" and time.time() - call.started > limit:
                del pool.inflight[ref]
                ray.kill(pool.evaluators[call.worker], no_restart=False)
                search.record_promotion(call.payload, {"status": "timeout", "reason": f"exceeded {limit:.0f} s"})
                _ping_later(pool, call.worker)
    search.store.flush()


def _collect_promotion(search: Search, pool: ActorPool, ref, call: Inflight) -> None:
    if call.kind == "ping":
        pool.mark_ready(call.worker, None)
    if call.kind != "promote":
        return
    try:
        result = ray.get(ref)
        pool.idle.add(call.worker)
    except ray.exceptions.RayActorError as exc:
        result = {"status": "failed", "reason": f"evaluator died: {type(exc).__name__}"}
        _ping_later(pool, call.worker)
    except ray.exceptions.RayTaskError as exc:
        result = {"status": "failed", "reason": f"evaluator error: {exc}"[:500]}
        pool.idle.add(call.worker)
    search.record_promotion(call.payload, result)
