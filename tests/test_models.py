"""Loading target models."""
import os
import time


def test_actors_starting_together_convert_the_gguf_once(tmp_path, monkeypatch):
    """The policy and the evaluators start at once on a fresh machine: one converts the GGUF, the
    others wait for its copy (two converting into one folder crashed an evaluator)."""
    import multiprocessing

    from autoprune_ray.compress import models
    monkeypatch.setenv("AUTOPRUNE_CACHE", str(tmp_path / "cache"))
    log = tmp_path / "conversions"

    def slow_conversion(target):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        partial.mkdir()
        time.sleep(1.0)   # long enough for the other process to arrive while this one converts
        (partial / "config.json").write_text("{}")
        partial.replace(target)

    monkeypatch.setattr(models, "_convert_gguf", slow_conversion)
    context = multiprocessing.get_context("fork")
    with context.Pool(3) as pool:
        dirs = pool.starmap(models.converted_default_dir, [()] * 3)
    assert len(set(dirs)) == 1 and (dirs[0] / "config.json").exists()
    assert len(log.read_text().split()) == 1, "exactly one process converted"
