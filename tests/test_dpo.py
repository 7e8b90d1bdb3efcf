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
    base = completion_logps(backend.model, backend.tokenizer, ["write a metric"], [" abs W times A"])
    backend.load_adapter(tmp_path / "v1", "dpo-1")
    tuned = completion_logps(backend.model, backend.tokenizer, ["write a metric"], [" abs W times A"])
    assert tuned.item() > base.item() and backend.adapter_version == "dpo-1"
