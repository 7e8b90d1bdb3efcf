"""Evaluator: holds the target model and its cached statistics, scores one candidate at a time.

Staged fitness: every candidate is screened by its task's evaluator at each of the run's levels
(forward-free, e.g. the reconstruction proxy); only those whose proxy is within the job's cutoff
are measured (fitness.measure: KL to the dense model or perplexity, on validation tokens). A
promotion job measures again by perplexity on more validation tokens, under its calibration seed.
The held-out split is sealed here: an evaluator cannot read it. Every failure (rejected program,
NaN or Inf, a bad allocation, shape error, out of memory) comes back as a recorded outcome with
its reason, never a crash. Time limits are enforced by the controller, which kills and restarts a
hung evaluator.
"""
from __future__ import annotations

import os
import time
import traceback

import torch

from autoprune_ray.compress.data import load_token_data
from autoprune_ray.compress.fitness import Stage
from autoprune_ray.compress.models import load_model
from autoprune_ray.compress.stats import CalibrationStats
from autoprune_ray.engine.config import RunConfig
from autoprune_ray.operators.language import CandidateError, parse
from autoprune_ray.tasks import get_task


class EvaluatorWorker:
    """One loaded target model and its run's task evaluator. Between calls it keeps only what
    every call reads the same way (the dense weights, cached statistics); each call restores the
    dense model before it returns."""

    def __init__(self, cfg: RunConfig, worker_id: int = 0, shared_stats: dict | None = None):
        threads = cfg.evaluators.threads or os.environ.get("AUTOPRUNE_EVAL_THREADS") or torch.get_num_threads()
        torch.set_num_threads(max(1, int(threads)))
        self.cfg, self.task, self.worker_id = cfg, get_task(cfg.task), worker_id
        self.faults = cfg.evaluators.fault_injection or {}
        self.lm = load_model(cfg.target.model, device=cfg.target.device)
        self.shared = shared_stats is not None
        stats = CalibrationStats.from_shared(shared_stats, self.lm.device) if self.shared else None
        self.evaluators = {cfg.target.seed: self.task.make_evaluator(self.lm, self._data(cfg.target.seed), cfg, stats)}
        self.evaluator = self.evaluators[cfg.target.seed]
        self.started = time.time()
        self.node = _node_id()

    def _data(self, seed: int):
        return search_data(self.lm, self.cfg, seed)

    def _evaluator_for(self, seed: int | None):
        """The evaluator calibrated with `seed` (a promotion's second seed is built on first use;
        like the dense weights, its statistics read the same on every call)."""
        seed = self.cfg.target.seed if seed is None else seed
        if seed not in self.evaluators:
            self.evaluators[seed] = self.task.make_evaluator(self.lm, self._data(seed), self.cfg)
        return self.evaluators[seed]

    def _stage(self, job: dict) -> Stage:
        f = self.cfg.fitness
        return Stage("perplexity", f.promote_tokens) if job.get("stage") == "promote" else Stage(f.measure, f.tokens)

    def ping(self) -> dict:
        return {"worker": self.worker_id, "pid": os.getpid(), "node": self.node, "shared_stats": self.shared,
                "up_seconds": time.time() - self.started}

    def evaluate_batch(self, jobs: list[dict]) -> list[dict]:
        """Several jobs in one call (the driver batches jobs that take milliseconds), in order."""
        return [self.evaluate(job) for job in jobs]

    def evaluate(self, job: dict) -> dict:
        """job: candidate_id, hash, code, granularity, proxy_cutoff (None: always measure),
        known_proxies (measured proxy -> candidate id: a match is not measured again); a
        promotion adds stage "promote" and its calibration seed."""
        start = time.perf_counter()
        out = {"candidate_id": job["candidate_id"], "hash": job["hash"], "worker": self.worker_id,
               "pid": os.getpid(), "node": self.node, "proxy": None, "perplexity": None, "reason": ""}
        evaluator = self.evaluator
        try:
            self._inject_faults(job["code"])
            cand = parse(job["code"], self.cfg.task, job.get("granularity", "row"))
            evaluator = self._evaluator_for(job.get("seed"))
            levels = self.cfg.target.levels
            screened = evaluator.screen_levels([self.task.compression_config(cand, self.cfg.at_level(level))
                                                for level in levels])
            out.update(screened.columns, proxy=screened.proxy)
            cutoff = job.get("proxy_cutoff")
            twin = (job.get("known_proxies") or {}).get(screened.proxy)
            if twin is not None:   # the same masks (bits) as a measured program: its measure is known
                out["status"] = "screened"
                out["reason"] = f"same proxy as #{twin}: the same compression, not measured again"
            elif cutoff is None or screened.proxy <= cutoff:
                measured = evaluator.measure(screened.value, self._stage(job))
                out.update(measured, levels=levels_text(levels, measured["levels"]) if self.task.leveled else None)
                out["status"] = "ok"
            else:
                out["status"] = "screened"   # proxy too far behind the best: no perplexity spent
                out["reason"] = f"proxy {screened.proxy:.4g} > cutoff {cutoff:.4g}"
        except (CandidateError, FloatingPointError, ValueError, RuntimeError, IndexError) as exc:
            out.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:500])
        except torch.OutOfMemoryError as exc:   # noqa: B014 - subclass of RuntimeError on some builds
            out.update(status="failed", reason=f"out of memory: {exc}"[:500])
        except Exception as exc:  # noqa: BLE001 - an unknown failure is still a recorded outcome
            out.update(status="failed", reason=f"{type(exc).__name__}: {exc}; {traceback.format_exc(limit=2)}"[:800])
        finally:
            evaluator.restore()   # also after a failure inside screening
        out["seconds"] = time.perf_counter() - start
        return out

    def _inject_faults(self, code: str) -> None:
        """Testing aid for fault tolerance: hang or kill this process on matching programs, or wait
        while a file exists; and a benchmark aid, `sleep_seconds`, a known extra cost per evaluation."""
        if self.faults.get("sleep_seconds"):
            time.sleep(float(self.faults["sleep_seconds"]))
        while self.faults.get("pause_while_file") and os.path.exists(self.faults["pause_while_file"]):
            time.sleep(0.1)   # a test holds evaluations back until an event it waits for has happened
        if self.faults.get("hang_if_code_contains") and self.faults["hang_if_code_contains"] in code:
            time.sleep(10 ** 6)
        if self.faults.get("crash_if_code_contains") and self.faults["crash_if_code_contains"] in code:
            marker = self.faults.get("crash_marker")
            if not marker or not os.path.exists(marker):   # crash once, so the re-queued job can finish
                if marker:
                    open(marker, "w").close()
                os._exit(1)


def shared_statistics(cfg: RunConfig) -> dict:
    """The run's calibration statistics (seed target.seed) as numpy arrays, computed once (or read
    from the disk cache) for Ray's object store, so that N evaluators do not walk the calibration
    set N times and a node holds one copy of them, not N."""
    lm = load_model(cfg.target.model, device=cfg.target.device)
    return get_task(cfg.task).statistics(lm, search_data(lm, cfg, cfg.target.seed), cfg).to_shared()


def search_data(lm, cfg: RunConfig, seed: int):
    """Calibration windows and the validation tokens a search may read; never the held-out split."""
    t = cfg.target
    return load_token_data(lm.tokenizer, t.calib_data, None, t.nsamples, t.seqlen, seed,
                           val_tokens=t.val_tokens, heldout=False)


def levels_text(levels: list[float], values: list[float]) -> str:
    """Each level's measure, as the evaluations table records it: "0.6:41.2,0.7:97.5"."""
    return ",".join(f"{level:g}:{value:.6g}" for level, value in zip(levels, values))


def _node_id() -> str | None:
    """The Ray node this evaluator runs on (None outside Ray)."""
    import ray
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
