"""The asynchronous search loop.

Named Ray actors: `policy` (writes candidates), `population` (islands, elites, dedup and
evaluation cache) and `evaluator-<i>` (score candidates on the target model). The driver keeps
the policy generating while evaluators evaluate, through one bounded queue, with no
per-generation barrier. Every proposed candidate ends in exactly one recorded outcome:

    candidates.status   rejected (with reason) | duplicate (of an earlier id) | accepted
    evaluations.status  ok | screened (proxy only) | failed (with reason) | timeout

An accepted candidate without an evaluation row is pending: the run stopped first, and a resumed
run evaluates it.

A hung evaluation is killed at its time limit and the evaluator restarted; a candidate whose
evaluator died is re-queued and recorded once; a killed driver resumes from the tables.
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field

from autoprune_ray.engine.config import RunConfig
from autoprune_ray.kernels.expr import walk
from autoprune_ray.engine.database import Individual, Population, fitness_from_perplexity, subtree_features
from autoprune_ray.engine.metrics import EngineMetrics
from autoprune_ray.engine.storage import RunStore
from autoprune_ray.llm import preferences as prefs
from autoprune_ray.llm.dpo import DPOConfig
from autoprune_ray.llm.strategy import StrategyController, strategy_name
from autoprune_ray.operators import prompts as P
from autoprune_ray.operators import symbolic
from autoprune_ray.operators.language import Candidate, CandidateError, parse
from autoprune_ray.operators.seeds import task_seeds

log = logging.getLogger("autoprune_ray.engine")
LLM_OPERATORS = ("llm_init", "llm_mutate", "llm_crossover", "gcot")
OUTCOMES_EVALUATED = ("ok", "screened", "failed", "timeout")


@dataclass
class Inflight:
    kind: str                  # "eval", "generate" or "ping"
    worker: int | None
    started: float
    payload: dict = field(default_factory=dict)


class RunExists(RuntimeError):
    pass


class Search:
    def __init__(self, cfg: RunConfig, resume: bool = False, progress: bool = True, population=None):
        self.cfg, self.progress = cfg, progress
        self.run_dir = cfg.resolved_run_dir
        if (self.run_dir / "config.yaml").exists() and not resume:
            raise RunExists(f"{self.run_dir} already holds a run: pass --resume to continue it, or another name")
        self.store = RunStore(self.run_dir)
        self.store.write_config(cfg.to_dict())
        self.rng = random.Random(cfg.search.seed)
        self.metrics = EngineMetrics(cfg.name)
        self.queue: deque[dict] = deque()
        self.lineage: dict[int, dict] = {}     # id -> code, fitness, parents, operator (for prompts)
        self.rejections: deque[tuple[str, str]] = deque(maxlen=24)
        self.next_id, self.evaluated, self.dispatched, self.prompt_counter = 0, 0, 0, 0
        self.stats = {"proposed": 0, "valid": 0, "tokens": 0, "busy_seconds": 0.0, "overhead_seconds": 0.0}
        self.since_accepted = 0                # proposals in a row that gave nothing new to evaluate
        self.t0 = time.time()
        self.prefs = prefs.PreferenceLog(cfg.dpo.margin, tuple(cfg.dpo.groupings), cfg.dpo.window)
        self.strategies = self._strategy_controller()
        self.dpo = {"round": 0, "pairs": 0, "pairs_at_round": 0, "adapter": None}   # adapter: (version, path)
        self.recent_pairs: deque[dict] = deque(maxlen=cfg.dpo.max_pairs)   # what the next DPO round trains on
        # a local Population, or a synchronous handle to the `population` actor (same methods)
        self.population = population or Population(cfg.search.islands, cfg.search.population_size,
                                                   cfg.search.elites, cfg.search.migration_interval, cfg.search.seed)
        self.resumed = self._replay() if resume else False

    # ------------------------------------------------------------------ records
    def _new_candidate(self, *, code: str, source: str, status: str, operator: str, island: int,
                       parents: list[int], reason: str = "", hash_: str = "", prompt_id: int | None = None,
                       adapter: str | None = None, duplicate_of: int | None = None, granularity: str = "row",
                       strategy: str | None = None) -> int:
        cid = self.next_id
        self.next_id += 1
        self.store.append("candidates", {
            "candidate_id": cid, "hash": hash_, "status": status, "reason": reason, "code": code,
            "source": source[:4000], "operator": operator, "island": island, "parents": parents,
            "prompt_id": prompt_id, "adapter": adapter, "duplicate_of": duplicate_of, "granularity": granularity,
            "created": time.time() - self.t0, "strategy": strategy})
        for p in parents:
            self.store.append("lineage", {"child_id": cid, "parent_id": p, "operator": operator})
        self.stats["proposed"] += 1
        self.metrics.inc("proposed")
        if status == "rejected":
            self.rejections.append((source.strip()[:200], reason))
        return cid

    def propose(self, cand: Candidate | None, *, source: str, operator: str, island: int, parents: list[int],
                reason: str = "", prompt_id: int | None = None, adapter: str | None = None,
                strategy: str | None = None) -> tuple[int, str, int | None]:
        """Record one proposal and queue it for evaluation when it is new and valid;
        returns its id, status and the id it duplicates."""
        missing = self._unavailable_inputs(cand) if cand is not None else set()
        if missing:
            cand, reason = None, (f"this run collects no statistics for {', '.join(sorted(missing))}: "
                                  "G (gradient RMS) needs target.gradients: true")
        if cand is None:
            cid = self._new_candidate(code="", source=source, status="rejected", reason=reason, operator=operator,
                                      island=island, parents=parents, prompt_id=prompt_id, adapter=adapter,
                                      strategy=strategy)
            self.since_accepted += 1
            return cid, "rejected", None
        self.stats["valid"] += 1
        self.metrics.inc("valid")
        earlier = self.population.claim(cand.hash, self.next_id)
        status = "duplicate" if earlier is not None else "accepted"
        cid = self._new_candidate(code=cand.code, source=source, status=status, operator=operator, island=island,
                                  parents=parents, hash_=cand.hash, prompt_id=prompt_id, adapter=adapter,
                                  duplicate_of=earlier, granularity=cand.granularity, strategy=strategy)
        log.debug("%s: %s by %s", self.tag({"island": island, "candidate_id": cid}), status, operator)
        self.lineage[cid] = {"code": cand.code, "fitness": None, "parents": parents, "operator": operator}
        self.since_accepted = 0 if status == "accepted" else self.since_accepted + 1
        if status == "accepted":
            self.queue.append({"candidate_id": cid, "hash": cand.hash, "code": cand.code, "island": island,
                               "granularity": cand.granularity, "operator": operator, "parents": parents,
                               "attempts": 0})
        return cid, status, earlier

    def tag(self, job: dict) -> str:
        """What every per-candidate log record starts with: grep a run's logs by any of the three."""
        return f"run={self.cfg.name} island={job['island']} candidate={job['candidate_id']}"

    def _unavailable_inputs(self, cand: Candidate) -> set[str]:
        """Inputs the program reads that the evaluators do not collect (G without gradients)."""
        if self.cfg.task not in ("prune", "mpq") or self.cfg.target.gradients:
            return set()
        return {"G"} & {n.value for n in walk(cand.tree) if n.op == "input"}

    def record_evaluation(self, job: dict, result: dict) -> None:
        status = result["status"]
        row = {"candidate_id": job["candidate_id"], "hash": job["hash"], "status": status,
               "proxy": result.get("proxy"), "perplexity": result.get("perplexity"),
               "fitness": fitness_from_perplexity(result.get("perplexity")) if status == "ok" else None,
               "sparsity": result.get("sparsity"), "seconds": result.get("seconds"), "worker": result.get("worker"),
               "reason": result.get("reason", ""), "attempts": job.get("attempts", 0),
               "finished": time.time() - self.t0, "node": result.get("node"),
               **{k: result.get(k) for k in ("avg_bits", "spearman", "kendall")}}
        self.store.append("evaluations", row)
        self._log_outcome(job, row)
        self.evaluated += 1
        self.metrics.inc("evaluated")
        if status in ("failed", "timeout"):
            self.metrics.inc("failed")
            self.rejections.append((job["code"][:200], row["reason"]))
        if result.get("seconds"):
            self.metrics.observe_latency(result["seconds"])
        self._admit(job, row)
        self._log_pairs(self.prefs.measured(job["candidate_id"], status, row["fitness"], row["finished"]))

    def _log_outcome(self, job: dict, row: dict) -> None:
        if row["status"] in ("failed", "timeout"):
            log.warning("%s: %s after %.1f s: %s", self.tag(job), row["status"], row["seconds"] or 0.0, row["reason"])
        else:
            log.info("%s: %s, proxy %.4g, perplexity %s (%s, %.1f s)", self.tag(job), row["status"],
                     row["proxy"] if row["proxy"] is not None else math.nan,
                     "-" if row["perplexity"] is None else f"{row['perplexity']:.3f}", job.get("operator", ""),
                     row["seconds"] or 0.0)

    def _admit(self, job: dict, row: dict) -> None:
        """Replayable: the population is a function of the evaluation rows, in order."""
        if row["status"] not in ("ok", "screened"):
            self.population.record_failure()
            return
        try:
            features = subtree_features(parse(job["code"], self.cfg.task, job.get("granularity", "row")).tree)
        except CandidateError:
            features = frozenset()
        ind = Individual(job["candidate_id"], job["hash"], job["code"], row["fitness"], row["proxy"],
                         row["perplexity"], job["island"], job.get("operator", ""), list(job.get("parents", [])),
                         features)
        self.population.add(ind)
        if job["candidate_id"] in self.lineage:
            self.lineage[job["candidate_id"]]["fitness"] = row["fitness"]
        snap = self.population.snapshot()
        self.metrics.set("best_fitness", snap["best_fitness"])
        self.metrics.set("best_perplexity", snap["best_perplexity"])

    def _replay(self) -> bool:
        """Resume: rebuild ids, dedup, population and the queue from the recorded tables."""
        cands, evals = self.store.read("candidates"), self.store.read("evaluations")
        if cands.empty:
            return False
        self.next_id = int(cands.candidate_id.max()) + 1
        by_id = {int(r.candidate_id): r for r in cands.itertuples()}
        for r in cands.itertuples():
            if r.status in ("accepted", "duplicate") and r.hash:
                self.population.claim(r.hash, int(r.candidate_id))
            if r.status != "rejected":
                self.lineage[int(r.candidate_id)] = {"code": r.code, "fitness": None, "parents": list(r.parents),
                                                     "operator": r.operator}
        done = set()
        for e in evals.itertuples() if not evals.empty else []:
            c = by_id[int(e.candidate_id)]
            job = {"candidate_id": int(c.candidate_id), "hash": c.hash, "code": c.code, "island": int(c.island),
                   "operator": c.operator, "parents": list(c.parents), "granularity": c.granularity}
            row = {"status": e.status, "proxy": _num(e.proxy), "perplexity": _num(e.perplexity),
                   "fitness": _num(e.fitness)}
            self._admit(job, row)
            done.add(int(e.candidate_id))
            if e.status in OUTCOMES_EVALUATED:
                self.evaluated += 1
        for r in cands.itertuples():
            if r.status == "accepted" and int(r.candidate_id) not in done:
                self.queue.append({"candidate_id": int(r.candidate_id), "hash": r.hash, "code": r.code,
                                   "island": int(r.island), "granularity": r.granularity, "operator": r.operator,
                                   "parents": list(r.parents), "attempts": 0})
        self.dispatched = self.evaluated
        self._replay_preferences(cands, evals)
        log.info("resumed %s: %d candidates, %d evaluations, %d re-queued", self.run_dir, len(cands),
                 self.evaluated, len(self.queue))
        return True

    def _replay_preferences(self, cands, evals) -> None:
        """Rebuild the pair log, the strategy controller and the DPO state; log pairs a crash lost."""
        logged = self.store.read("preferences")
        replayed = prefs.replay(self.prefs, cands, evals, self.store.read("prompts"))
        known = set(zip(logged.chosen_id, logged.rejected_id))
        for pair in logged.to_dict("records"):
            self.strategies.update(pair)
            self._keep_for_training(pair)
        self.dpo["pairs"] = len(logged)
        self._log_pairs([p for p in replayed if (p["chosen_id"], p["rejected_id"]) not in known])
        rounds = self.store.read("adapters")
        if not rounds.empty:
            self.dpo["round"] = len(rounds)
            self.dpo["pairs_at_round"] = int(rounds.pairs_total.max())
            ok = rounds[rounds.status == "ok"]
            if not ok.empty:
                self.dpo["adapter"] = (ok.version.iloc[-1], ok.path.iloc[-1])

    # ------------------------------------------------------------------ preferences, strategies, DPO
    def _temperatures(self) -> list[float]:
        return self.cfg.strategy.temperatures or [self.cfg.policy.temperature]

    def _strategy_controller(self) -> StrategyController:
        st, ops = self.cfg.strategy, self.cfg.search.operators
        rates = {op: ops.get(op, 0.0) for op in LLM_OPERATORS if ops.get(op, 0.0) > 0} or {"llm_init": 1.0}
        return StrategyController(rates, self._temperatures(), st.enabled, st.learning_rate, st.exploration)

    def _keep_for_training(self, pair: dict) -> None:
        if pair["grouping"] in self.cfg.dpo.groupings:
            self.recent_pairs.append({k: pair[k] for k in ("prompt", "chosen", "rejected")})

    def _log_pairs(self, pairs: list[dict]) -> None:
        changed = False
        for pair in pairs:
            self.store.append("preferences", pair)
            self._keep_for_training(pair)
            changed |= self.strategies.update(pair)
        self.dpo["pairs"] += len(pairs)
        if pairs:
            self.metrics.inc("preference_pairs", len(pairs))
        if changed:
            now = time.time() - self.t0
            for row in self.strategies.snapshot():
                self.store.append("strategies", row | {"time": now, "evaluated": self.evaluated,
                                                       "comparisons": self.strategies.comparisons})

    def dpo_due(self) -> bool:
        d = self.cfg.dpo
        return d.enabled and self.dpo["pairs"] - self.dpo["pairs_at_round"] >= d.every_pairs

    def next_dpo_round(self) -> dict:
        """The next round's job: the newest pairs, where its adapter goes, what it continues from."""
        d = self.cfg.dpo
        self.dpo["round"] += 1
        self.dpo["pairs_at_round"] = self.dpo["pairs"]
        version = f"v{self.dpo['round']}"
        previous = self.dpo["adapter"]
        return {"version": version, "round": self.dpo["round"], "path": str(self.run_dir / "adapters" / version),
                "pairs": list(self.recent_pairs),
                "pairs_total": self.dpo["pairs"], "init_adapter": previous[1] if previous else None,
                "config": DPOConfig(beta=d.beta, lr=d.lr, epochs=d.epochs, batch_size=d.batch_size, lora_r=d.lora_r,
                                    lora_alpha=2 * d.lora_r, max_length=d.max_length, reference=d.reference,
                                    seed=d.seed + self.dpo["round"]),
                "started": time.time() - self.t0}

    def record_dpo_round(self, job: dict, metrics: dict | None, error: str = "") -> None:
        """One row per round; a good round's adapter becomes the one the policy serves."""
        train, held = (metrics or {}).get("train", {}), (metrics or {}).get("held_out", {})
        self.store.append("adapters", {
            "version": job["version"], "path": job["path"], "round": job["round"],
            "status": "failed" if metrics is None else "ok", "reason": error[:500],
            "pairs_total": job["pairs_total"], "train_pairs": (metrics or {}).get("train_pairs"),
            "heldout_pairs": held.get("pairs"), "train_loss": train.get("loss"),
            "train_accuracy": train.get("reward_accuracy"), "heldout_loss": held.get("loss"),
            "heldout_accuracy": held.get("reward_accuracy"), "heldout_margin": held.get("reward_margin"),
            "started": job["started"], "finished": time.time() - self.t0})
        if metrics is not None:
            self.dpo["adapter"] = (job["version"], job["path"])
        self.store.flush()

    # ------------------------------------------------------------------ proposals
    def seed_population(self) -> None:
        if self.cfg.search.seeds:
            for name, cand in task_seeds(self.cfg.task).items():
                if self._unavailable_inputs(cand):
                    continue   # weight-gradient needs gradient statistics (target.gradients)
                self.propose(cand, source=cand.code, operator="seed", island=self.population.next_island(),
                             parents=[])

    def choose_operator(self) -> tuple[str, float | None]:
        """An operator and, for an LLM operator, its temperature: LLM against symbolic by the
        configured rates, then the LLM strategy from the strategy controller."""
        ops = self.cfg.search.operators
        llm_rate = sum(v for k, v in ops.items() if k in LLM_OPERATORS)
        names = ["llm"] * (llm_rate > 0) + [k for k, v in ops.items() if v > 0 and k not in LLM_OPERATORS]
        weights = [llm_rate] * (llm_rate > 0) + [ops[k] for k in names if k != "llm"]
        op = self.rng.choices(names, weights=weights)[0]
        has_parents = self.population.has_members()
        if op != "llm":
            return (op if has_parents else "symbolic_init"), None
        try:
            return self.strategies.choose(self.rng, None if has_parents else ("llm_init",))
        except ValueError:   # llm_init has rate 0 and there are no parents yet
            return "llm_init", self._temperatures()[0]

    def symbolic_child(self, op: str) -> None:
        island = self.population.next_island()
        if op == "symbolic_init":
            for _ in range(10):   # random programs only over the inputs this run collects
                child = symbolic._finish(symbolic.random_tree(self.rng, self.cfg.task, depth=3), self.cfg.task, ())
                if child is not None and not self._unavailable_inputs(child):
                    break
            parents = []
        elif op == "symbolic_mutate":
            parent = self.population.sample_parents(island, 1)[0]
            pc = parse(parent.code, self.cfg.task)
            child = symbolic.MUTATIONS[self.rng.choice(sorted(symbolic.MUTATIONS))](pc, self.rng)
            parents = [parent.candidate_id]
        else:
            a, b = self.population.sample_parents(island, 2)
            child = symbolic.crossover(parse(a.code, self.cfg.task), parse(b.code, self.cfg.task), self.rng)
            parents = [a.candidate_id, b.candidate_id]
        if child is not None:
            self.propose(child, source=child.code, operator=op, island=island, parents=parents)

    def build_prompt(self, op: str) -> tuple[str, int, list[int]]:
        island, task = self.population.next_island(), self.cfg.task
        feedback = P.feedback_lines(list(self.rejections))
        if op == "llm_init":
            examples = [(i.code, i.fitness) for i in self.population.elites(island)[:3]]
            return P.init_prompt(examples, feedback, task), island, []
        if op == "llm_crossover":
            a, b = self.population.sample_parents(island, 2)
            return (P.crossover_prompt(a.code, a.fitness, b.code, b.fitness, feedback, task), island,
                    [a.candidate_id, b.candidate_id])
        parent = self.population.sample_parents(island, 1)[0]
        if op == "gcot":
            return P.gcot_prompt(self.lineage_graph(parent.candidate_id), task), island, [parent.candidate_id]
        return P.mutate_prompt(parent.code, parent.fitness, feedback, task), island, [parent.candidate_id]

    def lineage_graph(self, root: int, limit: int = 8) -> "P.LineageGraph":
        """The parent's ancestors and their other children, with fitness, for graph-driven CoT."""
        ids, frontier = {root}, [root]
        while frontier and len(ids) < limit:
            node = frontier.pop()
            for p in self.lineage.get(node, {}).get("parents", []):
                if p in self.lineage and p not in ids:
                    ids.add(p)
                    frontier.append(p)
        for cid, info in list(self.lineage.items())[-200:]:
            if len(ids) >= limit:
                break
            if set(info["parents"]) & ids:
                ids.add(cid)
        nodes = [P.LineageNode(i, self.lineage[i]["code"], self.lineage[i]["fitness"]) for i in sorted(ids)]
        edges = [P.LineageEdge(p, c, self.lineage[c]["operator"]) for c in sorted(ids)
                 for p in self.lineage[c]["parents"] if p in ids]
        return P.LineageGraph(nodes=nodes, edges=edges, rejections=P.feedback_lines(list(self.rejections))[:5])

    def handle_completions(self, meta: dict, completions: list[dict]) -> None:
        for comp in completions:
            idx = comp["prompt_index"]
            prompt_id, strategy = meta["prompt_ids"][idx], strategy_name(meta["ops"][idx], meta["temperatures"][idx])
            self.store.append("prompts", {"prompt_id": prompt_id, "operator": meta["ops"][idx],
                                          "island": meta["islands"][idx], "prompt": meta["prompts"][idx],
                                          "completion": comp["text"], "tokens": comp.get("tokens"),
                                          "seconds": comp.get("seconds"), "adapter": comp.get("adapter"),
                                          "strategy": strategy})
            self.stats["tokens"] += comp.get("tokens") or 0
            try:
                cand, reason = parse(comp["text"], self.cfg.task), ""
            except CandidateError as exc:
                cand, reason = None, str(exc)
            cid, status, earlier = self.propose(
                cand, source=comp["text"], operator=meta["ops"][idx], island=meta["islands"][idx],
                parents=meta["parents"][idx], reason=reason, prompt_id=prompt_id, adapter=comp.get("adapter"),
                strategy=strategy)
            self._log_pairs(self.prefs.add(prefs.Completion(
                candidate_id=cid, prompt_id=prompt_id, prompt=meta["prompts"][idx], source=comp["text"],
                operator=meta["ops"][idx], island=meta["islands"][idx], parents=tuple(meta["parents"][idx]),
                adapter=comp.get("adapter"), strategy=strategy, status=status, duplicate_of=earlier),
                time.time() - self.t0))

    def next_prompt_id(self) -> int:
        self.prompt_counter += 1
        return self.prompt_counter

    # ------------------------------------------------------------------ stopping
    def stop_reason(self) -> str | None:
        s = self.cfg.search
        if self.evaluated >= s.max_evaluations:
            return f"reached {s.max_evaluations} evaluations"
        if s.max_seconds is not None and time.time() - self.t0 >= s.max_seconds:
            return f"reached {s.max_seconds:.0f} s"
        if s.patience is not None and self.population.snapshot()["since_improvement"] >= s.patience:
            return f"no improvement for {s.patience} evaluations"
        if self.since_accepted >= s.stall_proposals and not self.queue:
            return f"{s.stall_proposals} proposals in a row were rejected or duplicates"
        return None

    def proxy_cutoff(self) -> float | None:
        best = self.population.snapshot()["best_proxy"]
        return None if best is None else best * self.cfg.search.cascade

    def summary(self) -> dict:
        snap = self.population.snapshot()
        elapsed = time.time() - self.t0
        return {"run_dir": str(self.run_dir), "evaluated": self.evaluated, "proposed": self.stats["proposed"],
                "valid_rate": self.stats["valid"] / max(self.stats["proposed"], 1),
                "pending": len(self.queue), "best_id": snap["best_id"], "best_perplexity": snap["best_perplexity"], "best_code": snap["best_code"],
                "seconds": elapsed, "tokens_per_second": self.stats["tokens"] / max(elapsed, 1e-9),
                "evaluator_utilization": self.stats["busy_seconds"] / max(elapsed * self.cfg.evaluators.num, 1e-9),
                "overhead_per_candidate": self.stats["overhead_seconds"] / max(self.stats["proposed"], 1),
                "preference_pairs": self.dpo["pairs"], "dpo_rounds": self.dpo["round"],
                "adapter": self.dpo["adapter"][0] if self.dpo["adapter"] else None}


def _num(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)
