"""The grammar of constrained decoding (operators/grammar.py) and the backends that use it: every
string the grammar allows parses, the seeds and the accepted corpus are in it, rejected programs
are not, and a grammar that does not compile or a server that refuses it falls back with a warning."""
import dataclasses
import functools
import json
import logging
import random
import re
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

xgr = pytest.importorskip("xgrammar")

from autoprune_ray.engine.config import ConfigError, RunConfig, from_dict  # noqa: E402
from autoprune_ray.llm.backends import OpenAIBackend, make_backend  # noqa: E402
from autoprune_ray.llm.grammar_backends import checked_grammar, vllm_sampling_params  # noqa: E402
from autoprune_ray.operators.grammar import build, grammar_for  # noqa: E402
from autoprune_ray.operators.language import TASK_PARTS, CandidateError, parse  # noqa: E402
from autoprune_ray.operators.seeds import SCORE_SEEDS  # noqa: E402
from autoprune_ray.operators.specs import PRUNE  # noqa: E402
from autoprune_ray.tasks import TASKS  # noqa: E402

from hostile_programs import TOLERATED, hostile_programs  # noqa: E402

GRAMMAR_TASKS = ("prune", "allocate", "joint", "mpq")

# Accepted programs (the language tests' corpus) whose canonical form the grammar leaves out, and why.
OUTSIDE = {
    "def score(W):\n    return clamp(W, min=-0.5, max=0.5)\n": "two-sided clamp",
    "def score(W, A):\n    return 1000.0 * A * W\n": "a constant of 100 or more",
}
ACCEPTED = ([src for src, _ in SCORE_SEEDS.values()] + [src for src, _ in TOLERATED if len(src) < 2000] + [
    "def score(W, A):\n    return W.clamp(min=0) * A.clamp(max=2.0)\n",
    "def score(W, A, eps=1e-3):\n    x = W ** 2\n    x += eps\n    return torch.sqrt(x) * A ** -0.5\n",
    "import torch\n\ndef score(W, H):\n    a = W.abs()\n    return a / a.norm(dim=0, keepdim=True) * H.max(dim=1)[0]\n",
    "def s(W): return W - W.abs().max(dim=0)[0]",
    "def s(W): return W * W.std(dim=1)",
    "def s(W, V): return W / V.mean()",
    "def s(W, M): return torch.maximum(W, M) - min(W, M)",
    "def s(W, d): return torch.sigmoid(W) * torch.tanh(W) + d",
    "def s(W): return torch.clamp(W, min=-0.5, max=0.5)",
    "def s(W, A): return W * A * 1000",
])


def fenced(code: str) -> str:
    return f"```python\n{code}```"


@pytest.fixture(scope="module")
def grammars():
    return {task: build(TASK_PARTS[task]) for task in GRAMMAR_TASKS}


@functools.lru_cache(maxsize=8)
def compiled_for_strings(ebnf: str):
    return xgr.GrammarCompiler(xgr.TokenizerInfo([])).compile_grammar(ebnf)


def accepts(ebnf: str, text: str) -> bool:
    """Whether the grammar allows exactly this text (a matcher over strings, no tokenizer)."""
    compiled = compiled_for_strings(ebnf)
    matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
    return matcher.accept_string(text) and matcher.is_terminated()


# ---------------------------------------------------------------- the grammar

def test_task_plugins_give_their_grammar_or_none():
    for task in GRAMMAR_TASKS:
        assert TASKS[task].grammar().startswith("root ::= ")
    assert set(GRAMMAR_TASKS) == set(TASKS)


@pytest.mark.parametrize("text", [
    "def sensitivity(E, H):\n    return H.mean(dim=1, keepdim=True) * square(E).sum()\n",
    "def sensitivity(E, A):\n    return (E.abs() * A).mean() / A.max() + 1\n",
    "def sensitivity(E, b):\n    return b * (E ** 2).sum(dim=0, keepdim=True).sum(dim=1, keepdim=True)\n",
])
def test_sensitivities_reduced_to_one_number_are_in_the_grammar(text, grammars):
    assert accepts(grammars["mpq"].ebnf, fenced(text))


@pytest.mark.parametrize("text", [
    "def sensitivity(E):\n    return E ** 2\n",                       # one value per weight
    "def sensitivity(E, H):\n    return (E * H).sum(dim=0, keepdim=True)\n",   # one per input channel
    "def sensitivity(W, H):\n    return (W * H).sum()\n",                # reads neither E nor b
    "def sensitivity(E):\n    return 2.0\n",
])
def test_sensitivities_that_are_not_one_number_or_ignore_E_are_outside_the_grammar(text, grammars):
    with pytest.raises(CandidateError):
        parse(text, "mpq")
    assert not accepts(grammars["mpq"].ebnf, fenced(text))


