"""The search engine on a real local Ray instance, with a tiny target model and a scripted policy
(a real backend class fed fixed completions, so the runs are deterministic)."""

import threading
import time
from pathlib import Path

import pandas as pd
import pytest

ray = pytest.importorskip("ray")

from autoprune_ray.engine.runner import run_search  # noqa: E402
from autoprune_ray.engine.storage import RunStore  # noqa: E402
from tests_support import COMPLETIONS, assert_one_outcome_each, make_config, scaled, tables  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_search_pipeline_records_every_outcome(ray_session, tmp_path, tiny_model_dir, corpus_file):
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file)
    summary = run_search(cfg, progress=False)
    cands, evals = tables(cfg)
    assert summary["evaluated"] == 8 == len(evals)
    assert_one_outcome_each(cands, evals, summary)
    assert {"seed", "llm_mutate"} <= set(cands.operator)
    assert (cands.status == "duplicate").any() and (cands.status == "rejected").any()
    assert "import os" in " ".join(cands[cands.status == "rejected"].source)
    prompts = RunStore(cfg.resolved_run_dir).read("prompts")
    assert len(prompts) and prompts.completion.isin(COMPLETIONS).all()
    ok = evals[evals.status == "ok"]
    assert len(ok) and ok.perplexity.notna().all() and (ok.sparsity == 0.5).all()
    assert summary["best_perplexity"] == pytest.approx(ok.perplexity.min())
    lineage = RunStore(cfg.resolved_run_dir).read("lineage")
    assert set(lineage.child_id) <= set(cands.candidate_id)


def test_resume_continues_without_repeating(ray_session, tmp_path, tiny_model_dir, corpus_file):
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, name="r", max_evaluations=4)
    first = run_search(cfg, progress=False)
    first_cands, first_evals = tables(cfg)
    assert_one_outcome_each(first_cands, first_evals, first)
    with pytest.raises(Exception, match="already holds a run"):
        run_search(cfg, progress=False)
    cfg.search.max_evaluations = 9
    second = run_search(cfg, resume=True, progress=False)
    cands, evals = tables(cfg)
    assert len(evals) == 9
    pending = set(first_cands[first_cands.status == "accepted"].candidate_id) - set(first_evals.candidate_id)
    resumed = set(evals.candidate_id.iloc[len(first_evals):])
    # the stopped run's queue is dispatched first: as many of its candidates as evaluations allow
    assert pending and len(resumed & pending) == min(len(pending), len(resumed))
    pd.testing.assert_frame_equal(cands.iloc[: len(first_cands)].reset_index(drop=True),
                                  first_cands.reset_index(drop=True))
    pd.testing.assert_frame_equal(evals.iloc[: len(first_evals)].reset_index(drop=True),
                                  first_evals.reset_index(drop=True))
    assert_one_outcome_each(cands, evals, second)


def test_a_killed_policy_actor_restarts_and_the_run_goes_on(ray_session, tmp_path, tiny_model_dir, corpus_file,
                                                            caplog):
    """The policy's process is killed (as an OOM kill would) after its first batch: Ray restarts
    the actor, and the LLM keeps proposing."""
    caplog.set_level("INFO", logger="autoprune_ray")
    # Only LLM operators: at the kill at most 7 programs are evaluated, queued (4) or in flight (2),
    # so the 8th must be proposed after it, by the restarted policy (with symbolic operators on, a
    # busy machine could fill the rest of the budget with symbolic children).
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, name="p", max_evaluations=8,
                      operators={"llm_mutate": 0.7, "llm_init": 0.3})
    # Evaluations wait while the pause file exists, from the start: when the policy has served its
    # first batch the queue is full (seeds and that batch, fewer than 8 accepted programs), so the
    # run can neither end nor fill its budget before the policy is killed and has restarted, and
    # the restarted policy must be asked again (events, not a race against the table flushes).
    pause = tmp_path / "pause"
    pause.touch()
    cfg.evaluators.fault_injection = {"pause_while_file": str(pause)}
    cfg.search.eval_time_limit = 600
    killed = {}

    def served(policy) -> int:
        return ray.get(policy.ping.remote(), timeout=30)["tokens"]

    def kill_policy_after_its_first_batch():
        deadline = time.time() + scaled(600)
        try:
            policy = wait_for_actor(f"{cfg.name}:policy", deadline)
            while time.time() < deadline and served(policy) == 0:
                time.sleep(0.2)
            killed["pid"] = ray.get(policy.ping.remote())["pid"]
            ray.kill(policy, no_restart=False)
            while time.time() < deadline:   # the kill is asynchronous; calls fail while it restarts
                try:
                    state = ray.get(policy.ping.remote(), timeout=30)
                    if state["pid"] != killed["pid"]:
                        killed["new_pid"] = state["pid"]
                        break
                except ray.exceptions.RayError:
                    pass
                time.sleep(0.5)
        finally:
            pause.unlink()

    thread = threading.Thread(target=kill_policy_after_its_first_batch, daemon=True)
    thread.start()
    summary = run_search(cfg, progress=False)
    thread.join(timeout=scaled(30))
    cands, evals = tables(cfg)
    assert "new_pid" in killed, "Ray restarted the policy in a new process"
    assert summary["evaluated"] == 8
    assert_one_outcome_each(cands, evals, summary)
    # one batch was answered before the kill, and no second one asked (the queue was full)
    answered = RunStore(cfg.resolved_run_dir).read("prompts").prompt_id.nunique()
    assert answered > cfg.policy.prompts_per_batch, "the restarted policy wrote more candidates"


