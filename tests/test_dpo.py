"""Preference pairs from run tables, the DPO loss against hand-computed values, and a LoRA
adapter trained on a tiny model that the policy backend then hot-loads."""
import json
import math

import pandas as pd
import pytest
import torch

from autoprune_ray.llm.dpo import DPOConfig, completion_logps, dpo_loss, train_dpo
from autoprune_ray.llm.preferences import preference_pairs


def test_dpo_loss_matches_hand_computed_values():
    # rewards: chosen 0.5·(−1 − −1.5) = 0.25, rejected 0.5·(−2 − −1.5) = −0.25; loss = log(1 + e^−0.5)
    loss, chosen, rejected = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]),
                                      torch.tensor([-1.5]), beta=0.5)
    assert chosen.item() == pytest.approx(0.25) and rejected.item() == pytest.approx(-0.25)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.5)))
    # equal policy and reference: loss log 2, whatever the log-probabilities
    same = torch.tensor([-3.0, -7.0])
    assert dpo_loss(same, same + 1, same, same + 1, beta=0.1)[0].item() == pytest.approx(math.log(2))


def tables():
    cands = pd.DataFrame([
        # prompt 1: two measured programs (fitness −log ppl) and one rejected completion
        dict(candidate_id=10, status="accepted", source="good", operator="llm_mutate", island=0, prompt_id=1,
             adapter=None, duplicate_of=None),
        dict(candidate_id=11, status="accepted", source="worse", operator="llm_mutate", island=0, prompt_id=1,
             adapter="v1", duplicate_of=None),
        dict(candidate_id=12, status="rejected", source="junk", operator="llm_mutate", island=0, prompt_id=1,
             adapter=None, duplicate_of=None),
        # prompt 2: a duplicate inherits its original's fitness; a near-equal pair gives nothing
        dict(candidate_id=13, status="duplicate", source="good again", operator="llm_init", island=1, prompt_id=2,
             adapter=None, duplicate_of=10),
        dict(candidate_id=14, status="accepted", source="close", operator="llm_init", island=1, prompt_id=2,
             adapter=None, duplicate_of=None),
        dict(candidate_id=15, status="accepted", source="seed", operator="seed", island=0, prompt_id=None,
             adapter=None, duplicate_of=None),
    ])
    evals = pd.DataFrame([dict(candidate_id=10, status="ok", fitness=-math.log(80.0)),
                          dict(candidate_id=11, status="ok", fitness=-math.log(100.0)),
                          dict(candidate_id=14, status="ok", fitness=-math.log(80.4)),
                          dict(candidate_id=15, status="ok", fitness=-math.log(70.0))])
    prompts = pd.DataFrame([dict(prompt_id=1, prompt="improve this"), dict(prompt_id=1, prompt="improve this"),
                            dict(prompt_id=2, prompt="write one")])
    return cands, evals, prompts


def test_pairs_come_from_the_same_prompt_by_fitness_gap_and_validity():
    pairs = preference_pairs(*tables(), margin=0.01)
    got = {(r.chosen, r.rejected, r.kind) for r in pairs.itertuples()}
    assert got == {("good", "worse", "fitness"), ("good", "junk", "validity"), ("worse", "junk", "validity")}
    fit = pairs[pairs.kind == "fitness"].iloc[0]
    assert fit.gap == pytest.approx(math.log(100 / 80)) and fit.rejected_adapter == "v1"
    assert (pairs.prompt == "improve this").all()
    # a smaller margin admits the 80 vs 80.4 pair of prompt 2 (the duplicate counts as 80)
    loose = preference_pairs(*tables(), margin=0.001)
    assert ("good again", "close", "fitness") in {(r.chosen, r.rejected, r.kind) for r in loose.itertuples()}


@pytest.fixture
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer


