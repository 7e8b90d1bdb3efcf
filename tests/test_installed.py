"""The installed distribution, not the source tree: one namespace and a working console script."""
import importlib.metadata
import os
import subprocess
import sys


def test_every_module_lives_under_the_autoprune_ray_namespace():
    files = importlib.metadata.files("autoprune-ray")
    modules = [f for f in files if f.suffix == ".py" and "__editable__" not in str(f)]
    top = {f.parts[0] for f in modules}
    assert top <= {"autoprune_ray"}, top
    if modules:  # a regular install: every room is there
        rooms = {f.parts[1] for f in modules}
        assert {"compress", "engine", "operators", "llm", "kernels"} <= rooms


def test_console_script_runs_outside_the_source_tree(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(["autoprune-ray", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout
    assert "prune" in out and "baselines" in out
    probe = ("import importlib.util as u, autoprune_ray.compress.prune as p; "
             "print(p.__file__); print([n for n in ('engine','compress','kernels','operators') if u.find_spec(n)])")
    lines = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert lines[-1] == "[]"  # no stray top-level room modules
