"""Policy backends: the LLM that writes candidate programs.

Every backend turns a list of prompts into `n` completions per prompt, in prompt order, and can
hot-load a LoRA adapter (the DPO-updated policy) labelled with a version string. All but the
scripted one can constrain completions to a grammar (`make_backend(..., grammar=EBNF)`).

    transformers  embedded default: SmolLM2-135M-Instruct (or any local/hub causal LM) on CPU/GPU
    vllm          `vllm.LLM` in-process, LoRA adapters served per request
    openai        any OpenAI-compatible endpoint (e.g. `vllm serve`), standard library only
    scripted      fixed completions, cycled: tests and offline demos
"""
from __future__ import annotations

import abc
import itertools
import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from autoprune_ray.llm.grammar_backends import (HFGrammar, checked_grammar, refuses_grammar, vllm_sampling_params,
                                                with_grammar)

log = logging.getLogger("autoprune_ray.llm")

# The default; a search serves its task plug-in's system prompt (make_backend(system_prompt=...)).
SYSTEM_PROMPT = ("You write short Python functions for compressing neural networks. "
                 "Answer with the code in a ```python fence.")


@dataclass
class Completion:
    text: str
    prompt_index: int
    tokens: int                # generated tokens (0 when the backend cannot tell)
    seconds: float             # wall time, the batch's time shared among its completions
    adapter: str | None        # version of the LoRA adapter that generated it; None = base model


class PolicyBackend(abc.ABC):
    """`generate` returns n completions per prompt: prompt 0's n, then prompt 1's n, ..."""

    def __init__(self) -> None:
        self.system_prompt = SYSTEM_PROMPT
        self.tokens_generated = 0
        self._adapter_version: str | None = None

    @abc.abstractmethod
    def generate(self, prompts: list[str], n: int = 1, temperature: float = 0.8, max_new_tokens: int = 256,
                 seed: int | None = None) -> list[Completion]:
        ...

    def set_grammar(self, ebnf: str | None) -> None:
        """Constrain completions to an EBNF grammar (None: unconstrained). A backend that cannot
        constrain (scripted) ignores it; the parser judges every completion either way."""

    def load_adapter(self, path: str, version: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot load LoRA adapters; use the transformers, "
                                  "vllm or openai backend for a policy updated by DPO")

    @property
    def adapter_version(self) -> str | None:
        return self._adapter_version

    def _completion(self, text: str, index: int, tokens: int, seconds: float) -> Completion:
        self.tokens_generated += tokens
        return Completion(text=text, prompt_index=index, tokens=tokens, seconds=seconds,
                          adapter=self._adapter_version)


def _check_args(prompts, n: int, temperature: float, max_new_tokens: int) -> None:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"n and max_new_tokens must be >= 1, got n={n}, max_new_tokens={max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")


def chat_messages(prompt: str, system: str = SYSTEM_PROMPT) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