def test_completion_logps_equal_an_explicit_token_by_token_sum(tiny):
    model, tokenizer = tiny
    prompt, completion = "the cat sat", " on her"
    got = completion_logps(model, tokenizer, [prompt, "a"], [completion, " b c d e f"])[0]
    p = tokenizer(prompt).input_ids
    c = tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    expected = sum(logp[len(p) + i - 1, tok] for i, tok in enumerate(c))
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_training_prefers_chosen_and_the_adapter_hot_loads(tiny, tiny_model_dir, tmp_path):
    from autoprune_ray.llm.backends import TransformersBackend
    model, tokenizer = tiny
    pairs = pd.DataFrame({"prompt": ["write a metric"] * 4 + ["improve it"] * 2,
                          "chosen": [" abs W times A"] * 6, "rejected": [" import os"] * 6})
    cfg = DPOConfig(beta=0.5, lr=5e-3, epochs=8, batch_size=3, lora_r=4, holdout=0.0, target_modules=("q_proj", "v_proj", "down_proj"))
    metrics = train_dpo(model, tokenizer, pairs, tmp_path / "v1", cfg)
    assert metrics["steps"][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)   # adapter starts as a no-op
    assert metrics["train"]["loss"] < 0.5 * math.log(2) and metrics["train"]["reward_accuracy"] == 1.0
    assert json.loads((tmp_path / "v1" / "metrics.json").read_text())["train_pairs"] == 6
    backend = TransformersBackend(str(tiny_model_dir), device="cpu")
    margin = lambda: (completion_logps(backend.model, backend.tokenizer, ["write a metric"] * 2,  # noqa: E731
                                       [" abs W times A", " import os"]) @ torch.tensor([1.0, -1.0])).item()
    base, base_margin = completion_logps(backend.model, backend.tokenizer, ["write a metric"], [" abs W times A"]), margin()
    greedy = lambda: backend.generate(["write a metric"], n=1, temperature=0, max_new_tokens=8)[0]  # noqa: E731
    before = greedy()
    backend.load_adapter(tmp_path / "v1", "dpo-1")
    tuned = completion_logps(backend.model, backend.tokenizer, ["write a metric"], [" abs W times A"])
    assert tuned.item() > base.item() and backend.adapter_version == "dpo-1"
    assert margin() > base_margin + 1.0      # log π(chosen) − log π(rejected) moved the right way
    after = greedy()   # hot-loading changes what the policy writes, and labels it
    assert after.text != before.text and (before.adapter, after.adapter) == (None, "dpo-1")


# ---------------------------------------------------------------- the incremental pair log

def completion(cid, prompt_id, source, status="accepted", parents=(), strategy="llm_mutate@0.8", duplicate_of=None):
    from autoprune_ray.llm.preferences import Completion
    return Completion(candidate_id=cid, prompt_id=prompt_id, prompt=f"prompt {prompt_id}", source=source,
                      operator="llm_mutate", island=0, parents=tuple(parents), adapter=None, strategy=strategy,
                      status=status, duplicate_of=duplicate_of)


def test_pair_log_pairs_each_outcome_once_as_it_arrives():
    from autoprune_ray.llm.preferences import PreferenceLog
    log = PreferenceLog(margin=0.01, groupings=("prompt", "parents"))
    kinds = lambda ps: [(p["chosen"], p["rejected"], p["kind"], p["grouping"]) for p in ps]  # noqa: E731
    assert log.add(completion(1, 1, "a", parents=[7])) == []                 # nothing to compare yet
    # same prompt and same parents: one pair, not two
    assert kinds(log.add(completion(2, 1, "junk", status="rejected", parents=[7]))) == [
        ("a", "junk", "validity", "prompt")]
    # another prompt built from the same parent, by another strategy: valid, so it beats junk at once
    assert kinds(log.add(completion(3, 2, "b", parents=[7], strategy="gcot@1"))) == [
        ("b", "junk", "validity", "parents")]
    assert log.measured(3, "ok", -math.log(50.0)) == []      # a is not measured yet
    pairs = log.measured(1, "ok", -math.log(60.0))
    assert kinds(pairs) == [("b", "a", "fitness", "parents")]
    assert pairs[0]["prompt"] == "prompt 2" and pairs[0]["gap"] == pytest.approx(math.log(60 / 50))
    assert pairs[0]["chosen_strategy"] == "gcot@1" and pairs[0]["rejected_strategy"] == "llm_mutate@0.8"
    # an outcome may arrive before its completion is added; a failed evaluation loses to a measured one
    assert log.measured(4, "failed", None) == []
    assert kinds(log.add(completion(4, 2, "nan", parents=[9]))) == [("b", "nan", "failure", "prompt")]
    # a duplicate inherits its original's outcome (b's −log 50)
    assert kinds(log.add(completion(5, 1, "a again", status="duplicate", duplicate_of=3))) == [
        ("a again", "a", "fitness", "prompt"), ("a again", "junk", "validity", "prompt")]
    assert log.measured(1, "ok", -math.log(60.0)) == [] and len(log.emitted) == 6   # never twice
    assert log.measured(3, "screened", None) == []     # proxy-only outcomes are not measurements
    # completions written far apart (more than `window` candidate ids) are not paired
    assert log.add(completion(40, 1, "late junk", status="rejected")) == []