def wait_for_actor(name: str, deadline: float):
    while True:
        try:
            return ray.get_actor(name)
        except ValueError:   # not created yet
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def test_dpo_rounds_train_and_serve_adapters_while_searching_and_resume(ray_session, tmp_path, tiny_model_dir,
                                                                          corpus_file):
    from autoprune_ray.llm.preferences import PreferenceLog, replay
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, name="d", max_evaluations=5, stall_proposals=80,
                      operators={"llm_mutate": 0.3, "gcot": 0.2, "llm_init": 0.2, "symbolic_mutate": 0.3})
    cfg.evaluators.num = 1                      # the DPO task takes the other CPU
    # each prompt's two completions: a valid program and a rejected one, so every prompt gives a pair
    cfg.policy.scripted = [c for valid in COMPLETIONS[4:] for c in (valid, COMPLETIONS[3])]
    cfg.policy.model = str(tiny_model_dir)      # the model DPO trains (the scripted policy only labels)
    cfg.dpo.enabled, cfg.dpo.every_pairs, cfg.dpo.lora_r = True, 2, 4
    cfg.strategy.temperatures = [0.5, 1.0]
    first = run_search(cfg, progress=False)
    store = RunStore(cfg.resolved_run_dir)
    rounds = store.read("adapters")
    assert first["dpo_rounds"] >= 1 and (rounds.status == "ok").all(), rounds.reason.tolist()
    assert list(rounds.version) == [f"v{r}" for r in rounds["round"]] == [f"v{i + 1}" for i in range(len(rounds))]
    for path in rounds.path:
        assert (Path(path) / "adapter_config.json").exists() and (Path(path) / "metrics.json").exists()
    assert (rounds.train_pairs > 0).all() and rounds.train_loss.notna().all()
    last_before = rounds.version.iloc[-1]
    n_cands = len(store.read("candidates"))

    cfg.search.max_evaluations = 9
    second = run_search(cfg, resume=True, progress=False)
    assert second["stop_reason"] in ("reached 9 evaluations", "80 proposals in a row were rejected or duplicates")
    store = RunStore(cfg.resolved_run_dir)
    cands, evals, prompts = store.read("candidates"), store.read("evaluations"), store.read("prompts")
    assert_one_outcome_each(cands, evals, second)
    rounds = store.read("adapters")
    assert list(rounds["round"]) == list(range(1, len(rounds) + 1))          # versions continue, none reused
    new = cands.iloc[n_cands:]
    new = new[new.prompt_id.notna()]
    assert len(new) and new.adapter.iloc[0] == last_before                    # served from the first batch
    assert set(cands.adapter.dropna()) <= set(rounds.version)
    # the log holds every pair once, the same pairs a replay of the tables gives
    pairs = store.read("preferences")
    assert len(pairs) and not pairs[["chosen_id", "rejected_id"]].duplicated().any()
    replayed = replay(PreferenceLog(cfg.dpo.margin, tuple(cfg.dpo.groupings), cfg.dpo.window), cands, evals, prompts)
    assert set(zip(pairs.chosen_id, pairs.rejected_id)) == {(p["chosen_id"], p["rejected_id"]) for p in replayed}
    assert set(prompts.strategy) <= {f"{op}@{t}" for op in ("llm_mutate", "gcot", "llm_init") for t in ("0.5", "1")}
    assert set(cands[cands.prompt_id.notna()].strategy) == set(prompts.strategy)


