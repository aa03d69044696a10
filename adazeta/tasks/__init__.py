"""Tasks: each a small class naming its columns, labels and prompts (see tasks/base.py)."""

from adazeta.config import TaskConfig
from adazeta.errors import ConfigError
from adazeta.tasks.base import Example, Splits, Task
from adazeta.tasks.sst2 import SST2

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (SST2,)}


def build_task(cfg: TaskConfig) -> Task:
    if cfg.name not in TASKS:
        raise ConfigError(f"task.name={cfg.name!r} is not a task; choose one of {sorted(TASKS)}")
    return TASKS[cfg.name](cfg)


__all__ = ["TASKS", "Example", "Splits", "Task", "build_task"]
