"""What a run shows in the terminal: one rich display (log records scroll above a progress bar
pinned at the bottom) or plain log lines (`--no-progress`, jobs, CI), and the closing table.

Everything that writes to the terminal during a run goes through one rich Console, so that no
record is glued to the bar: the engine's records through a RichHandler on that console, Ray's own
records and the workers' forwarded output through the stderr proxy the live bar installs.
"""
from __future__ import annotations

import logging
import math
import sys

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ENGINE_LOGGER = "autoprune_ray"


class Display:
    """A context manager around a run: attaches the engine's log handler (unless the embedding
    program configured logging itself) and, when `live`, the pinned progress bar."""

    def __init__(self, total: int, measure: str, live: bool, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.live, self.total, self.measure = live, total, measure
        self.handler: logging.Handler | None = None
        self.bar: Progress | None = None
        self._ray_streams: list[tuple[logging.StreamHandler, object]] = []

    def __enter__(self) -> "Display":
        if self.live:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                TimeElapsedColumn(), console=self.console)
            self.task = self.bar.add_task("starting", total=self.total)
            self.bar.start()
            self._route_ray_records()
        self._attach_handler()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        if self.handler is not None:
            logging.getLogger(ENGINE_LOGGER).removeHandler(self.handler)

    def update(self, read_summary, queued: int) -> None:
        if self.bar is None:
            return
        summary = read_summary()
        fitness = summary.get("best_fitness")   # −mean log of the measure (KL or perplexity)
        best = f"{math.exp(-fitness):.3g}" if fitness is not None else "–"
        self.bar.update(self.task, completed=summary["evaluated"],
                        description=f"valid {summary['valid_rate']:.0%} | best {self.measure} {best} | "
                                    f"queue {queued}")

    def stop(self) -> None:
        """Stops the bar (promotion and the closing table come after it) and gives Ray its stream back."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        for handler, stream in self._ray_streams:
            handler.setStream(stream)
        self._ray_streams = []

    def _attach_handler(self) -> None:
        engine = logging.getLogger(ENGINE_LOGGER)
        if engine.handlers or logging.getLogger().handlers:
            return
        if self.live:
            self.handler = RichHandler(console=self.console, show_path=False, markup=False, log_time_format="%H:%M:%S")
            self.handler.setFormatter(logging.Formatter("%(message)s"))
        else:
            self.handler = logging.StreamHandler(sys.stderr)
            self.handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
        engine.addHandler(self.handler)
        engine.setLevel(logging.INFO)

    def _route_ray_records(self) -> None:
        # Ray's handlers hold the stderr of import time; pointed at the live proxy, a warning Ray
        # logs mid-run lands above the bar instead of being glued to it
        for handler in logging.getLogger("ray").handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.__stderr__, sys.__stdout__):
                self._ray_streams.append((handler, handler.setStream(sys.stderr)))


def outcome_table(outcome: dict) -> Table:
    """The closing table: the best program found beside the task's reference seed."""
    table = Table(title=outcome["title"], caption=outcome["caption"], caption_justify="left")
    for i, column in enumerate(outcome["columns"]):
        table.add_column(column, no_wrap=i < 3, justify="left" if i < 3 else "right")
    for row in outcome["rows"]:
        table.add_row(*[str(row.get(column, "")) for column in outcome["columns"]])
    return table


def show_outcome(outcome: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(outcome_table(outcome))
    for line in outcome["notes"]:
        console.print(line, markup=False, highlight=False)
    if outcome["code"]:
        console.print()
        console.print(outcome["code"], markup=False, highlight=False, soft_wrap=True)
    if outcome["next"]:
        console.print("\nNext:", markup=False)
        for command, why in outcome["next"]:
            console.print(f"  # {why}\n  {command}", markup=False, highlight=False, soft_wrap=True)
