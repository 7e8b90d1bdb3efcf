"""Hostile programs are rejected cleanly, nothing in them runs, and random text never crashes
the parser: it returns a candidate or raises CandidateError, nothing else."""
import builtins
import os
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoprune_ray.kernels.expr import to_string
from autoprune_ray.operators.language import CandidateError, parse
from autoprune_ray.operators.seeds import SCORE_SEEDS
from hostile_programs import SENTINEL, TOLERATED, hostile_programs

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
        if time.perf_counter() - start > 0.5:
            slow.append(program[:60])
    assert not slow, f"parsing took over 0.5 s: {slow}"


@pytest.mark.parametrize("program,expected", TOLERATED)
def test_harmless_oddities_parse(program, expected, nothing_may_run):
    assert to_string(parse(program).tree) == expected


def parse_or_reject(text: str) -> None:
    try:
        parse(text)
    except CandidateError:
        pass


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=600))
def test_random_text_never_crashes_the_parser(text):
    parse_or_reject(text)
    parse_or_reject("def score(W, A):\n    return " + text)


_ALPHABET = "WAGdMVH()[]{}.,:;=+-*/%@<>!~^&|'\"#\\\n\t 0123456789eE_abcdefghijklmnopqrstuvwxyz"


@settings(max_examples=400, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(sorted(SCORE_SEEDS)), edits=st.lists(
    st.tuples(st.integers(0, 10**4), st.sampled_from(["insert", "delete", "replace"]), st.sampled_from(_ALPHABET)),
    min_size=1, max_size=8))
def test_mutated_seed_programs_never_crash_the_parser(seed, edits):
    text = SCORE_SEEDS[seed][0]
    for position, kind, char in edits:
        i = position % (len(text) + 1)
        text = {"insert": text[:i] + char + text[i:], "delete": text[:i] + text[i + 1:],
                "replace": text[:i] + char + text[i + 1:]}[kind]
    parse_or_reject(text)
