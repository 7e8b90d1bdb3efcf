"""DPO on a LoRA adapter of the policy model (peft), from logged preference pairs.

    loss = −log σ(β[(log π(y⁺|x) − log π_ref(y⁺|x)) − (log π(y⁻|x) − log π_ref(y⁻|x))])

Each log-probability is the sum over the completion's tokens, the prompt formatted exactly as
the policy saw it (its chat template). One model in memory serves policy and reference: the
reference is the base with the adapter disabled (`reference="base"`), or the adapter as it was
loaded before this round's first step (`reference="previous"`: the previous round's adapter).
A round continues from the previous round's adapter when one is given. A compact loss rather than TRL's trainer: the
pairs are few and short, and the loss is tested against hand-computed values.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from autoprune_ray.llm.backends import SYSTEM_PROMPT, apply_chat_template
from autoprune_ray.llm.dpo_config import DPOConfig



def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean DPO loss and the implicit rewards β·(log π − log π_ref) of chosen and rejected."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


def _encode(tokenizer, prompt: str, completion: str, max_length: int,
            system: str = SYSTEM_PROMPT) -> tuple[list[int], int]:
    """Token ids of prompt + completion + eos, and where the completion starts."""
    templated = apply_chat_template(tokenizer, prompt, system)
    with_template = bool(getattr(tokenizer, "chat_template", None))
    p = tokenizer(templated, add_special_tokens=not with_template).input_ids
    c = tokenizer(completion, add_special_tokens=False).input_ids
    if tokenizer.eos_token_id is not None:
        c = c + [tokenizer.eos_token_id]
    c = c[:max_length - 1]
    p = p[-(max_length - len(c)):]
    return p + c, len(p)


def completion_logps(model, tokenizer, prompts: list[str], completions: list[str],
                     max_length: int = 512, system: str = SYSTEM_PROMPT) -> torch.Tensor:
    """Sum of log π(completion token | everything before it), one value per pair."""
    encoded = [_encode(tokenizer, p, c, max_length, system) for p, c in zip(prompts, completions)]
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    scored = torch.zeros_like(ids, dtype=torch.bool)   # positions whose token is a completion token
    for row, (tokens, start) in enumerate(encoded):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        attention[row, :len(tokens)] = 1
        scored[row, start:len(tokens)] = True
    ids, attention, scored = ids.to(device), attention.to(device), scored.to(device)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_logps * scored[:, 1:]).sum(dim=1)


def _batches(n: int, size: int, rng: random.Random):
    order = list(range(n))
    rng.shuffle(order)
    for i in range(0, n, size):
        yield order[i:i + size]


def _pair_logps(model, tokenizer, pairs: pd.DataFrame, cfg: DPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = list(pairs.prompt)
    return (completion_logps(model, tokenizer, prompts, list(pairs.chosen), cfg.max_length, cfg.system_prompt),
            completion_logps(model, tokenizer, prompts, list(pairs.rejected), cfg.max_length, cfg.system_prompt))


def _reference_logps(model, tokenizer, pairs: pd.DataFrame, cfg: DPOConfig):
    """Log-probabilities of the frozen reference; computed once, before any update."""
    with torch.no_grad(), (model.disable_adapter() if cfg.reference == "base" else contextlib.nullcontext()):
        parts = [_pair_logps(model, tokenizer, pairs.iloc[i:i + cfg.batch_size], cfg)
                 for i in range(0, len(pairs), cfg.batch_size)]
    return torch.cat([c for c, _ in parts]), torch.cat([r for _, r in parts])


def _evaluate(model, tokenizer, pairs: pd.DataFrame, ref, cfg: DPOConfig) -> dict:
    if pairs.empty:
        return {"pairs": 0}
    with torch.no_grad():
        chosen, rejected = _pair_logps(model, tokenizer, pairs, cfg)
    loss, rc, rr = dpo_loss(chosen, rejected, ref[0], ref[1], cfg.beta)
    return {"pairs": len(pairs), "loss": float(loss), "reward_accuracy": float((rc > rr).float().mean()),
            "reward_margin": float((rc - rr).mean())}


def _with_adapter(model, cfg: DPOConfig, init_adapter: str | Path | None):
    from peft import LoraConfig, PeftModel, get_peft_model
    if init_adapter is not None:
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                            target_modules=list(cfg.target_modules), lora_dropout=0.0))


def train_dpo(model, tokenizer, pairs: pd.DataFrame, out_dir: str | Path, cfg: DPOConfig = DPOConfig(),
              on_step=None, init_adapter: str | Path | None = None) -> dict:
    """Train a LoRA adapter on `pairs` (prompt, chosen, rejected), save it with metrics.json.

    `init_adapter`: continue from this saved adapter (the previous round's) instead of a fresh one.
    The directory appears whole or not at all."""
    if pairs.empty:
        raise ValueError("no preference pairs to train on")
    if cfg.reference not in ("base", "previous"):
        raise ValueError(f"reference must be base or previous, got {cfg.reference!r}")
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    pairs = pairs.sample(frac=1.0, random_state=cfg.seed).reset_index(drop=True)
    n_hold = int(len(pairs) * cfg.holdout) if len(pairs) >= 5 else 0
    held, train = pairs.iloc[:n_hold], pairs.iloc[n_hold:].reset_index(drop=True)
    peft_model = _with_adapter(model, cfg, init_adapter)
    peft_model.train()
    ref_train = _reference_logps(peft_model, tokenizer, train, cfg)
    ref_held = _reference_logps(peft_model, tokenizer, held, cfg) if n_hold else None
    before = _evaluate(peft_model, tokenizer, held, ref_held, cfg) if n_hold else {"pairs": 0}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=cfg.lr)
    steps = []
    for epoch in range(cfg.epochs):
        for batch in _batches(len(train), cfg.batch_size, rng):
            chosen, rejected = _pair_logps(peft_model, tokenizer, train.iloc[batch], cfg)
            loss, rc, rr = dpo_loss(chosen, rejected, ref_train[0][batch], ref_train[1][batch], cfg.beta)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps.append({"epoch": epoch, "loss": float(loss.detach()), "reward_accuracy": float((rc > rr).float().mean())})
            if on_step:
                on_step(steps[-1])
    peft_model.eval()
    metrics = {"config": asdict(cfg), "train_pairs": len(train), "steps": steps,
               "train": _evaluate(peft_model, tokenizer, train, ref_train, cfg),
               "held_out_before": before,
               "held_out": _evaluate(peft_model, tokenizer, held, ref_held, cfg) if n_hold else {"pairs": 0},
               "initial_loss": math.log(2), "init_adapter": None if init_adapter is None else str(init_adapter)}
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return metrics


def train_round(model: str, pairs: list[dict], out_dir: str, cfg: DPOConfig,
                init_adapter: str | None = None) -> dict:
    """One DPO round from scratch in a fresh process (a Ray task): load the policy's base model,
    train, save the adapter; returns the round's metrics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from autoprune_ray.compress.models import default_device, resolve_model_path

    path = resolve_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    net = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(default_device())
    return train_dpo(net, tokenizer, pd.DataFrame(pairs), out_dir, cfg, init_adapter=init_adapter)
