"""Discovery that holds up: joint metric + allocation programs, the staged KL fitness at several
sparsities, promotion, and a search that never reads the held-out split."""
from __future__ import annotations

import math
import random

import pandas as pd
import pytest
import torch

from autoprune_ray.compress.fitness import PruneEvaluator, Stage, geometric_fitness
from autoprune_ray.compress.kl import DenseReference, kl_divergence
from autoprune_ray.engine.config import ConfigError, RunConfig, from_dict
from autoprune_ray.engine.promotion import promoted_ranking, promotion_candidates, promotion_jobs
from autoprune_ray.operators import symbolic
from autoprune_ray.operators.language import CandidateError, parse, parse_file
from autoprune_ray.tasks import get_task

JOINT = ("def score(W, A):\n    return W.abs() * A\n\n"
         "def allocate(outlier, depth):\n    return depth - 2 * outlier\n")


# ---------------------------------------------------------------- the joint program

def test_a_joint_program_holds_a_metric_and_an_allocation_and_round_trips():
    chatty = "Idea: prune deep layers more.\n```python\n" + JOINT.replace("\n\ndef", "\n# and now\ndef") + "```\nDone."
    cand = parse(chatty, "joint")
    assert set(cand.parts) == {"prune", "allocate"}
    assert cand.inputs == ["W", "A", "outlier", "depth"]
    again = parse(cand.code, "joint")
    assert again.hash == cand.hash and again.code == cand.code
    # one-part programs hash as they always did: a changed hash would split old runs' dedup
    metric = parse("def score(W, A): return W.abs() * A", "prune")
    assert metric.hash != cand.hash and metric.hash == parse(metric.code, "prune").hash


def test_the_parts_are_told_apart_by_name_or_else_by_parameters():
    renamed = "def f(W, A):\n    return W.abs() * A\n\ndef g(outlier):\n    return -outlier\n"
    swapped = "def allocate_layers(alpha):\n    return alpha\n\ndef score_new(W):\n    return W.abs()\n"
    assert expr_text(parse(renamed, "joint").allocation) == "neg(outlier)"
    assert expr_text(parse(swapped, "joint").tree) == "abs(W)"


def expr_text(tree) -> str:
    from autoprune_ray.tree import expr
    return expr.to_string(tree)


@pytest.mark.parametrize("text, reason", [
    ("def score(W, A):\n    return W.abs() * A\n", "`allocate` function is missing"),
    ("def f(W):\n    return W\n\ndef g(W):\n    return W.abs()\n", "two functions look like the score part"),
    (JOINT + "\ndef helper(x):\n    return x\n", "write exactly 2 functions"),
    ("def score(W, A):\n    return W.abs() * A\n\ndef allocate(outlier):\n    return outlier.sum()\n",
     "one value per layer"),
])
def test_a_bad_joint_program_is_rejected_with_its_reason(text, reason):
    with pytest.raises(CandidateError, match=reason):
        parse(text, "joint")


def test_a_program_file_says_what_it_is_by_its_functions():
    assert parse_file(JOINT).task == "joint"
    assert parse_file("def allocate(outlier):\n    return -outlier\n").task == "allocate"
    assert parse_file("def score(W, A):\n    return W.abs() * A\n").task == "prune"
    with pytest.raises(CandidateError, match="top-level statement"):
        parse_file("import os\n" + JOINT)


def test_symbolic_operators_vary_one_part_and_keep_the_other():
    parent = parse(JOINT, "joint")
    rng = random.Random(0)
    changed = {"prune": 0, "allocate": 0}
    for _ in range(40):
        child = symbolic.subtree_mutation(parent, rng)
        assert child is not None and child.hash != parent.hash
        assert parse(child.code, "joint").hash == child.hash   # what is hashed is what runs
        same = [part for part in parent.parts if child.parts[part] == parent.parts[part]]
        assert len(same) == 1, "exactly one part changes"
        changed[({"prune", "allocate"} - set(same)).pop()] += 1
    assert min(changed.values()) > 0, "both parts get varied"
    assert symbolic.random_candidate(rng, "joint").allocation is not None


def test_joint_seeds_are_the_expert_metrics_crossed_with_the_expert_allocations():
    seeds = get_task("joint").seeds()
    assert {"uniform-wanda", "owl-wanda", "alpha-wanda"} <= set(seeds)
    owl = seeds["owl-wanda"]
    assert expr_text(owl.allocation) == "neg(outlier)" and parse(owl.code, "joint").hash == owl.hash


# ---------------------------------------------------------------- the KL stage

