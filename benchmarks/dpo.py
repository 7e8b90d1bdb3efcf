"""What DPO does to the programs the policy writes: an A/B, scored as the search scores them.

    python benchmarks/dpo.py runs/discover-s1 --train-prompts 24 --ab-prompts 64 --n 2 --seeds 0,1

1. Prompts: the prompts of a finished search that show parents (mutation, crossover, GCoT), in
   the run's task, split by a seeded shuffle into training prompts and held-out A/B prompts. No
   A/B prompt is trained on.
2. Training pairs: `--train-n` fresh completions of the base policy per training prompt, with
   the run's grammar setting and sampling settings, each valid one scored as the children of step 4 are, and
   paired as the engine pairs them (llm.preferences.PreferenceLog, same prompt, `--margin`;
   `--chosen-percentile` keeps a fitness pair only when its chosen program ranks at least that
   high, as dpo.chosen_percentile does). The run's own logged pairs outside the A/B prompts are
   added. (With the grammar on, a search's measured programs are few and far apart, so its own
   log holds few fitness pairs: 13 in the 472 evaluations of discover-s1.)
3. DPO rounds: llm/dpo.py (TRL's DPOTrainer on the peft LoRA adapter, reference = the frozen
   base, the task's system prompt), each continuing from the previous adapter.
4. A/B: every A/B prompt, `--n` completions for every seed, from the base policy and from the
   last adapter, with the same seeds. Per arm: the valid rate, the distinct rate (a valid program
   not written earlier in the arm), the mean log-measure of the valid children (KL to the dense
   model as the search measures it, or the screening proxy with --stage proxy, which ranks a
   search's own programs poorly: see stage_agreement.py; lower is better) and the share of valid
   children that beat their best parent by that measure (parents are scored again here, not read
   from the run). Each with a bootstrap 95% interval over prompts, and the paired difference of the arms.

Every finished step is kept in `--work` (default runs/dpo-ab/<run name>): the scored programs,
the training pairs, each round's adapter and each (arm, seed) of the A/B. Run the same command
again after an interruption and it goes on from there; delete the directory to start over. A
variant of one setting reuses what does not depend on it, e.g. EvoTune's percentile filter:

    python benchmarks/dpo.py runs/discover-s1 ... --chosen-percentile 0.5 \
        --work runs/dpo-ab/discover-s1-p50 --share-from runs/dpo-ab/discover-s1 --out .../dpo-ab-p50-cpu.json

trains and samples only the tuned arm; the scores, the fresh pairs and the base arm are shared.

Writes benchmarks/results/dpo-ab-cpu.json (or --out). (dpo-cpu.json is the result of this
benchmark's first version, before the grammar: validity pairs, child perplexity, 64 samples per arm.)
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import click
import numpy as np
import pandas as pd

RESULTS = Path(__file__).parent / "results"
CHUNK = 16   # A/B prompts generated and kept per step (8-9.5 minutes on 2 cores, KL scoring included)
STATISTICS = ("valid_rate", "distinct_rate", "mean_log_stage", "beats_parent")


# ---------------------------------------------------------------- statistics (pure, tested)

def per_prompt(samples: list[dict]) -> pd.DataFrame:
    """Sums per prompt of one arm's samples (dicts with prompt, valid, distinct, value, beats)."""
    frame = pd.DataFrame(samples)
    values = frame.value.astype(float)   # None (not valid, or failed) is NaN
    scored = values.notna()
    frame = frame.assign(log_value=np.log(values.where(scored, 1.0)), scored=scored,
                         beats=frame.beats.astype(float).fillna(0.0))
    return frame.groupby("prompt").agg(samples=("valid", "size"), valid=("valid", "sum"),
                                       distinct=("distinct", "sum"), scored=("scored", "sum"),
                                       log_value=("log_value", "sum"), beats=("beats", "sum"))


def arm_statistics(sums: pd.DataFrame) -> dict[str, float]:
    """Ratios of sums: each is a share of samples, of valid or of scored children."""
    total = sums.sum()

    def share(part: str, whole: str) -> float:
        return float(total[part] / total[whole]) if total[whole] else math.nan
    return {"valid_rate": share("valid", "samples"), "distinct_rate": share("distinct", "samples"),
            "mean_log_stage": share("log_value", "scored"), "beats_parent": share("beats", "valid")}


