"""A synthetic evaluator for benchmarks and tests of the engine itself (`evaluators.synthetic_seconds`).

It stands where `EvaluatorWorker` stands (same actor methods, same result keys) but loads no
model: each evaluation sleeps the configured seconds and returns a measure derived from the
program's canonical hash, so a run's cost per evaluation is known exactly and its outcomes are
deterministic. Everything else in a synthetic run (policy actor, parsing, dedup, population,
queue, tables, time limits, restarts) is the real engine.

Nothing here imports torch or the run config, so dozens of these actors start in a fraction of a
second each and hold a few tens of MB (the config's values are passed in).
"""
from __future__ import annotations

import json
import os
import time


def synthetic_measure(hash_: str) -> tuple[float, float]:
    """(proxy, perplexity) from a program's hash: a fixed, program-specific value in [10, 20)."""
    fraction = int(hash_[:8], 16) / 2 ** 32
    return fraction, 10.0 * (1.0 + fraction)


class SyntheticEvaluatorWorker:
    """`seconds`: the cost of one evaluation (time.sleep: no CPU used). `faults`: the subset of
    `evaluators.fault_injection` that tests use here (pause_while_file, started_file,
    crash_if_code_contains + crash_marker, hang_if_code_contains, hang_mid_batch_marker)."""

    def __init__(self, seconds: float, worker_id: int = 0, faults: dict | None = None):
        self.seconds, self.worker_id, self.faults = float(seconds), worker_id, dict(faults or {})
        self.started = time.time()
        self.node = _node_id()
        self._place = (0, 1)   # the running job's position in its batch, and the batch's size

    def ping(self) -> dict:
        return {"worker": self.worker_id, "pid": os.getpid(), "node": self.node,
                "up_seconds": time.time() - self.started}

    def evaluate_batch(self, jobs: list[dict]) -> list[dict]:
        out = []
        for position, job in enumerate(jobs):
            if position:
                self._hang_mid_batch(jobs)
            self._place = (position, len(jobs))
            out.append(self.evaluate(job))
        return out

    def evaluate(self, job: dict) -> dict:
        start = time.perf_counter()
        self._faults(job)
        if self.seconds:
            time.sleep(self.seconds)
        proxy, perplexity = synthetic_measure(job["hash"])
        out = {"candidate_id": job["candidate_id"], "hash": job["hash"], "worker": self.worker_id,
               "pid": os.getpid(), "node": self.node, "proxy": proxy, "perplexity": None, "reason": ""}
        cutoff = job.get("proxy_cutoff")
        if cutoff is None or proxy <= cutoff:   # the real evaluator's screening rule
            out.update(status="ok", perplexity=perplexity)
        else:
            out.update(status="screened", reason=f"proxy {proxy:.4g} > cutoff {cutoff:.4g}")
        out["seconds"] = time.perf_counter() - start
        return out

    def _hang_mid_batch(self, jobs: list[dict]) -> None:
        """`hang_mid_batch_marker`: the first evaluator anywhere to reach a batch's second job
        writes the marker (its worker id and the batch's candidate ids, as JSON) and hangs there,
        so that a test can kill it mid-batch; later batches (the marker exists) run on."""
        marker = self.faults.get("hang_mid_batch_marker")
        if not marker or os.path.exists(marker):
            return
        tmp = f"{marker}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump({"worker": self.worker_id, "candidates": [j["candidate_id"] for j in jobs]}, fh)
        try:
            os.link(tmp, marker)   # atomic and exclusive: one evaluator wins, with the whole content
        except FileExistsError:
            return
        finally:
            os.unlink(tmp)
        time.sleep(10 ** 6)

    def _faults(self, job: dict) -> None:
        code, f = job["code"], self.faults
        if f.get("started_file"):   # tests read it: which worker started which candidate, in what batch
            with open(f["started_file"], "a") as fh:   # worker, candidate, position in batch, batch size
                fh.write(f"{self.worker_id} {job['candidate_id']} {self._place[0]} {self._place[1]}\n")
        while f.get("pause_while_file") and os.path.exists(f["pause_while_file"]):
            time.sleep(0.05)
        if f.get("hang_if_code_contains") and f["hang_if_code_contains"] in code:
            time.sleep(10 ** 6)
        if f.get("crash_if_code_contains") and f["crash_if_code_contains"] in code:
            marker = f.get("crash_marker")
            if not marker or not os.path.exists(marker):
                if marker:
                    open(marker, "w").close()
                os._exit(1)


def _node_id() -> str | None:
    import ray
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
