"""The policy actor: a thin host around one `llm.backends` backend."""
from __future__ import annotations

import dataclasses
import os

from autoprune_ray.engine.config import PolicyConfig


def backend_options(cfg: PolicyConfig) -> dict:
    if cfg.backend == "scripted":
        return {"completions": list(cfg.scripted)}
    if cfg.backend == "openai":
        return {"base_url": cfg.base_url, "model": cfg.model, "api_key_env": cfg.api_key_env}
    return {"model": cfg.model}


class PolicyWorker:
    """`system_prompt`: the run's task plug-in's (what kind of program the policy writes);
    `grammar_task`: the task whose grammar completions are constrained to (None: unconstrained),
    leaving out the inputs `grammar_without` (those the run collects no statistics for). The
    grammar is built here, not passed: at 100-250 KB it would travel through the object store,
    and Ray cannot restart an actor whose constructor arguments were released there."""

    def __init__(self, cfg: PolicyConfig, system_prompt: str | None = None, grammar_task: str | None = None,
                 grammar_without: frozenset[str] = frozenset()):
        from autoprune_ray.llm.backends import make_backend
        from autoprune_ray.tasks import get_task
        self.cfg = cfg
        grammar = get_task(grammar_task).grammar(frozenset(grammar_without)) if grammar_task else None
        self.backend = make_backend(cfg.backend, system_prompt=system_prompt, grammar=grammar, **backend_options(cfg))

    def generate(self, prompts: list[str], seed: int | None = None,
                 temperatures: list[float] | None = None) -> list[dict]:
        """n completions per prompt; prompts sharing a temperature are sampled as one batch."""
        temperatures = temperatures or [self.cfg.temperature] * len(prompts)
        out = []
        for t in sorted(set(temperatures)):
            indices = [i for i, ti in enumerate(temperatures) if ti == t]
            completions = self.backend.generate([prompts[i] for i in indices], n=self.cfg.completions_per_prompt,
                                                temperature=t, max_new_tokens=self.cfg.max_new_tokens, seed=seed)
            out += [dataclasses.asdict(c) | {"prompt_index": indices[c.prompt_index]} for c in completions]
        return sorted(out, key=lambda c: c["prompt_index"])

    def load_adapter(self, path: str, version: str) -> str:
        self.backend.load_adapter(path, version)
        return version

    def ping(self) -> dict:
        return {"backend": self.cfg.backend, "adapter": self.backend.adapter_version,
                "tokens": self.backend.tokens_generated, "pid": os.getpid()}
