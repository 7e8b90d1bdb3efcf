"""What a run shows in the terminal (issue: a newcomer's first hour). The live display is read as a
terminal would show it: every record on a line of its own, never on the progress bar's line; no
forwarded worker progress bars; no token-authentication warning; a closing table and the next
commands. The plain mode (--no-progress) gives log lines only."""
import io
import logging
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest
import yaml
from rich.console import Console

from autoprune_ray.engine.display import Display
from autoprune_ray.engine.storage import RunStore
from autoprune_ray.tasks import get_task
from tests_support import make_config, scaled

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BAR = "━"
TQDM = re.compile(r"\d+%\|| it/s\]|calibration:|Loading weights")


def screen_lines(raw: str) -> list[str]:
    """The lines a terminal ends up showing: a carriage return or an erase-line starts the line over."""
    lines = []
    for line in raw.replace("\r\n", "\n").replace("\x1b[2K", "\r").split("\n"):   # a pty sends \r\n
        lines.append(ANSI.sub("", line.split("\r")[-1]).rstrip())
    return [line for line in lines if line]


def unconfigured_logging(monkeypatch):
    """Logging as a command-line run has it: pytest hangs its capture handlers on the root when
    the test body starts, so this is called in the body, not as a fixture."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])


def test_live_records_never_share_the_bar_line(monkeypatch):
    unconfigured_logging(monkeypatch)
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    engine = logging.getLogger("autoprune_ray.engine")
    with Display(4, "KL", live=True, console=console) as display:
        for i in range(4):
            display.update(lambda: {"evaluated": i, "valid_rate": 0.5, "best_fitness": -0.4}, 2)
            engine.info("candidate=%d: ok", i)
            print(f"(EvaluatorWorker pid=1) forwarded line {i}", file=sys.stderr)   # Ray's log_to_driver
    shown = screen_lines(buf.getvalue())
    for i in range(4):
        mine = [line for line in shown if f"candidate={i}: ok" in line]
        forwarded = [line for line in shown if f"forwarded line {i}" in line]
        assert len(mine) == 1 and len(forwarded) == 1, shown
        assert BAR not in mine[0] and BAR not in forwarded[0]
    assert not logging.getLogger("autoprune_ray").handlers, "the display's handler outlives the run"


def test_a_plain_display_writes_log_lines_and_no_bar(monkeypatch, capsys):
    unconfigured_logging(monkeypatch)
    with Display(2, "KL", live=False) as display:
        display.update(lambda: pytest.fail("a plain display reads no summary"), 0)
        logging.getLogger("autoprune_ray.engine").info("candidate=0: ok")
    err = capsys.readouterr().err
    assert re.fullmatch(r"\d{4}-\d\d-\d\d [\d:,]+ INFO autoprune_ray\.engine: candidate=0: ok\n", err), err


def _config_file(tmp_path, tiny_model_dir, corpus_file, name: str, **search):
    cfg = make_config(tmp_path, tiny_model_dir, corpus_file, name=name, max_evaluations=6, **search)
    data = cfg.to_dict() | {"ray": {"num_cpus": 2}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run_in_terminal(args: list[str], timeout: float) -> str:
    """The bytes a terminal of 120 columns receives from the command."""
    controller, terminal = pty.openpty()
    env = os.environ | {"COLUMNS": "120", "LINES": "40", "TERM": "xterm-256color"}
    env.pop("RAY_AUTH_MODE", None)   # as a newcomer's shell has it
    proc = subprocess.Popen(args, stdin=terminal, stdout=terminal, stderr=terminal, env=env, start_new_session=True)
    os.close(terminal)
    out, deadline = bytearray(), time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([controller], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(controller, 65536)
            except OSError:   # the command closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=scaled(60))
    os.close(controller)
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
    return out.decode(errors="replace")


def test_a_live_run_in_a_terminal_is_clean_and_ends_with_the_table(tmp_path, tiny_model_dir, corpus_file):
    config = _config_file(tmp_path, tiny_model_dir, corpus_file, "live")
    raw = _run_in_terminal([sys.executable, "-m", "autoprune_ray.engine.cli", "run", str(config)], scaled(600))
    shown = screen_lines(raw)
    records = [line for line in shown if "candidate=" in line]
    assert len(records) >= 6, shown
    assert not [line for line in records if BAR in line], "a record shares the progress bar's line"
    assert not [line for line in shown if TQDM.search(line)], "a worker's progress bar reached the terminal"
    assert not [line for line in shown if "Token authentication is enabled" in line]
    assert any(line.lstrip("│┃ ").startswith("reference") and "wanda" in line for line in shown), shown
    assert any("autoprune-ray report" in line for line in shown)


def test_a_plain_run_gives_log_lines_and_the_table(tmp_path, tiny_model_dir, corpus_file):
    config = _config_file(tmp_path, tiny_model_dir, corpus_file, "plain", seeds=["wanda", "ria"])
    env = os.environ.copy()
    env.pop("RAY_AUTH_MODE", None)
    done = subprocess.run([sys.executable, "-m", "autoprune_ray.engine.cli", "run", str(config), "--no-progress"],
                          capture_output=True, text=True, timeout=scaled(600), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert sum("candidate=" in line for line in lines) >= 6
    assert not [line for line in lines if BAR in line or TQDM.search(line) or "\r" in line], lines
    assert not [line for line in lines if "Token authentication is enabled" in line]
    assert "reference" in done.stdout and "Next:" in done.stdout, done.stdout
    cands = RunStore(tmp_path / "plain").read("candidates")
    seeds = get_task("prune").seeds()
    assert set(cands[cands.operator == "seed"].hash) == {seeds["wanda"].hash, seeds["ria"].hash}


def test_actors_run_with_their_progress_bars_off():
    """Forwarded to the driver, the actors' bars (model loading, calibration) would flood the display."""
    ray = pytest.importorskip("ray")
    from autoprune_ray.engine.runner import QUIET_ACTORS
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote(runtime_env=QUIET_ACTORS)
        def bar_is_off() -> bool:
            from tqdm.auto import tqdm
            return tqdm(range(1)).disable

        assert ray.get(bar_is_off.remote()) is True
    finally:
        if started:
            ray.shutdown()


