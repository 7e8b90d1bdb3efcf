"""The statistics of the policy's benchmarks (benchmarks/dpo.py's A/B, benchmarks/llm_onoff.py),
against hand-computed values."""
import math

import pandas as pd
import pytest
from tests_support import load_benchmark

ab, onoff = load_benchmark("dpo"), load_benchmark("llm_onoff")


def sample(prompt, valid, distinct=False, value=None, beats=None):
    return {"prompt": prompt, "valid": valid, "distinct": distinct, "value": value, "beats": beats}


ARM = [sample(1, True, True, math.e, True), sample(1, False),
       sample(2, True, False, math.e ** 3, False), sample(2, True, True, None, False)]


def test_arm_statistics_are_the_hand_computed_shares():
    stats = ab.arm_statistics(ab.per_prompt(ARM))
    # 3 of 4 valid; 2 of 4 new in the arm; log-values 1 and 3 of the 2 scored; 1 of 3 valid beats
    assert stats["valid_rate"] == pytest.approx(0.75)
    assert stats["distinct_rate"] == pytest.approx(0.5)
    assert stats["mean_log_stage"] == pytest.approx(2.0)
    assert stats["beats_parent"] == pytest.approx(1 / 3)


def test_an_arm_with_nothing_valid_has_undefined_means_not_zero():
    stats = ab.arm_statistics(ab.per_prompt([sample(1, False), sample(2, False)]))
    assert stats["valid_rate"] == 0.0
    assert math.isnan(stats["mean_log_stage"]) and math.isnan(stats["beats_parent"])


def test_identical_arms_differ_by_exactly_zero_in_every_resample():
    arms = {"base": ab.per_prompt(ARM), "dpo-v1": ab.per_prompt(ARM)}
    out = ab.bootstrap(arms, resamples=200)
    for key in ab.STATISTICS:
        assert out["dpo-v1 - base"][key] == {"value": 0.0, "low": 0.0, "high": 0.0}


def test_interval_brackets_the_estimate_and_resamples_whole_prompts():
    # base: prompt p has valid share p/10; the tuned arm writes one more valid program per prompt
    base = [sample(p, k < p) for p in range(1, 9) for k in range(10)]
    tuned = [sample(p, k <= p) for p in range(1, 9) for k in range(10)]
    out = ab.bootstrap({"base": ab.per_prompt(base), "tuned": ab.per_prompt(tuned)}, resamples=500)
    rate = out["base"]["valid_rate"]
    assert rate["value"] == pytest.approx(36 / 80)
    assert rate["low"] < rate["value"] < rate["high"]
    # paired: every resample draws the same prompts in both arms, so the difference is exactly 0.1
    diff = out["tuned - base"]["valid_rate"]
    assert diff["low"] == pytest.approx(0.1) and diff["high"] == pytest.approx(0.1)


def test_best_so_far_follows_finishing_order_and_skips_unmeasured():
    # finished out of id order; a screened (NaN) and a failed (inf) evaluation count but never lead
    evals = pd.DataFrame({"finished": [3.0, 1.0, 2.0, 4.0, 5.0, 6.0],
                          "fitness": [-1.0, -3.0, float("nan"), -2.0, float("inf"), -0.5]})
    assert onoff.best_so_far(evals, budget=6, points=3) == {2: -3.0, 4: -1.0, 6: -0.5}
    assert onoff.best_so_far(evals, budget=12, points=2) == {6: -0.5, 12: None}   # the run stopped at 6


