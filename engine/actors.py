"""The run's Ray actors and how the driver talks to them: one policy, one population mirror, N
evaluators, their in-flight calls, and when each evaluator became ready.

The driver holds the authoritative population itself (`MirroredPopulation`): selection, dedup and
the screening cutoff are read on every candidate, and a synchronous actor call for each read was
one Ray round trip per dispatch. The named `population` actor still holds the same state, for the
dashboard and for anyone who asks it (`ray.get(actor.summary.remote())`): the driver sends it
its updates in one fire-and-forget call per loop turn, and calls from one caller run in order.
"""
from __future__ import annotations

import logging
import time

import ray

from autoprune_ray.engine.config import RunConfig
from autoprune_ray.engine.controller import Inflight
from autoprune_ray.engine.database import Population
from autoprune_ray.engine.dispatch import BatchSizer
from autoprune_ray.engine.policy import PolicyWorker
from autoprune_ray.tasks import get_task

log = logging.getLogger("autoprune_ray.engine")
# The actors' tqdm bars (model loading, calibration walks) would be forwarded to the driver's
# terminal, dozens of them; the driver's display says what the actors are doing instead.
QUIET_ACTORS = {"env_vars": {"TQDM_DISABLE": "1"}}
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def ensure_ray(cfg: RunConfig) -> None:
    if ray.is_initialized():
        return
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, log_to_driver=True)
    else:
        # A new local instance even when `ray start` left an address file on this machine (a plain
        # ray.init() would join that cluster). The dashboard binds to localhost. Token
        # authentication stays on, as Ray sets it; its warning at every start is said once here.
        logging.getLogger(RAY_AUTH_LOGGER).addFilter(_drop_token_auth_notice)
        context = ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard,
                           dashboard_host=cfg.ray.dashboard_host)
        if context.dashboard_url:
            log.info("Ray dashboard: http://%s (token authentication is on: paste the token from "
                     "~/.ray/auth_token when it asks)", context.dashboard_url)


def _drop_token_auth_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _evaluator_actor(cfg: RunConfig, index: int, shared_stats: ray.ObjectRef | None):
    """The remote class and constructor arguments of evaluator `index`: the real one, or the
    synthetic one of benchmarks and engine tests (engine/synthetic.py)."""
    ev = cfg.evaluators
    if ev.synthetic_seconds is not None:
        from autoprune_ray.engine.synthetic import SyntheticEvaluatorWorker
        return ray.remote(SyntheticEvaluatorWorker), (ev.synthetic_seconds, index, ev.fault_injection)
    from autoprune_ray.engine.evaluator import EvaluatorWorker
    return ray.remote(EvaluatorWorker), (_without_script(cfg), index, shared_stats)


def _shared_statistics(cfg: RunConfig) -> ray.ObjectRef | None:
    """With several real evaluators, the calibration statistics are computed once, by a task with
    an evaluator's resources, and every evaluator reads them from the object store: one copy per
    node in shared memory, and one calibration walk per run. One evaluator computes its own (a
    separate task would only load the model twice)."""
    ev = cfg.evaluators
    if ev.synthetic_seconds is not None or ev.num < 2:
        return None
    from autoprune_ray.engine.evaluator import shared_statistics
    return ray.remote(shared_statistics).options(
        num_cpus=ev.num_cpus, num_gpus=ev.num_gpus, runtime_env=QUIET_ACTORS).remote(_without_script(cfg))


def _without_script(cfg: RunConfig) -> RunConfig:
    """An evaluator never reads the scripted policy's completions; a long script would otherwise
    travel to every evaluator."""
    import dataclasses
    return dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, scripted=[]))


class ActorPool:
    """Named actors and their in-flight calls. All evaluators are created at once (Ray starts
    their processes in parallel); `ready` says when each answered its first ping, in seconds
    from the pool's creation."""

    def __init__(self, cfg: RunConfig):
        ev, pol, name = cfg.evaluators, cfg.policy, cfg.name
        self.created = time.time()
        self.evaluators = []
        self.shared_stats = _shared_statistics(cfg)   # held here, so that a restarted evaluator finds it
        for i in range(ev.num):
            remote_class, args = _evaluator_actor(cfg, i, self.shared_stats)
            self.evaluators.append(remote_class.options(
                name=f"{name}:evaluator-{i}", num_cpus=ev.num_cpus, num_gpus=ev.num_gpus,
                max_restarts=ev.max_restarts, max_task_retries=0, runtime_env=QUIET_ACTORS).remote(*args))
        self.policy = ray.remote(PolicyWorker).options(
            name=f"{name}:policy", num_cpus=0, num_gpus=pol.num_gpus, max_restarts=pol.max_restarts,
            max_task_retries=0, runtime_env=QUIET_ACTORS).remote(
                pol, get_task(cfg.task).prompts.system, cfg.task if pol.grammar else None,
                cfg.target.uncollected_inputs)
        s = cfg.search
        self.population = ray.remote(Population).options(name=f"{name}:population", num_cpus=0).remote(
            s.islands, s.population_size, s.elites, s.migration_interval, s.seed)
        self.inflight: dict[ray.ObjectRef, Inflight] = {}
        self.idle: set[int] = set()
        self.restarts = 0
        self.dead: set[int] = set()   # evaluators whose constructor raised (Ray does not restart them)
        self.ready: dict[int, float] = {}
        self.sizer = BatchSizer()   # jobs per evaluator call, from the evaluations' measured speed
        for i, actor in enumerate(self.evaluators):
            self.inflight[actor.ping.remote()] = Inflight("ping", i, time.time())

    def mark_ready(self, worker: int, ping: dict) -> None:
        """An evaluator answered a ping: idle from now on; its first answer is its start-up time."""
        self.idle.add(worker)
        if worker not in self.ready:
            self.ready[worker] = time.time() - self.created
            log.info("evaluator-%d ready after %.1f s (node %s)", worker, self.ready[worker],
                     (ping or {}).get("node") or "local")

    def start_up(self) -> dict:
        """When the evaluators became ready: each one's seconds, and the first and last."""
        times = [self.ready[i] for i in sorted(self.ready)]
        return {"evaluator_ready_seconds": times, "evaluators_created": self.created,
                "first_ready": min(times, default=None), "last_ready": max(times, default=None)}

    def kill(self) -> None:
        for actor in [*self.evaluators, self.policy, self.population]:
            ray.kill(actor)


class MirroredPopulation:
    """A local `Population` whose updates are also sent to the `population` actor, batched:
    reads are local (no round trip), `sync` sends what changed, at most every `SYNC_SECONDS`."""

    UPDATES = frozenset({"claim", "add", "record_failure"})
    SYNC_SECONDS = 0.5

    def __init__(self, local: Population, actor):
        self._local, self._actor, self._pending, self._synced = local, actor, [], 0.0

    def __getattr__(self, name):
        attr = getattr(self._local, name)
        if name not in self.UPDATES:
            return attr

        def recorded(*args):
            self._pending.append((name, args))
            return attr(*args)
        return recorded

    def sync(self, force: bool = False) -> None:
        if self._pending and (force or time.monotonic() - self._synced >= self.SYNC_SECONDS):
            self._actor.apply.remote(self._pending)
            self._pending, self._synced = [], time.monotonic()


class SyncActor:
    """Call an actor's methods as if local: `handle.add(x)` is `ray.get(actor.add.remote(x))`."""

    def __init__(self, actor):
        self._actor = actor

    def __getattr__(self, name):
        method = getattr(self._actor, name)
        return lambda *args, **kwargs: ray.get(method.remote(*args, **kwargs))