def test_kl_divergence_matches_a_hand_computation():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    q = torch.tensor([[0.25, 0.5, 0.25], [0.1, 0.1, 0.8]])
    expected = [0.5 * math.log(2) + 0.25 * math.log(0.5), 0.8 * math.log(8) + 0.1 * math.log(0.125)]
    got = kl_divergence(p.log(), q.log())
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)


def test_the_kl_of_a_tiny_model_is_zero_dense_and_matches_a_direct_computation(tiny_lm, tiny_data):
    tokens = tiny_data.validation[:, :64]
    reference = DenseReference.compute(tiny_lm, tokens, 32)
    assert reference.kl(tiny_lm) == pytest.approx(0.0, abs=1e-6)
    dense_logits = tiny_lm.model(tokens.view(2, 32)).logits.detach()
    with torch.no_grad():
        for p in tiny_lm.model.parameters():
            p.mul_(0.9)
        logits = tiny_lm.model(tokens.view(2, 32)).logits
    p_dense = torch.softmax(dense_logits, -1)
    direct = (p_dense * (torch.log_softmax(dense_logits, -1) - torch.log_softmax(logits, -1))).sum(-1).mean()
    assert reference.kl(tiny_lm) == pytest.approx(float(direct), rel=1e-4)
    assert float(direct) > 1e-4


def test_the_fitness_is_minus_the_log_of_the_geometric_mean_over_levels():
    fitness, geometric = geometric_fitness([4.0, 16.0])
    assert geometric == pytest.approx(8.0) and fitness == pytest.approx(-math.log(8.0))
    with pytest.raises(FloatingPointError):
        geometric_fitness([1.0, float("nan")])


def test_the_evaluator_measures_each_level_on_validation_tokens(tiny_lm, tiny_data):
    from autoprune_ray.compress.prune import PruneConfig
    evaluator = PruneEvaluator(tiny_lm, tiny_data)
    configs = [PruneConfig(method="wanda", sparsity=s, mode="one-pass") for s in (0.3, 0.6)]
    screened = evaluator.screen_levels(configs)
    assert len(screened.value) == 2 and screened.columns["sparsity"] == pytest.approx(0.45, abs=0.01)
    kl = evaluator.measure(screened.value, Stage("kl", 64))
    ppl = evaluator.measure(screened.value, Stage("perplexity", 64))
    assert kl["levels"][0] < kl["levels"][1], "more sparsity moves the model further from the dense one"
    assert ppl["levels"] == [pytest.approx(evaluator.perplexity(v, tiny_data.validation[:, :64])) for v in screened.value]
    assert kl["fitness"] == pytest.approx(-sum(math.log(v) for v in kl["levels"]) / 2)


# ---------------------------------------------------------------- promotion

def _evals(rows):
    return pd.DataFrame(rows, columns=["candidate_id", "hash", "status", "fitness"])


def test_promotion_takes_the_fittest_distinct_programs():
    evals = _evals([(1, "a", "ok", -2.0), (2, "b", "ok", -1.0), (3, "b", "ok", -1.0), (4, "c", "screened", None),
                    (5, "d", "ok", -3.0), (6, "e", "failed", None), (7, "f", "ok", -1.5)])
    assert promotion_candidates(evals, 3) == [2, 7, 1]
    assert promotion_candidates(evals, 0) == []


def test_promotion_skips_another_spelling_of_a_promoted_program():
    # 8 and 2 are different texts with bitwise-equal fitness: the same masks, promoted once
    evals = _evals([(2, "b", "ok", -1.0), (8, "g", "ok", -1.0), (7, "f", "ok", -1.5), (9, "h", "ok", -1.0000001)])
    assert promotion_candidates(evals, 3) == [2, 9, 7]


def test_promotion_jobs_skip_what_was_already_measured():
    cfg = RunConfig()
    cfg.fitness.promote = 2
    cands = pd.DataFrame({"candidate_id": [1, 2], "hash": ["a", "b"], "code": ["x", "y"], "granularity": ["row", None]})
    evals = _evals([(1, "a", "ok", -2.0), (2, "b", "ok", -1.0)])
    done = pd.DataFrame({"candidate_id": [2], "seed": [0]})
    jobs = promotion_jobs(cfg, cands, evals, done)
    assert [(j["candidate_id"], j["seed"]) for j in jobs] == [(2, 1), (1, 0), (1, 1)]
    assert all(j["stage"] == "promote" and j["proxy_cutoff"] is None for j in jobs)


