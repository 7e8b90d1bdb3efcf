"""Each task plug-in (mpq, allocate, joint) through the whole engine on a real local Ray, with a
tiny target model and a scripted policy: the engine never names a task, so each one is run."""
import pytest

ray = pytest.importorskip("ray")

from autoprune_ray.engine.storage import RunStore  # noqa: E402
from tests_support import make_config, run_task_search  # noqa: E402

MPQ_COMPLETIONS = [
    "```python\ndef sensitivity(E, A):\n    return (E.abs() * A).sum()\n```",
    "```python\ndef sensitivity(E, H):\n    return E ** 2 * H\n```",                      # rejected: not reduced
    "```python\ndef sensitivity(E, b):\n    return (E ** 2).mean() * b\n```",
    "```python\ndef sensitivity(E, H, d):\n    return (E ** 2 * H).sum() * (1 + d)\n```",
]


def test_mpq_search_records_bits_rank_correlation_and_reports(local_ray, tmp_path, tiny_model_dir, corpus_file):
    """Task mpq through the same engine: seeds, LLM and symbolic proxies; every evaluation records
    the allocation's average bits (within the budget) and its rank correlation; the report puts the
    best proxy beside uniform, HAWQ and APTQ-style allocation at the same budget."""
    from autoprune_ray.compress.protocol import Protocol
    from autoprune_ray.engine.config import QuantSettings
    from autoprune_ray.engine.outcome import run_outcome
    from autoprune_ray.engine.report import write_report

    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, name="q", max_evaluations=7)
    cfg.quant = QuantSettings(avg_bits=4.5, group_size=16, measure_layers=4, measure_tokens=128)
    cands, evals = run_task_search(cfg, "mpq", MPQ_COMPLETIONS)
    assert set(cands[cands.operator == "seed"].code.str.slice(0, 15)) == {"def sensitivity"}
    assert cands[cands.status == "rejected"].reason.str.contains("one number per layer").any()
    ok = evals[evals.status == "ok"]
    assert len(ok) >= 4 and (ok.avg_bits <= 4.5).all()
    # the seeds' sensitivities fall with more bits, so they spend the budget beyond all-2-bit (4.0);
    # an evolved proxy may not (a symbolic child whose sensitivity grows with b gets all 2 bits)
    seeds = ok.candidate_id.isin(cands[cands.operator == "seed"].candidate_id)
    assert seeds.any() and (ok[seeds].avg_bits > 4.0).all()
    # a proxy that ranks every layer alike has no rank correlation (NaN); the seeds rank them
    assert ok.spearman.dropna().between(-1, 1).all() and ok.kendall.dropna().between(-1, 1).all()
    assert ok[seeds].spearman.notna().all()
    # a budget, not a sparsity: no pruning level in the table, the closing table or its commands
    assert (ok.levels.fillna("") == "").all()
    outcome = run_outcome(cfg.resolved_run_dir)
    assert not any("@" in column for column in outcome["columns"])
    assert all("--sparsity" not in command for command, _ in outcome["next"])
    proto = Protocol(calib_data=str(corpus_file), nsamples=4, seqlen=32, eval_tokens=128)
    text = write_report(cfg.resolved_run_dir, proto).read_text()
    for label in ("| best program |", "| uniform |", "| hawq |", "| aptq |"):
        assert label in text
    assert "Rank correlation of the best proxy" in text and "avg_bits" in text


ALLOCATE_COMPLETIONS = [
    "```python\ndef allocate(depth, outlier):\n    return depth - 2 * outlier\n```",
    "```python\ndef allocate(kurt):\n    return -kurt\n```",
    "```python\ndef allocate(W):\n    return W\n```",                                   # rejected: no such input
    "```python\ndef allocate(skew, size):\n    return skew * size\n```",
]


