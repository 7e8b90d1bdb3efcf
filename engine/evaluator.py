"""Evaluator: holds the target model and its cached statistics, scores one candidate at a time.

Cascade fitness: every candidate gets the forward-free reconstruction proxy; only those whose
proxy is within the job's cutoff get held-out perplexity. Every failure (rejected program, NaN or
Inf, shape error, out of memory) comes back as a recorded outcome with its reason, never a crash.
Time limits are enforced by the controller, which kills and restarts a hung evaluator.
"""
from __future__ import annotations

import os
import time
import traceback

import torch

from autoprune_ray.compress.data import load_token_data
from autoprune_ray.compress.fitness import ProgramEvaluator
from autoprune_ray.compress.models import load_model
from autoprune_ray.compress.mpq_fitness import SensitivityEvaluator
from autoprune_ray.engine.config import QuantSettings, TargetConfig
from autoprune_ray.operators.language import CandidateError, parse


class EvaluatorWorker:
    def __init__(self, target: TargetConfig, task: str = "prune", fault_injection: dict | None = None,
                 worker_id: int = 0, quant: QuantSettings | None = None):
        torch.set_num_threads(max(1, int(os.environ.get("AUTOPRUNE_EVAL_THREADS", torch.get_num_threads()))))
        self.target, self.task, self.worker_id = target, task, worker_id
        self.faults = fault_injection or {}
        self.lm = load_model(target.model, device=target.device)
        self.data = load_token_data(self.lm.tokenizer, target.calib_data, None, target.nsamples, target.seqlen,
                                    target.seed, target.eval_tokens)
        if task == "mpq":
            quant = quant or QuantSettings()
            self.evaluator = SensitivityEvaluator(self.lm, self.data, quant.quant_config(), quant.measure_config(),
                                                  with_grad=target.gradients)
        else:
            self.evaluator = ProgramEvaluator(self.lm, self.data, with_grad=target.gradients)
        self.started = time.time()
        self.node = _node_id()

    def ping(self) -> dict:
        return {"worker": self.worker_id, "pid": os.getpid(), "node": self.node, "up_seconds": time.time() - self.started}

    def evaluate(self, job: dict) -> dict:
        """job: candidate_id, hash, code, granularity, proxy_cutoff (None: always measure perplexity)."""
        start = time.perf_counter()
        out = {"candidate_id": job["candidate_id"], "hash": job["hash"], "worker": self.worker_id,
               "pid": os.getpid(), "node": self.node, "proxy": None, "perplexity": None, "reason": ""}
        try:
            self._inject_faults(job["code"])
            cand = parse(job["code"], self.task, job.get("granularity", "row"))
            fit, columns = self._first_stage(cand)
            out.update(columns)
            cutoff = job.get("proxy_cutoff")
            if cutoff is None or fit.proxy <= cutoff:
                out["perplexity"] = self.evaluator.perplexity_of_last(fit).perplexity
                out["status"] = "ok"
            else:
                out["status"] = "screened"   # proxy too far behind the best: no perplexity spent
                out["reason"] = f"proxy {fit.proxy:.4g} > cutoff {cutoff:.4g}"
        except (CandidateError, FloatingPointError, ValueError, RuntimeError, IndexError) as exc:
            out.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:500])
        except torch.OutOfMemoryError as exc:   # noqa: B014 - subclass of RuntimeError on some builds
            out.update(status="failed", reason=f"out of memory: {exc}"[:500])
        except Exception as exc:  # noqa: BLE001 - an unknown failure is still a recorded outcome
            out.update(status="failed", reason=f"{type(exc).__name__}: {exc}; {traceback.format_exc(limit=2)}"[:800])
        finally:
            self.evaluator.restore()
        out["seconds"] = time.perf_counter() - start
        return out

    def _first_stage(self, cand):
        """The forward-free fitness, and the columns it adds to the candidate's record."""
        if self.task == "mpq":
            fit = self.evaluator.proxy(cand.tree)
            extra = {"avg_bits": fit.avg_bits, "spearman": fit.spearman, "kendall": fit.kendall}
        else:
            fit = self.evaluator.proxy(cand.tree, self.target.sparsity, self.target.pattern, cand.granularity,
                                       keep_masks=True)
            extra = {"sparsity": fit.sparsity}
        return fit, extra | {"proxy": fit.proxy}

    def _inject_faults(self, code: str) -> None:
        """Testing aid for fault tolerance: hang or kill this process on matching programs; and a
        benchmark aid, `sleep_seconds`, a known extra cost per evaluation."""
        if self.faults.get("sleep_seconds"):
            time.sleep(float(self.faults["sleep_seconds"]))
        if self.faults.get("hang_if_code_contains") and self.faults["hang_if_code_contains"] in code:
            time.sleep(10 ** 6)
        if self.faults.get("crash_if_code_contains") and self.faults["crash_if_code_contains"] in code:
            marker = self.faults.get("crash_marker")
            if not marker or not os.path.exists(marker):   # crash once, so the re-queued job can finish
                if marker:
                    open(marker, "w").close()
                os._exit(1)


def _node_id() -> str | None:
    """The Ray node this evaluator runs on (None outside Ray)."""
    import ray
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
