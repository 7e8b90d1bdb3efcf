"""DPO on a LoRA adapter of the policy model, from logged preference pairs, with TRL's DPOTrainer.

    loss = −log σ(β[(log π(y⁺|x) − log π_ref(y⁺|x)) − (log π(y⁻|x) − log π_ref(y⁻|x))])

TRL computes the loss (its "sigmoid" DPO loss), the log-probabilities (sums over completion
tokens), the optimisation and the metrics; this module decides what TRL is given:

- Prompts as the policy saw them: the chat template with `cfg.system_prompt`
  (`backends.apply_chat_template`, which inlines the system prompt for templates without a system
  role), handed to TRL as plain strings. Not as messages: TRL would then render each completion as
  an assistant turn, whose closing tokens the policy never wrote. TRL appends eos to completions.
- Truncation: prompts are often longer than `max_length`; TRL's supported "keep_start" mode would
  drop every such pair, so the deprecated "keep_end" mode (TRL 1.x) keeps the prompt's end.
- Reference: with peft, TRL's reference is the base with the adapter disabled for an adapter it
  adds itself from `peft_config`, and a frozen copy ("ref") of the adapter of a `PeftModel` it is
  given. So a fresh round adds a new adapter; `reference="previous"` hands TRL the previous
  round's adapter as a `PeftModel`; `reference="base"` continuing from an adapter lets TRL add an
  adapter of the saved config, then loads the saved weights into it before the first step.
- The adapter directory appears whole or not at all (`.partial`, then a rename).
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from autoprune_ray.llm.backends import apply_chat_template
from autoprune_ray.llm.dpo_config import DPOConfig


def policy_prompt(tokenizer, prompt: str, system: str) -> str:
    """The prompt text the policy was given, ready for TRL's plain-text tokenization."""
    text = apply_chat_template(tokenizer, prompt, system)
    bos = tokenizer.bos_token
    # The policy tokenizes a templated prompt without special tokens; TRL tokenizes plain text with
    # them, so a BOS the template already wrote would be doubled by tokenizers that add one.
    adds_bos = bos is not None and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]
    if getattr(tokenizer, "chat_template", None) and adds_bos and text.startswith(bos):
        text = text[len(bos):]
    return text


def preference_dataset(tokenizer, pairs: pd.DataFrame, cfg: DPOConfig):
    """TRL's standard prompt/chosen/rejected dataset; other columns of `pairs` are left out."""
    from datasets import Dataset
    return Dataset.from_dict({"prompt": [policy_prompt(tokenizer, p, cfg.system_prompt) for p in pairs.prompt],
                              "chosen": list(pairs.chosen), "rejected": list(pairs.rejected)})


def _trl_args(cfg: DPOConfig, model, output_dir: str):
    from trl import DPOConfig as TRLConfig
    # transformers 5 renamed gradient_checkpointing (TRL's default: on) and warns at the old name
    checkpointing = next(n for n in ("activation_checkpointing", "gradient_checkpointing")
                         if n in TRLConfig.__dataclass_fields__)
    with warnings.catch_warnings():   # keep_end's deprecation: the module docstring says why it is used
        warnings.filterwarnings("ignore", message=".*keep_end.*", category=FutureWarning)
        return TRLConfig(
            output_dir=output_dir, beta=cfg.beta, learning_rate=cfg.lr, lr_scheduler_type="constant",
            num_train_epochs=cfg.epochs, per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.batch_size, max_length=cfg.max_length, truncation_mode="keep_end",
            seed=cfg.seed,
            # the model's own dtype and device: no bf16 autocast (TRL's default), a CPU model stays there
            bf16=False, use_cpu=next(model.parameters()).device.type == "cpu",
            **{checkpointing: False},          # few short pairs: memory is not the limit, time is
            logging_strategy="steps", logging_steps=1,   # every step reaches on_step
            save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
            remove_unused_columns=True,         # TRL keeps the columns it tokenized (prompt_ids, ...)
            prediction_loss_only=True)          # evaluation needs the loss and TRL's metrics, no logits


def _policy(model, cfg: DPOConfig, init_adapter):
    """The model and peft_config to hand TRL, which fix what its reference is (module docstring)."""
    from peft import LoraConfig, PeftConfig, PeftModel
    if init_adapter is None:
        return model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.target_modules),
                                 lora_dropout=0.0, task_type="CAUSAL_LM")
    if cfg.reference == "previous":
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True), None
    config = PeftConfig.from_pretrained(str(init_adapter))
    config.inference_mode = False       # saved configs are marked for inference: frozen weights
    return model, config


