"""Proposal scheduling: which operator runs next, the prompts LLM operators send, the children
symbolic operators make, and how every proposal (seed, symbolic child or completion) is recorded
and, when new and valid, queued for evaluation (`propose`).

Task-specific content comes from the run's task plug-in (seeds, prompt texts); the task's name is
only ever a lookup key (the candidate language of `parse`), never compared.
"""
from __future__ import annotations

import itertools
import logging
import random

from autoprune_ray.engine.config import RunConfig
from autoprune_ray.engine.learning import LLM_OPERATORS, PolicyLearning
from autoprune_ray.engine.records import RunRecords, evaluation_job
from autoprune_ray.llm import preferences as prefs
from autoprune_ray.llm.strategy import strategy_name
from autoprune_ray.operators import prompts as P
from autoprune_ray.operators import symbolic
from autoprune_ray.operators.language import Candidate, CandidateError, parse
from autoprune_ray.tasks.base import TaskPlugin
from autoprune_ray.tree.expr import inputs_of

log = logging.getLogger("autoprune_ray.engine")
SYMBOLIC_INIT_TRIES = 10


class Proposals:
    def __init__(self, cfg: RunConfig, task: TaskPlugin, rng: random.Random, records: RunRecords,
                 learning: PolicyLearning, population):
        self.cfg, self.task, self.rng = cfg, task, rng
        self.records, self.learning, self.population = records, learning, population
        self.since_accepted = 0                # proposals in a row that gave nothing new to evaluate
        self.prompt_counter = 0

    # ------------------------------------------------------------------ recording a proposal
    def propose(self, cand: Candidate | None, *, source: str, operator: str, island: int, parents: list[int],
                reason: str = "", prompt_id: int | None = None, adapter: str | None = None,
                strategy: str | None = None) -> tuple[int, str, int | None]:
        """Record one proposal and queue it for evaluation when it is new and valid;
        returns its id, status and the id it duplicates."""
        missing = self.unavailable_inputs(cand) if cand is not None else set()
        if missing:
            cand, reason = None, (f"this run collects no statistics for {', '.join(sorted(missing))}: "
                                  "G (gradient RMS) needs target.gradients: true")
        common = {"source": source, "operator": operator, "island": island, "parents": parents,
                  "prompt_id": prompt_id, "adapter": adapter, "strategy": strategy}
        if cand is None:
            cid = self.records.new_candidate(code="", status="rejected", reason=reason, **common)
            self.since_accepted += 1
            return cid, "rejected", None
        return self._propose_valid(cand, common)

    def _propose_valid(self, cand: Candidate, common: dict) -> tuple[int, str, int | None]:
        """A valid program is a duplicate of the first id with its hash, or accepted and queued."""
        r, island, operator, parents = self.records, common["island"], common["operator"], common["parents"]
        r.stats["valid"] += 1
        r.metrics.inc("valid")
        earlier = self.population.claim(cand.hash, r.next_id)
        status = "duplicate" if earlier is not None else "accepted"
        cid = r.new_candidate(code=cand.code, status=status, hash_=cand.hash, duplicate_of=earlier,
                              granularity=cand.granularity, **common)
        log.debug("%s: %s by %s", r.tag({"island": island, "candidate_id": cid}), status, operator)
        r.remember(cid, cand.code, parents, operator)
        self.since_accepted = 0 if status == "accepted" else self.since_accepted + 1
        if status == "accepted":
            r.queue.append(evaluation_job(cid, cand.hash, cand.code, island, cand.granularity, operator, parents))
        return cid, status, earlier

    def unavailable_inputs(self, cand: Candidate) -> set[str]:
        """Inputs the program reads that the evaluators do not collect (G without gradients);
        a task whose language has no G never reads it."""
        return self.cfg.target.uncollected_inputs & inputs_of(cand.tree)

    # ------------------------------------------------------------------ scheduling
    def seed_population(self) -> None:
        wanted = self.cfg.search.seeds
        if not wanted:
            return
        for name, cand in self.task.seeds().items():
            if isinstance(wanted, list) and name not in wanted:
                continue
            if self.unavailable_inputs(cand):
                continue   # weight-gradient needs gradient statistics (target.gradients)
            self.propose(cand, source=cand.code, operator="seed", island=self.population.next_island(), parents=[])

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
            return self.learning.strategies.choose(self.rng, None if has_parents else ("llm_init",))
        except ValueError:   # llm_init has rate 0 and there are no parents yet
            return "llm_init", self.learning.temperatures()[0]

    def choose_symbolic(self) -> str | None:
        """A symbolic operator by the configured rates (None when the run has none): what an idle
        evaluator gets while the policy is still writing, instead of waiting for it."""
        ops = {k: v for k, v in self.cfg.search.operators.items() if v > 0 and k not in LLM_OPERATORS}
        if not ops:
            return None
        op = self.rng.choices(list(ops), weights=list(ops.values()))[0]
        return op if self.population.has_members() else "symbolic_init"

    # ------------------------------------------------------------------ symbolic operators
    def symbolic_child(self, op: str) -> None:
        island = self.population.next_island()
        if op == "symbolic_init":
            child, parents = self._random_child(), []
        elif op == "symbolic_mutate":
            parent = self.population.sample_parents(island, 1)[0]
            program = parse(parent.code, self.cfg.task)
            mutate = symbolic.MUTATIONS[self.rng.choice(sorted(symbolic.MUTATIONS))]
            child, parents = mutate(program, self.rng), [parent.candidate_id]
        else:
            a, b = self.population.sample_parents(island, 2)
            child = symbolic.crossover(parse(a.code, self.cfg.task), parse(b.code, self.cfg.task), self.rng)
            parents = [a.candidate_id, b.candidate_id]
        if child is not None:
            self.propose(child, source=child.code, operator=op, island=island, parents=parents)

    def _random_child(self) -> Candidate | None:
        """A random program over the inputs this run collects. One tree per try (tries=1), so a
        seed draws the same programs as before; the last try is proposed even when it reads an
        unavailable input, and is then recorded as rejected with the reason."""
        child = None
        for _ in range(SYMBOLIC_INIT_TRIES):
            child = symbolic.random_candidate(self.rng, self.cfg.task, depth=3, tries=1)
            if child is not None and not self.unavailable_inputs(child):
                break
        return child

    # ------------------------------------------------------------------ LLM operators
    def build_prompt(self, op: str) -> tuple[str, int, list[int]]:
        """The prompt of an LLM operator, the island it draws from, and its parents' ids."""
        island, task = self.population.next_island(), self.task.prompts
        feedback = P.feedback_lines(list(self.records.rejections))
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

    def lineage_graph(self, root: int, limit: int = 8) -> P.LineageGraph:
        return lineage_graph(self.records.lineage, root, P.feedback_lines(list(self.records.rejections)), limit)

    def next_prompt_id(self) -> int:
        self.prompt_counter += 1
        return self.prompt_counter

    def handle_completions(self, meta: dict, completions: list[dict]) -> None:
        """A generated batch: `meta` holds per-prompt lists (prompts, ops, islands, parents,
        prompt_ids, temperatures); each completion names its prompt by `prompt_index`."""
        for comp in completions:
            self._take_completion(meta, comp)

    def _take_completion(self, meta: dict, comp: dict) -> None:
        """Record the prompt and completion, propose what it parses to, and pair it with its siblings."""
        idx, text, adapter = comp["prompt_index"], comp["text"], comp.get("adapter")
        op, island, parents, prompt = meta["ops"][idx], meta["islands"][idx], meta["parents"][idx], meta["prompts"][idx]
        prompt_id, strategy = meta["prompt_ids"][idx], strategy_name(op, meta["temperatures"][idx])
        self.records.store.append("prompts", {"prompt_id": prompt_id, "operator": op, "island": island,
                                              "prompt": prompt, "completion": text, "tokens": comp.get("tokens"),
                                              "seconds": comp.get("seconds"), "adapter": adapter,
                                              "strategy": strategy})
        self.records.stats["tokens"] += comp.get("tokens") or 0
        cand, reason = parse_completion(text, self.cfg.task)
        cid, status, earlier = self.propose(cand, source=text, operator=op, island=island, parents=parents,
                                            reason=reason, prompt_id=prompt_id, adapter=adapter, strategy=strategy)
        self.learning.completed(prefs.Completion(
            candidate_id=cid, prompt_id=prompt_id, prompt=prompt, source=text, operator=op, island=island,
            parents=tuple(parents), adapter=adapter, strategy=strategy, status=status, duplicate_of=earlier))


