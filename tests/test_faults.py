"""Fault tolerance on real processes: the driver is killed (SIGKILL) mid-run and the run is
resumed. Nothing evaluated before the kill is lost or evaluated again, and every proposed
candidate ends in exactly one recorded outcome. (Dead evaluators and hung evaluations:
tests/test_engine.py::test_failures_become_records.)"""
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

pytest.importorskip("ray")

from autoprune_ray.engine.storage import RunStore  # noqa: E402

from tests_support import COMPLETIONS  # noqa: E402
from tests_support import assert_resumed_cleanly, scaled  # noqa: E402


def run_cli(config, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "autoprune_ray.engine.cli", "run", str(config), "--no-progress",
                             *extra], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def test_killed_driver_resumes_without_losing_or_repeating(tmp_path, tiny_model_dir, corpus_file):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "killed", "run_dir": str(tmp_path / "{name}"),
        "target": {"model": str(tiny_model_dir), "calib_data": str(corpus_file), "nsamples": 4, "seqlen": 32,
                   "val_tokens": 128, "device": "cpu"},
        "policy": {"backend": "scripted", "scripted": COMPLETIONS, "prompts_per_batch": 2, "completions_per_prompt": 2},
        "search": {"islands": 2, "population_size": 6, "elites": 1, "max_evaluations": 10, "max_seconds": scaled(600),
                   "eval_time_limit": scaled(120), "cascade": 100.0, "checkpoint_every": 1,
                   "operators": {"llm_mutate": 0.5, "llm_init": 0.2, "symbolic_mutate": 0.3}},
        "evaluators": {"num": 1, "fault_injection": {"sleep_seconds": "1.5"}},
        "ray": {"num_cpus": 2}}))
    store_dir = tmp_path / "killed"
    driver = run_cli(config)
    deadline = time.time() + scaled(300)
    while time.time() < deadline and driver.poll() is None:
        if (store_dir / "config.yaml").exists() and len(RunStore(store_dir).read("evaluations")) >= 4:
            break
        time.sleep(0.5)
    assert driver.poll() is None, driver.stderr.read()[-2000:]
    os.killpg(driver.pid, signal.SIGKILL)       # the driver and whatever Ray processes share its group
    driver.wait()
    before = RunStore(store_dir).read("evaluations")
    assert 4 <= len(before) < 10

    resumed = run_cli(config, "--resume")
    _, err = resumed.communicate(timeout=scaled(600))
    assert resumed.returncode == 0, err[-2000:]
    assert_resumed_cleanly(RunStore(store_dir), before, total=10)
