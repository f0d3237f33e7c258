"""Built-in tasks (MeZO's classification suite) and lookup by name or task-definition file.

Files are relative to the data dir (see `find_data_dir`; layout in shared/data/README.md). BoolQ, WiC
and MultiRC have only their validation file there, so it serves as both splits and `sample_splits`
keeps the two apart. With network access, `Task.hub_examples` reads the hub copies instead.

`sst2-demo` needs no data dir: its files ship in zo_scale/demo_data. `sst2_dev.tsv` is GLUE SST-2
dev.tsv unchanged (872 rows); `sst2_train_sample.tsv` is the header plus the 512 rows of train.tsv at
the positions `sorted(random.Random(0).sample(range(67349), 512))` (data rows counted from 0), written
byte for byte in file order.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from zo_scale.tasks import templates
from zo_scale.tasks.custom import load_custom_task
from zo_scale.tasks.example import Example
from zo_scale.tasks.task import HubSource, Task

__all__ = ["BUILTIN_TASKS", "DEMO_DATA_DIR", "Task", "get_task"]

DEMO_DATA_DIR = Path(__file__).resolve().parent.parent / "demo_data"
_TRAIN_VALIDATION = {"train": "train", "eval": "validation"}


def _superglue(
    folder: str,
    template: Callable[[dict], Example],
    has_train: bool = True,
    flatten: Callable[[dict], list[dict]] | None = None,
) -> Task:
    name = folder.lower()
    train = "train.jsonl" if has_train else "val.jsonl"
    return Task(
        name=name,
        template=template,
        files={"train": f"superglue/{folder}/{train}", "eval": f"superglue/{folder}/val.jsonl"},
        # MeZO used super_glue "wsc.fixed", which repairs span offsets of the original "wsc".
        hub=HubSource("aps/super_glue", "wsc.fixed" if name == "wsc" else name, _TRAIN_VALIDATION),
        flatten=flatten,
    )


BUILTIN_TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="sst2",
            template=templates.sst2,
            files={"train": "glue_sst2/train.tsv", "eval": "glue_sst2/dev.tsv"},
            hub=HubSource("nyu-mll/glue", "sst2", _TRAIN_VALIDATION),
        ),
        Task(
            name="sst2-demo",
            template=templates.sst2,
            files={"train": "sst2_train_sample.tsv", "eval": "sst2_dev.tsv"},
            root=DEMO_DATA_DIR,
        ),
        _superglue("RTE", templates.rte),
        _superglue("CB", templates.cb),
        _superglue("WSC", templates.wsc),
        _superglue("COPA", templates.copa),
        _superglue("BoolQ", templates.boolq, has_train=False),
        _superglue("WiC", templates.wic, has_train=False),
        _superglue("MultiRC", templates.multirc, has_train=False, flatten=templates.multirc_rows),
        Task(
            name="winogrande",
            template=templates.winogrande,
            # The official release's file names (winogrande_1.1.zip); not in shared/data.
            files={"train": "winogrande/train_xl.jsonl", "eval": "winogrande/dev.jsonl"},
            hub=HubSource("allenai/winogrande", "winogrande_xl", _TRAIN_VALIDATION),
        ),
    )
}

_DEFINITION_SUFFIXES = (".yaml", ".yml", ".json")


def get_task(name_or_path: str | Path) -> Task:
    """A built-in task by name (case-insensitive), or a user-defined task from a .yaml/.yml/.json file."""
    key = str(name_or_path).lower()
    if key.endswith(_DEFINITION_SUFFIXES):
        return load_custom_task(name_or_path)
    task = BUILTIN_TASKS.get(key)
    if task is None:
        raise ValueError(
            f"unknown task {name_or_path!r}; built-in tasks: {', '.join(BUILTIN_TASKS)}, "
            f"or give a task definition file ending in {', '.join(_DEFINITION_SUFFIXES)}"
        )
    return task
