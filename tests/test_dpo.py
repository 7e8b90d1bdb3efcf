"""Preference pairs from run tables, DPO rounds through TRL's DPOTrainer on a tiny model (the
loss and reference checked against log-probabilities from a plain forward pass), and the adapter
that the policy backend then hot-loads."""
import json
import math

import pandas as pd
import pytest
import torch

from autoprune_ray.llm.dpo import DPOConfig, train_dpo
from autoprune_ray.llm.preferences import preference_pairs

PAIRS = pd.DataFrame({"prompt": ["write a metric"] * 4 + ["improve it"] * 2,
                      "chosen": [" abs W times A"] * 6, "rejected": [" import os"] * 6})
# A chat template, so that the prompt TRL trains on must be the templated one the policy is given
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")


def logp(model, tokenizer, prompt: str, completion: str, system: str = DPOConfig.system_prompt) -> float:
    """log π(completion, eos | prompt), the prompt tokenized as the policy backend does: an
    independent check on what TRL computes."""
    from autoprune_ray.llm.backends import apply_chat_template
    templated = apply_chat_template(tokenizer, prompt, system)
    p = tokenizer(templated, add_special_tokens=not tokenizer.chat_template).input_ids
    c = tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    with torch.no_grad():
        logps = torch.log_softmax(model(torch.tensor([p + c])).logits[0].float(), -1)
    return sum(logps[len(p) + i - 1, tok].item() for i, tok in enumerate(c))


def margin(model, tokenizer, pairs: pd.DataFrame) -> float:
    """Mean of log π(chosen) − log π(rejected) over the pairs."""
    return sum(logp(model, tokenizer, r.prompt, r.chosen) - logp(model, tokenizer, r.prompt, r.rejected)
               for r in pairs.itertuples()) / len(pairs)


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


def with_adapter(model_dir, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter)).eval()


def test_one_trl_round_raises_the_chosen_over_rejected_margin(tiny, tiny_model_dir, tmp_path):
    model, tokenizer = tiny
    tokenizer.chat_template = TEMPLATE
    before = margin(model, tokenizer, PAIRS)
    seen = []
    cfg = DPOConfig(beta=0.5, lr=5e-3, epochs=2, batch_size=3, lora_r=4, holdout=0.0)
    metrics = train_dpo(model, tokenizer, PAIRS, tmp_path / "v1", cfg, on_step=seen.append)
    after = margin(with_adapter(tiny_model_dir, tmp_path / "v1"), tokenizer, PAIRS)
    assert after > before + 0.5, (before, after)
    assert metrics["steps"][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)   # the adapter starts as a no-op
    assert seen == metrics["steps"] and [s["epoch"] for s in seen] == [0, 0, 1, 1]   # 6 pairs, batches of 3
    saved = json.loads((tmp_path / "v1" / "metrics.json").read_text())
    assert saved == metrics and saved["train_pairs"] == 6 and saved["held_out"] == {"pairs": 0}
    assert set(saved) == {"config", "train_pairs", "steps", "train", "held_out_before", "held_out",
                          "initial_loss", "init_adapter"}
    assert set(saved["train"]) == {"pairs", "loss", "reward_accuracy", "reward_margin"}
    assert (tmp_path / "v1" / "adapter_config.json").exists()


def test_training_prefers_chosen_and_the_adapter_hot_loads(tiny, tiny_model_dir, tmp_path):
    from autoprune_ray.llm.backends import TransformersBackend
    model, tokenizer = tiny
    cfg = DPOConfig(beta=0.5, lr=5e-3, epochs=8, batch_size=3, lora_r=4, holdout=0.0,
                    target_modules=("q_proj", "v_proj", "down_proj"))
    metrics = train_dpo(model, tokenizer, PAIRS, tmp_path / "v1", cfg)
    assert metrics["train"]["loss"] < 0.5 * math.log(2) and metrics["train"]["reward_accuracy"] == 1.0
    backend = TransformersBackend(str(tiny_model_dir), device="cpu")
    prompt = "write a metric"
    base, base_margin = logp(backend.model, backend.tokenizer, prompt, " abs W times A"), margin(
        backend.model, backend.tokenizer, PAIRS)
    greedy = lambda: backend.generate([prompt], n=1, temperature=0, max_new_tokens=8)[0]  # noqa: E731
    before = greedy()
    backend.load_adapter(tmp_path / "v1", "dpo-1")
    assert logp(backend.model, backend.tokenizer, prompt, " abs W times A") > base
    assert backend.adapter_version == "dpo-1"
    assert margin(backend.model, backend.tokenizer, PAIRS) > base_margin + 1.0   # moved the right way
    after = greedy()   # hot-loading changes what the policy writes, and labels it
    assert after.text != before.text and (before.adapter, after.adapter) == (None, "dpo-1")