def test_the_promoted_best_needs_every_seed_and_ranks_by_the_mean():
    rows = [(1, 0, "ok", -2.0), (1, 1, "ok", -2.2),       # mean −2.1
            (2, 0, "ok", -1.9), (2, 1, "ok", -2.4),       # mean −2.15: better on seed 0 alone, not on both
            (3, 0, "ok", -1.0), (3, 1, "failed", None)]   # failed under the second seed: not eligible
    promotions = pd.DataFrame(rows, columns=["candidate_id", "seed", "status", "fitness"])
    ranking = promoted_ranking(promotions, [0, 1])
    assert list(ranking.candidate_id) == [1, 2]
    assert ranking.fitness.iloc[0] == pytest.approx(-2.1)
    assert ranking.perplexity.iloc[0] == pytest.approx(math.exp(2.1))


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("target, key", [
    ({"sparsities": [0.6, 1.0]}, "target.sparsities[1]"),
    ({"sparsities": [0.0]}, "target.sparsities[0]"),
    ({"sparsity": -0.1}, "target.sparsity"),
    ({"sparsities": []}, "target.sparsities"),
])
def test_sparsities_outside_zero_one_fail_validation_with_one_line(target, key):
    with pytest.raises(ConfigError) as exc:
        from_dict(RunConfig, {"task": "joint", "target": target}).validate()
    assert str(exc.value).startswith(key) and "\n" not in str(exc.value)


def test_an_allocation_band_leaving_zero_one_at_any_level_fails_validation():
    with pytest.raises(ConfigError, match="allocation.lam: sparsity 0.9"):
        from_dict(RunConfig, {"task": "joint", "target": {"sparsities": [0.6, 0.9]},
                              "allocation": {"lam": 0.16}}).validate()


def test_fitness_settings_are_checked():
    with pytest.raises(ConfigError, match="fitness.measure"):
        from_dict(RunConfig, {"fitness": {"measure": "accuracy"}}).validate()
    with pytest.raises(ConfigError, match="fitness.second_seed"):
        from_dict(RunConfig, {"fitness": {"second_seed": 0}}).validate()
    with pytest.raises(ConfigError, match="fitness.tokens"):
        from_dict(RunConfig, {"target": {"val_tokens": 1024}, "fitness": {"tokens": 2048}}).validate()


def test_evaluator_threads_are_checked_and_set(tmp_path, tiny_model_dir, corpus_file):
    from autoprune_ray.engine.evaluator import EvaluatorWorker
    from tests_support import make_config

    with pytest.raises(ConfigError, match="evaluators.threads: must be at least 1"):
        from_dict(RunConfig, {"evaluators": {"threads": 0}}).validate()
    before = torch.get_num_threads()
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file)
    cfg.evaluators.threads = 1 if before > 1 else 2
    try:
        EvaluatorWorker(cfg.validate())
        assert torch.get_num_threads() == cfg.evaluators.threads
    finally:
        torch.set_num_threads(before)


def test_a_run_may_name_the_seeds_it_starts_from():
    cfg = from_dict(RunConfig, {"task": "joint", "search": {"seeds": ["uniform-wanda", "alpha-wanda"]}}).validate()
    assert cfg.search.seeds == ["uniform-wanda", "alpha-wanda"]
    with pytest.raises(ConfigError, match=r"search.seeds: unknown seed\(s\) \['wanda'\]: task joint has"):
        from_dict(RunConfig, {"task": "joint", "search": {"seeds": ["wanda"]}}).validate()


# ---------------------------------------------------------------- the held-out split stays sealed

def test_a_search_evaluator_never_reads_the_held_out_split(monkeypatch, tmp_path, tiny_model_dir, corpus_file):
    """Search-stage and promotion jobs run with every corpus's held-out reader booby-trapped; the
    report's loader, which must read it, trips the trap (so the trap is live)."""
    from autoprune_ray.compress import data
    from autoprune_ray.engine.evaluator import EvaluatorWorker
    from tests_support import make_config

    reads = []

    def forbidden(corpus):
        reads.append(corpus.name)
        raise AssertionError("the held-out split was read")

    monkeypatch.setattr(data.Corpus, "evaluation_docs", property(forbidden))
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file)
    cfg.task, cfg.target.sparsities = "joint", [0.3, 0.5]
    cfg.fitness.measure, cfg.fitness.tokens, cfg.fitness.promote = "kl", 64, 1
    worker = EvaluatorWorker(cfg.validate())
    seed = get_task("joint").seeds()["owl-wanda"]
    job = {"candidate_id": 0, "hash": seed.hash, "code": seed.code, "granularity": seed.granularity}
    for extra in ({}, {"stage": "promote", "seed": 0}, {"stage": "promote", "seed": 1}):
        result = worker.evaluate(job | extra)
        assert result["status"] == "ok", result["reason"]
    assert reads == []
    with pytest.raises(AssertionError, match="held-out split was read"):
        data.load_token_data(worker.lm.tokenizer, str(corpus_file), nsamples=2, seqlen=32, heldout=True)
    assert reads