def test_failures_become_records(ray_session, tmp_path, tiny_model_dir, corpus_file, caplog):
    """A hung evaluation is killed at its limit, a crashed evaluator's job is re-queued once,
    a NaN score is a recorded failure, and the run finishes; the logs name run, island and candidate."""
    caplog.set_level("INFO", logger="autoprune_ray")
    marker = tmp_path / "crashed-once"
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, name="f", max_evaluations=7, eval_time_limit=15,
                      operators={"llm_mutate": 1.0})
    cfg.policy.scripted = [
        "```python\ndef score(W):\n    return W.abs() * W.tanh()\n```",          # hangs
        "```python\ndef score(W, A):\n    return W.abs().sigmoid() * A\n```",     # crashes its evaluator once
        "```python\ndef score(W):\n    return ((W * 10000) ** 4) ** 4 - ((W * 10000) ** 4) ** 4\n```",  # NaN
        "```python\ndef score(W, A):\n    return W.square() * A\n```",
        "```python\ndef score(W, G):\n    return W.abs() * G\n```",             # G is not collected
    ]
    cfg.evaluators.fault_injection = {"hang_if_code_contains": "tanh", "crash_if_code_contains": "sigmoid",
                                      "crash_marker": str(marker)}
    summary = run_search(cfg, progress=False)
    cands, evals = tables(cfg)
    assert_one_outcome_each(cands, evals, summary)
    by_code = evals.merge(cands[["candidate_id", "code"]], on="candidate_id")
    hung = by_code[by_code.code.str.contains("tanh")]
    assert (hung.status == "timeout").all() and len(hung) == 1
    crashed = by_code[by_code.code.str.contains("sigmoid")]
    assert marker.exists() and len(crashed) == 1 and crashed.status.iloc[0] == "ok"
    assert crashed.attempts.iloc[0] == 1
    nan = by_code[by_code.code.str.contains("10000")]
    assert nan.status.iloc[0] == "failed" and "NaN" in nan.reason.iloc[0]
    assert summary["evaluator_restarts"] >= 2
    reads_g = cands[cands.source.str.contains("W, G")]
    assert len(reads_g) and (reads_g.status == "rejected").all()
    assert reads_g.reason.str.contains("target.gradients").all()
    messages, islands = [r.getMessage() for r in caplog.records], cands.set_index("candidate_id").island

    def logged(cid, text):
        return any(m.startswith(f"run=f island={islands[cid]} candidate={cid}:") and text in m for m in messages)

    assert logged(hung.candidate_id.iloc[0], "timeout after")
    assert logged(crashed.candidate_id.iloc[0], "died mid-evaluation; re-queued")
    assert logged(crashed.candidate_id.iloc[0], ": ok, proxy")


@pytest.mark.slow
def test_real_default_smollm2_writes_and_scores_candidates(ray_session, tmp_path, user_cache):
    """configs/local.yaml shrunk: SmolLM2 is the policy (transformers backend) and the target."""
    from pathlib import Path

    from autoprune_ray.compress.models import resolve_model_path
    from autoprune_ray.engine.config import load_config

    cached = str(resolve_model_path("smollm2"))   # actors share the converted copy, not a fresh cache
    cfg = load_config(Path(__file__).parent.parent / "configs" / "local.yaml", {
        "run_dir": str(tmp_path / "{name}"), "target.model": cached, "policy.model": cached,
        "target.nsamples": 2, "target.seqlen": 64, "target.val_tokens": 256, "fitness.tokens": 128,
        "fitness.promote": 0, "fitness.promote_tokens": 256, "policy.max_new_tokens": 160,
        "policy.prompts_per_batch": 1, "policy.completions_per_prompt": 2, "search.max_evaluations": 3,
        "search.max_seconds": 900, "search.operators": {"llm_init": 0.5, "llm_mutate": 0.5}})
    summary = run_search(cfg, progress=False)
    cands, evals = tables(cfg)
    prompts = RunStore(cfg.resolved_run_dir).read("prompts")
    assert len(prompts) >= 2 and (prompts.tokens > 0).all() and prompts.completion.str.len().gt(0).all()
    from_policy = cands[cands.operator.str.startswith("llm")]
    assert len(from_policy) >= 2 and set(from_policy.status) <= {"accepted", "rejected", "duplicate"}
    assert (evals.status == "ok").sum() >= 1 and evals[evals.status == "ok"].kl.notna().all()
    assert_one_outcome_each(cands, evals, summary)


