"""Several evaluators read one copy of the calibration statistics from Ray's object store, and
score a candidate exactly as an evaluator that computed its own statistics does."""
import pytest

ray = pytest.importorskip("ray")

from autoprune_ray.engine.actors import ActorPool  # noqa: E402
from autoprune_ray.engine.evaluator import EvaluatorWorker  # noqa: E402
from tests_support import make_config  # noqa: E402

JOB = {"candidate_id": 0, "hash": "h", "code": "def score(W, A):\n    return abs(W) * A\n",
       "granularity": "row", "proxy_cutoff": None}


def test_evaluators_share_the_statistics_and_score_as_one_alone(local_ray, tmp_path, tiny_model_dir, corpus_file):
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, name="shared")
    assert cfg.evaluators.num == 2
    pool = ActorPool(cfg)
    try:
        pings = ray.get([actor.ping.remote() for actor in pool.evaluators])
        assert [p["shared_stats"] for p in pings] == [True, True]
        from_pool = ray.get([actor.evaluate.remote(JOB) for actor in pool.evaluators])
    finally:
        pool.kill()
    alone = EvaluatorWorker(cfg)
    assert alone.ping()["shared_stats"] is False
    expected = alone.evaluate(JOB)
    assert expected["status"] == "ok"
    for out in from_pool:
        assert out["status"] == "ok"
        assert out["proxy"] == pytest.approx(expected["proxy"], rel=1e-6)
        assert out["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