def bootstrap(arms: dict[str, pd.DataFrame], resamples: int = 2000, seed: int = 0) -> dict:
    """Each arm's statistics with a 95% interval from resampling prompts (the arms share their
    prompts, so one draw serves both and gives the paired difference, last arm − first)."""
    names = list(arms)
    prompts = arms[names[0]].index.to_numpy()
    rng = np.random.default_rng(seed)
    draws = {name: [] for name in names}
    for _ in range(resamples):
        chosen = rng.choice(prompts, size=len(prompts), replace=True)
        for name in names:
            draws[name].append(arm_statistics(arms[name].loc[chosen]))
    out = {name: {k: {"value": v, **_interval([d[k] for d in draws[name]])}
                  for k, v in arm_statistics(arms[name]).items()} for name in names}
    if len(names) == 2:
        a, b = names
        out[f"{b} - {a}"] = {k: {"value": out[b][k]["value"] - out[a][k]["value"],
                                 **_interval([db[k] - da[k] for da, db in zip(draws[a], draws[b])])}
                             for k in STATISTICS}
    return out


def _interval(values: list[float]) -> dict:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"low": None, "high": None}
    low, high = np.percentile(finite, [2.5, 97.5])
    return {"low": float(low), "high": float(high)}


# ---------------------------------------------------------------- measuring programs

class Checkpoint:
    """One JSON file per finished step under a work directory, so that a long benchmark resumes."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.timings = self.load("timings") or {}   # seconds each step took when it was computed

    def load(self, name: str):
        path = self.root / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def save(self, name: str, value) -> None:
        from autoprune_ray.engine.storage import atomic_write_bytes   # whole or absent, even when killed
        atomic_write_bytes(self.root / f"{name}.json", json.dumps(value).encode())

    def step(self, name: str, compute):
        """The saved result of step `name`, or compute() saved under that name."""
        value = self.load(name)
        if value is None:
            start = time.perf_counter()
            value = compute()
            self.save(name, value)
            self.timings[name] = round(time.perf_counter() - start, 1)
            self.save("timings", self.timings)
        return value


# steps another work directory's results serve, when its arguments agree on these
SHAREABLE = {"scores-": ("run_dir", "stage"),
             "pairs": ("run_dir", "train_prompts", "ab_prompts", "train_n", "stage", "margin"),
             "ab-base-": ("run_dir", "train_prompts", "ab_prompts", "n", "stage")}


def share(checkpoint: Checkpoint, source: Path, arguments: dict) -> list[str]:
    """Copy into `checkpoint` the steps of `source` that do not depend on the arguments that
    differ (e.g. a --chosen-percentile variant reuses the scores, the fresh pairs and the base
    arm); returns the steps copied."""
    theirs = Checkpoint(source).load("arguments")
    if theirs is None:
        raise click.UsageError(f"--share-from {source}: not a work directory of this benchmark")
    copied = []
    for path in sorted(Path(source).glob("*.json")):
        keys = next((k for prefix, k in SHAREABLE.items() if path.stem.startswith(prefix)), None)
        if not keys or any(theirs.get(k) != arguments.get(k) for k in keys):
            continue
        value, mine = json.loads(path.read_text()), checkpoint.load(path.stem)
        if path.stem.startswith("scores-"):
            checkpoint.save(path.stem, value | (mine or {}))   # a program scores the same in both
        elif mine is None:
            checkpoint.save(path.stem, value)
        copied.append(path.stem)
    return copied


def resume(root: Path, arguments: dict) -> Checkpoint:
    """The work directory's checkpoint; a directory left by other arguments is refused, not mixed in."""
    checkpoint = Checkpoint(root)
    saved = checkpoint.load("arguments")
    if saved is not None and saved != arguments:
        changed = sorted(k for k in arguments.keys() | saved.keys() if saved.get(k) != arguments.get(k))
        raise click.UsageError(f"{root} holds steps made with other arguments ({', '.join(changed)}); "
                               "delete it or pass another --work")
    checkpoint.save("arguments", arguments)
    return checkpoint


