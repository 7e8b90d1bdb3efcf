"""Task plug-ins: the registry, what each plug-in provides, and config validation through it."""
from pathlib import Path

import pytest

from autoprune_ray.engine.config import ConfigError, RunConfig, from_dict, load_config
from autoprune_ray.operators.language import TASK_PARTS, parse
from autoprune_ray.operators.specs import SPECS
from autoprune_ray.tasks import TASKS, get_task
from autoprune_ray.tasks.base import TaskPlugin
from autoprune_ray.tree.expr import inputs_of

CONFIGS = Path(__file__).parent.parent / "configs"


def test_every_plugin_is_complete_and_its_seeds_are_valid_programs_of_its_language():
    assert set(TASKS) == {"prune", "allocate", "joint", "mpq"}
    for name, plugin in TASKS.items():
        assert plugin.name == name and plugin.spec.name == TASK_PARTS[name][0] and plugin.unimplemented() == []
        assert plugin.prompts.preamble and plugin.prompts.noun and plugin.prompts.system
        for seed in plugin.seeds().values():
            assert seed.task == name and list(seed.parts) == list(TASK_PARTS[name])
            assert parse(seed.code, name, seed.granularity).hash == seed.hash   # prints and re-parses alike
            for part, tree in seed.parts.items():
                assert inputs_of(tree) <= set(SPECS[part].inputs)


def test_each_plugin_turns_a_candidate_and_its_baselines_into_compress_configs():
    cfg = RunConfig().validate()
    for plugin in TASKS.values():
        for seed in plugin.seeds().values():
            plugin.compression_config(seed, cfg).validate()
        for name in plugin.baselines:
            plugin.baseline_config(name, cfg).validate()


def test_each_task_tells_the_policy_what_it_writes():
    assert "pruning metrics" in get_task("prune").prompts.system
    assert "quantization" in get_task("mpq").prompts.system
    assert "allocation" in get_task("allocate").prompts.system
    assert get_task("mpq").prompts.preamble != get_task("prune").prompts.preamble


def test_an_unknown_task_fails_validation_in_one_line():
    with pytest.raises(ConfigError, match=r"^task: unknown task 'distill': choose prune, allocate, joint, mpq$"):
        from_dict(RunConfig, {"task": "distill"}).validate()
    with pytest.raises(ValueError, match="unknown task 'distill'"):
        get_task("distill")


def test_a_task_without_an_evaluator_fails_validation(monkeypatch):
    class NoEvaluator(TaskPlugin):
        name = "half"
        spec = get_task("prune").spec
        prompts = get_task("prune").prompts

    monkeypatch.setitem(TASKS, "half", NoEvaluator())
    with pytest.raises(ConfigError, match="task 'half' cannot be searched: its plug-in lacks compression_config, "
                                          "baseline_config, make_evaluator"):
        from_dict(RunConfig, {"task": "half"}).validate()


def test_allocate_settings_are_checked_by_its_plugin():
    with pytest.raises(ConfigError, match="allocation.metric: 'sparsegpt' is not a mask-only metric"):
        from_dict(RunConfig, {"task": "allocate", "allocation": {"metric": "sparsegpt"}}).validate()
    with pytest.raises(ConfigError, match="allocation.lam: sparsity 0.9 ± 0.25 must stay within"):
        from_dict(RunConfig, {"task": "allocate", "target": {"sparsity": 0.9}}).validate()
    with pytest.raises(ConfigError, match="target.pattern"):
        from_dict(RunConfig, {"task": "allocate", "target": {"pattern": "2:4"}}).validate()


def test_no_module_outside_the_registry_compares_a_task_name():
    """The engine, report, config and prompts look tasks up; they never branch on a name."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"""(==|!=)\s*["'](prune|allocate|joint|mpq)["']|["'](prune|allocate|joint|mpq)["']\s*(==|!=)|"""
                         r"""task\w*\s+(not\s+)?in\s+\(["']""")
    hits = [f"{path.relative_to(root)}:{n}" for room in ("engine", "tasks", "operators", "llm", "compress")
            for path in sorted((root / room).glob("*.py"))
            for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "cluster.yaml"),
                         ids=lambda p: p.name)
def test_every_shipped_search_config_validates_and_names_a_registered_task(path):
    cfg = load_config(path)
    assert cfg.task in TASKS
    assert cfg.target.val_tokens, "a search reads a capped validation split"


def test_an_mpq_search_can_score_with_act_order_gptq():
    """quant.act_order reaches every config the task builds: the fitness's rounding and the
    report's re-measured rows."""
    cfg = load_config(CONFIGS / "mpq.yaml", {"quant.quantizer": "gptq", "quant.act_order": True})
    task = get_task("mpq")
    task.validate(cfg)
    assert task.baseline_config("uniform", cfg).gptq_options["act_order"] is True
    assert load_config(CONFIGS / "mpq.yaml").quant.quant_config().gptq_act_order is False
