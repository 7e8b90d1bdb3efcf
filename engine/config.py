"""Run configuration: YAML validated into dataclasses, with messages that name the bad key."""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from autoprune_ray.compress.protocol import Protocol
from autoprune_ray.llm.dpo_config import DPOConfig


class ConfigError(ValueError):
    pass


@dataclass
class TargetConfig(Protocol):
    """The model being compressed and how a candidate is measured on it: a calibration protocol
    (calib_data, nsamples, seqlen, seed), sized here for search time, plus the target itself. A
    search reads the *validation* split (val_tokens of it); the held-out split stays sealed until
    the report (eval_tokens is the report's)."""
    nsamples: int = 16
    seqlen: int = 256
    val_tokens: int | None = 4096    # validation tokens a search may read (its stages use their first ones)
    model: str = "smollm2"
    sparsity: float = 0.5
    sparsities: list[float] | None = None   # several levels (0.6, 0.7): the fitness combines them
    pattern: str | None = None
    device: str | None = None
    gradients: bool = False          # collect gradient RMS (G) for programs that read it: one backward per window

    @property
    def uncollected_inputs(self) -> frozenset[str]:
        """Program inputs the evaluators have no statistics for: a program reading one is refused,
        and the policy's grammar leaves it out."""
        return frozenset() if self.gradients else frozenset({"G"})

    @property
    def levels(self) -> list[float]:
        """The sparsities a candidate is measured at: `sparsities`, else `sparsity`."""
        return list(self.sparsities) if self.sparsities else [self.sparsity]


@dataclass
class FitnessSettings:
    """How a screened candidate is measured (compress/fitness.py), and its promotion.

    Search stage: `measure` (kl: KL divergence to the dense model's cached next-token
    distribution; perplexity) on the first `tokens` validation tokens, at every level; fitness is
    −mean over levels of log(measure). Promotion, when the search stops: the `promote` fittest
    programs are measured again by perplexity on `promote_tokens` validation tokens, with the
    run's calibration seed and with `second_seed`; the best is the one with the highest mean of
    those two fitnesses."""
    measure: str = "perplexity"
    tokens: int | None = None          # None: all of target.val_tokens
    promote: int = 0                   # 0: no promotion (the best is the best search-stage fitness)
    promote_tokens: int | None = None  # None: all of target.val_tokens
    second_seed: int = 1


@dataclass
class QuantSettings:
    """Task mpq: the budget, and how a candidate's bit allocation is built and measured."""
    avg_bits: float = 3.25            # average bits per weight, each group's fp16 scale and zero included
    as_uniform: int | None = None     # instead: the budget is what uniform b-bit costs the model
    group_size: int = 128
    bits: list[int] = field(default_factory=lambda: [2, 3, 4, 8])
    allocator: str = "ilp"            # ilp (exact) or greedy
    quantizer: str = "rtn"            # rtn, or gptq (fitness: one-pass, rounded once per evaluator)
    act_order: bool = False           # gptq: columns by decreasing input energy (upstream's actorder)
    measure_layers: int = 16          # rank correlation: layers quantized alone, a fixed sample
    measure_bits: int = 2               # one layer at 3 bits moves the NLL less than its noise on 2k tokens
    measure_tokens: int = 2048

    def quant_config(self, **extra):
        from autoprune_ray.compress.quantize import QuantConfig
        return QuantConfig(avg_bits=self.avg_bits, as_uniform=self.as_uniform, group_size=self.group_size,
                           choices=tuple(self.bits),
                           allocator=self.allocator, quantizer=self.quantizer, gptq_act_order=self.act_order,
                           **extra)

    def measure_config(self):
        from autoprune_ray.compress.mpq_fitness import MeasureConfig
        return MeasureConfig(self.measure_layers, self.measure_bits, self.measure_tokens)


@dataclass
class AllocationSettings:
    """Task allocate: the fixed metric that picks weights inside each block, and the band S ± lam."""
    metric: str = "wanda"
    lam: float = 0.25   # measured at 70% (configs/local.yaml): wider than OWL's 0.08, see README


