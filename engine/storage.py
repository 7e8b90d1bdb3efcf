"""The run directory: resolved config, append-only Parquet tables, checkpoints.

    RUN_DIR/config.yaml            the resolved configuration
    RUN_DIR/tables/<table>/part-*.parquet   candidates, evaluations, lineage, prompts,
                                            preferences, adapters, strategies (DPO)
    RUN_DIR/tables/<table>/_corrupt/        parts found unreadable, set aside (never deleted)
    RUN_DIR/adapters/v<k>/         LoRA adapters trained by DPO rounds
    RUN_DIR/checkpoint.json        counters; the population itself is replayed from the tables
    RUN_DIR/driver.lock            held by the driver writing the run (`RunStore.lock`)

Every file is written to a temporary name and renamed, so a crash mid-write never leaves a
corrupt table or checkpoint; a part is never replaced, so no rows are ever overwritten;
`pandas.read_parquet(RUN_DIR/tables/candidates)` reads a table. Nothing is created on disk
before the first write, so opening a directory (`RunStore.open_existing`) leaves it as it was.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

try:
    import fcntl
except ImportError:   # not POSIX (Windows): runs go unlocked, with a warning
    fcntl = None

log = logging.getLogger(__name__)

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
                              ("perplexity", _FLOAT), ("fitness", _FLOAT),
                              ("seconds", _FLOAT), ("worker", _INT), ("reason", _STR), ("attempts", _INT),
                              ("finished", _FLOAT), ("node", _STR), ("kl", _FLOAT),
                              ("levels", _STR)]),   # + the task plug-in's columns
    # the fittest programs re-measured when a search stops (engine/promotion.py)
    "promotions": pa.schema([("candidate_id", _INT), ("hash", _STR), ("seed", _INT), ("tokens", _INT),
                             ("status", _STR), ("perplexity", _FLOAT), ("fitness", _FLOAT), ("levels", _STR),
                             ("seconds", _FLOAT), ("reason", _STR), ("finished", _FLOAT)]),
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
                              ("time", _FLOAT), ("chosen_rank", _FLOAT)]),
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


PART_NAME = re.compile(r"part-(\d+)\.parquet")
# '_' prefix: pandas and pyarrow skip it when they read a table directory as one dataset
CORRUPT_DIR = "_corrupt"
LOCK_FILE = "driver.lock"
# libyaml when present: a config with a long scripted policy took seconds per thousand programs in
# the pure-Python emitter; the YAML is the same.
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class NotARun(FileNotFoundError):
    """A directory opened as a run holds no config.yaml."""


class RunLocked(RuntimeError):
    """Another driver holds the run's lock. `holder`: its pid, host and start time, as it wrote them."""

    def __init__(self, run_dir: Path, holder: dict):
        self.run_dir, self.holder = run_dir, holder
        pid = holder.get("pid") or "PID"
        super().__init__(f"{run_dir} is in use by another driver ({describe_holder(holder)}): let it finish, "
                         f"or stop it (`autoprune-ray stop JOB_ID` for a launched search, else kill {pid} on its "
                         f"host), then continue with --resume")


# -- files ---------------------------------------------------------------------------------
def _write_temp(path: Path, data: bytes) -> Path:
    """`data` in a temporary file next to `path`, on disk; folders are made on this first write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` whole: a crash mid-write leaves the previous file."""
    os.replace(_write_temp(path, data), path)


def write_new_file(path: Path, data: bytes) -> bool:
    """Create `path` whole, never replacing a file; False (and nothing written) when it exists."""
    tmp = _write_temp(path, data)
    try:
        os.link(tmp, path)   # atomic, and fails instead of replacing
    except FileExistsError:
        return False
    except OSError:          # a filesystem without hard links: the run lock keeps writers apart
        if path.exists():
            return False
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _part_number(path: Path) -> int:
    match = PART_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else 0


def _unused(path: Path) -> Path:
    """`path`, or the first `path.N` not taken."""
    n, candidate = 0, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


# -- the run lock ----------------------------------------------------------------------------
def describe_holder(holder: dict) -> str:
    if not holder.get("pid"):
        return "holder unknown"
    return f"pid {holder['pid']} on host {holder.get('host', '?')}, since {holder.get('since', '?')}"


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace")
    try:
        holder = json.loads(text) if text.strip() else {}
    except ValueError:
        return {"pid": None, "raw": text}
    return holder if isinstance(holder, dict) else {}


