"""Run tables: every part has the table's schema, so pandas reads a table directory directly."""
import pandas as pd
import pytest

from autoprune_ray.engine.storage import RunStore


def candidate(cid, duplicate_of=None, prompt_id=None):
    return {"candidate_id": cid, "hash": f"h{cid}", "status": "accepted", "reason": "", "code": "W",
            "source": "def score(W): return W", "operator": "seed", "island": 0, "parents": [],
            "prompt_id": prompt_id, "adapter": None, "duplicate_of": duplicate_of, "granularity": "row",
            "created": 0.5}


def test_parts_with_all_none_columns_read_as_one_table(tmp_path):
    store = RunStore(tmp_path)
    store.append("candidates", candidate(0))                       # duplicate_of all None in part 1
    store.flush()
    store.append("candidates", candidate(1, duplicate_of=0, prompt_id=3))
    store.flush()
    direct = pd.read_parquet(tmp_path / "tables" / "candidates")
    assert direct.sort_values("candidate_id").duplicate_of.tolist()[1] == 0
    assert store.read("candidates").candidate_id.tolist() == [0, 1]


def test_empty_table_has_its_columns_and_unknown_columns_fail_at_once(tmp_path):
    store = RunStore(tmp_path)
    assert "perplexity" in store.read("evaluations").columns and store.read("evaluations").empty
    with pytest.raises(KeyError, match="no column"):
        store.append("evaluations", {"candidate_id": 0, "perplexty": 1.0})


def test_unflushed_rows_are_read_with_the_written_ones(tmp_path):
    store = RunStore(tmp_path)
    store.append("lineage", {"child_id": 1, "parent_id": 0, "operator": "llm_mutate"})
    store.flush()
    store.append("lineage", {"child_id": 2, "parent_id": 1, "operator": "gcot"})
    assert store.read("lineage").child_id.tolist() == [1, 2]
