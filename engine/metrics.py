"""Engine metrics through `ray.util.metrics` (exported by Ray as `ray_autoprune_*`; Counters gain
`_total`). They need `ray[default]`; without it every call is a no-op.

Counter increments are summed here and sent by `flush`, which the driver calls once per loop
turn: a Ray metric call costs tens of microseconds, and there were several per candidate."""
from __future__ import annotations


class EngineMetrics:
    def __init__(self, run_id: str):
        self.tags = {"run_id": run_id}
        self.pending: dict[str, float] = {}
        try:
            from ray.util.metrics import Counter, Gauge, Histogram
        except ImportError:  # pragma: no cover - ray without its metrics extra
            self._ok = False
            return
        self._ok = True
        keys = ("run_id",)
        self.counters = {name: Counter(f"autoprune_candidates_{name}", description=f"candidates {name}",
                                       tag_keys=keys)
                         for name in ("proposed", "valid", "evaluated", "failed")}
        self.counters["preference_pairs"] = Counter("autoprune_preference_pairs", description="preference pairs logged",
                                                    tag_keys=keys)
        self.counters["dpo_rounds"] = Counter("autoprune_dpo_rounds", description="DPO rounds finished",
                                              tag_keys=keys)
        self.gauges = {name: Gauge(f"autoprune_{name}", description=name.replace("_", " "), tag_keys=keys)
                       for name in ("best_fitness", "best_perplexity", "eval_queue_depth", "evaluators_busy",
                                     "adapter_round")}
        self.latency = Histogram("autoprune_eval_latency_seconds", description="seconds per evaluation",
                                 boundaries=[1, 5, 15, 30, 60, 120, 300, 600], tag_keys=keys)

    def inc(self, name: str, value: float = 1.0) -> None:
        if self._ok:
            self.pending[name] = self.pending.get(name, 0.0) + value

    def flush(self) -> None:
        """Send the summed counter increments."""
        for name, value in self.pending.items():
            self.counters[name].inc(value, tags=self.tags)
        self.pending.clear()

    def set(self, name: str, value: float | None) -> None:
        if self._ok and value is not None:
            self.gauges[name].set(value, tags=self.tags)

    def observe_latency(self, seconds: float) -> None:
        if self._ok:
            self.latency.observe(seconds, tags=self.tags)