def parse_completion(text: str, task: str) -> tuple[Candidate | None, str]:
    """The candidate a completion parses to, or None and the reason. Whatever the parser raises
    becomes a rejection: one odd completion must never stop a search."""
    try:
        return parse(text, task), ""
    except CandidateError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - a parser bug is a recorded rejection, and logged
        log.exception("the parser failed on a completion; recorded as a rejection")
        return None, f"the program could not be parsed ({type(exc).__name__}: {exc})"[:300]


def lineage_graph(lineage: dict[int, dict], root: int, feedback: list[str], limit: int = 8) -> P.LineageGraph:
    """The root's ancestors and their other children, with fitness, for graph-driven CoT."""
    ids, frontier = {root}, [root]
    while frontier and len(ids) < limit:
        node = frontier.pop()
        for p in lineage.get(node, {}).get("parents", []):
            if p in lineage and p not in ids:
                ids.add(p)
                frontier.append(p)
    # other children, among the newest 200 candidates (read from the end: a copy of the whole
    # lineage per prompt made gcot prompts linear in the run's length)
    for cid, info in reversed(list(itertools.islice(reversed(lineage.items()), 200))):
        if len(ids) >= limit:
            break
        if set(info["parents"]) & ids:
            ids.add(cid)
    nodes = [P.LineageNode(i, lineage[i]["code"], lineage[i]["fitness"]) for i in sorted(ids)]
    edges = [P.LineageEdge(p, c, lineage[c]["operator"])
             for c in sorted(ids) for p in lineage[c]["parents"] if p in ids]
    return P.LineageGraph(nodes=nodes, edges=edges, rejections=feedback[:5])
