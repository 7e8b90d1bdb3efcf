"""The installed distribution, not the source tree: one namespace and a working console script."""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def installed_distribution():
    """The installed metadata, not the `autoprune_ray.egg-info` an in-tree `pip install .` leaves in the checkout
    (which shadows it whenever the current directory is the repository root)."""
    for dist in importlib.metadata.distributions(name="autoprune-ray"):
        if Path(dist.locate_file("")).resolve() != REPO:
            return dist
    raise AssertionError("autoprune-ray is not installed")


def test_every_module_lives_under_the_autoprune_ray_namespace():
    files = installed_distribution().files
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
