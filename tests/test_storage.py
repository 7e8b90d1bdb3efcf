"""Run tables: every part has the table's schema, so pandas reads a table directory directly; no
part is ever overwritten; one driver at a time writes a run; an unreadable part is set aside, not
fatal; opening a directory creates nothing in it."""
import logging
import os
import signal
import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import autoprune_ray.engine.storage as storage
from autoprune_ray.engine.storage import RunStore


def candidate(cid, duplicate_of=None, prompt_id=None):
    return {"candidate_id": cid, "hash": f"h{cid}", "status": "accepted", "reason": "", "code": "W",
            "source": "def score(W): return W", "operator": "seed", "island": 0, "parents": [],
            "prompt_id": prompt_id, "adapter": None, "duplicate_of": duplicate_of, "granularity": "row",
            "created": 0.5}


def evaluation(cid):
    return {"candidate_id": cid, "hash": f"h{cid}", "status": "ok", "perplexity": 10.0 + cid}


def write_parts(store, table, rows):
    """One part per row."""
    for row in rows:
        store.append(table, row)
        store.flush()


def ids(store, table="candidates"):
    return sorted(store.read(table).candidate_id.tolist())


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


# -- no part is ever overwritten ---------------------------------------------------------------
def test_after_a_gap_the_next_part_overwrites_nothing(tmp_path):
    write_parts(RunStore(tmp_path), "candidates", [candidate(i) for i in range(3)])
    (tmp_path / "tables" / "candidates" / "part-000002.parquet").unlink()   # a gap: parts 1 and 3 remain
    store = RunStore(tmp_path)                                               # e.g. a resumed driver
    write_parts(store, "candidates", [candidate(3)])
    assert ids(store) == [0, 2, 3]                                           # part 3's row survived
    assert [p.name for p in store.parts("candidates")] == ["part-000001.parquet", "part-000003.parquet",
                                                          "part-000004.parquet"]


def test_two_stores_on_one_run_never_overwrite_each_others_parts(tmp_path):
    first, second = RunStore(tmp_path), RunStore(tmp_path)   # both opened before either wrote
    write_parts(first, "candidates", [candidate(0)])
    write_parts(second, "candidates", [candidate(1)])
    write_parts(first, "candidates", [candidate(2)])
    assert ids(RunStore(tmp_path)) == [0, 1, 2]


def test_a_new_file_never_replaces_an_existing_one(tmp_path):
    path = tmp_path / "part-000001.parquet"
    assert storage.write_new_file(path, b"first")
    assert not storage.write_new_file(path, b"second")
    assert path.read_bytes() == b"first" and os.listdir(tmp_path) == [path.name]   # no temporary file left


# -- one driver per run --------------------------------------------------------------------------
def test_a_second_driver_is_refused_with_the_holder_and_what_to_do(tmp_path):
    first = RunStore(tmp_path)
    first.lock()
    with pytest.raises(storage.RunLocked) as refused:
        RunStore(tmp_path).lock()
    message = str(refused.value)
    assert f"pid {os.getpid()}" in message and "host" in message and "--resume" in message
    assert refused.value.holder["pid"] == os.getpid()
    first.unlock()
    with RunStore(tmp_path).lock() as again:     # released: the next driver takes it, as a context manager
        assert again.held
    assert not again.held