def _write_holder(fd: int) -> None:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(me).encode())
    os.fsync(fd)


class RunLock:
    """RUN_DIR/driver.lock, flock()ed for as long as the driver writes the run. The OS releases a
    flock when its process dies, however it dies, so a killed driver never leaves the run locked;
    the file's pid/host/time only serve the messages. A context manager: `with store.lock(): ...`."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        if fcntl is None:
            return self._unlocked("no fcntl on this platform")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLocked(self.path.parent, holder) from None
        except OSError as exc:   # a filesystem without locks (some network mounts)
            os.close(fd)
            return self._unlocked(exc)
        previous = _read_holder(fd)
        if previous:   # a clean release empties the file: this holder died without releasing
            log.warning("%s: taking over the lock of a driver that ended without releasing it (%s)",
                        self.path.parent, describe_holder(previous))
        _write_holder(fd)
        self._fd = fd
        return self

    def _unlocked(self, why) -> "RunLock":
        log.warning("%s is not locked against a second driver (%s)", self.path.parent, why)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)   # no holder left behind: the next driver sees a clean release
        os.close(self._fd)          # closing the descriptor releases the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# -- the store -----------------------------------------------------------------------------
class RunStore:
    """`evaluation_columns`: the run's task plug-in's columns (name -> Arrow type), appended to the
    evaluations table's common schema; by default those of the task in the run's config.yaml.
    `read_only`: every write raises; unreadable parts are skipped where they are, not moved.

    `quarantined`: the parts this store found unreadable and left out of `read`, each logged once:
    moved into tables/<table>/_corrupt/ (their new paths), or, read-only, skipped in place."""

    def __init__(self, run_dir: str | Path, evaluation_columns: dict[str, pa.DataType] | None = None,
                 read_only: bool = False):
        self.root = Path(run_dir)
        self.read_only = read_only
        self.schemas = dict(SCHEMAS)
        if evaluation_columns is None:
            evaluation_columns = _task_columns(self.root / "config.yaml")
        for name, type_ in evaluation_columns.items():
            self.schemas["evaluations"] = self.schemas["evaluations"].append(pa.field(name, type_))
        self.buffers: dict[str, list[dict]] = {t: [] for t in TABLES}
        self.quarantined: list[Path] = []
        self._lock: RunLock | None = None
        self._next: dict[str, int] = {}   # table -> the part number this store writes next

    @classmethod
    def open_existing(cls, run_dir: str | Path,
                      evaluation_columns: dict[str, pa.DataType] | None = None) -> "RunStore":
        """An existing run, read-only (status, report): NotARun when `run_dir` holds no config.yaml."""
        if not (Path(run_dir) / "config.yaml").is_file():
            raise NotARun(f"{run_dir} is not a run directory (no config.yaml)")
        return cls(run_dir, evaluation_columns, read_only=True)

    def _require_writable(self) -> None:
        if self.read_only:
            raise PermissionError(f"{self.root} was opened read-only (RunStore.open_existing)")

    # -- the driver's lock -----------------------------------------------------------
    def lock(self) -> RunLock:
        """Take the run's lock for this driver's lifetime (RunLocked when another driver holds it);
        `unlock`, the returned lock's `release`, or the driver's exit gives it back."""
        self._require_writable()
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = RunLock(self.root / LOCK_FILE).acquire()
        return self._lock

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()

    # -- config and checkpoint -----------------------------------------------------
    def write_config(self, config: dict) -> None:
        self._require_writable()
        atomic_write_bytes(self.root / "config.yaml", yaml.dump(config, Dumper=_DUMPER, sort_keys=False).encode())

    def read_config(self) -> dict:
        return yaml.load((self.root / "config.yaml").read_text(), Loader=_LOADER)

    def save_checkpoint(self, state: dict) -> None:
        self.flush()   # tables first: a checkpoint never refers to rows that are not on disk
        atomic_write_bytes(self.root / "checkpoint.json", json.dumps(state, indent=1).encode())

    def load_checkpoint(self) -> dict | None:
        path = self.root / "checkpoint.json"
        return json.loads(path.read_text()) if path.exists() else None

    # -- tables ----------------------------------------------------------------------
    def append(self, table: str, row: dict) -> None:
        self._require_writable()
        unknown = set(row) - set(self.schemas[table].names)
        if unknown:   # caught at once, not at the next flush
            raise KeyError(f"table {table} has no column(s) {sorted(unknown)}")
        self.buffers[table].append(row)

    def flush(self) -> None:
        self._require_writable()
        for table, rows in self.buffers.items():
            if rows:
                self._write_part(table, rows)
                rows.clear()

    def _write_part(self, table: str, rows: list[dict]) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=self.schemas[table]), sink)
        data = sink.getvalue().to_pybytes()
        # The directory is scanned once per table, not per part: a scan per write made a long
        # run's writes quadratic in its number of parts. A number taken meanwhile is seen by a rescan.
        number = self._next.get(table) or self._next_part(table)
        while not write_new_file(self._table_dir(table) / f"part-{number:06d}.parquet", data):
            number = self._next_part(table)
        self._next[table] = number + 1

    def _table_dir(self, table: str) -> Path:
        return self.root / "tables" / table

    def _next_part(self, table: str) -> int:
        """One past the highest part number ever used, set-aside parts included: after a gap, a
        count of the parts would name an existing part."""
        used = [*self._table_dir(table).glob("part-*.parquet"),
                *(self._table_dir(table) / CORRUPT_DIR).glob("part-*.parquet*")]
        return max((_part_number(p) for p in used), default=0) + 1

    def parts(self, table: str) -> list[Path]:
        """The table's part files, in the order they were written."""
        return sorted(self._table_dir(table).glob("part-*.parquet"), key=_part_number)

    def read(self, table: str) -> pd.DataFrame:
        """Written parts plus rows not yet flushed, with the table's schema even when empty. An
        unreadable part is left out and set aside (see `quarantined`)."""
        tables = [t for t in (self._read_part(p, table) for p in self.parts(table)) if t is not None]
        if self.buffers[table]:
            tables.append(pa.Table.from_pylist(self.buffers[table], schema=self.schemas[table]))
        return pa.concat_tables(tables or [self.schemas[table].empty_table()]).to_pandas()

    def _read_part(self, path: Path, table: str) -> pa.Table | None:
        try:
            return _conform(pq.read_table(path), self.schemas[table])
        except (pa.ArrowException, OSError) as exc:   # truncated, not Parquet, or columns of other types
            self._set_aside(path, exc)
            return None

    def _set_aside(self, path: Path, error: Exception) -> None:
        if not path.exists():
            return   # another reader of this run set it aside a moment ago
        where = path if self.read_only else self._move_to_corrupt(path)
        if where not in self.quarantined:
            self.quarantined.append(where)
            log.warning("%s is unreadable (%s): its rows are left out; %s", path, error,
                        "skipped (read-only)" if where == path else f"moved to {where}")

    def _move_to_corrupt(self, path: Path) -> Path:
        """Out of the table, kept for inspection; the part itself where it cannot be moved."""
        target = _unused(path.parent / CORRUPT_DIR / path.name)
        try:
            target.parent.mkdir(exist_ok=True)
            os.replace(path, target)
        except OSError:
            return path
        return target

    def corrupt_parts(self) -> list[Path]:
        """Every part left out as unreadable: set aside by any session (tables/*/_corrupt/), or
        skipped in place by this read-only store."""
        moved = sorted(self.root.glob(f"tables/*/{CORRUPT_DIR}/*"))
        return moved + [p for p in self.quarantined if p not in moved]


def split_orphan_evaluations(cands: pd.DataFrame, evals: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(evaluations of known candidates, orphans): an orphan's candidate row was in a part that was
    set aside. A replay skips orphans (with a warning): their code and parents are gone."""
    known = evals.candidate_id.isin(cands.candidate_id)
    return evals[known], evals[~known]


def _task_columns(config_path: Path) -> dict[str, pa.DataType]:
    """The evaluation columns of the task a written run config names (none before it is written)."""
    if not config_path.exists():
        return {}
    from autoprune_ray.tasks import TASKS   # here: it loads every task's modules (seconds)
    task = (yaml.load(config_path.read_text(), Loader=_LOADER) or {}).get("task")
    return TASKS[task].columns if task in TASKS else {}


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """A part written by an older version: missing columns read as nulls, types as the schema's."""
    if t.schema == schema:
        return t
    for name in schema.names:
        if name not in t.column_names:
            t = t.append_column(name, pa.nulls(len(t), schema.field(name).type))
    return t.select(schema.names).cast(schema)