def test_new_bests_credit_the_operator_that_wrote_each_step_up():
    evals = pd.DataFrame({"candidate_id": [1, 2, 3, 4, 5], "finished": [2.0, 1.0, 3.0, 4.0, 5.0],
                          "fitness": [-2.0, -3.0, float("nan"), -2.5, -1.0]})
    cands = pd.DataFrame({"candidate_id": [1, 2, 3, 4, 5],
                          "operator": ["llm_mutate", "seed", "llm_init", "symbolic_mutate", "symbolic_mutate"]})
    steps = onoff.new_bests(evals, cands)
    # finishing order 2, 1, 3 (screened), 4 (worse than the best), 5
    assert [(s["evaluation"], s["candidate_id"], s["operator"]) for s in steps] == [
        (1, 2, "seed"), (2, 1, "llm_mutate"), (5, 5, "symbolic_mutate")]
    assert onoff.credit({0: {"new_bests": steps}, 1: {"new_bests": steps[:1]}}) == {
        "seed": 2, "llm_mutate": 1, "symbolic_mutate": 1}


def test_best_lineage_follows_every_parent_back_to_the_seeds():
    cands = pd.DataFrame({"candidate_id": [0, 1, 2, 3, 4, 5],
                          "operator": ["seed", "seed", "llm_init", "symbolic_crossover", "symbolic_mutate", "gcot"],
                          "parents": [[], [], [], [0, 2], [3], [1]]})
    evals = pd.DataFrame({"candidate_id": [0, 1, 2, 3, 4, 5], "finished": [1.0, 2, 3, 4, 5, 6],
                          "fitness": [-3.0, -2.5, float("nan"), -2.0, -1.0, float("inf")]})
    # 5 failed (inf) and cannot be the best; 4's grandparent 2 was written by the LLM, 1 is not an ancestor
    assert onoff.best_lineage(evals, cands) == {
        "candidate_id": 4, "lineage": {0: "seed", 2: "llm_init", 3: "symbolic_crossover", 4: "symbolic_mutate"},
        "llm_in_lineage": True}
    assert onoff.lineage(cands, 3) == {0: "seed", 2: "llm_init", 3: "symbolic_crossover"}
    assert onoff.best_lineage(evals.assign(fitness=[-3.0, -1.0, float("nan"), -2.0, -4.0, float("inf")]), cands) == {
        "candidate_id": 1, "lineage": {1: "seed"}, "llm_in_lineage": False}


def test_promoted_is_the_best_mean_over_calibration_seeds():
    promotions = pd.DataFrame({"candidate_id": [7, 7, 9, 9, 11], "seed": [0, 1, 0, 1, 0],
                               "status": ["ok", "ok", "ok", "ok", "failed"],
                               "perplexity": [100.0, 120.0, 90.0, 140.0, None],
                               "fitness": [-4.6, -4.8, -4.5, -4.95, None], "levels": ["a", "b", "c", "d", None]})
    # means: 7 -> -4.70, 9 -> -4.725: 7 wins although 9 is better under seed 0
    assert onoff.promoted(promotions) == {"candidate_id": 7, "perplexity": {0: 100.0, 1: 120.0},
                                          "levels": {0: "a", 1: "b"}}


class LengthJudge:
    """Parses any completion but "bad"; a program's value is its length, a parent's is 3."""

    def parse(self, text):
        return None if text == "bad" else type("Cand", (), {"hash": text})()

    def value(self, cand):
        return float(len(cand.hash))

    def parent_value(self, code):
        return 3.0


def test_ab_samples_resume_from_the_checkpoint_and_count_distinct_across_seeds(tmp_path):
    from autoprune_ray.llm.backends import ScriptedBackend
    prompts = pd.DataFrame({"prompt_id": [5], "prompt": ["p"]})
    backend = ScriptedBackend(["ab", "bad", "abcd", "ab"])   # seed 0: ab, bad; seed 1: abcd, ab
    first = ab.ab_samples(backend, LengthJudge(), prompts, {5: ["x"]}, 2, [0, 1], {}, ab.Checkpoint(tmp_path), "base")
    assert [(s["valid"], s["distinct"], s["value"], s["beats"]) for s in first[0]] == [
        (True, True, 2.0, True), (False, False, None, None), (True, True, 4.0, False), (True, False, 2.0, True)]

    class Refuses(ScriptedBackend):
        def generate(self, *args, **kwargs):
            raise AssertionError("a finished step was generated again")
    again = ab.ab_samples(Refuses(["x"]), LengthJudge(), prompts, {5: ["x"]}, 2, [0, 1], {},
                          ab.Checkpoint(tmp_path), "base")
    assert again[0] == first[0]


