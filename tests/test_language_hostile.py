"""Hostile programs are rejected cleanly with a reason, and nothing in them runs. (Random text and
mutated programs are fuzzed in test_language_fuzz.py.)"""
import builtins
import os
import time
from collections import Counter

import pytest

from autoprune_ray.tree.expr import to_string
from autoprune_ray.operators.language import CandidateError, parse
from hostile_programs import SENTINEL, TOLERATED, hostile_programs
from tests_support import scaled

CORPUS = hostile_programs()


@pytest.fixture
def nothing_may_run(monkeypatch):
    """exec/eval raise if called; the sentinel file must not appear."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the parser executed code")
    monkeypatch.setattr(builtins, "exec", forbidden)
    monkeypatch.setattr(builtins, "eval", forbidden)
    if os.path.exists(SENTINEL):
        os.remove(SENTINEL)
    yield
    assert not os.path.exists(SENTINEL)


def test_corpus_is_large_and_covers_every_category():
    counts = Counter(category for category, _ in CORPUS)
    assert len(CORPUS) >= 400
    assert set(counts) == {"escape", "dunder", "form", "limit", "text"} and min(counts.values()) >= 30


def test_every_hostile_program_is_rejected_with_a_reason(nothing_may_run):
    slow = []
    for category, program in CORPUS:
        start = time.perf_counter()
        with pytest.raises(CandidateError) as info:
            parse(program)
        assert str(info.value).strip(), f"empty reason for {program[:80]!r}"
        if time.perf_counter() - start > scaled(0.5):   # stretched on a busy machine
            slow.append(program[:60])
    assert not slow, f"parsing took over 0.5 s: {slow}"


@pytest.mark.parametrize("program,expected", TOLERATED)
def test_harmless_oddities_parse(program, expected, nothing_may_run):
    assert to_string(parse(program).tree) == expected


# -- holes a review with hostile LLM text found: each case failed before its fix --------------

HUGE = "9" * 400


@pytest.mark.parametrize("program,reason", [
    (f"def score(W):\n    return W * {HUGE}\n", "too large"),                 # was OverflowError
    (f"def score(W):\n    return W ** {HUGE}\n", "too large"),
    (f"def score(W):\n    return W * W.sum(dim={HUGE})\n", "too large"),
    ("def score(W):\n    return W * torch.clamp(2.0, None, None)\n", "no bound"),  # was RuntimeError when folded
    ("def score(W):\n    return torch.clamp(W, None, None)\n", "no bound"),      # was accepted, failed later
    ("def score(W):\n    return W.clip(min=None)\n", "no bound"),
    ("def score(W):\n    return W.clamp(0, min=1)\n", "clamp(x, min=a, max=b)"),  # a bound given twice
    ("def score(W):\n    return W * 0.0 ** -4\n", "not a finite number"),       # folds to inf
    ("def score(W):\n    return W + (0.0 ** -4 - 0.0 ** -4)\n", "not a finite number"),
    ("def score(W):\n    return W.norm(1, dim=0) * W\n", "L2 norm"),            # norm's first argument is p
    ("def score(W):\n    x: open('/tmp/x') = W\n    return x\n", "annotations"),
    ("def score(W) -> W.__class__:\n    return W\n", "annotations"),
    ("def score(W: 'os.system(1)'):\n    return W\n", "annotations"),
    ("@torch.jit.script\ndef score(W):\n    return W.abs()\n", "decorators"),
    ("def helper(W):\n    return W.abs()\n\ndef score(W, A):\n    return helper(W) * A\n", "Helper functions"),
])
def test_review_cases_are_rejected_with_a_reason(program, reason, nothing_may_run):
    with pytest.raises(CandidateError) as info:
        parse(program)
    assert reason in str(info.value) and info.value.__cause__ is None


def test_an_unexpected_exception_while_parsing_becomes_a_candidate_error(monkeypatch):
    from autoprune_ray.operators import language

    def broken(_tree):
        raise ZeroDivisionError("a bug, not the text's fault")
    monkeypatch.setattr(language, "canonicalize", broken)
    with pytest.raises(CandidateError, match="cannot be parsed: ZeroDivisionError"):
        parse("def score(W):\n    return W\n")


def test_lines_end_where_pythons_tokenizer_ends_them():
    # \x1c is a line break for str.splitlines but not for Python: here it sits inside a comment
    assert to_string(parse("def score(W, G):\n    x = W  # note\x1c    x = G\n    return x\n").tree) == "W"
    assert to_string(parse("```python\r\ndef score(W):\r\n    return W.abs()\r\n```\r\n").tree) == "abs(W)"


# -- program files: the strict form ------------------------------------------------------------

@pytest.mark.parametrize("file_text,reason", [
    ("import os\nos.system('touch {s}')\n\ndef score(W):\n    return W\n", "top-level statement `import os`"),
    ("def score(W):\n    return W\n\nprint(score)\n", "top-level statement `print(score)` (line 4)"),
    ("x = 1\ndef score(W):\n    return W\n", "top-level statement `x = 1`"),
    ("def score(W):\n    return W\n\ndef other(A):\n    return A\n", "second definition"),
    # a saved completion: the prose may stay, but its fence is the file's code and is held to the same rules
    ("Here it is:\n```python\nimport os\ndef score(W):\n    return W\n```\n", "top-level statement `import os`"),
])
def test_program_files_have_nothing_outside_the_function(file_text, reason, nothing_may_run):
    file_text = file_text.replace("{s}", SENTINEL)
    with pytest.raises(CandidateError) as info:
        parse(file_text, strict=True)
    assert reason in str(info.value)
    if "top-level" in reason:
        parse(file_text)        # the same text as an LLM completion: the statements around are ignored


def test_a_saved_completion_is_a_program_file_when_its_fence_holds_only_the_function():
    text = "Here it is:\n```python\ndef score(W, A):\n    return W.abs() * A\n```\nHope it helps."
    assert to_string(parse(text, strict=True).tree) == "mul(A,abs(W))"


def test_program_files_may_have_a_docstring_comments_and_imports():
    text = ('"""Wanda, with annotations."""\nimport torch\nfrom typing import Optional\n\n\n'
            "def score(W: torch.Tensor, A: Optional[torch.Tensor]) -> torch.Tensor:\n"
            "    # |W| times the input norm\n    return W.abs() * A\n")
    assert to_string(parse(text, strict=True).tree) == "mul(A,abs(W))"