class Judge:
    """Parses completions and scores each distinct valid program once (--stage); the scores are
    kept in the checkpoint, so a resumed benchmark measures no program twice."""

    def __init__(self, cfg, stage: str, checkpoint: Checkpoint | None = None):
        from autoprune_ray.engine.evaluator import EvaluatorWorker
        self.cfg, self.stage, self.checkpoint = cfg, stage, checkpoint
        self.worker = EvaluatorWorker(cfg)
        self.values: dict[str, float | None] = (checkpoint and checkpoint.load(f"scores-{stage}")) or {}

    def parse(self, text: str):
        from autoprune_ray.operators.language import CandidateError, parse
        try:
            return parse(text, self.cfg.task)
        except CandidateError:
            return None

    def parent_value(self, code: str) -> float | None:
        cand = self.parse(code)
        return None if cand is None else self.value(cand)

    def value(self, cand) -> float | None:
        """The proxy (forward-free) or the KL to the dense model; None when the evaluation failed."""
        if cand.hash not in self.values:
            cutoff = float("-inf") if self.stage == "proxy" else None   # -inf: screen only, never measure
            out = self.worker.evaluate({"candidate_id": -1, "hash": cand.hash, "code": cand.code,
                                        "granularity": cand.granularity, "proxy_cutoff": cutoff})
            value = out.get(self.stage) if out["status"] in ("ok", "screened") else None
            self.values[cand.hash] = value if value is not None and math.isfinite(value) and value > 0 else None
            if self.checkpoint:
                self.checkpoint.save(f"scores-{self.stage}", self.values)
        return self.values[cand.hash]


def parents_of(cands: pd.DataFrame) -> dict[int, list[str]]:
    """prompt id -> the code of the parents its completions were written from."""
    code = cands.set_index("candidate_id").code.to_dict()
    out = {}
    for row in cands[cands.prompt_id.notna()].itertuples(index=False):
        parents = [code.get(int(p)) for p in (row.parents if row.parents is not None else [])]
        if parents and all(isinstance(c, str) and c for c in parents):
            out.setdefault(int(row.prompt_id), parents)
    return out


def split_prompts(prompts: pd.DataFrame, with_parents: set[int], train: int, ab: int, seed: int):
    unique = prompts.drop_duplicates("prompt_id")
    unique = unique[unique.prompt_id.isin(with_parents)][["prompt_id", "operator", "prompt"]]
    order = list(range(len(unique)))
    random.Random(seed).shuffle(order)
    if len(order) < train + ab:
        raise click.UsageError(f"the run has {len(order)} prompts with parents; asked for {train} + {ab}")
    return unique.iloc[order[:train]], unique.iloc[order[train:train + ab]]


# ---------------------------------------------------------------- the rounds and the A/B

def training_pairs(backend, judge: Judge, prompts: pd.DataFrame, n: int, settings: dict, margin: float) -> list[dict]:
    """The engine's pairing over n fresh completions per training prompt, scored by the judge
    (every pair: --chosen-percentile is applied later, to these and the run's logged pairs alike)."""
    from autoprune_ray.llm.preferences import Completion, PreferenceLog
    log, pairs = PreferenceLog(margin=margin, groupings=("prompt",), window=10 ** 9), []
    completions = backend.generate(list(prompts.prompt), n=n, **settings)
    for cid, comp in enumerate(completions):
        row = prompts.iloc[comp.prompt_index]
        cand = judge.parse(comp.text)
        pairs += log.add(Completion(candidate_id=cid, prompt_id=int(row.prompt_id), prompt=row.prompt,
                                    source=comp.text, operator=row.operator, island=0, parents=(), adapter=None,
                                    strategy=None, status="rejected" if cand is None else "accepted"))
        if cand is not None:
            value = judge.value(cand)
            pairs += log.measured(cid, "ok" if value else "failed", -math.log(value) if value else None)
    return pairs


def ab_samples(backend, judge: Judge, prompts: pd.DataFrame, parents: dict[int, list[str]], n: int,
               seeds: list[int], settings: dict, checkpoint: Checkpoint, arm: str) -> tuple[list[dict], dict]:
    """One arm's samples over every seed, kept in checkpoint steps of CHUNK prompts (seed_chunks)."""
    samples, seen, tokens, seconds = [], set(), 0, 0.0
    for seed in seeds:
        step = seed_chunks(backend, judge, prompts, parents, n, seed, settings, checkpoint, arm)
        for sample in step["samples"]:
            # distinct: not written earlier in the arm, over seeds in order
            code_hash = sample.pop("hash")   # None: not valid
            samples.append({**sample, "distinct": code_hash is not None and code_hash not in seen})
            seen.add(code_hash)              # a None in it never matches a valid program
        tokens, seconds = tokens + step["tokens"], seconds + step["seconds"]
    return samples, {"tokens": tokens, "generation_seconds": round(seconds, 1),
                     "completions_per_minute": round(len(samples) / seconds * 60, 2) if seconds else None}