def test_a_seed_is_kept_in_chunks_of_prompts(tmp_path, monkeypatch):
    from autoprune_ray.llm.backends import ScriptedBackend
    monkeypatch.setattr(ab, "CHUNK", 2)
    prompts = pd.DataFrame({"prompt_id": [1, 2, 3], "prompt": ["a", "b", "c"]})
    checkpoint = ab.Checkpoint(tmp_path)
    samples, _ = ab.ab_samples(ScriptedBackend(["x", "yy", "zzz"]), LengthJudge(), prompts, {1: ["p"], 2: ["p"], 3: ["p"]},
                               1, [0], {}, checkpoint, "base")
    assert [s["prompt"] for s in samples] == [1, 2, 3] and [s["value"] for s in samples] == [1.0, 2.0, 3.0]
    assert checkpoint.load("ab-base-s0-c0")["samples"][1]["prompt"] == 2
    assert [s["prompt"] for s in checkpoint.load("ab-base-s0-c2")["samples"]] == [3]


def test_a_work_directory_left_by_other_arguments_is_refused(tmp_path):
    import click
    checkpoint = ab.resume(tmp_path, {"n": 2, "seeds": "0,1"})
    assert checkpoint.step("pairs", lambda: [1, 2]) == [1, 2]
    assert ab.resume(tmp_path, {"n": 2, "seeds": "0,1"}).step("pairs", lambda: pytest.fail("recomputed")) == [1, 2]
    with pytest.raises(click.UsageError, match="seeds"):
        ab.resume(tmp_path, {"n": 2, "seeds": "0,2"})


def test_onoff_keeps_finished_searches_and_resumes_stopped_ones(tmp_path):
    import json
    assert onoff.search_state(tmp_path / "on-s0") == "new"
    stopped = tmp_path / "on-s1"
    stopped.mkdir()
    (stopped / "config.yaml").write_text("task: prune\n")
    assert onoff.search_state(stopped) == "stopped"            # killed before its first checkpoint
    (stopped / "checkpoint.json").write_text(json.dumps({"summary": {"evaluated": 40}, "next_id": 50}))
    assert onoff.search_state(stopped) == "stopped"            # a periodic checkpoint
    (stopped / "checkpoint.json").write_text(json.dumps({"summary": {"stop_reason": "reached 100 evaluations"}}))
    assert onoff.search_state(stopped) == "finished"


def test_a_variant_shares_only_the_steps_its_differing_argument_does_not_touch(tmp_path):
    args = {"run_dir": "runs/x", "train_prompts": 24, "ab_prompts": 64, "train_n": 4, "n": 2, "stage": "kl",
            "margin": 0.01, "chosen_percentile": 0.0, "seeds": "0,1"}
    first = ab.resume(tmp_path / "p0", args)
    for name, value in {"scores-kl": {"h1": 2.0}, "pairs": [1], "ab-base-s0": {"samples": []},
                        "ab-dpo-v1-s0": {"samples": []}, "round-1": {"round": 1}}.items():
        first.save(name, value)
    variant = {**args, "chosen_percentile": 0.5}
    second = ab.resume(tmp_path / "p50", variant)
    second.save("scores-kl", {"h2": 3.0})
    copied = ab.share(second, tmp_path / "p0", variant)
    assert copied == ["ab-base-s0", "pairs", "scores-kl"]         # not the tuned arm, not the round
    assert second.load("scores-kl") == {"h1": 2.0, "h2": 3.0}
    other_split = ab.resume(tmp_path / "q", {**args, "ab_prompts": 32})
    assert ab.share(other_split, tmp_path / "p0", {**args, "ab_prompts": 32}) == ["scores-kl"]
