"""Task plug-ins and their registry: the one place that maps a task's name to its plug-in.

Adding a task means one module here with a `TaskPlugin` subclass, one line in `_PLUGINS`, and
its tests (see tests/test_tasks.py)."""
from __future__ import annotations

from autoprune_ray.tasks.allocate import AllocateTask
from autoprune_ray.tasks.base import TaskPlugin
from autoprune_ray.tasks.joint import JointTask
from autoprune_ray.tasks.mpq import MPQTask
from autoprune_ray.tasks.prune import PruneTask

_PLUGINS: tuple[TaskPlugin, ...] = (PruneTask(), AllocateTask(), JointTask(), MPQTask())
TASKS: dict[str, TaskPlugin] = {plugin.name: plugin for plugin in _PLUGINS}


def get_task(name: str) -> TaskPlugin:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose {', '.join(TASKS)}")
    return TASKS[name]