def test_logged_pairs_equal_pairs_replayed_from_the_tables():
    from autoprune_ray.llm.preferences import PreferenceLog, replay
    cands, evals, prompts = tables()
    live = PreferenceLog(margin=0.001)
    pairs = []
    for c in [completion(10, 1, "good"), completion(14, 2, "close"), completion(12, 1, "junk", "rejected"),
              completion(11, 1, "worse")]:
        c.prompt = "improve this" if c.prompt_id == 1 else "write one"
        pairs += live.add(c)
        measured = evals[evals.candidate_id == c.candidate_id]
        for e in measured.itertuples():
            pairs += live.measured(e.candidate_id, e.status, e.fitness)
    pairs += live.add(completion(13, 2, "good again", "duplicate", duplicate_of=10))
    replayed = replay(PreferenceLog(margin=0.001), cands, evals, prompts)
    key = lambda ps: sorted((p["chosen_id"], p["rejected_id"], p["kind"]) for p in ps)  # noqa: E731
    assert key(pairs) == key(replayed) and len(pairs) == 4


# ---------------------------------------------------------------- the prompt-strategy controller

def test_strategy_controller_bradley_terry_step_and_switch():
    from autoprune_ray.llm.strategy import StrategyController
    ctl = StrategyController({"llm_mutate": 0.3, "gcot": 0.1}, [0.5, 1.0], learning_rate=0.2, exploration=0.5)
    assert ctl.probabilities() == pytest.approx({"llm_mutate@0.5": 0.375, "llm_mutate@1": 0.375,
                                                 "gcot@0.5": 0.125, "gcot@1": 0.125})
    assert not ctl.update({"chosen_strategy": "gcot@1", "rejected_strategy": "gcot@1"})   # says nothing
    assert ctl.update({"chosen_strategy": "gcot@1", "rejected_strategy": "llm_mutate@0.5"})
    # step = lr·(1 − σ(0)) = 0.1 each way
    assert ctl.theta["gcot@1"] == pytest.approx(0.1) and ctl.theta["llm_mutate@0.5"] == pytest.approx(-0.1)
    w = {"llm_mutate@0.5": 0.375 * math.exp(-0.1), "llm_mutate@1": 0.375, "gcot@0.5": 0.125,
         "gcot@1": 0.125 * math.exp(0.1)}
    total = sum(w.values())
    assert ctl.probabilities()["gcot@1"] == pytest.approx(0.5 * w["gcot@1"] / total + 0.5 * 0.125)
    ctl.enabled = False
    assert ctl.probabilities()["gcot@1"] == pytest.approx(0.125)   # switched off: the base rates
    import random
    ops = {ctl.choose(random.Random(i), ("gcot",))[0] for i in range(20)}
    assert ops == {"gcot"}


# ---------------------------------------------------------------- reference model and rounds

def test_reference_is_the_frozen_base_or_the_previous_adapter(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from autoprune_ray.llm.dpo import _reference_logps, _with_adapter
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    fresh = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # noqa: E731
    pairs = pd.DataFrame({"prompt": ["write a metric"] * 3, "chosen": [" abs W times A"] * 3,
                          "rejected": [" import os"] * 3})
    cfg = DPOConfig(beta=0.5, lr=5e-3, epochs=4, batch_size=3, lora_r=4, holdout=0.0)
    train_dpo(fresh(), tokenizer, pairs, tmp_path / "v1", cfg)
    with torch.no_grad():
        base = completion_logps(fresh(), tokenizer, list(pairs.prompt), list(pairs.chosen))
    continued = _with_adapter(fresh(), cfg, tmp_path / "v1")
    with torch.no_grad():
        adapted = completion_logps(continued, tokenizer, list(pairs.prompt), list(pairs.chosen))
    assert adapted[0].item() > base[0].item() + 1e-3        # v1 really moved the policy
    ref_base = _reference_logps(continued, tokenizer, pairs, cfg)[0]
    ref_prev = _reference_logps(continued, tokenizer, pairs, DPOConfig(**{**cfg.__dict__, "reference": "previous"}))[0]
    assert torch.allclose(ref_base, base, atol=1e-5) and torch.allclose(ref_prev, adapted, atol=1e-5)
    # round 2 continues from v1: against the previous adapter its first loss is log 2, against the base not
    m_prev = train_dpo(fresh(), tokenizer, pairs, tmp_path / "v2", DPOConfig(**{**cfg.__dict__, "reference": "previous"}),
                       init_adapter=tmp_path / "v1")
    m_base = train_dpo(fresh(), tokenizer, pairs, tmp_path / "v2b", cfg, init_adapter=tmp_path / "v1")
    assert m_prev["steps"][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert m_base["steps"][0]["loss"] < math.log(2) - 1e-3
    assert not list(tmp_path.glob(".*partial"))   # adapters appear whole