def _load_previous(peft_model, init_adapter) -> None:
    """The previous round's weights into the adapter TRL added (reference base, continuing)."""
    from peft import load_peft_weights, set_peft_model_state_dict
    loaded = set_peft_model_state_dict(peft_model, load_peft_weights(str(init_adapter)))
    unfilled = [k for k in loaded.missing_keys if "lora_" in k]   # base weights are "missing" too
    if loaded.unexpected_keys or unfilled:
        raise ValueError(f"{init_adapter} does not fit the adapter: {(loaded.unexpected_keys + unfilled)[:3]}")


def _step_logger(on_step):
    from transformers import TrainerCallback

    class Steps(TrainerCallback):
        """Each training step's log (logging_steps=1) as {epoch, loss, reward_accuracy}."""

        def __init__(self):
            self.steps, self.epoch = [], -1

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.epoch += 1

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and "rewards/accuracies" in logs:   # not eval or summary logs
                self.steps.append({"epoch": self.epoch, "loss": float(logs["loss"]),
                                   "reward_accuracy": float(logs["rewards/accuracies"])})
                if on_step:
                    on_step(self.steps[-1])

    return Steps()


def _evaluate(trainer, data) -> dict:
    """TRL's evaluation: the loss per pair; accuracy and margin of β·(log π − log π_ref), averaged
    over batches of batch_size."""
    if len(data) == 0:
        return {"pairs": 0}
    m = trainer.evaluate(data)
    return {"pairs": len(data), "loss": float(m["eval_loss"]), "reward_accuracy": float(m["eval_rewards/accuracies"]),
            "reward_margin": float(m["eval_rewards/margins"])}


@contextlib.contextmanager
def _quiet():
    """No progress bars from datasets while a round runs: its output would clutter the search's
    display (a Ray task's output is forwarded to the driver); metrics.json holds the numbers."""
    import datasets
    was_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_progress_bars()


def _split(pairs: pd.DataFrame, cfg: DPOConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Held-out and training pairs, by a seeded shuffle; no hold-out under 5 pairs."""
    pairs = pairs.sample(frac=1.0, random_state=cfg.seed).reset_index(drop=True)
    n_hold = int(len(pairs) * cfg.holdout) if len(pairs) >= 5 else 0
    return pairs.iloc[:n_hold], pairs.iloc[n_hold:].reset_index(drop=True)


def _save_whole(peft_model, metrics: dict, out_dir) -> None:
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp, selected_adapters=["default"])   # not TRL's frozen "ref" copy
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def train_dpo(model, tokenizer, pairs: pd.DataFrame, out_dir: str | Path, cfg: DPOConfig = DPOConfig(),
              on_step=None, init_adapter: str | Path | None = None) -> dict:
    """Train a LoRA adapter on `pairs` (prompt, chosen, rejected), save it with metrics.json.

    `init_adapter`: continue from this saved adapter (the previous round's) instead of a fresh one.
    The directory appears whole or not at all."""
    from transformers import PrinterCallback
    from trl import DPOTrainer
    if pairs.empty:
        raise ValueError("no preference pairs to train on")
    if cfg.reference not in ("base", "previous"):
        raise ValueError(f"reference must be base or previous, got {cfg.reference!r}")
    held, train = _split(pairs, cfg)
    held_data, train_data = preference_dataset(tokenizer, held, cfg), preference_dataset(tokenizer, train, cfg)
    policy, peft_config = _policy(model, cfg, init_adapter)
    steps = _step_logger(on_step)
    with tempfile.TemporaryDirectory(prefix="dpo-") as scratch, _quiet():   # scratch: TRL's output_dir
        trainer = DPOTrainer(policy, args=_trl_args(cfg, model, scratch), train_dataset=train_data,
                             processing_class=tokenizer, peft_config=peft_config, callbacks=[steps])
        trainer.remove_callback(PrinterCallback)   # disable_tqdm's replacement prints every log
        if init_adapter is not None and cfg.reference == "base":
            _load_previous(trainer.model, init_adapter)
        before = _evaluate(trainer, held_data)
        trainer.train()
        metrics = {"config": asdict(cfg), "train_pairs": len(train), "steps": steps.steps,
                   "train": _evaluate(trainer, train_data), "held_out_before": before,
                   "held_out": _evaluate(trainer, held_data), "initial_loss": math.log(2),
                   "init_adapter": None if init_adapter is None else str(init_adapter)}
    _save_whole(trainer.accelerator.unwrap_model(trainer.model), metrics, out_dir)
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