def test_status_report_and_prune_with_the_best_program(ray_session, tmp_path, tiny_model_dir, corpus_file):
    from click.testing import CliRunner

    from autoprune_ray.compress.protocol import Protocol
    from autoprune_ray.engine.cli import main
    from autoprune_ray.engine.report import status, write_report

    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, name="r", max_evaluations=5)
    # each prompt's two completions: a valid program, then a rejected one (a validity pair for DPO)
    valid, invalid = [COMPLETIONS[i] for i in (0, 4, 5, 6, 7)], [COMPLETIONS[i] for i in (2, 3)]
    cfg.policy.scripted = [text for k, good in enumerate(valid) for text in (good, invalid[k % 2])]
    run_search(cfg, progress=False)
    run_dir = cfg.resolved_run_dir
    st = status(run_dir)
    assert st["candidates"] >= 5 and 0 < st["valid_rate"] <= 1 and st["best"]["perplexity"] > 1
    proto = Protocol(calib_data=str(corpus_file), nsamples=4, seqlen=32, eval_tokens=128)
    text = write_report(run_dir, proto, ["wanda"]).read_text()
    assert "## Re-measured beside the baselines" in text and "| wanda |" in text and "best program" in text
    assert (run_dir / "report" / "best_fitness.png").exists() or any((run_dir / "report").glob("*.png"))
    pruned = CliRunner().invoke(main, ["prune", "--program", f"{run_dir}:best", "--model", str(tiny_model_dir),
                                       "--data", str(corpus_file), "--nsamples", "4", "--seqlen", "32",
                                       "--eval-tokens", "128", "--json"])
    assert pruned.exit_code == 0, pruned.output
    assert '"sparsity": 0.5' in pruned.output
    trained = CliRunner().invoke(main, ["dpo", str(run_dir), "--model", str(tiny_model_dir), "--lr", "1e-3"])
    assert trained.exit_code == 0, trained.output
    assert (run_dir / "adapters" / "offline-1" / "metrics.json").exists()
    logged = pd.read_parquet(run_dir / "tables" / "preferences")   # the run's own log, read with pandas
    assert (logged.kind == "validity").any() and f"{len(logged)} pairs" in trained.output


def test_a_parser_fault_becomes_a_rejection_not_a_crash(ray_session, tmp_path, tiny_model_dir, corpus_file,
                                                        monkeypatch):
    """Whatever the parser raises on a completion (here an injected RuntimeError on one of them) is
    recorded as that completion's rejection with the reason; the search runs to its budget."""
    from autoprune_ray.engine import proposals

    real_parse = proposals.parse

    def faulty_parse(text, task, *args, **kwargs):
        if "M.abs()" in text:
            raise RuntimeError("injected parser fault")
        return real_parse(text, task, *args, **kwargs)

    monkeypatch.setattr(proposals, "parse", faulty_parse)
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, name="f", max_evaluations=4,
                      operators={"llm_init": 1.0})
    summary = run_search(cfg, progress=False)
    cands, evals = tables(cfg)
    assert summary["evaluated"] == 4
    faulted = cands[cands.source.str.contains("M.abs()", regex=False)]
    assert len(faulted) and (faulted.status == "rejected").all()
    assert faulted.reason.str.contains("could not be parsed (RuntimeError: injected parser fault)",
                                       regex=False).all()


def test_evaluators_that_cannot_start_end_the_run_with_one_clear_error(ray_session, tmp_path, tiny_model_dir,
                                                                        corpus_file):
    """Ray does not restart an actor whose constructor raised: the run says why and ends, keeping
    what it recorded, instead of waiting forever on evaluators that will never answer."""
    from autoprune_ray.engine.runner import ActorsFailed
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, name="nostart")
    cfg.target.model = str(empty)
    with pytest.raises(ActorsFailed, match="every evaluator failed to start: .*config.json"):
        run_search(cfg, progress=False)
    cands, _ = tables(cfg)
    assert len(cands) and (cands.operator == "seed").any(), "the seeds proposed before the failure are kept"


def test_idle_evaluators_get_symbolic_children_while_the_policy_writes():
    """On a CPU the policy writes for minutes; an idle evaluator must not wait for it."""
    from types import SimpleNamespace

    from autoprune_ray.engine.runner import _fill_idle
    proposed = []

    def search(queue, dispatched=0, symbolic="symbolic_mutate"):
        return SimpleNamespace(queue=list(queue), dispatched=dispatched,
                               cfg=SimpleNamespace(search=SimpleNamespace(max_evaluations=8)),
                               choose_symbolic=lambda: symbolic, symbolic_child=proposed.append)

    _fill_idle(search([]), SimpleNamespace(idle={0}))
    assert proposed == ["symbolic_mutate"]
    _fill_idle(search(["queued job"]), SimpleNamespace(idle={0}))                 # it has work
    _fill_idle(search([]), SimpleNamespace(idle=set()))                           # none idle
    _fill_idle(search([], dispatched=8), SimpleNamespace(idle={0}))               # budget spent
    _fill_idle(search([], symbolic=None), SimpleNamespace(idle={0}))              # no symbolic operators
    assert proposed == ["symbolic_mutate"]
