"""The command line on the tiny model: tables, export, and clear errors for bad input."""
import json
import math

import pytest
import torch
from click.testing import CliRunner

from autoprune_ray.engine.cli import main
from autoprune_ray.operators.language import parse_file


@pytest.fixture
def run(tiny_model_dir, corpus_file):
    def invoke(*args):
        common = ["--model", str(tiny_model_dir), "--data", str(corpus_file), "--nsamples", "4", "--seqlen", "32",
                  "--eval-tokens", "128", "--device", "cpu"]
        return CliRunner().invoke(main, [args[0], *common, *args[1:]])  # later options win
    return invoke


def test_help_lists_commands_with_examples():
    out = CliRunner().invoke(main, ["--help"]).output
    assert "prune" in out and "baselines" in out
    for command in ("prune", "baselines"):
        assert "Examples:" in CliRunner().invoke(main, [command, "--help"]).output


def test_prune_prints_table_and_exports_loadable_model(run, tmp_path):
    from transformers import AutoModelForCausalLM
    result = run("prune", "--method", "wanda", "--sparsity", "0.5", "--save", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "wanda" in result.output and "50.0000%" in result.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    q = model.model.layers[1].self_attn.q_proj.weight
    assert ((q == 0).sum(1) == q.shape[1] // 2).all()
    report = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert report["sparsity"] == 0.5 and report["protocol"]["nsamples"] == 4


def test_prune_json_output(run):
    result = run("prune", "--method", "sparsegpt", "--pattern", "2:4", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["label"] == "sparsegpt 2:4" and report["sparsity"] == 0.5
    assert torch.isfinite(torch.tensor(report["perplexity"]))
    nll = report["window_nll"]   # each held-out window's mean NLL, so two reports can be paired
    assert len(nll) == report["protocol"]["eval_tokens"] // report["protocol"]["seqlen"]
    assert report["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)))


@pytest.mark.parametrize("args,message", [
    (["--method", "obs"], "'obs' is not one of"),
    (["--method", "program"], "'program' is not one of"),   # a program comes with --program
    (["--sparsity", "1.0"], "outside [0, 1)"),
    (["--sparsity", "-0.1"], "outside [0, 1)"),
    (["--pattern", "3:7"], "does not divide"),
    (["--pattern", "two:four"], "bad N:M"),
    (["--allocation", "random"], "unknown allocation"),
    (["--data", "/nonexistent/corpus.txt"], "does not exist"),
    (["--nsamples", "0"], "nsamples must be positive"),
    (["--eval-tokens", "8"], "less than one window"),
])
def test_bad_input_gets_one_clear_message(run, args, message):
    result = run("prune", *args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_files_are_reported(tmp_path):
    result = CliRunner().invoke(main, ["prune", "--data", str(tmp_path / "none.txt"), "--model", str(tmp_path)])
    assert result.exit_code != 0 and "config.json" in result.output


def test_baselines_table_to_parquet(run, tmp_path):
    import pandas as pd
    out = tmp_path / "t.parquet"
    result = run("baselines", "--methods", "magnitude,wanda,owl-wanda", "--sparsity", "0.5", "--patterns", "2:4",
                 "--out", str(out))
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out)
    assert list(table.method) == ["dense", "magnitude", "magnitude", "wanda", "wanda", "owl-wanda"]
    assert "| method | 50% | 2:4 |" in result.output


def test_prune_with_a_program_file_equals_wanda(run, tmp_path):
    program = tmp_path / "metric.py"
    program.write_text("Here you go:\n```python\ndef score_v2(weight, act):\n    return torch.abs(weight) * act\n```\n")
    ours = run("prune", "--program", str(program), "--json").output
    ours = json.loads(ours[ours.index("{"):])
    wanda = run("prune", "--method", "wanda", "--json").output
    wanda = json.loads(wanda[wanda.index("{"):])
    assert ours["perplexity"] == wanda["perplexity"]
    expected = parse_file(program.read_text()).hash[:8]
    assert ours["label"] == f"program {expected}"   # tables name a program by its hash


def test_the_method_choices_are_the_baselines():
    from autoprune_ray.compress.prune import METHODS
    from autoprune_ray.engine.cli_compress import BASELINE_METHODS
    assert set(BASELINE_METHODS) == set(METHODS) - {"program"}


def test_check_prints_canonical_form_or_reason(tmp_path):
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text("def f(act, weight):\n    s = act * weight.abs()\n    return s")
    bad.write_text("def f(W):\n    import os\n    return W")
    out = CliRunner().invoke(main, ["check", str(good)])
    assert out.exit_code == 0 and "return A * abs(W)" in out.output
    out = CliRunner().invoke(main, ["check", str(bad)])
    assert out.exit_code != 0 and "import os" in out.output
    out = CliRunner().invoke(main, ["prune", "--program", str(bad)])
    assert out.exit_code != 0 and "program rejected" in out.output


def test_every_committed_program_file_is_checked_as_its_task():
    """The discovered programs in benchmarks/results: pruning files by their functions, a
    `sensitivity` proxy as task mpq, which `prune` refuses with the command that applies it."""
    from pathlib import Path
    files = sorted((Path(__file__).parents[1] / "benchmarks" / "results" / "discovered").glob("*.py"))
    tasks = {}
    for path in files:
        out = CliRunner().invoke(main, ["check", str(path)])
        assert out.exit_code == 0, out.output
        tasks[path.name] = out.output.split(";")[0].removeprefix("# task ")
    assert tasks["mpq-3bit.py"] == "mpq" and tasks["best-70.py"] == "joint"
    out = CliRunner().invoke(main, ["prune", "--program", str(files[0].parent / "mpq-3bit.py")])
    assert out.exit_code != 0 and "autoprune-ray quantize --program" in out.output


def test_program_files_with_top_level_statements_or_parser_crashers_are_rejected_in_one_line(tmp_path):
    """A file is the one function and nothing else: `check` and `prune --program` reject top-level
    statements (nothing runs either way); text that once crashed the parser gets one clear line."""
    outside = tmp_path / "outside.py"
    outside.write_text("import os\nos.system('touch /tmp/pwned')\n\ndef score(W, A):\n    return W.abs() * A\n")
    huge = tmp_path / "huge.py"
    huge.write_text("def score(W):\n    return W.abs() ** " + "9" * 400 + "\n")
    for path in (outside, huge):
        for args in (["check", str(path)], ["prune", "--program", str(path)]):
            out = CliRunner().invoke(main, args)
            assert out.exit_code != 0 and "Traceback" not in out.output, (args, out.output)
            assert out.output.count("\n") == 1 and "rejected" in out.output, out.output


def test_an_allocation_program_gets_the_band_its_search_ran_with(tmp_path):
    import yaml

    from autoprune_ray.compress.prune import PruneConfig
    from autoprune_ray.engine.cli_compress import program_band

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"task": "joint", "allocation": {"lam": 0.12}}))
    assert program_band(f"{run_dir}:best") == 0.12
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"task": "prune"}))   # written before the band was saved
    assert program_band(f"{run_dir}:best") == 0.16
    assert program_band(str(tmp_path / "best-70.py")) == PruneConfig.allocation_lambda == 0.25
    assert program_band(None) == 0.25