def test_the_grammar_follows_the_specs():
    renamed = dataclasses.replace(PRUNE, function="metric", inputs={"W": PRUNE.inputs["W"], "Z": PRUNE.inputs["A"]})
    ebnf = grammar_for(("prune",), {"prune": renamed})
    assert accepts(ebnf, fenced("def metric(W, Z):\n    return W * Z\n"))
    assert not accepts(ebnf, fenced("def score(W, A):\n    return W * A\n"))


def test_a_run_without_gradients_gets_a_grammar_that_never_reads_G():
    cfg = RunConfig()
    assert not cfg.target.gradients and cfg.target.uncollected_inputs == {"G"}
    ebnf = TASKS["prune"].grammar(cfg.target.uncollected_inputs)
    assert accepts(ebnf, fenced("def score(W, A):\n    return W.abs() * A\n"))
    for reads_g in ("def score(W, G):\n    return W.abs() * G\n", "def score(W, G):\n    return W * G\n"):
        assert accepts(TASKS["prune"].grammar(), fenced(reads_g))
        assert not accepts(ebnf, fenced(reads_g))
    assert RunConfig(target=dataclasses.replace(cfg.target, gradients=True)).target.uncollected_inputs == set()


@pytest.mark.parametrize("task", GRAMMAR_TASKS)
def test_every_seed_is_in_the_grammar(task, grammars):
    for name, cand in TASKS[task].seeds().items():
        assert accepts(grammars[task].ebnf, fenced(cand.code)), name


def test_the_accepted_corpus_is_in_the_grammar_where_its_subset_reaches(grammars):
    outside = []
    for src in ACCEPTED:
        code = parse(src).code
        if not accepts(grammars["prune"].ebnf, fenced(code)):
            outside.append(code)
    assert sorted(outside) == sorted(OUTSIDE)


@pytest.mark.parametrize("text", [
    "```python\nimport os\ndef score(W):\n    return W\n```",
    "```python\ndef score(W):\n    return 1.0\n```",                           # constant: must vary
    "```python\ndef score(W, A):\n    return A\n```",                          # no W or G
    "```python\ndef score(W):\n    return W.sum(dim=1, keepdim=True)\n```",    # reduced away
    "```python\ndef score(W):\n    return W.item()\n```",
    "```python\ndef score(W):\n    return A * W\n```",                         # A is no parameter
    "```python\ndef score(W):\n    return W / 0\n```",
    "```python\ndef score(W):\n    return W ** 5\n```",
    "```python\ndef score(W):\n    return eval('W')\n```",
    "Here is a metric:\n```python\ndef score(W):\n    return W\n```",
    "def score(W):\n    return W\n",
])
def test_rejected_programs_are_outside_the_grammar(text, grammars):
    assert not accepts(grammars["prune"].ebnf, text)


# ---------------------------------------------------------------- signatures of several inputs

@pytest.mark.parametrize("task, code", [
    ("allocate", "def allocate(outlier, depth):\n    return depth - 2.0 * outlier\n"),      # body in either order
    ("allocate", "def allocate(outlier, depth):\n    return -outlier + 0.5 * depth\n"),
    ("allocate", "def allocate(kurt, alpha):\n    return 2.0 * sqrt(kurt) * alpha ** 2\n"),
    ("allocate", "def allocate(outlier, sens):\n    return outlier - outlier.mean(dim=0) + sens\n"),
    ("allocate", "def allocate(skew, size, is_down):\n    return skew + size - is_down\n"),
    ("allocate", "def allocate(kurt, depth, sens):\n    return kurt * (1 - depth) / sens\n"),
    ("prune", "def score(W, A, H):\n    return abs(W) * A / sqrt(H)\n"),
    ("joint", "def score(W, A):\n    return A * abs(W)\n\n\ndef allocate(alpha, depth):\n    return alpha - depth\n"),
])
def test_signatures_of_several_inputs_are_in_the_grammar_and_parse(task, code, grammars):
    assert accepts(grammars[task].ebnf, fenced(code))
    signatures = [line for line in code.splitlines() if line.startswith("def ")]
    assert [line for line in parse(code, task).code.splitlines() if line.startswith("def ")] == signatures


