"""Tasks: each a small class naming its columns, labels, prompts, loss and metric (tasks/base.py).

| task | masked LM (LM-BFF) | causal LM (MeZO) | classification head | metric |
|---|---|---|---|---|
| sst2, sst5, mr | yes | yes | yes | accuracy |
| trec, mnli, snli | yes | mnli/snli: CB's prompt | yes | accuracy |
| rte, cb | yes | yes | yes | accuracy |
| boolq, wic, wsc, multirc | no | yes | yes | accuracy (multirc: per answer option) |
| copa, record | no | yes (LM loss on the gold choice) | no | accuracy (record: any gold entity) |
| squad, drop | no | yes (LM loss, greedy generation) | no | f1 (and em) |
"""

from adazeta.config import TaskConfig
from adazeta.errors import ConfigError
from adazeta.tasks.base import Example, Splits, Task
from adazeta.tasks.lmbff import MR, SST5, TREC
from adazeta.tasks.nli import CB, MNLI, RTE, SNLI
from adazeta.tasks.qa import DROP, SQuAD
from adazeta.tasks.sst2 import SST2
from adazeta.tasks.superglue import COPA, WSC, BoolQ, MultiRC, ReCoRD, WiC

TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (
        SST2,
        SST5,
        MR,
        TREC,
        RTE,
        MNLI,
        SNLI,
        CB,
        BoolQ,
        WiC,
        WSC,
        MultiRC,
        COPA,
        ReCoRD,
        SQuAD,
        DROP,
    )
}


def build_task(cfg: TaskConfig) -> Task:
    if cfg.name not in TASKS:
        raise ConfigError(f"task.name={cfg.name!r} is not a task; choose one of {sorted(TASKS)}")
    return TASKS[cfg.name](cfg)


__all__ = ["TASKS", "Example", "Splits", "Task", "build_task"]
