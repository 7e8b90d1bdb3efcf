"""How far the embedded model's weights are from a 4-bit grid: SmolLM2-135M-Instruct ships as a
Q4_1 GGUF (16 levels per 32-column block), so its "dense" weights are already 4-bit values on
that format's grid. Measures the relative weight change of our RTN 4-bit at group 32 (Q4_1's
block size) and 128, and the most distinct values in one 32-column block of block 0's q_proj.

    python benchmarks/gguf_grid.py     # writes benchmarks/results/gguf-grid.json
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from autoprune_ray.compress.models import block_linears, decoder_layers, load_model
from autoprune_ray.kernels.quant import fake_quant_reference

OUT = Path(__file__).parent / "results" / "gguf-grid.json"


def rtn_change(linears: list[torch.Tensor], group_size: int) -> dict:
    """||RTN(W) − W|| / ||W|| over every linear, and the share of weights RTN leaves unchanged."""
    num = den = 0.0
    same = total = 0
    for w in linears:
        q = fake_quant_reference(w, 4, group_size)[0]
        num, den = num + float(((q - w) ** 2).sum()), den + float((w ** 2).sum())
        same, total = same + int((q == w).sum()), total + w.numel()
    return {"relative_change": (num / den) ** 0.5, "unchanged_share": same / total}


def main() -> None:
    lm = load_model("smollm2", device="cpu")
    linears = [lin.weight.data.float() for block in decoder_layers(lm.model) for lin in block_linears(block).values()]
    q = block_linears(decoder_layers(lm.model)[0])["self_attn.q_proj"].weight.data.float()
    blocks = q.view(q.shape[0], -1, 32)
    distinct = max(len(torch.unique(blocks[r, c])) for r in range(q.shape[0]) for c in range(blocks.shape[1]))
    result = {"model": lm.name, "rtn4_group32": rtn_change(linears, 32), "rtn4_group128": rtn_change(linears, 128),
              "block0_q_proj_most_distinct_values_per_32_columns": distinct}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