@dataclass
class PolicyConfig:
    """The LLM that writes candidates."""
    backend: str = "transformers"    # transformers | vllm | openai | scripted
    model: str = "smollm2"
    temperature: float = 0.8
    max_new_tokens: int = 160
    prompts_per_batch: int = 4
    completions_per_prompt: int = 2
    base_url: str | None = None      # openai backend
    api_key_env: str = "OPENAI_API_KEY"   # the key itself never enters the config or the run directory
    scripted: list[str] = field(default_factory=list)   # scripted backend: fixed completions
    num_gpus: float = 0.0
    max_restarts: int = 3
    grammar: bool = True             # constrain completions to the task's grammar where it has one


@dataclass
class SearchConfig:
    islands: int = 2
    population_size: int = 12         # per island
    elites: int = 2                   # per island, never dropped, they migrate
    migration_interval: int = 10      # evaluations between migrations
    seeds: bool | list[str] = True    # start from the task's expert seeds (or the ones named); False: from scratch
    operators: dict[str, float] = field(default_factory=lambda: {
        "llm_init": 0.15, "llm_mutate": 0.3, "llm_crossover": 0.1, "gcot": 0.15,
        "symbolic_mutate": 0.2, "symbolic_crossover": 0.1})
    max_evaluations: int = 40
    max_seconds: float | None = 1800.0
    patience: int | None = None       # stop after this many evaluations without improvement
    stall_proposals: int = 500        # stop when this many proposals in a row gave nothing new to evaluate
    eval_time_limit: float = 300.0    # seconds per candidate; a hung evaluation is killed
    queue_size: int = 8               # bounded queue between policy and evaluators
    cascade: float = 1.5              # perplexity only when proxy <= cascade × best proxy so far
    checkpoint_every: int = 5         # evaluations
    seed: int = 0


@dataclass
class EvaluatorConfig:
    num: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # torch threads per evaluator; null: Ray's default, one per reserved CPU. On a small machine
    # the policy is idle most of the time, so an evaluator may use the cores it does not reserve.
    threads: int | None = None
    max_restarts: int = 3
    fault_injection: dict[str, str] = field(default_factory=dict)   # testing aid: see engine/evaluator.py
    # benchmark and test aid: evaluators load no model; each evaluation takes this many seconds and
    # returns a fitness derived from the program's hash (engine/synthetic.py). null: real evaluators
    synthetic_seconds: float | None = None


@dataclass
class DPOSettings(DPOConfig):
    """DPO rounds during the search: a LoRA adapter of the policy, trained on the logged pairs.
    The training fields are llm.dpo.DPOConfig's; these add when and on which pairs a round runs."""
    max_length: int = 384             # tokens of prompt (cut from the left) + completion
    enabled: bool = False
    every_pairs: int = 16             # a round starts when this many new pairs have been logged
    margin: float = 0.01              # least fitness gap (−log perplexity) of a fitness pair
    window: int = 16                  # pair only completions at most this many candidate ids apart
    groupings: list[str] = field(default_factory=lambda: ["prompt", "parents"])
    max_pairs: int = 64               # a round trains on the newest pairs, at most this many
    chosen_percentile: float = 0.0    # EvoTune: a fitness pair trains only when its chosen program
                                      # ranks at or above this share of the run's measured ones (0: all)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    drain_seconds: float = 600.0      # at the end of a run, how long a running round may finish


@dataclass
class StrategySettings:
    """The prompt-strategy controller: LLM operator × temperature, steered by preference pairs."""
    enabled: bool = True
    temperatures: list[float] | None = None   # None: policy.temperature alone
    learning_rate: float = 0.2
    exploration: float = 0.2


