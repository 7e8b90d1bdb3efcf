"""Grammar-constrained decoding for the policy backends (the grammar: operators.grammar).

A constraint only raises the share of completions that parse: the parser still judges every
completion. So nothing here may stop a search: a grammar that does not compile, a missing
xgrammar or a server that refuses the field is a warning, then unconstrained generation.
"""
from __future__ import annotations

import logging

log = logging.getLogger("autoprune_ray.llm")


def checked_grammar(ebnf: str | None) -> str | None:
    """The grammar when xgrammar parses it (or cannot be imported to check: vLLM checks it
    again), else None with a warning."""
    if not ebnf:
        return None
    try:
        import xgrammar as xgr
    except ImportError:
        return ebnf
    try:
        xgr.Grammar.from_ebnf(ebnf)
    except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError & co for a bad grammar
        log.warning("the policy's grammar does not compile, generating unconstrained: %s", str(exc)[:300])
        return None
    return ebnf


class HFGrammar:
    """xgrammar's logits processor for transformers' generate: the grammar is compiled once for
    the tokenizer, and every generate call gets a fresh processor (it holds one matcher per row
    of the batch, made at its first call, and cannot be reset)."""

    def __init__(self, compiled):
        self.compiled = compiled

    @classmethod
    def compile(cls, ebnf: str | None, tokenizer, vocab_size: int, stop_ids) -> "HFGrammar | None":
        """None (with a warning where a grammar was given) when there is nothing to constrain with."""
        if not ebnf:
            return None
        try:
            import xgrammar as xgr
        except ImportError:
            log.warning("constrained generation needs xgrammar (pip install xgrammar): generating unconstrained")
            return None
        try:
            # the model's vocab_size, not the tokenizer's: the logits may be padded beyond it;
            # the stop tokens the backend stops at, so the grammar ends where generation does
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids))
            return cls(xgr.GrammarCompiler(info).compile_grammar(ebnf))
        except Exception as exc:  # noqa: BLE001 - a bad grammar or tokenizer: unconstrained, never a crash
            log.warning("the policy's grammar does not compile, generating unconstrained: %s", str(exc)[:300])
            return None

    def processors(self) -> list:
        import xgrammar as xgr
        return [xgr.contrib.hf.LogitsProcessor(self.compiled)]


def vllm_sampling_params(sampling_params_class, ebnf: str | None, **kwargs):
    """vLLM's SamplingParams, constrained to the grammar as vLLM documents it: from 0.12 on
    `SamplingParams(structured_outputs=StructuredOutputsParams(grammar=...))`, before that
    `SamplingParams(guided_decoding=GuidedDecodingParams(grammar=...))`."""
    if not ebnf:
        return sampling_params_class(**kwargs)
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:
        from vllm.sampling_params import GuidedDecodingParams
        return sampling_params_class(guided_decoding=GuidedDecodingParams(grammar=ebnf), **kwargs)
    return sampling_params_class(structured_outputs=StructuredOutputsParams(grammar=ebnf), **kwargs)


def with_grammar(body: dict, ebnf: str | None) -> dict:
    """A chat request constrained as a vLLM server (0.12 and later) documents it: the extra body
    field `structured_outputs: {"grammar": ...}`. Older servers ignore the field."""
    return {**body, "structured_outputs": {"grammar": ebnf}} if ebnf else body


def refuses_grammar(status: int, detail: str) -> bool:
    """Whether an error answer is a server refusing the grammar field (or the grammar itself)."""
    return status == 400 and any(word in detail.lower() for word in ("structured_outputs", "grammar"))
