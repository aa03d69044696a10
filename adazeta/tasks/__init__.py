"""Tasks: each a small class naming its columns, labels, prompts, loss and metric (tasks/base.py).

Which task runs on which head (`Task.heads`; an Objective refuses any other, naming the task, the
head and the heads the task runs on):

| task | causal LM | masked LM | classification head | metric |
|---|---|---|---|---|
| sst2, sst5, mr | MeZO's SST-2 prompt | LM-BFF | yes | accuracy |
| trec | MeZO's SST-2 style ("This question is about") | LM-BFF | yes | accuracy |
| rte, cb | MeZO | LM-BFF | yes | accuracy |
| mnli, snli | CB's MeZO prompt | LM-BFF | yes | accuracy |
| boolq, wic, wsc, multirc | MeZO | PET | yes | accuracy (multirc: per answer option) |
| copa, record | MeZO (LM loss on the gold choice) | no | no | accuracy (record: any gold entity) |
| squad, drop | MeZO (LM loss, greedy generation) | no | no | f1 (and em) |
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