def test_an_allocation_that_overflows_is_a_recorded_failure_with_its_reason(tmp_path, tiny_model_dir, corpus_file):
    from autoprune_ray.engine.evaluator import EvaluatorWorker
    from tests_support import make_config

    cfg = make_config(tmp_path, tiny_model_dir, corpus_file)
    cfg.task, cfg.target.sparsities = "joint", [0.3, 0.5]
    worker = EvaluatorWorker(cfg.validate())
    code = ("def score(W, A):\n    return W.abs() * A\n\n"
            "def allocate(size):\n    e = exp(100 * size + 100)\n    return e * e * e * e\n")   # exp is clamped; 1e13⁴ is not
    cand = parse(code, "joint")
    result = worker.evaluate({"candidate_id": 0, "hash": cand.hash, "code": cand.code, "granularity": "row"})
    assert result["status"] == "failed"
    assert "AllocationError" in result["reason"] and "non-finite" in result["reason"]
    ok = parse(JOINT, "joint")   # the evaluator is dense again and measures the next program
    assert worker.evaluate({"candidate_id": 1, "hash": ok.hash, "code": ok.code, "granularity": "row"})["status"] == "ok"


# ---------------------------------------------------------------- one measurement per behaviour

def test_another_spelling_of_a_measured_program_is_screened_not_measured(tmp_path, tiny_model_dir, corpus_file):
    """|W|·A and A·|W|·1 prune the same weights: with the first's proxy known, the second is not
    measured again; a program with other masks still is."""
    from autoprune_ray.engine.evaluator import EvaluatorWorker
    from tests_support import make_config

    cfg = make_config(tmp_path, tiny_model_dir, corpus_file)
    cfg.task, cfg.target.sparsities = "joint", [0.3, 0.5]
    worker = EvaluatorWorker(cfg.validate())
    allocation = "def allocate(depth):\n    return depth\n"
    first, respelled, other = (parse(f"def score(W, A):\n    return {score}\n\n{allocation}", "joint")
                               for score in ("W.abs() * A", "A * W.abs() * 1.0", "W.abs()"))
    assert len({first.hash, respelled.hash, other.hash}) == 3

    def job(cid, cand, known):
        return {"candidate_id": cid, "hash": cand.hash, "code": cand.code, "granularity": "row",
                "known_proxies": known}

    measured = worker.evaluate(job(0, first, {}))
    assert measured["status"] == "ok", measured["reason"]
    known = {measured["proxy"]: 0}
    twin = worker.evaluate(job(1, respelled, known))
    assert twin["status"] == "screened" and twin["proxy"] == measured["proxy"]
    assert twin["reason"].startswith("same proxy as #0") and twin["perplexity"] is None
    assert worker.evaluate(job(2, other, known))["status"] == "ok"


def test_known_behaviours_keep_the_lowest_proxies_under_the_cutoff(tmp_path, tiny_model_dir, corpus_file):
    from autoprune_ray.engine import records
    from autoprune_ray.engine.database import Population
    from autoprune_ray.engine.storage import RunStore
    from tests_support import make_config

    cfg = make_config(tmp_path, tiny_model_dir, corpus_file)
    rec = records.RunRecords(cfg, get_task("prune"), RunStore(tmp_path / "run"), Population(1, 4, 1, 10, 0))
    for cid, (status, proxy) in enumerate([("ok", 0.3), ("ok", 0.1), ("screened", 0.05), ("ok", 0.1),
                                           ("failed", None), ("ok", 0.2)]):
        job = {"candidate_id": cid, "hash": f"h{cid}", "code": "", "island": 0}
        rec.admit(job, {"status": status, "proxy": proxy, "perplexity": None, "fitness": -1.0})
    assert rec.known_behaviours(None) == {0.1: 1, 0.2: 5, 0.3: 0}   # the first to measure 0.1 keeps it
    assert rec.known_behaviours(0.2) == {0.1: 1, 0.2: 5}
    for cid in range(records.KNOWN_BEHAVIOURS + 5):
        rec.admit({"candidate_id": 100 + cid, "hash": f"x{cid}", "code": "", "island": 0},
                  {"status": "ok", "proxy": 1.0 + cid, "perplexity": None, "fitness": -2.0})
    kept = rec.known_behaviours(None)
    assert len(kept) == records.KNOWN_BEHAVIOURS and max(kept) < 1.0 + records.KNOWN_BEHAVIOURS
