"""What DPO does to the candidates the policy writes: an A/B on the default CPU setup.

    python benchmarks/dpo.py runs/local --rounds 2 --prompts 12 --n 4 --seeds 0,1

1. Prompts: the real prompts of a finished search (RUN_DIR's prompts table), split in two by a
   seeded shuffle: training prompts and held-out A/B prompts. No A/B prompt is trained on.
2. Rounds: the run's own logged pairs, plus, each round, `n` completions per training prompt
   from the current policy (base, then the newest adapter), parsed and paired exactly as the
   engine pairs them (same prompt or same parents; validity, failure and fitness pairs). A DPO
   round (llm/dpo.py, LoRA, reference = the frozen base) continues from the previous adapter.
3. A/B: the held-out prompts, `n` completions each, for every seed, from the base model and from
   the last adapter, same sampling settings and seeds. Per arm: the valid-program rate, the
   duplicate rate (valid programs already seen in the run or earlier in the arm), and the
   held-out perplexity of each distinct new valid program (the evaluator of the search, at
   `--eval-tokens`): mean and best.

Writes benchmarks/results/dpo-cpu.json (or --out).
"""
from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import click
import pandas as pd

RESULTS = Path(__file__).parent / "results"


def split_prompts(prompts: pd.DataFrame, count: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    unique = prompts.drop_duplicates("prompt_id")[["prompt_id", "operator", "prompt"]].reset_index(drop=True)
    order = list(range(len(unique)))
    random.Random(seed).shuffle(order)
    return unique.iloc[order[:count]], unique.iloc[order[count:2 * count]]


class Judge:
    """Parses completions and measures distinct valid programs once (cached by canonical hash)."""

    def __init__(self, cfg, known_hashes: set[str]):
        from autoprune_ray.engine.evaluator import EvaluatorWorker
        self.worker = EvaluatorWorker(cfg)
        self.known = set(known_hashes)
        self.perplexity: dict[str, float | None] = {}

    def parse(self, text: str):
        from autoprune_ray.operators.language import CandidateError, parse
        try:
            return parse(text), ""
        except CandidateError as exc:
            return None, str(exc)

    def measure(self, cand) -> float | None:
        if cand.hash not in self.perplexity:
            out = self.worker.evaluate({"candidate_id": -1, "hash": cand.hash, "code": cand.code,
                                        "granularity": cand.granularity, "proxy_cutoff": None})
            self.perplexity[cand.hash] = out["perplexity"] if out["status"] == "ok" else None
        return self.perplexity[cand.hash]


def collect_pairs(backend, judge: Judge, prompts: pd.DataFrame, n: int, temperature: float, max_new_tokens: int,
                  seed: int, log, next_id: list[int]) -> list[dict]:
    """The engine's pairing (PreferenceLog) over n fresh completions per training prompt."""
    from autoprune_ray.engine.database import fitness_from_perplexity
    from autoprune_ray.llm.preferences import Completion

    pairs = []
    completions = backend.generate(list(prompts.prompt), n=n, temperature=temperature,
                                   max_new_tokens=max_new_tokens, seed=seed)
    for comp in completions:
        row = prompts.iloc[comp.prompt_index]
        cand, _ = judge.parse(comp.text)
        next_id[0] += 1
        cid = next_id[0]
        pairs += log.add(Completion(candidate_id=cid, prompt_id=int(row.prompt_id) + 10 ** 6 * seed, prompt=row.prompt,
                                    source=comp.text, operator=row.operator, island=0, parents=(), adapter=comp.adapter,
                                    strategy=None, status="rejected" if cand is None else "accepted"))
        if cand is not None:
            ppl = judge.measure(cand)
            pairs += log.measured(cid, "ok" if ppl is not None else "failed", fitness_from_perplexity(ppl))
    return pairs


def training_pairs(earlier: pd.DataFrame, new: pd.DataFrame, max_pairs: int, seed: int) -> pd.DataFrame:
    """At most max_pairs: the round's new pairs first, then a seeded sample of earlier ones."""
    new = new.sample(frac=1.0, random_state=seed).head(max_pairs) if len(new) else new
    room = max_pairs - len(new)
    old = earlier.sample(n=min(room, len(earlier)), random_state=seed) if room > 0 and len(earlier) else earlier.head(0)
    return pd.concat([new, old], ignore_index=True)


def ab_arm(backend, judge: Judge, prompts: list[str], n: int, temperature: float, max_new_tokens: int,
           seeds: list[int]) -> dict:
    samples, valid, duplicates, tokens, seconds = 0, 0, 0, 0, 0.0
    seen = set(judge.known)
    measured: list[float] = []
    failed = 0
    for seed in seeds:
        start = time.perf_counter()
        completions = backend.generate(prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens,
                                       seed=seed)
        seconds += time.perf_counter() - start
        for comp in completions:
            samples += 1
            tokens += comp.tokens
            cand, _ = judge.parse(comp.text)
            if cand is None:
                continue
            valid += 1
            if cand.hash in seen:
                duplicates += 1
                continue
            seen.add(cand.hash)
            ppl = judge.measure(cand)
            if ppl is None:
                failed += 1
            else:
                measured.append(ppl)
    return {"samples": samples, "valid": valid, "valid_rate": valid / samples,
            "duplicates": duplicates, "duplicate_rate": duplicates / valid if valid else None,
            "new_programs": len(measured) + failed, "failed_evaluations": failed,
            "mean_child_perplexity": sum(measured) / len(measured) if measured else None,
            "best_child_perplexity": min(measured) if measured else None,
            "child_perplexities": sorted(measured), "tokens": tokens, "generation_seconds": seconds}


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--rounds", default=2, show_default=True, help="DPO rounds before the A/B")
@click.option("--prompts", "count", default=12, show_default=True, help="training prompts, and as many A/B prompts")
@click.option("--n", default=4, show_default=True, help="completions per prompt")
@click.option("--seeds", default="0,1", show_default=True, help="A/B sampling seeds")
@click.option("--eval-tokens", default=1024, show_default=True, help="held-out tokens per child perplexity")
@click.option("--beta", default=0.1, show_default=True)
@click.option("--lr", default=1e-4, show_default=True)
@click.option("--epochs", default=2, show_default=True)
@click.option("--max-pairs", default=32, show_default=True,
              help="pairs per round: all new ones first, the rest drawn from earlier ones (CPU cost)")
@click.option("--max-length", default=256, show_default=True, help="tokens of prompt + completion in training")
@click.option("--out", type=click.Path(dir_okay=False), default=str(RESULTS / "dpo-cpu.json"), show_default=True)
def main(run_dir, rounds, count, n, seeds, eval_tokens, beta, lr, epochs, max_pairs, max_length, out):
    import dataclasses

    from autoprune_ray.engine.config import RunConfig, from_dict
    from autoprune_ray.engine.storage import RunStore
    from autoprune_ray.llm.backends import TransformersBackend
    from autoprune_ray.llm.dpo import DPOConfig, train_round
    from autoprune_ray.llm.preferences import PreferenceLog, replay

    t0 = time.perf_counter()
    store = RunStore(run_dir)
    cfg = from_dict(RunConfig, store.read_config())
    cfg = dataclasses.replace(cfg, target=dataclasses.replace(cfg.target, eval_tokens=eval_tokens))
    cands, evals, prompts = store.read("candidates"), store.read("evaluations"), store.read("prompts")
    train_prompts, ab_prompts = split_prompts(prompts, count, seed=0)
    pol = cfg.policy
    judge = Judge(cfg, set(cands.hash.dropna()) - {""})
    # every pair of the run, however far apart its completions (the engine pairs within a window)
    log = PreferenceLog(margin=0.01, groupings=("prompt", "parents"), window=10 ** 9)
    pairs = replay(log, cands, evals, prompts)
    history = [{"round": 0, "source": "run tables", "pairs": len(pairs)}]
    base = TransformersBackend(pol.model, device="cpu")
    tuned = TransformersBackend(pol.model, device="cpu")
    next_id, adapter = [10 ** 7], None
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(1, rounds + 1):
            policy = tuned if adapter else base
            new = collect_pairs(policy, judge, train_prompts, n, pol.temperature, pol.max_new_tokens, 100 + r, log,
                                next_id)
            frame = training_pairs(pd.DataFrame(pairs), pd.DataFrame(new), max_pairs, seed=r)
            pairs += new
            metrics = train_round(pol.model, frame[["prompt", "chosen", "rejected"]].to_dict("records"),
                                  f"{tmp}/v{r}", DPOConfig(beta=beta, lr=lr, epochs=epochs, max_length=max_length,
                                                           seed=r), adapter)
            adapter = f"{tmp}/v{r}"
            tuned.load_adapter(adapter, f"v{r}")
            history.append({"round": r, "new_pairs": len(new), "pairs": len(pairs), "trained_on": len(frame),
                            "kinds": frame.kind.value_counts().to_dict(), "train": metrics["train"],
                            "held_out_before": metrics["held_out_before"], "held_out": metrics["held_out"]})
            click.echo(json.dumps(history[-1]))
        seed_list = [int(s) for s in seeds.split(",")]
        arms = {name: ab_arm(backend, judge, list(ab_prompts.prompt), n, pol.temperature, pol.max_new_tokens,
                             seed_list) for name, backend in (("base", base), (f"dpo-v{rounds}", tuned))}
    result = {"benchmark": "DPO A/B on the default CPU setup (SmolLM2-135M-Instruct policy and target)",
              "run_dir": run_dir, "rounds": history, "ab_prompts": len(ab_prompts), "completions_per_prompt": n,
              "seeds": seed_list, "temperature": pol.temperature, "max_new_tokens": pol.max_new_tokens,
              "eval_tokens": eval_tokens, "dpo": {"beta": beta, "lr": lr, "epochs": epochs, "reference": "base",
                                                  "max_pairs": max_pairs, "max_length": max_length},
              "arms": arms, "seconds": time.perf_counter() - t0,
              "machine": "2-core CPU"}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    click.echo(json.dumps({k: {m: v[m] for m in ("samples", "valid_rate", "duplicate_rate", "mean_child_perplexity",
                                                 "best_child_perplexity")} for k, v in arms.items()}, indent=1))


if __name__ == "__main__":
    main()
