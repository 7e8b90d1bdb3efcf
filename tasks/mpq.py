"""Task `mpq` (TAP): a sensitivity proxy, one number per (layer, bit width), from which an
allocator assigns each layer's bits under the run's budget (`quant:`)."""
from __future__ import annotations

import pyarrow as pa

from autoprune_ray.compress.mpq_fitness import SensitivityEvaluator
from autoprune_ray.compress.quantize import QuantConfig
from autoprune_ray.operators.prompts import Ideas, TaskPrompts, preamble_text, system_prompt
from autoprune_ray.operators.seeds import sensitivity_seeds
from autoprune_ray.operators.specs import MPQ
from autoprune_ray.tasks.base import TaskPlugin

# a proxy reads E with a statistic of its layer (not G: a run collects it only with target.gradients)
SENSITIVITY_IDEAS = Ideas(MPQ, leads=("E",), others=("W", "A", "H", "b", "d"))

PROMPTS = TaskPrompts(
    preamble=preamble_text(
        "You design sensitivity proxies for mixed-precision quantization of a language model. A proxy is one "
        "Python function called for one linear layer quantized to b bits; it returns one number: how much the "
        "model suffers from that layer's quantization error. An allocator then gives more bits to the layers "
        "whose sensitivity drops most per extra bit, under an average-bits budget, so what matters is ranking "
        "layers and bit widths correctly.",
        MPQ, "The result must be ONE number per layer (reduce over all weights: .sum() or .mean() with no dim) "
             "and must use E (or b)."),
    noun="proxy",
    from_scratch=("Invent a new proxy from scratch: decide what makes a layer's quantization error hurt the "
                  "model's output and write a sensitivity for it."),
    system=system_prompt("sensitivity proxies for mixed-precision quantization of neural networks"),
    example="def sensitivity(E, A):\n    x = E.abs() * A\n    return x.sum() / (1 + A.mean())",
    ideas=(SENSITIVITY_IDEAS,),
)


class MPQTask(TaskPlugin):
    name = "mpq"
    spec = MPQ
    prompts = PROMPTS
    columns = {"avg_bits": pa.float64(), "spearman": pa.float64(), "kendall": pa.float64()}
    baselines = ("uniform", "hawq", "aptq")
    amount = "avg_bits"
    reference_seed = "hawq"
    apply_command = "quantize"

    def seeds(self):
        return sensitivity_seeds()

    def validate(self, cfg) -> None:
        q = cfg.quant
        try:
            q.quant_config(method="uniform").validate()   # the program comes with each candidate
        except ValueError as exc:
            raise ValueError(f"quant: {exc}") from None
        if q.measure_bits not in q.bits:
            raise ValueError(f"quant.measure_bits: must be one of quant.bits {q.bits}")
        if q.measure_layers < 2:
            raise ValueError("quant.measure_layers: a rank correlation needs at least 2 layers")
        if q.measure_tokens < cfg.target.seqlen:
            raise ValueError(f"quant.measure_tokens: at least one window of target.seqlen {cfg.target.seqlen}")

    def compression_config(self, cand, cfg) -> QuantConfig:
        return cfg.quant.quant_config(method="program", program=cand.tree)

    def baseline_config(self, name: str, cfg) -> QuantConfig:
        return cfg.quant.quant_config(method=name)

    def make_evaluator(self, lm, data, cfg, stats=None) -> SensitivityEvaluator:
        return SensitivityEvaluator(lm, data, cfg.quant.quant_config(), cfg.quant.measure_config(),
                                    stats=stats, with_grad=cfg.target.gradients)

    def protocol_note(self, cfg) -> str:
        q = cfg.quant
        budget = (f"the size of uniform {q.as_uniform}-bit" if q.as_uniform is not None
                  else f"{q.avg_bits} bits per weight")
        return (f"one-pass statistics, budget {budget} (group {q.group_size}, fp16 scale and zero counted), "
                f"{q.allocator} allocation, {q.quantizer} rounding")
