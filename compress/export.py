"""Write a pruned model in HF format, loadable with AutoModelForCausalLM.from_pretrained(DIR)."""
from __future__ import annotations

import json
from pathlib import Path

from .models import LoadedModel


def save_pruned(lm: LoadedModel, directory: str | Path, report: dict | None = None,
                report_name: str = "pruning.json") -> Path:
    """A quantized model is saved the same way, its weights dequantized (fake quantization)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    lm.model.config.use_cache = True  # what a user who loads the export expects for generation
    try:
        lm.model.save_pretrained(out)
    finally:
        lm.model.config.use_cache = False
    lm.tokenizer.save_pretrained(out)
    if report is not None:
        (out / report_name).write_text(json.dumps(report, indent=2))
    return out