def test_calibration_bars_stay_off_a_file(tiny_lm, tiny_data, capsys):
    """An actor's stderr is a file that Ray forwards to the driver's terminal: a bar there is noise."""
    from autoprune_ray.compress.eval import perplexity
    from autoprune_ray.compress.stats import walk
    walk(tiny_lm, tiny_data.calibration, with_gram=False, batch_size=2)
    perplexity(tiny_lm, tiny_data.validation, tiny_data.seqlen)
    err = capsys.readouterr().err
    assert "calibration" not in err and "perplexity" not in err, err


def test_the_ancestry_plot_holds_both_parents_of_a_crossover(tmp_path):
    import pandas as pd

    from autoprune_ray.engine.plots import ancestry, plots
    cands = pd.DataFrame({"candidate_id": [0, 1, 2, 3, 4], "operator": ["seed", "seed", "symbolic_mutate",
                                                                        "symbolic_crossover", "llm_mutate"],
                          "parents": [[], [], [0], [2, 1], [3]], "hash": list("abcde"),
                          "status": ["accepted"] * 5, "code": [""] * 5})
    assert ancestry(cands, 4) == {4: 0, 3: 1, 2: 2, 1: 2, 0: 3}
    evals = pd.DataFrame({"candidate_id": [0, 1, 2, 3, 4], "status": ["ok"] * 5, "fitness": [-1.0] * 5,
                          "finished": range(5), "hash": list("abcde")})
    assert plots(cands, evals, 4, {"a": "wanda"}, "KL", tmp_path) == ["best_fitness.png", "valid_rate.png",
                                                                      "lineage.png"]
