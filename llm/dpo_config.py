"""The settings of one DPO round (a light module: run configs import it without torch).

llm/dpo.py maps them onto TRL's own `trl.DPOConfig` (imported there as TRLConfig)."""
from __future__ import annotations

from dataclasses import dataclass, field

from autoprune_ray.llm.backends import SYSTEM_PROMPT


@dataclass
class DPOConfig:
    beta: float = 0.1
    lr: float = 5e-5
    epochs: int = 1
    batch_size: int = 4
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    max_length: int = 512          # tokens of prompt + completion; the prompt is cut from the left
    holdout: float = 0.2           # share of pairs held out for the accuracy metric
    reference: str = "base"        # base | previous
    seed: int = 0
    system_prompt: str = SYSTEM_PROMPT   # the one the policy generated with
