"""The run directory: resolved config, append-only Parquet tables, checkpoints.

    RUN_DIR/config.yaml            the resolved configuration
    RUN_DIR/tables/<table>/part-*.parquet   candidates, evaluations, lineage, prompts,
                                            preferences, adapters, strategies (DPO)
    RUN_DIR/adapters/v<k>/         LoRA adapters trained by DPO rounds
    RUN_DIR/checkpoint.json        counters; the population itself is replayed from the tables

Every file is written to a temporary name and renamed, so a crash mid-write never leaves a
corrupt table or checkpoint; `pandas.read_parquet(RUN_DIR/tables/candidates)` reads a table.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

_STR, _INT, _FLOAT = pa.string(), pa.int64(), pa.float64()
# Fixed schemas: every part file of a table has the same column types (a part whose column is all
# None would otherwise be typed null and break reading the table as one dataset).
SCHEMAS = {
    "candidates": pa.schema([("candidate_id", _INT), ("hash", _STR), ("status", _STR), ("reason", _STR),
                             ("code", _STR), ("source", _STR), ("operator", _STR), ("island", _INT),
                             ("parents", pa.list_(_INT)), ("prompt_id", _INT), ("adapter", _STR),
                             ("duplicate_of", _INT), ("granularity", _STR), ("created", _FLOAT),
                             ("strategy", _STR)]),
    "evaluations": pa.schema([("candidate_id", _INT), ("hash", _STR), ("status", _STR), ("proxy", _FLOAT),
                              ("perplexity", _FLOAT), ("fitness", _FLOAT), ("sparsity", _FLOAT),
                              ("seconds", _FLOAT), ("worker", _INT), ("reason", _STR), ("attempts", _INT),
                              ("finished", _FLOAT), ("node", _STR),
                              # task mpq: the allocation's average bits, rank correlation with measured
                              ("avg_bits", _FLOAT), ("spearman", _FLOAT), ("kendall", _FLOAT)]),
    "lineage": pa.schema([("child_id", _INT), ("parent_id", _INT), ("operator", _STR)]),
    "prompts": pa.schema([("prompt_id", _INT), ("operator", _STR), ("island", _INT), ("prompt", _STR),
                          ("completion", _STR), ("tokens", _INT), ("seconds", _FLOAT), ("adapter", _STR),
                          ("strategy", _STR)]),
    # DPO: every preference pair once, as it was logged (llm/preferences.py has the columns' meaning)
    "preferences": pa.schema([("prompt_id", _INT), ("prompt", _STR), ("chosen", _STR), ("rejected", _STR),
                              ("chosen_fitness", _FLOAT), ("rejected_fitness", _FLOAT), ("gap", _FLOAT),
                              ("kind", _STR), ("grouping", _STR), ("operator", _STR), ("island", _INT),
                              ("chosen_adapter", _STR), ("rejected_adapter", _STR), ("chosen_strategy", _STR),
                              ("rejected_strategy", _STR), ("chosen_id", _INT), ("rejected_id", _INT),
                              ("time", _FLOAT)]),
    # one row per DPO round: the adapter it wrote and its training metrics
    "adapters": pa.schema([("version", _STR), ("path", _STR), ("round", _INT), ("status", _STR), ("reason", _STR),
                           ("pairs_total", _INT), ("train_pairs", _INT), ("heldout_pairs", _INT),
                           ("train_loss", _FLOAT), ("train_accuracy", _FLOAT), ("heldout_loss", _FLOAT),
                           ("heldout_accuracy", _FLOAT), ("heldout_margin", _FLOAT), ("started", _FLOAT),
                           ("finished", _FLOAT)]),
    # the prompt-strategy controller after each change
    "strategies": pa.schema([("time", _FLOAT), ("evaluated", _INT), ("comparisons", _INT), ("strategy", _STR),
                             ("strength", _FLOAT), ("probability", _FLOAT)]),
}
TABLES = tuple(SCHEMAS)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class RunStore:
    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)
        self.buffers: dict[str, list[dict]] = {t: [] for t in TABLES}
        for table in TABLES:
            (self.root / "tables" / table).mkdir(parents=True, exist_ok=True)
        self._part = {t: len(list((self.root / "tables" / t).glob("part-*.parquet"))) for t in TABLES}

    # -- config and checkpoint -----------------------------------------------------
    def write_config(self, config: dict) -> None:
        atomic_write_bytes(self.root / "config.yaml", yaml.safe_dump(config, sort_keys=False).encode())

    def read_config(self) -> dict:
        return yaml.safe_load((self.root / "config.yaml").read_text())

    def save_checkpoint(self, state: dict) -> None:
        self.flush()   # tables first: a checkpoint never refers to rows that are not on disk
        atomic_write_bytes(self.root / "checkpoint.json", json.dumps(state, indent=1).encode())

    def load_checkpoint(self) -> dict | None:
        path = self.root / "checkpoint.json"
        return json.loads(path.read_text()) if path.exists() else None

    # -- tables ----------------------------------------------------------------------
    def append(self, table: str, row: dict) -> None:
        unknown = set(row) - set(SCHEMAS[table].names)
        if unknown:   # caught at once, not at the next flush
            raise KeyError(f"table {table} has no column(s) {sorted(unknown)}")
        self.buffers[table].append(row)

    def flush(self) -> None:
        for table, rows in self.buffers.items():
            if not rows:
                continue
            self._part[table] += 1
            path = self.root / "tables" / table / f"part-{self._part[table]:06d}.parquet"
            sink = pa.BufferOutputStream()
            pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMAS[table]), sink)
            atomic_write_bytes(path, sink.getvalue().to_pybytes())
            rows.clear()

    def read(self, table: str) -> pd.DataFrame:
        """Written parts plus rows not yet flushed, with the table's schema even when empty."""
        parts = sorted((self.root / "tables" / table).glob("part-*.parquet"))
        tables = [pq.read_table(p) for p in parts]
        if self.buffers[table]:
            tables.append(pa.Table.from_pylist(self.buffers[table], schema=SCHEMAS[table]))
        tables = [_conform(t, SCHEMAS[table]) for t in tables]
        return pa.concat_tables(tables or [SCHEMAS[table].empty_table()]).to_pandas()


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """A part written by an older version: missing columns read as nulls, types as the schema's."""
    if t.schema == schema:
        return t
    for name in schema.names:
        if name not in t.column_names:
            t = t.append_column(name, pa.nulls(len(t), schema.field(name).type))
    return t.select(schema.names).cast(schema)
