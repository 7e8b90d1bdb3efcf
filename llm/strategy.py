"""The prompt-strategy controller: which prompt (operator) and temperature the policy gets next.

A strategy is an LLM operator at a temperature, e.g. "gcot@1.0". Each has a Bradley–Terry
strength, fitted online from the same preference pairs DPO learns from: a pair whose chosen and
rejected completions came from *different* strategies (prompts built from the same parents) is
one comparison, and the strengths take one gradient step on its log-likelihood

    P(s⁺ beats s⁻) = σ(θ[s⁺] − θ[s⁻]).

The next strategy is drawn with probability ∝ base_rate · exp(θ), mixed with `exploration` of
the base rates, so no strategy starves. Switched off, it draws by the base rates alone.
"""
from __future__ import annotations

import math
import random


def strategy_name(operator: str, temperature: float) -> str:
    return f"{operator}@{temperature:g}"


def parse_strategy(name: str) -> tuple[str, float]:
    operator, _, temperature = name.rpartition("@")
    return operator, float(temperature)


class StrategyController:
    def __init__(self, base_rates: dict[str, float], temperatures: list[float], enabled: bool = True,
                 learning_rate: float = 0.2, exploration: float = 0.2):
        if not base_rates or not temperatures:
            raise ValueError("the strategy controller needs at least one LLM operator and one temperature")
        if not 0 <= exploration <= 1:
            raise ValueError(f"exploration must lie in [0, 1], got {exploration}")
        self.base = {strategy_name(op, t): rate / len(temperatures)
                     for op, rate in base_rates.items() for t in temperatures}
        total = sum(self.base.values())
        self.base = {k: v / total for k, v in self.base.items()}
        self.enabled, self.learning_rate, self.exploration = enabled, learning_rate, exploration
        self.theta = {k: 0.0 for k in self.base}
        self.comparisons = 0

    def probabilities(self) -> dict[str, float]:
        if not self.enabled:
            return dict(self.base)
        weights = {k: self.base[k] * math.exp(self.theta[k]) for k in self.base}
        total = sum(weights.values())
        return {k: (1 - self.exploration) * weights[k] / total + self.exploration * self.base[k] for k in self.base}

    def choose(self, rng: random.Random, operators: tuple[str, ...] | None = None) -> tuple[str, float]:
        """Draw a strategy, optionally among the given operators only; returns (operator, temperature)."""
        probs = {k: p for k, p in self.probabilities().items()
                 if operators is None or parse_strategy(k)[0] in operators}
        if not probs:
            raise ValueError(f"no strategy for operators {operators}")
        name = rng.choices(list(probs), weights=list(probs.values()))[0]
        return parse_strategy(name)

    def update(self, pair: dict) -> bool:
        """One comparison from a preference pair; False when it says nothing about strategies."""
        win, lose = pair.get("chosen_strategy"), pair.get("rejected_strategy")
        if win == lose or win not in self.theta or lose not in self.theta:
            return False
        step = self.learning_rate * (1 - _sigmoid(self.theta[win] - self.theta[lose]))
        self.theta[win] += step
        self.theta[lose] -= step
        self.comparisons += 1
        return True

    def snapshot(self) -> list[dict]:
        probs = self.probabilities()
        return [{"strategy": k, "strength": self.theta[k], "probability": probs[k]} for k in self.base]


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))