def test_bad_rounds_are_refused_and_leave_nothing(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="no preference pairs"):
        train_dpo(model, tokenizer, PAIRS.iloc[:0], tmp_path / "v1", DPOConfig())
    with pytest.raises(ValueError, match="base or previous"):
        train_dpo(model, tokenizer, PAIRS, tmp_path / "v1", DPOConfig(reference="latest"))

    def interrupted(step):
        raise RuntimeError("stopped mid-round")
    with pytest.raises(RuntimeError, match="mid-round"):
        train_dpo(model, tokenizer, PAIRS, tmp_path / "v1", DPOConfig(lora_r=4, holdout=0.0), on_step=interrupted)
    assert list(tmp_path.iterdir()) == []          # no adapter, no .partial


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


def test_fitness_pairs_carry_the_chosen_rank_and_rounds_can_keep_only_the_top():
    from autoprune_ray.llm.preferences import PreferenceLog, trains_on
    log = PreferenceLog(margin=0.01)
    for k, ppl in enumerate((80.0, 70.0, 90.0), start=1):            # three other programs measured
        log.measured(100 + k, "ok", -math.log(ppl))
    log.measured(101, "ok", -math.log(80.0))                         # measured twice: counted once
    log.add(completion(1, 1, "a"))
    log.add(completion(2, 1, "b"))
    log.measured(1, "ok", -math.log(60.0))
    (pair,) = log.measured(2, "ok", -math.log(100.0))
    # five programs measured; the chosen one (60) beats 70, 80, 90 and 100: four of five below it
    assert pair["chosen"] == "a" and pair["chosen_rank"] == pytest.approx(4 / 5)
    (validity,) = log.add(completion(3, 1, "junk", status="rejected"))[:1]
    assert validity["chosen_rank"] is None
    assert trains_on(pair, 0.8) and not trains_on(pair, 0.81) and trains_on(validity, 0.99)
    assert trains_on(pair | {"chosen_rank": float("nan")}, 0.99)     # logged before ranks existed
    from autoprune_ray.engine.config import ConfigError, RunConfig, from_dict
    with pytest.raises(ConfigError, match="dpo.chosen_percentile"):
        from_dict(RunConfig, {"dpo": {"chosen_percentile": 1.0}}).validate()


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
    """Round 2 continues from v1. Its held-out metrics before the first step are TRL's DPO loss
    and rewards against the chosen reference, here recomputed from plain forward passes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = TEMPLATE
    fresh = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # noqa: E731
    cfg = DPOConfig(beta=0.5, lr=5e-3, epochs=4, batch_size=3, lora_r=4, holdout=0.0)
    train_dpo(fresh(), tokenizer, PAIRS, tmp_path / "v1", cfg)
    base, v1 = fresh().eval(), with_adapter(tiny_model_dir, tmp_path / "v1")
    held = DPOConfig(**{**cfg.__dict__, "holdout": 0.5})
    previous = DPOConfig(**{**held.__dict__, "reference": "previous"})
    m_prev = train_dpo(fresh(), tokenizer, PAIRS, tmp_path / "v2", previous, init_adapter=tmp_path / "v1")
    m_base = train_dpo(fresh(), tokenizer, PAIRS, tmp_path / "v2b", held, init_adapter=tmp_path / "v1")
    # against the previous adapter, the policy starts equal to its reference: loss log 2, margin 0
    assert m_prev["held_out_before"]["pairs"] == 3 and m_prev["init_adapter"] == str(tmp_path / "v1")
    assert m_prev["held_out_before"]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert m_prev["held_out_before"]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert m_prev["steps"][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    # against the base, the policy starts as v1: β[(log π_v1 − log π_base)(chosen) − (same)(rejected)]
    heldout = PAIRS.sample(frac=1.0, random_state=held.seed).iloc[:3]   # train_dpo's split
    rewards = [held.beta * ((logp(v1, tokenizer, r.prompt, r.chosen) - logp(base, tokenizer, r.prompt, r.chosen))
                            - (logp(v1, tokenizer, r.prompt, r.rejected) - logp(base, tokenizer, r.prompt, r.rejected)))
               for r in heldout.itertuples()]
    assert rewards[0] > 1e-3                                    # v1 really moved the policy
    expected_loss = sum(-torch.nn.functional.logsigmoid(torch.tensor(x)).item() for x in rewards) / 3
    assert m_base["held_out_before"]["loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert m_base["held_out_before"]["reward_margin"] == pytest.approx(sum(rewards) / 3, rel=1e-4)
    assert m_base["steps"][0]["loss"] < math.log(2) - 1e-3
    assert not list(tmp_path.glob(".*partial"))   # adapters appear whole


def test_the_prompt_tokens_are_the_policys_when_the_tokenizer_adds_a_bos(tiny_model_dir):
    """The policy tokenizes a templated prompt without special tokens, TRL with them: a BOS that
    both the template and the tokenizer write must appear once."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from autoprune_ray.llm.backends import apply_chat_template
    from autoprune_ray.llm.dpo import policy_prompt
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, bos_token="<eos>")
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", 0)])
    tokenizer.chat_template = "{{ bos_token }}" + TEMPLATE
    assert tokenizer("x").input_ids[0] == tokenizer.bos_token_id == 0
    seen_by_policy = tokenizer(apply_chat_template(tokenizer, "write a metric", "sys"), add_special_tokens=False)
    assert tokenizer(policy_prompt(tokenizer, "write a metric", "sys")).input_ids == seen_by_policy.input_ids