@pytest.mark.parametrize("code, parser_accepts", [
    ("def allocate(outlier, foo):\n    return outlier + foo\n", False),     # no such input
    ("def allocate(depth, outlier):\n    return depth - outlier\n", True),   # not the canonical order
    ("def allocate(outlier, depth):\n    return -outlier\n", True),          # depth never read
    ("def allocate(outlier, depth):\n    return outlier.mean(dim=0) + depth.sum(dim=0)\n", False),  # constant
])
def test_other_signatures_are_outside_the_grammar(code, parser_accepts, grammars):
    """The grammar keeps to the parser's canonical form: parameters in the spec's order, each of a
    composed signature read; the parser (the gate) is more lenient where the meaning is clear."""
    assert not accepts(grammars["allocate"].ebnf, fenced(code))
    if parser_accepts:
        parse(code, "allocate")
    else:
        with pytest.raises(CandidateError):
            parse(code, "allocate")


def test_composed_signatures_read_every_parameter(grammars):
    texts = random_walks(grammars["allocate"].ebnf, 60, seed=2)
    signatures = [text.split("(", 1)[1].split(")", 1)[0] for text in texts]
    assert sum(s.count(",") == 1 for s in signatures) >= 5 and sum(s.count(",") == 2 for s in signatures) >= 5
    for text, signature in zip(texts, signatures):
        assert f"def allocate({signature}):" in parse(text, "allocate").code, text


def test_the_grammar_stays_small(grammars):
    # a copy of the expression rules per signature would be 0.5 MB for allocate's 91 pairs alone
    assert len(grammars["allocate"].ebnf) < 200_000 and len(grammars["joint"].ebnf) < 400_000


@pytest.mark.parametrize("task", GRAMMAR_TASKS)
def test_the_signatures_prompts_suggest_are_in_the_grammar(task, grammars):
    from autoprune_ray.operators import prompts as P
    lines = [P.init_prompt([(f"def score(W):\n    return W * {k}.0\n", None)], [], TASKS[task].prompts)
             for k in range(12)]
    suggested = {s for line in lines for s in re.findall(r"`(def \w+\([^)]*\))`", line)}
    assert len(suggested) >= 5
    for signature in suggested:
        matcher = xgr.GrammarMatcher(compiled_for_strings(grammars[task].ebnf), terminate_without_stop_token=True)
        prefix = "```python\n" + ("def score(W):\n    return W\n\n" if "allocate" in signature and task == "joint" else "")
        assert matcher.accept_string(prefix + signature + ":\n    return "), signature


def test_hostile_programs_are_outside_the_grammar(grammars):
    for _, text in hostile_programs():
        for task in GRAMMAR_TASKS:
            assert not accepts(grammars[task].ebnf, fenced(text)), text


def random_walks(ebnf: str, count: int, seed: int) -> list[str]:
    """Strings the grammar allows, drawn one character at a time uniformly among those it allows."""
    vocab = [chr(i) for i in range(32, 127)] + ["\n", "<stop>"]
    info = xgr.TokenizerInfo(vocab, stop_token_ids=[len(vocab) - 1])
    compiled = xgr.GrammarCompiler(info).compile_grammar(ebnf)
    mask, rng, out = xgr.allocate_token_bitmask(1, len(vocab)), random.Random(seed), []
    for _ in range(count):
        matcher, text = xgr.GrammarMatcher(compiled), []
        while not matcher.is_terminated():
            matcher.fill_next_token_bitmask(mask)
            words = mask[0].tolist()
            token = rng.choice([i for i in range(len(vocab)) if words[i >> 5] >> (i & 31) & 1])
            assert matcher.accept_token(token)
            text.append(vocab[token] if token < len(vocab) - 1 else "")
        out.append("".join(text))
    return out


@pytest.mark.parametrize("task", GRAMMAR_TASKS)
def test_every_string_the_grammar_allows_parses(task, grammars):
    texts = random_walks(grammars[task].ebnf, 40, seed=1)
    for text in texts:
        parse(text, task)                 # raises CandidateError with the reason
        assert len(text) <= grammars[task].longest
    assert len(set(texts)) > 30


def test_the_grammar_is_bounded(grammars):
    # a token is at least one character: a completion closes within `longest` new tokens
    assert grammars["prune"].longest <= 260 and grammars["allocate"].longest <= 260
    assert grammars["joint"].longest <= 480 and grammars["mpq"].longest <= 400


# ---------------------------------------------------------------- constrained generation