LOCK_AND_WAIT = """
import sys, time
from autoprune_ray.engine.storage import RunStore
RunStore(sys.argv[1]).lock()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_killed_drivers_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    driver = subprocess.Popen([sys.executable, "-c", LOCK_AND_WAIT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout.readline().strip() == "locked"
        with pytest.raises(storage.RunLocked, match=f"pid {driver.pid} "):
            RunStore(tmp_path).lock()
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    with caplog.at_level(logging.WARNING, logger=storage.__name__):
        lock = RunStore(tmp_path).lock()
    assert lock.held
    assert f"pid {driver.pid} " in caplog.text and "without releasing" in caplog.text
    lock.release()


# -- unreadable parts ------------------------------------------------------------------------------
def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_a_truncated_part_is_set_aside_and_the_rest_is_read(tmp_path, caplog):
    write_parts(RunStore(tmp_path), "candidates", [candidate(i) for i in range(3)])
    table_dir = tmp_path / "tables" / "candidates"
    truncate(table_dir / "part-000002.parquet")
    store = RunStore(tmp_path)
    with caplog.at_level(logging.WARNING, logger=storage.__name__):
        assert ids(store) == [0, 2]
    moved = table_dir / "_corrupt" / "part-000002.parquet"
    assert store.quarantined == [moved] and moved.exists() and "unreadable" in caplog.text
    assert store.corrupt_parts() == [moved]
    assert sorted(pd.read_parquet(table_dir).candidate_id) == [0, 2]      # pandas skips _corrupt/
    write_parts(store, "candidates", [candidate(3)])                      # its number is not reused
    assert (table_dir / "part-000004.parquet").exists() and ids(RunStore(tmp_path)) == [0, 2, 3]
    assert RunStore(tmp_path).corrupt_parts() == [moved]                  # a later session still sees it


def test_an_empty_part_and_a_part_that_does_not_fit_the_schema_are_set_aside(tmp_path):
    store = RunStore(tmp_path)
    write_parts(store, "evaluations", [evaluation(0)])
    parts = tmp_path / "tables" / "evaluations"
    (parts / "part-000002.parquet").write_bytes(b"")
    pq.write_table(pa.table({"candidate_id": ["not a number"]}), parts / "part-000003.parquet")
    assert ids(store, "evaluations") == [0]
    assert [p.name for p in store.quarantined] == ["part-000002.parquet", "part-000003.parquet"]


def test_a_read_only_store_skips_an_unreadable_part_where_it_is(tmp_path):
    writer = RunStore(tmp_path)
    writer.write_config({"name": "r"})
    write_parts(writer, "candidates", [candidate(0), candidate(1)])
    part = tmp_path / "tables" / "candidates" / "part-000001.parquet"
    truncate(part)
    reader = RunStore.open_existing(tmp_path)
    assert ids(reader) == [1] and ids(reader) == [1]
    assert reader.quarantined == [part] and reader.corrupt_parts() == [part] and part.exists()
    for write in (reader.flush, reader.lock, lambda: reader.write_config({}),
                  lambda: reader.append("candidates", candidate(2))):
        with pytest.raises(PermissionError, match="read-only"):
            write()


def test_evaluations_whose_candidates_were_lost_are_split_off(tmp_path):
    store = RunStore(tmp_path)
    write_parts(store, "candidates", [candidate(0), candidate(1)])
    write_parts(store, "evaluations", [evaluation(0), evaluation(1)])
    truncate(tmp_path / "tables" / "candidates" / "part-000002.parquet")
    cands, evals = store.read("candidates"), store.read("evaluations")
    kept, orphans = storage.split_orphan_evaluations(cands, evals)
    assert kept.candidate_id.tolist() == [0] and orphans.candidate_id.tolist() == [1]


# -- opening creates nothing -------------------------------------------------------------------------
def test_opening_and_reading_a_directory_creates_nothing_in_it(tmp_path):
    store = RunStore(tmp_path)
    for table in storage.TABLES:
        assert store.read(table).empty
    assert store.load_checkpoint() is None and os.listdir(tmp_path) == []
    assert store.corrupt_parts() == [] and os.listdir(tmp_path) == []
    store.write_config({"name": "x"})                       # the first write makes what it needs
    assert os.listdir(tmp_path) == ["config.yaml"]
    RunStore(tmp_path / "elsewhere").read("candidates")
    assert not (tmp_path / "elsewhere").exists()


def test_opening_a_directory_that_is_not_a_run_fails_clearly_and_touches_nothing(tmp_path):
    with pytest.raises(storage.NotARun) as refused:
        RunStore.open_existing(tmp_path)
    assert str(refused.value) == f"{tmp_path} is not a run directory (no config.yaml)"
    assert isinstance(refused.value, FileNotFoundError) and os.listdir(tmp_path) == []