def seed_chunks(backend, judge: Judge, prompts: pd.DataFrame, parents: dict[int, list[str]], n: int, seed: int,
                settings: dict, checkpoint: Checkpoint, arm: str) -> dict:
    """One seed's samples, generated CHUNK prompts at a time (each chunk a checkpoint step, sampled
    with the seed, the same chunks in both arms), so that an interruption loses minutes, not a seed."""
    steps = [checkpoint.step(f"ab-{arm}-s{seed}-c{i}",
                             lambda i=i: seed_samples(backend, judge, prompts.iloc[i:i + CHUNK], parents, n, seed,
                                                      settings))
             for i in range(0, len(prompts), CHUNK)]
    return {"samples": [x for step in steps for x in step["samples"]],
            "tokens": sum(step["tokens"] for step in steps), "seconds": sum(step["seconds"] for step in steps)}


def seed_samples(backend, judge: Judge, prompts: pd.DataFrame, parents: dict[int, list[str]], n: int, seed: int,
                 settings: dict) -> dict:
    start = time.perf_counter()
    completions = backend.generate(list(prompts.prompt), n=n, seed=seed, **settings)
    seconds, samples = time.perf_counter() - start, []
    for comp in completions:
        prompt_id = int(prompts.iloc[comp.prompt_index].prompt_id)
        cand = judge.parse(comp.text)
        sample = {"prompt": prompt_id, "valid": cand is not None, "hash": None, "value": None, "beats": None}
        if cand is not None:
            sample.update(hash=cand.hash, value=judge.value(cand))
            best_parent = min((v for v in map(judge.parent_value, parents[prompt_id]) if v), default=None)
            sample["beats"] = bool(sample["value"] and best_parent and sample["value"] < best_parent)
        samples.append(sample)
    return {"samples": samples, "tokens": sum(c.tokens for c in completions), "seconds": seconds}


def run_rounds(cfg, train_frame: pd.DataFrame, rounds: int, dpo_settings: dict, checkpoint: Checkpoint,
               tuned) -> list[dict]:
    from autoprune_ray.llm.dpo import train_round
    from autoprune_ray.llm.dpo_config import DPOConfig
    from autoprune_ray.tasks import get_task
    history, adapter = [], None
    for r in range(1, rounds + 1):
        def train(r=r, previous=adapter):
            dpo = DPOConfig(**dpo_settings, seed=r, system_prompt=get_task(cfg.task).prompts.system)
            metrics = train_round(cfg.policy.model, train_frame[["prompt", "chosen", "rejected"]].to_dict("records"),
                                  str(checkpoint.root / f"v{r}"), dpo, previous)
            return {"round": r, "trained_on": len(train_frame), "kinds": train_frame.kind.value_counts().to_dict(),
                    "train": metrics["train"], "held_out_before": metrics["held_out_before"],
                    "held_out": metrics["held_out"]}
        history.append(checkpoint.step(f"round-{r}", train))
        adapter = str(checkpoint.root / f"v{r}")
        tuned.load_adapter(adapter, f"v{r}")
        click.echo(json.dumps(history[-1]))
    return history


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--train-prompts", default=24, show_default=True, help="prompts whose completions are paired")
@click.option("--train-n", default=4, show_default=True, help="completions per training prompt")
@click.option("--ab-prompts", default=64, show_default=True, help="held-out prompts of the A/B")
@click.option("--n", default=2, show_default=True, help="A/B completions per prompt and seed")
@click.option("--seeds", default="0,1", show_default=True, help="A/B sampling seeds (the same in both arms)")
@click.option("--stage", type=click.Choice(["kl", "proxy"]), default="kl", show_default=True,
              help="what scores a child: KL to the dense model on fitness.tokens validation tokens (the "
                   "search's ranking measure), or the forward-free screening proxy (cheaper, ranks worse)")
@click.option("--rounds", default=1, show_default=True)
@click.option("--margin", default=0.01, show_default=True, help="least fitness gap of a fitness pair")
@click.option("--chosen-percentile", default=0.0, show_default=True)
@click.option("--beta", default=0.1, show_default=True)
@click.option("--lr", default=1e-4, show_default=True)
@click.option("--epochs", default=2, show_default=True)
@click.option("--max-pairs", default=64, show_default=True, help="pairs trained per round (CPU cost)")
@click.option("--max-length", default=384, show_default=True, help="tokens of prompt + completion in training")
@click.option("--work", type=click.Path(file_okay=False), default=None,
              help="where finished steps are kept for resuming  [default: runs/dpo-ab/<run name>]")