@dataclass
class RayConfig:
    address: str | None = None        # None: start a local instance
    num_cpus: int | None = None
    include_dashboard: bool = False
    dashboard_host: str = "127.0.0.1"   # beyond loopback only with Ray's token authentication on

    def dashboard_exposed(self) -> bool:
        """The dashboard (and its Jobs API, which runs any command) listens beyond this machine."""
        import ipaddress
        if self.dashboard_host.strip().lower() == "localhost":
            return False
        try:
            return not ipaddress.ip_address(self.dashboard_host.strip()).is_loopback
        except ValueError:   # a host name: it may resolve to any interface
            return True

    @staticmethod
    def token_auth_disabled() -> bool:
        """Ray 2.60 turns token authentication on by default; RAY_AUTH_MODE=disabled turns it off."""
        import os
        return os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled"


@dataclass
class RunConfig:
    name: str = "local"
    task: str = "prune"
    run_dir: str = "runs/{name}"
    target: TargetConfig = field(default_factory=TargetConfig)
    quant: QuantSettings = field(default_factory=QuantSettings)
    allocation: AllocationSettings = field(default_factory=AllocationSettings)
    fitness: FitnessSettings = field(default_factory=FitnessSettings)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    evaluators: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    dpo: DPOSettings = field(default_factory=DPOSettings)
    strategy: StrategySettings = field(default_factory=StrategySettings)
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> "RunConfig":
        from autoprune_ray.tasks import TASKS
        _check(self.task in TASKS, "task", f"unknown task {self.task!r}: choose {', '.join(TASKS)}")
        missing = TASKS[self.task].unimplemented()
        _check(not missing, "task", f"task {self.task!r} cannot be searched: its plug-in lacks {', '.join(missing)}")
        self._validate_target()
        self._validate_fitness()
        _check(self.policy.backend in ("transformers", "vllm", "openai", "scripted"), "policy.backend",
               f"unknown backend {self.policy.backend!r}: transformers, vllm, openai or scripted")
        _check(self.policy.backend != "scripted" or self.policy.scripted, "policy.scripted",
               "the scripted backend needs a list of completions")
        _check(self.policy.backend != "openai" or self.policy.base_url, "policy.base_url",
               "the openai backend needs base_url")
        _check(isinstance(self.policy.grammar, bool), "policy.grammar", f"true or false, got {self.policy.grammar!r}")
        if isinstance(self.search.seeds, list):
            names = set(TASKS[self.task].seeds())
            _check(set(self.search.seeds) <= names, "search.seeds",
                   f"unknown seed(s) {sorted(set(self.search.seeds) - names)}: task {self.task} has {sorted(names)}")
        known = {"llm_init", "llm_mutate", "llm_crossover", "gcot", "symbolic_mutate", "symbolic_crossover"}
        unknown = set(self.search.operators) - known
        _check(not unknown, "search.operators", f"unknown operator(s) {sorted(unknown)}: use {sorted(known)}")
        _check(all(v >= 0 for v in self.search.operators.values()) and sum(self.search.operators.values()) > 0,
               "search.operators", "rates must be non-negative and not all zero")
        for key in ("islands", "population_size", "max_evaluations", "queue_size", "checkpoint_every",
                    "stall_proposals"):
            _check(getattr(self.search, key) >= 1, f"search.{key}", "must be at least 1")
        _check(0 <= self.search.elites <= self.search.population_size, "search.elites",
               "must lie between 0 and population_size")
        _check(self.search.eval_time_limit > 0, "search.eval_time_limit", "must be positive")
        _check(self.evaluators.num >= 1, "evaluators.num", "must be at least 1")
        _check(self.evaluators.threads is None or self.evaluators.threads >= 1, "evaluators.threads",
               "must be at least 1, or null for one per reserved CPU")
        _check(self.evaluators.synthetic_seconds is None or self.evaluators.synthetic_seconds >= 0,
               "evaluators.synthetic_seconds", "must be at least 0, or null for real evaluators")
        self._validate_dpo()
        self._validate_ray()
        try:
            TASKS[self.task].validate(self)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return self

    def _validate_target(self) -> None:
        from autoprune_ray.compress.masks import check_sparsity, parse_pattern
        t = self.target
        _check(t.sparsities is None or len(t.sparsities) >= 1, "target.sparsities", "list at least one sparsity")
        for key, value in [("sparsity", t.sparsity)] + [(f"sparsities[{i}]", v) for i, v in enumerate(t.sparsities or [])]:
            _check(0 < value < 1, f"target.{key}", f"a sparsity lies strictly between 0 and 1, got {value}")
        try:
            for level in t.levels:
                check_sparsity(level)
            parse_pattern(t.pattern)
            t.validate()
        except ValueError as exc:
            raise ConfigError(f"target: {exc}") from None
        _check(t.val_tokens is None or t.val_tokens >= t.seqlen, "target.val_tokens",
               f"at least one window of seqlen {t.seqlen}, got {t.val_tokens}")

    def _validate_fitness(self) -> None:
        from autoprune_ray.compress.fitness import KINDS
        f, t = self.fitness, self.target
        _check(f.measure in KINDS, "fitness.measure", f"unknown measure {f.measure!r}: use {' or '.join(KINDS)}")
        for key in ("tokens", "promote_tokens"):
            value = getattr(f, key)
            _check(value is None or value >= t.seqlen, f"fitness.{key}",
                   f"at least one window of seqlen {t.seqlen}, got {value}")
            _check(value is None or t.val_tokens is None or value <= t.val_tokens, f"fitness.{key}",
                   f"at most target.val_tokens ({t.val_tokens}), got {value}")
        _check(f.promote >= 0, "fitness.promote", "must be 0 (no promotion) or more")
        _check(f.second_seed != t.seed, "fitness.second_seed", f"must differ from target.seed ({t.seed})")

    def _validate_dpo(self) -> None:
        d, st = self.dpo, self.strategy
        _check(d.every_pairs >= 1 and d.max_pairs >= 1, "dpo.every_pairs", "every_pairs and max_pairs must be >= 1")
        _check(0 <= d.chosen_percentile < 1, "dpo.chosen_percentile", f"in [0, 1), got {d.chosen_percentile}")
        _check(set(d.groupings) <= {"prompt", "parents"} and d.groupings, "dpo.groupings",
               f"choose from prompt and parents, got {d.groupings}")
        _check(d.reference in ("base", "previous"), "dpo.reference", f"base or previous, got {d.reference!r}")
        _check(d.beta > 0 and d.lr > 0, "dpo.beta", "beta and lr must be positive")
        _check(st.temperatures is None or (st.temperatures and all(t >= 0 for t in st.temperatures)),
               "strategy.temperatures",
               "a non-empty list of temperatures >= 0")
        _check(0 <= st.exploration <= 1, "strategy.exploration", "must lie in [0, 1]")

    def _validate_ray(self) -> None:
        _check(not (self.ray.dashboard_exposed() and RayConfig.token_auth_disabled()), "ray.dashboard_host",
               f"{self.ray.dashboard_host!r} opens the Ray dashboard and its Jobs API to the network while "
               "RAY_AUTH_MODE=disabled turns token authentication off: unset RAY_AUTH_MODE (or set it to token) "
               "to keep Ray's token authentication on, or use dashboard_host 127.0.0.1")

    def at_level(self, sparsity: float) -> "RunConfig":
        """This config with one sparsity level: what a task plug-in builds one level's config from."""
        return dataclasses.replace(self, target=dataclasses.replace(self.target, sparsity=sparsity, sparsities=None))

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir.format(name=self.name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrong types by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        values[name] = _coerce(hints[name], value, key)
    return cls(**values)


def _coerce(hint, value, key):
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value or {}, key)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner[:-1]:   # e.g. `str | dict`: the first type the value fits
            try:
                return _coerce(option, value, key)
            except ConfigError:
                pass
        return _coerce(inner[-1], value, key)
    if hint is typing.Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    if origin is list and isinstance(value, list):
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    expected = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def read_yaml(path: str | Path, what: str = "config file") -> dict:
    """A YAML file's mapping, or a ConfigError that names the file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from None


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    return from_dict(RunConfig, apply_overrides(read_yaml(path), overrides)).validate()


def apply_overrides(data: dict, overrides: dict | None) -> dict:
    """Set dotted keys (`search.max_evaluations`) in a config mapping, in place."""
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return data