def apply_chat_template(tokenizer, prompt: str, system: str = SYSTEM_PROMPT) -> str:
    """The prompt in the tokenizer's chat format, ending where the assistant starts; the bare
    prompt when the tokenizer has no template. Templates without a system role get it inlined."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    try:
        return tokenizer.apply_chat_template(chat_messages(prompt, system), tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - e.g. templates that raise on a system message
        merged = [{"role": "user", "content": f"{system}\n\n{prompt}"}]
        return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------- scripted

class ScriptedBackend(PolicyBackend):
    """Returns the given completions in order, cycling across calls; deterministic, ignores seed."""

    def __init__(self, completions: list[str]):
        super().__init__()
        if isinstance(completions, str) or not completions:
            raise ValueError("ScriptedBackend needs a non-empty list of completion strings")
        self.completions = list(completions)
        self._next = 0
        self.adapters: list[tuple[str, str]] = []     # (version, path), in load order

    def generate(self, prompts, n=1, temperature=0.8, max_new_tokens=256, seed=None):
        _check_args(prompts, n, temperature, max_new_tokens)
        out = []
        for i in range(len(prompts)):
            for _ in range(n):
                text = self.completions[self._next % len(self.completions)]
                self._next += 1
                out.append(self._completion(text, i, len(text.split()), 0.0))
        return out

    def load_adapter(self, path: str, version: str) -> None:
        self.adapters.append((version, str(path)))
        self._adapter_version = version


# ---------------------------------------------------------------- transformers (embedded default)

class TransformersBackend(PolicyBackend):
    """A causal LM through transformers: batched sampling with left padding, completions only.

    `model` is "smollm2" (the embedded default), a local HF directory or a hub id. LoRA adapters
    are loaded with peft (`pip install peft`); only the active adapter is kept in memory."""

    def __init__(self, model: str = "smollm2", device: str | None = None, dtype=None, batch_size: int = 8):
        super().__init__()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from autoprune_ray.compress.models import default_device, default_dtype, resolve_model_path

        self.device = device or default_device()
        self.dtype = dtype or default_dtype(self.device)
        self.batch_size = max(1, int(batch_size))
        self.path = resolve_model_path(model)
        self.model_name = model
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"{self.path}: the tokenizer has neither a pad nor an eos token to pad with")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=self.dtype).to(self.device).eval()
        self.model.requires_grad_(False)
        self._torch = torch
        self._adapter_names: dict[str, str] = {}      # peft adapter name -> version label
        self._stop_ids = self._eos_ids()
        self._grammar: HFGrammar | None = None

    def __repr__(self) -> str:
        return (f"TransformersBackend(model={self.model_name!r}, device={self.device!r}, "
                f"adapter={self._adapter_version!r})")

    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def set_grammar(self, ebnf: str | None) -> None:
        self._grammar = HFGrammar.compile(ebnf, self.tokenizer, self.model.config.vocab_size, self._stop_ids)

    def generate(self, prompts, n=1, temperature=0.8, max_new_tokens=256, seed=None):
        _check_args(prompts, n, temperature, max_new_tokens)
        torch = self._torch
        if seed is not None:
            torch.manual_seed(seed)
        templated = [apply_chat_template(self.tokenizer, p, self.system_prompt) for p in prompts]
        with_template = bool(getattr(self.tokenizer, "chat_template", None))
        rows = [(i, templated[i]) for i in range(len(prompts)) for _ in range(n)]
        sampling = {"do_sample": True, "temperature": float(temperature), "top_k": 0, "top_p": 1.0} \
            if temperature > 0 else {"do_sample": False}
        out: list[Completion] = []
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            t0 = time.perf_counter()
            enc = self.tokenizer([text for _, text in batch], return_tensors="pt", padding=True,
                                 add_special_tokens=not with_template).to(self.device)
            constrained = {"logits_processor": self._grammar.processors()} if self._grammar else {}
            with torch.inference_mode():
                generated = self.model.generate(**enc, max_new_tokens=max_new_tokens,
                                                pad_token_id=self.tokenizer.pad_token_id, **sampling, **constrained)
            new = generated[:, enc["input_ids"].shape[1]:].tolist()
            seconds = (time.perf_counter() - t0) / len(batch)
            for (index, _), ids in zip(batch, new):
                count = next((k + 1 for k, t in enumerate(ids) if t in self._stop_ids), len(ids))
                text = self.tokenizer.decode(ids[:count], skip_special_tokens=True)
                out.append(self._completion(text, index, count, seconds))
        return out

    def load_adapter(self, path: str, version: str) -> None:
        """Load a peft LoRA adapter saved at `path` and make it the active one. Adapters get
        internal names (version labels may hold characters peft module names cannot); the
        previously active adapter is deleted."""
        try:
            from peft import PeftModel
        except ImportError as exc:
            raise ImportError("loading a LoRA adapter needs peft: pip install peft") from exc
        name = f"adapter_{len(self._adapter_names)}"
        if not isinstance(self.model, PeftModel):
            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name).eval()
        else:
            previous = self.model.active_adapter
            self.model.load_adapter(str(path), adapter_name=name)
            self.model.set_adapter(name)
            self.model.delete_adapter(previous)
        self.model.requires_grad_(False)
        self._adapter_names[name] = version
        self._adapter_version = version


# ---------------------------------------------------------------- vLLM

def _import_vllm():
    try:
        import vllm
        from vllm.lora.request import LoRARequest
    except ImportError as exc:
        raise ImportError("the vllm backend needs vLLM (a CUDA build: pip install vllm on a GPU machine); "
                          "use backend 'transformers' or 'openai' (with `vllm serve`) otherwise") from exc
    return vllm, LoRARequest


class VLLMBackend(PolicyBackend):
    """`vllm.LLM` in this process. LoRA adapters go with each request; vLLM caches adapters by
    integer id, so every loaded adapter gets a new id. Inside a Ray actor reserve `num_gpus`."""

    def __init__(self, model: str = "smollm2", enable_lora: bool = True, max_lora_rank: int = 16,
                 gpu_memory_utilization: float = 0.5, **llm_kwargs):
        super().__init__()
        if llm_kwargs.get("distributed_executor_backend") == "ray":
            raise ValueError("distributed_executor_backend='ray' deadlocks inside a Ray actor (nested placement "
                             "group); run vLLM's default executor in the actor instead")
        vllm, self._LoRARequest = _import_vllm()
        from autoprune_ray.compress.models import resolve_model_path

        self._SamplingParams = vllm.SamplingParams
        self.model_name = model
        self.enable_lora = enable_lora
        self.llm = vllm.LLM(model=resolve_model_path(model), enable_lora=enable_lora, max_lora_rank=max_lora_rank,
                            gpu_memory_utilization=gpu_memory_utilization, **llm_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.grammar: str | None = None
        self._lora_request = None
        self._ids = itertools.count(1)

    def __repr__(self) -> str:
        return f"VLLMBackend(model={self.model_name!r}, adapter={self._adapter_version!r})"

    def set_grammar(self, ebnf: str | None) -> None:
        self.grammar = checked_grammar(ebnf)

    def generate(self, prompts, n=1, temperature=0.8, max_new_tokens=256, seed=None):
        _check_args(prompts, n, temperature, max_new_tokens)
        params = vllm_sampling_params(self._SamplingParams, self.grammar, n=n, temperature=temperature,
                                      max_tokens=max_new_tokens, seed=seed)
        texts = [apply_chat_template(self.tokenizer, p, self.system_prompt) for p in prompts]
        t0 = time.perf_counter()
        outputs = self.llm.generate(texts, params, lora_request=self._lora_request, use_tqdm=False)
        seconds = (time.perf_counter() - t0) / max(1, len(prompts) * n)
        return [self._completion(c.text, i, len(c.token_ids), seconds)
                for i, request in enumerate(outputs) for c in request.outputs]

    def load_adapter(self, path: str, version: str) -> None:
        if not self.enable_lora:
            raise RuntimeError("this VLLMBackend was built with enable_lora=False")
        self._lora_request = self._LoRARequest(version, next(self._ids), str(path))
        self._adapter_version = version


# ---------------------------------------------------------------- OpenAI-compatible HTTP

class ServerError(RuntimeError):
    """An HTTP error answer: its status and (the start of) its body."""

    def __init__(self, message: str, status: int, detail: str):
        super().__init__(message)
        self.status, self.detail = status, detail


class OpenAIBackend(PolicyBackend):
    """POST {base_url}/chat/completions (one request per prompt, `n` choices each).

    The API key is read from the environment variable `api_key_env` at each call and never
    stored; without it no Authorization header is sent (a local `vllm serve` needs none).
    `load_adapter(path, version)` switches the request's `model` to `version`: `vllm serve`
    exposes each LoRA module as a model name, so start it with `--enable-lora --lora-modules
    VERSION=PATH`, or pass `runtime_lora=True` to register the adapter first through
    POST {base_url}/load_lora_adapter (needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True on the server).
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60,
                 runtime_lora: bool = False):
        super().__init__()
        if not base_url:
            raise ValueError("OpenAIBackend needs base_url, e.g. http://127.0.0.1:8000/v1")
        self.base_url = base_url.rstrip("/")
        self.base_model = model
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.runtime_lora = runtime_lora
        self.grammar: str | None = None

    def __repr__(self) -> str:
        return (f"OpenAIBackend(base_url={self.base_url!r}, model={self.model!r}, "
                f"api_key_env={self.api_key_env!r})")

    def _post(self, route: str, body: dict) -> bytes:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(f"{self.base_url}/{route}", data=json.dumps(body).encode(),
                                         headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            raise ServerError(f"{self.base_url}/{route} answered HTTP {exc.code}: {detail}", exc.code, detail) from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise RuntimeError(f"{self.base_url}/{route} is unreachable: {exc}") from None

    def set_grammar(self, ebnf: str | None) -> None:
        self.grammar = checked_grammar(ebnf)

    def _chat(self, body: dict) -> bytes:
        """POST chat/completions, constrained to the grammar while the server takes it: a server
        that refuses the field (or the grammar) is told once in the log, then asked without."""
        try:
            return self._post("chat/completions", with_grammar(body, self.grammar))
        except ServerError as exc:
            if not (self.grammar and refuses_grammar(exc.status, exc.detail)):
                raise
            log.warning("%s refuses the grammar (%s): generating unconstrained", self.base_url, exc.detail[:200])
            self.grammar = None
            return self._post("chat/completions", body)

    def generate(self, prompts, n=1, temperature=0.8, max_new_tokens=256, seed=None):
        _check_args(prompts, n, temperature, max_new_tokens)
        out = []
        for i, prompt in enumerate(prompts):
            body = {"model": self.model, "messages": chat_messages(prompt, self.system_prompt), "n": n, "temperature": temperature,
                    "max_tokens": max_new_tokens}
            if seed is not None:
                body["seed"] = seed
            t0 = time.perf_counter()
            reply = json.loads(self._chat(body))
            seconds = (time.perf_counter() - t0) / n
            choices = sorted(reply.get("choices", []), key=lambda c: c.get("index", 0))
            if len(choices) != n:
                raise RuntimeError(f"{self.base_url} returned {len(choices)} choices for n={n}")
            total = int((reply.get("usage") or {}).get("completion_tokens") or 0)
            share, extra = divmod(total, n)
            for k, choice in enumerate(choices):
                text = (choice.get("message") or {}).get("content") or ""
                out.append(self._completion(text, i, share + (k < extra), seconds))
        return out

    def load_adapter(self, path: str, version: str) -> None:
        if self.runtime_lora:
            self._post("load_lora_adapter", {"lora_name": version, "lora_path": str(path)})
        self.model = version
        self._adapter_version = version


# ---------------------------------------------------------------- factory

BACKENDS = {"transformers": TransformersBackend, "vllm": VLLMBackend, "openai": OpenAIBackend,
            "scripted": ScriptedBackend}


def make_backend(kind: str, system_prompt: str | None = None, grammar: str | None = None,
                 **options) -> PolicyBackend:
    """`grammar`: an EBNF grammar (operators.grammar) that completions are constrained to."""
    if kind not in BACKENDS:
        raise ValueError(f"unknown policy backend {kind!r}; choose one of {', '.join(sorted(BACKENDS))}")
    backend = BACKENDS[kind](**options)
    backend.system_prompt = system_prompt or SYSTEM_PROMPT
    backend.set_grammar(grammar)
    return backend