@click.option("--share-from", type=click.Path(exists=True, file_okay=False), default=None,
              help="another work directory whose scores, fresh pairs and base arm serve here where their "
                   "arguments agree (a variant of one setting costs only its own steps)")
@click.option("--out", type=click.Path(dir_okay=False), default=str(RESULTS / "dpo-ab-cpu.json"), show_default=True)
def main(run_dir, train_prompts, train_n, ab_prompts, n, seeds, stage, rounds, margin, chosen_percentile, beta, lr,
         epochs, max_pairs, max_length, work, share_from, out):
    from autoprune_ray.engine.config import RunConfig, from_dict
    from autoprune_ray.engine.storage import RunStore
    from autoprune_ray.llm.backends import make_backend
    from autoprune_ray.llm.preferences import trains_on
    from autoprune_ray.tasks import get_task

    t0 = time.perf_counter()
    arguments = {k: v for k, v in locals().items() if k not in ("out", "work", "share_from", "t0") and not callable(v)}
    checkpoint = resume(Path(work or Path("runs/dpo-ab") / Path(run_dir).name), arguments)
    shared = share(checkpoint, Path(share_from), arguments) if share_from else []
    store = RunStore(run_dir)
    cfg = from_dict(RunConfig, store.read_config())
    cands, prompts = store.read("candidates"), store.read("prompts")
    parents = parents_of(cands)
    train, ab = split_prompts(prompts, set(parents), train_prompts, ab_prompts, seed=0)
    judge, task, pol = Judge(cfg, stage, checkpoint), get_task(cfg.task), cfg.policy
    settings = {"temperature": pol.temperature, "max_new_tokens": pol.max_new_tokens}
    backends = [make_backend("transformers", system_prompt=task.prompts.system, model=pol.model, device="cpu",
                             grammar=task.grammar(cfg.target.uncollected_inputs) if pol.grammar else None) for _ in range(2)]
    fresh = checkpoint.step("pairs", lambda: training_pairs(backends[0], judge, train, train_n,
                                                            {**settings, "seed": 100}, margin))
    logged = store.read("preferences")
    logged = logged[~logged.prompt_id.isin(set(ab.prompt_id))]
    frame = pd.concat([pd.DataFrame(fresh), logged], ignore_index=True)
    kept = frame[[trains_on(pair, chosen_percentile) for pair in frame.to_dict("records")]]
    frame = kept.sample(frac=1.0, random_state=0).head(max_pairs)
    click.echo(f"{len(fresh)} fresh pairs, {len(logged)} logged, {len(kept)} past --chosen-percentile; "
               f"training on {len(frame)}")
    seed_list = [int(s) for s in seeds.split(",")]
    dpo_settings = {"beta": beta, "lr": lr, "epochs": epochs, "max_length": max_length}
    history = run_rounds(cfg, frame, rounds, dpo_settings, checkpoint, backends[1])
    arms, generation = {}, {}
    for name, backend in (("base", backends[0]), (f"dpo-v{rounds}", backends[1])):
        samples, generation[name] = ab_samples(backend, judge, ab, parents, n, seed_list, settings, checkpoint, name)
        arms[name] = per_prompt(samples)
    result = {"benchmark": "DPO A/B, children scored as the search scores them", "command": "python " + " ".join(sys.argv),
              "run_dir": run_dir, "task": cfg.task, "stage": stage, "grammar": pol.grammar,
              "pairs": {"fresh": len(fresh), "logged": len(logged), "past_percentile": len(kept),
                        "trained_on": len(frame),
                        "kinds": frame.kind.value_counts().to_dict()},
              "rounds": history, "ab_prompts": len(ab), "samples_per_arm": len(ab) * n * len(seed_list),
              "seeds": seed_list, **settings, "dpo": {**dpo_settings, "reference": "base", "max_pairs": max_pairs,
                                                      "chosen_percentile": chosen_percentile, "margin": margin},
              "statistics": bootstrap(arms), "generation": generation, "programs_scored": len(judge.values),
              "seconds": round(time.perf_counter() - t0), "seconds_by_step": checkpoint.timings,
              "work": str(checkpoint.root), "shared": {"from": share_from, "steps": shared},
              "machine": "2-core CPU"}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    click.echo(json.dumps(result["statistics"], indent=1))


if __name__ == "__main__":
    main()