def test_constrained_generation_of_a_random_model_parses(tiny_model_dir, grammars):
    backend = make_backend("transformers", grammar=grammars["prune"].ebnf, model=str(tiny_model_dir),
                           device="cpu", batch_size=16)
    out = backend.generate(["Write a metric."], n=16, temperature=1.0, max_new_tokens=grammars["prune"].longest + 1,
                           seed=0)
    for c in out:
        parse(c.text, "prune")
    assert len({c.text for c in out}) > 8
    unconstrained = make_backend("transformers", model=str(tiny_model_dir), device="cpu", batch_size=16)
    texts = [c.text for c in unconstrained.generate(["Write a metric."], n=4, max_new_tokens=20, seed=0)]
    with pytest.raises(CandidateError):
        parse(texts[0], "prune")


def test_a_grammar_that_does_not_compile_falls_back_with_a_warning(tiny_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="autoprune_ray.llm"):
        backend = make_backend("transformers", grammar="root ::= oops", model=str(tiny_model_dir), device="cpu")
        out = backend.generate(["the cat"], max_new_tokens=4, seed=0)
        assert checked_grammar('root ::= "unclosed') is None
    assert len(out) == 1 and backend._grammar is None
    assert sum("does not compile" in r.getMessage() for r in caplog.records) == 2


def test_scripted_backend_ignores_the_grammar(grammars):
    backend = make_backend("scripted", grammar=grammars["prune"].ebnf, completions=["prose"])
    assert backend.generate(["p"])[0].text == "prose"


# ---------------------------------------------------------------- vLLM and OpenAI-compatible requests

class Recorded:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def fake_vllm(monkeypatch, **classes):
    module = types.ModuleType("vllm.sampling_params")
    for name, cls in classes.items():
        setattr(module, name, cls)
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", module)


def test_vllm_sampling_params_carry_the_grammar_as_documented(monkeypatch):
    fake_vllm(monkeypatch, StructuredOutputsParams=type("StructuredOutputsParams", (Recorded,), {}))
    params = vllm_sampling_params(Recorded, "root ::= \"x\"", n=2, temperature=0.5, max_tokens=8, seed=None)
    constraint = params.kwargs.pop("structured_outputs")
    assert constraint.kwargs == {"grammar": "root ::= \"x\""}
    assert params.kwargs == {"n": 2, "temperature": 0.5, "max_tokens": 8, "seed": None}
    assert "structured_outputs" not in vllm_sampling_params(Recorded, None, n=1).kwargs
    fake_vllm(monkeypatch, GuidedDecodingParams=type("GuidedDecodingParams", (Recorded,), {}))   # vLLM < 0.12
    assert vllm_sampling_params(Recorded, "g", n=1).kwargs["guided_decoding"].kwargs == {"grammar": "g"}


class GrammarServer:
    """A local chat endpoint that records requests; `refuse` answers 400 to a structured_outputs field."""

    def __init__(self, refuse: bool):
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                status, reply = 200, {"choices": [{"index": 0, "message": {"content": "ok"}}]}
                if refuse and "structured_outputs" in body:
                    status, reply = 400, {"error": "Unrecognized request argument supplied: structured_outputs"}
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.mark.parametrize("refuse", [False, True])
def test_openai_backend_sends_the_grammar_and_falls_back_once_refused(refuse, grammars, caplog):
    server = GrammarServer(refuse)
    try:
        backend = make_backend("openai", grammar=grammars["prune"].ebnf, base_url=server.url, model="m")
        with caplog.at_level(logging.WARNING, logger="autoprune_ray.llm"):
            texts = [c.text for c in backend.generate(["p0", "p1"])]
    finally:
        server.httpd.shutdown()
    assert texts == ["ok", "ok"]
    assert server.requests[0]["structured_outputs"] == {"grammar": grammars["prune"].ebnf}
    if refuse:   # asked once with the field, then without it: one warning
        assert ["structured_outputs" in body for body in server.requests] == [True, False, False]
        assert sum("refuses the grammar" in r.getMessage() for r in caplog.records) == 1
    else:
        assert all("structured_outputs" in body for body in server.requests) and not caplog.records


def test_openai_backend_errors_other_than_the_grammar_still_raise():
    backend = OpenAIBackend("http://127.0.0.1:9/v1", model="m", timeout=2)
    backend.set_grammar('root ::= "x"')
    with pytest.raises(RuntimeError, match="unreachable"):
        backend.generate(["p"])


# ---------------------------------------------------------------- configuration

def test_policy_grammar_is_a_validated_switch():
    assert RunConfig().policy.grammar is True
    with pytest.raises(ConfigError, match="policy.grammar"):
        from_dict(RunConfig, {"policy": {"grammar": "yes"}})
    cfg = RunConfig()
    cfg.policy.grammar = 1
    with pytest.raises(ConfigError, match="policy.grammar"):
        cfg.validate()