def test_allocate_search_runs_through_its_plugin(local_ray, tmp_path, tiny_model_dir, corpus_file):
    """Task allocate end to end: a fixed metric (Wanda), the program choosing block sparsities.
    Every evaluation keeps the target on average; the best program's search-time perplexity is
    what pruning a fresh model with the same allocation through prune_model gives."""
    from autoprune_ray.compress.data import load_token_data
    from autoprune_ray.compress.eval import perplexity
    from autoprune_ray.compress.models import load_model
    from autoprune_ray.compress.prune import prune_model
    from autoprune_ray.tasks import get_task

    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, name="a", max_evaluations=6)
    cands, evals = run_task_search(cfg, "allocate", ALLOCATE_COMPLETIONS)
    assert set(cands[cands.operator == "seed"].code.str.slice(0, 12)) == {"def allocate"}
    assert cands[cands.status == "rejected"].reason.str.contains("unknown parameter `W`").any()
    ok = evals[evals.status == "ok"].merge(cands[["candidate_id", "code"]], on="candidate_id")
    assert len(ok) >= 4 and ok.sparsity.between(0.49, 0.51).all()
    best = ok.loc[ok.perplexity.idxmin()]
    plugin = get_task("allocate")
    prune_cfg = plugin.compression_config(parse_allocation(best.code), cfg)
    prune_cfg.mode = "one-pass"
    lm = load_model(str(tiny_model_dir), device="cpu")
    data = load_token_data(lm.tokenizer, str(corpus_file), None, 4, 32, 0, val_tokens=128, heldout=False)
    prune_model(lm, data, prune_cfg)
    assert perplexity(lm, data.validation, data.seqlen, progress=False) == pytest.approx(best.perplexity, rel=1e-5)


JOINT_COMPLETIONS = [
    "```python\ndef score(W, A):\n    return W.abs() * A.sqrt()\n\ndef allocate(depth, sens):\n    return depth + sens\n```",
    "```python\ndef score(W, A):\n    return W.abs() ** 2 * A\n\ndef allocate(alpha):\n    return -alpha\n```",
    "```python\ndef score(W, A):\n    return W.abs() * A\n```",                       # rejected: no allocation
    "```python\ndef score(W):\n    return W.abs()\n\ndef allocate(is_down, outlier):\n    return is_down - outlier\n```",
]


def test_joint_search_at_two_levels_with_kl_fitness_and_promotion(local_ray, tmp_path, tiny_model_dir,
                                                                   corpus_file):
    """Task joint end to end: metric + allocation programs measured by KL to the dense model at
    two sparsities; when the search stops, the two fittest are measured again by perplexity under
    two calibration seeds, and the best is the promoted one."""
    from autoprune_ray.engine.report import best_row, status

    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, name="j", max_evaluations=12)
    cfg.target.sparsities = [0.3, 0.5]
    cfg.fitness.measure, cfg.fitness.tokens, cfg.fitness.promote = "kl", 64, 2
    cands, evals = run_task_search(cfg, "joint", JOINT_COMPLETIONS)
    assert cands[cands.status == "rejected"].reason.str.contains("`allocate` function is missing").any()
    ok = evals[evals.status == "ok"]
    assert len(ok) >= 4 and ok.kl.notna().all() and ok.perplexity.isna().all()
    assert ok.sparsity.between(0.39, 0.41).all(), "the mean of the two levels' achieved sparsity"
    assert ok.levels.str.match(r"^0\.3:[0-9.e-]+,0\.5:[0-9.e-]+$").all()
    promotions = RunStore(cfg.resolved_run_dir).read("promotions")
    fittest = ok.sort_values("fitness", ascending=False).drop_duplicates("hash").candidate_id.head(2)
    assert sorted(zip(promotions.candidate_id, promotions.seed)) == sorted((c, s) for c in fittest for s in (0, 1))
    assert (promotions.status == "ok").all() and promotions.perplexity.gt(1).all()
    means = promotions.groupby("candidate_id").fitness.mean()
    best = status(cfg.resolved_run_dir)["best"]
    assert best["promoted"] and best["candidate_id"] == int(means.idxmax())
    assert best_row(cands, evals).candidate_id == ok.loc[ok.fitness.idxmax()].candidate_id   # without promotions


def parse_allocation(code: str):
    from autoprune_ray.operators.language import parse
    return parse(code, "allocate")
