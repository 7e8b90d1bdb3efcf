"""Fuzz the candidate language's boundary at scale: the strategies of tests/test_language_fuzz.py
(programs from random Python ASTs, random text and bytes, mutated seeds and hostile programs),
run through hypothesis far beyond CI's sample.

    python benchmarks/fuzz_language.py                         # 110,000 cases, ~10 min on 2 cores
    python benchmarks/fuzz_language.py --ast 1000 --text 1000 --mutation 1000

Every case must end `accepted` (a Candidate that evaluates on small random inputs and whose
printed form parses back to it) or `rejected` (a CandidateError the parser explained). Anything
else is counted by kind and a few examples are kept: `crash` (an exception other than
CandidateError escaped parse), `guarded` (parse's boundary turned an unexplained exception into
a generic rejection), `evaluation` and `round trip`. Writes benchmarks/results/fuzz-language.json.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import click
import hypothesis
from hypothesis import HealthCheck, Phase, given, settings

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))   # the strategies live with the tests that sample them

from test_language_fuzz import STRATEGIES, classify  # noqa: E402

RESULTS = HERE / "results"
KEPT_EXAMPLES = 5


def fuzz(strategy, cases: int) -> dict:
    """Run `cases` generated cases through `classify`; outcome counts and failing examples."""
    outcomes, examples = Counter(), {}

    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(case):
        outcome = classify(*case)
        outcomes[outcome] += 1
        if outcome not in ("accepted", "rejected") and len(examples.setdefault(outcome, [])) < KEPT_EXAMPLES:
            examples[outcome].append(repr(case)[:400])

    start = time.perf_counter()
    run()
    return {"cases": sum(outcomes.values()), "outcomes": dict(outcomes), "failing_examples": examples,
            "seconds": round(time.perf_counter() - start, 1)}


def _count(by_strategy: dict, prefix: str) -> int:
    return sum(n for result in by_strategy.values() for outcome, n in result["outcomes"].items()
               if outcome.startswith(prefix))


@click.command()
@click.option("--ast", "ast_cases", default=40_000, help="programs built from random Python ASTs")
@click.option("--text", "text_cases", default=30_000, help="random text and bytes")
@click.option("--mutation", "mutation_cases", default=40_000, help="mutated seeds and hostile programs")
def main(ast_cases: int, text_cases: int, mutation_cases: int) -> None:
    start = time.perf_counter()
    by_strategy = {}
    for name, cases in (("ast", ast_cases), ("text", text_cases), ("mutation", mutation_cases)):
        by_strategy[name] = fuzz(STRATEGIES[name], cases)
        click.echo(f"{name}: {json.dumps(by_strategy[name])}")
    result = {
        "cases": sum(r["cases"] for r in by_strategy.values()),
        "non_candidate_errors": _count(by_strategy, "crash"),
        "guarded_internal_errors": _count(by_strategy, "guarded"),
        "evaluation_errors": _count(by_strategy, "evaluation"),
        "round_trip_errors": _count(by_strategy, "round trip"),
        "accepted": _count(by_strategy, "accepted"),
        "by_strategy": by_strategy,
        "seconds": round(time.perf_counter() - start, 1),
        "hypothesis": hypothesis.__version__, "python": platform.python_version(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fuzz-language.json").write_text(json.dumps(result, indent=2) + "\n")
    click.echo(json.dumps({k: v for k, v in result.items() if k != "by_strategy"}, indent=2))


if __name__ == "__main__":
    main()
