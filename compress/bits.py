"""Mixed-precision bit allocation under an average-bits budget that counts the group scales.

    layers = [LayerSize("0.q_proj", 576, 576), ...]
    bits = allocate("ilp", sensitivity, [2, 3, 4, 8], layers, avg_bits=4.25, group_size=128)

`sensitivity[l, k]` is the damage (lower is better) of storing layer l at `choices[k]` bits.
Every group of `group_size` input columns of a row stores an fp16 scale and an fp16 zero, so a
layer at b bits costs numel·b + groups·32 bits: at group 128 that is 0.25 bits per weight on top
of b, which a budget that ignored it would silently overspend. Costs and the budget are integers
(bits), so a budget is never exceeded by a rounding error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

GROUP_OVERHEAD_BITS = 32   # fp16 scale + fp16 zero per group
METHODS = ("ilp", "greedy")


@dataclass(frozen=True)
class LayerSize:
    name: str
    rows: int
    cols: int

    def __post_init__(self):
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"layer {self.name} must have positive rows and cols, got [{self.rows}, {self.cols}]")

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    def groups(self, group_size: int) -> int:
        return self.rows * math.ceil(self.cols / group_size)

    def cost(self, bits: int, group_size: int) -> int:
        """Storage in bits: the quantized weights plus one scale and one zero per group."""
        return self.numel * bits + self.groups(group_size) * GROUP_OVERHEAD_BITS


def total_numel(layers: list[LayerSize]) -> int:
    return sum(layer.numel for layer in layers)


def total_cost(layers: list[LayerSize], bits_per_layer: list[int], group_size: int) -> int:
    if len(bits_per_layer) != len(layers):
        raise ValueError(f"{len(bits_per_layer)} bit widths for {len(layers)} layers")
    return sum(layer.cost(b, group_size) for layer, b in zip(layers, bits_per_layer))


def average_bits(layers: list[LayerSize], bits_per_layer: list[int], group_size: int) -> float:
    return total_cost(layers, bits_per_layer, group_size) / total_numel(layers)


def budget_bits(layers: list[LayerSize], avg_bits: float) -> int:
    """floor(avg_bits · Σ numel), exactly. A float budget is read as the decimal it prints as,
    so 4.3 means 43/10 and not the binary float just below it (which would lose a bit whenever
    Σ numel is a multiple of 10); a cost within this budget still has average_bits ≤ avg_bits
    as floats, since rounding to the nearest float is monotone."""
    if not math.isfinite(avg_bits) or avg_bits <= 0:
        raise ValueError(f"avg_bits must be a positive finite number, got {avg_bits}")
    exact = avg_bits if isinstance(avg_bits, (int, Fraction)) else Fraction(repr(float(avg_bits)))
    return math.floor(exact * total_numel(layers))


def _check_choices(choices: list[int]) -> list[int]:
    if not choices:
        raise ValueError("choices is empty")
    if any(int(b) != b or b < 1 for b in choices):
        raise ValueError(f"choices must be positive integer bit widths, got {list(choices)}")
    if any(a >= b for a, b in zip(choices, choices[1:])):
        raise ValueError(f"choices must be strictly increasing (sorted, no duplicates), got {list(choices)}")
    return [int(b) for b in choices]


def _check_sensitivity(sensitivity, layers: list[LayerSize], choices: list[int]) -> np.ndarray:
    s = np.asarray(sensitivity, dtype=np.float64)
    if s.shape != (len(layers), len(choices)):
        raise ValueError(f"sensitivity must have shape [layers, choices] = [{len(layers)}, {len(choices)}], "
                         f"got {list(s.shape)}")
    for index, row in enumerate(s):
        if not np.isfinite(row).all():
            raise ValueError(f"sensitivity of layer {index} ({layers[index].name}) is not finite: {row.tolist()}")
    return s


def _check_budget(layers: list[LayerSize], choices: list[int], avg_bits: float, group_size: int) -> int:
    budget = budget_bits(layers, avg_bits)
    lowest = [choices[0]] * len(layers)
    if total_cost(layers, lowest, group_size) > budget:
        raise ValueError(f"avg_bits {avg_bits} is below the minimum {average_bits(layers, lowest, group_size):.6g} "
                         f"(every layer at {choices[0]} bits plus {GROUP_OVERHEAD_BITS} bits of scale and zero "
                         f"per group of {group_size})")
    return budget


def _validated(sensitivity, choices, layers, avg_bits, group_size) -> tuple[np.ndarray, list[int], int]:
    if not layers:
        raise ValueError("no layers to allocate bits to")
    if int(group_size) != group_size or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size}")
    choices = _check_choices(choices)
    s = _check_sensitivity(sensitivity, layers, choices)
    return s, choices, _check_budget(layers, choices, avg_bits, group_size)


def _extra_costs(layers: list[LayerSize], choices: list[int]) -> np.ndarray:
    """[L, K] integer bits above each layer's lowest choice. The group overhead does not depend
    on the bit width, so it cancels here and only numel·Δbits remains."""
    return np.array([[layer.numel * (b - choices[0]) for b in choices] for layer in layers], dtype=np.int64)


def _unit_scale(s: np.ndarray) -> np.ndarray:
    """The same argmin in [0, 1]: each layer picks exactly one width, so a constant per layer cancels,
    and a positive factor does not reorder. HiGHS reads costs past 1e20 as infinite, and searched
    proxies write tables like 1e30 · (…)."""
    s = s - s.min(axis=1, keepdims=True)
    top = s.max()
    return s / top if top > 0 else s


def allocate_ilp(sensitivity, choices: list[int], layers: list[LayerSize], avg_bits: float,
                 group_size: int) -> list[int]:
    """Bit widths minimising Σ_l sensitivity[l, b_l] within the budget: HAWQ-v3's integer program,
    one binary x[l, k] per (layer, choice), Σ_k x[l, k] = 1, Σ cost·x ≤ budget, solved by HiGHS."""
    s, choices, budget = _validated(sensitivity, choices, layers, avg_bits, group_size)
    s = _unit_scale(s)
    n_layers, n_choices = s.shape
    extra = _extra_costs(layers, choices)
    spare = budget - total_cost(layers, [choices[0]] * n_layers, group_size)
    # Dividing by the gcd keeps the budget row exact (its left side is an integer multiple of the
    # gcd) and its coefficients small, so HiGHS's float tolerances cannot buy extra bits.
    unit = int(np.gcd.reduce(extra[extra > 0])) if (extra > 0).any() else 1
    one_per_layer = LinearConstraint(np.kron(np.eye(n_layers), np.ones(n_choices)), 1, 1)
    within_budget = LinearConstraint((extra // unit).reshape(1, -1).astype(np.float64), -np.inf, spare // unit)
    result = milp(s.ravel(), constraints=[one_per_layer, within_budget], integrality=np.ones(s.size),
                  bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0})
    if result.x is None:
        raise RuntimeError(f"bit-allocation ILP failed: {result.message}")
    picked = np.rint(result.x).reshape(n_layers, n_choices).astype(np.int64)
    if not (picked.sum(axis=1) == 1).all():
        raise RuntimeError("bit-allocation ILP did not pick exactly one bit width per layer")
    bits = [choices[int(k)] for k in picked.argmax(axis=1)]
    if total_cost(layers, bits, group_size) > budget:
        raise RuntimeError(f"bit-allocation ILP answer costs {total_cost(layers, bits, group_size)} bits, "
                           f"over the budget of {budget}")
    return bits


def allocate_greedy(sensitivity, choices: list[int], layers: list[LayerSize], avg_bits: float,
                    group_size: int) -> list[int]:
    """Start every layer at the lowest width and keep taking the single upgrade (one layer to any
    higher width) with the largest sensitivity decrease per extra bit that still fits. Ties go to
    the earlier layer, then the lower width, so the answer is deterministic."""
    s, choices, budget = _validated(sensitivity, choices, layers, avg_bits, group_size)
    extra = _extra_costs(layers, choices)
    index = [0] * len(layers)
    spare = budget - total_cost(layers, [choices[0]] * len(layers), group_size)
    while (step := _best_upgrade(s, extra, index, spare)) is not None:
        layer, k = step
        spare -= int(extra[layer, k] - extra[layer, index[layer]])
        index[layer] = k
    return [choices[k] for k in index]


def _best_upgrade(s: np.ndarray, extra: np.ndarray, index: list[int], spare: int) -> tuple[int, int] | None:
    best, best_rate = None, 0.0
    for layer, current in enumerate(index):
        for k in range(current + 1, s.shape[1]):
            more = int(extra[layer, k] - extra[layer, current])
            gain = s[layer, current] - s[layer, k]
            if more <= spare and gain > 0 and gain / more > best_rate:
                best, best_rate = (layer, k), gain / more
    return best


def uniform_bits(choices: list[int], layers: list[LayerSize], avg_bits: float, group_size: int) -> int:
    """The largest single width of `choices` that every layer can take within the budget."""
    zeros = np.zeros((len(layers), len(choices)))
    _, choices, budget = _validated(zeros, choices, layers, avg_bits, group_size)
    return max(b for b in choices if total_cost(layers, [b] * len(layers), group_size) <= budget)


def allocate(method: str, sensitivity, choices: list[int], layers: list[LayerSize], avg_bits: float,
             group_size: int) -> list[int]:
    if method == "ilp":
        return allocate_ilp(sensitivity, choices, layers, avg_bits, group_size)
    if method == "greedy":
        return allocate_greedy(sensitivity, choices, layers, avg_bits, group_size)
    raise ValueError(f"unknown bit-allocation method {method!r}; expected one of {METHODS}")
