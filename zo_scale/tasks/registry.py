"""Built-in tasks (MeZO's classification suite, SQuAD and DROP, generated puzzles) and lookup by name or file.

Files are relative to the data dir (see `find_data_dir`; layout in shared/data/README.md). BoolQ, WiC
and MultiRC have only their validation file there, so it serves as both splits and `sample_splits`
keeps the two apart. With network access, `Task.hub_examples` reads the hub copies instead.
SST-2 and RTE carry LM-BFF's masked-LM prompts (and SST-5, MNLI, TREC, MeZO's other medium-model tasks,
which read from the hub only); every other task's masked prompt is its causal one
with the mask appended (`Task.for_masked_lm`).

`sst2-demo` needs no data dir: its files ship in zo_scale/demo_data. `sst2_dev.tsv` is GLUE SST-2
dev.tsv unchanged (872 rows); `sst2_train_sample.tsv` is the header plus the 512 rows of train.tsv at
the positions `sorted(random.Random(0).sample(range(67349), 512))` (data rows counted from 0), written
byte for byte in file order.

SQuAD (v1.1) and DROP are generation tasks, read from their official JSON files (file names as
released, not in shared/data) or the hub. `squad-demo` and `drop-demo` ship small files of the same
layouts (invented passages), one file serving as both splits.

`countdown` and `arithmetic` are reward tasks generated from seed 0 (:mod:`zo_scale.tasks.puzzles`: 3 numbers
up to 20; 2 operators over 0 .. 10), 2000 train and 500 eval rows, scored by the `countdown` and `numeric`
rewards (:mod:`zo_scale.tasks.rewards`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from zo_scale.tasks import generation, masked_templates, puzzles, templates
from zo_scale.tasks.custom import load_custom_task
from zo_scale.tasks.example import Example
from zo_scale.tasks.generation import GenerationExample
from zo_scale.tasks.rewards import reward_example
from zo_scale.tasks.task import HubSource, Task

__all__ = ["BUILTIN_TASKS", "DEMO_DATA_DIR", "Task", "get_task"]

DEMO_DATA_DIR = Path(__file__).resolve().parent.parent / "demo_data"
_TRAIN_VALIDATION = {"train": "train", "eval": "validation"}


def _superglue(
    folder: str,
    template: Callable[[dict], Example],
    has_train: bool = True,
    flatten: Callable[[dict], list[dict]] | None = None,
    masked_template: Callable[[dict], Example] | None = None,
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
        masked_template=masked_template,
    )


PUZZLE_POOL = {"train": 2000, "eval": 500}  # rows a generated task's split holds (run.seed samples from them)


def _puzzles(name: str, rows: Callable[..., list[dict]], reward: str) -> Task:
    """A task generated from seed 0 (:mod:`~zo_scale.tasks.puzzles`): its pool of rows per split, no files."""
    return Task(name=name, template=reward_example, files={}, kind="reward", reward=reward,
                generate=lambda split: rows(PUZZLE_POOL[split], seed=0, split=split))


def _generation(
    name: str, template: Callable[[dict], GenerationExample], reader: Callable[[Path], list[dict]], train: str,
    eval_file: str, hub: HubSource,
) -> tuple[Task, Task]:
    """A generation task from its official files, and `<name>-demo` from the package's `<name>_demo.json`."""
    common = {"template": template, "kind": "generation", "reader": reader}
    return (Task(name=name, files={"train": train, "eval": eval_file}, hub=hub, **common),
            Task(name=f"{name}-demo", files=dict.fromkeys(("train", "eval"), f"{name}_demo.json"), root=DEMO_DATA_DIR,
                 **common))


BUILTIN_TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="sst2",
            template=templates.sst2,
            files={"train": "glue_sst2/train.tsv", "eval": "glue_sst2/dev.tsv"},
            hub=HubSource("nyu-mll/glue", "sst2", _TRAIN_VALIDATION),
            masked_template=masked_templates.sst2,
        ),
        Task(
            name="sst2-demo",
            template=templates.sst2,
            files={"train": "sst2_train_sample.tsv", "eval": "sst2_dev.tsv"},
            root=DEMO_DATA_DIR,
            masked_template=masked_templates.sst2,
        ),
        _superglue("RTE", templates.rte, masked_template=masked_templates.rte),
        _superglue("CB", templates.cb),
        _superglue("WSC", templates.wsc),
        _superglue("COPA", templates.copa),
        _superglue("BoolQ", templates.boolq, has_train=False),
        _superglue("WiC", templates.wic, has_train=False),
        _superglue("MultiRC", templates.multirc, has_train=False, flatten=templates.multirc_rows),
        # MeZO's medium-model tasks that shared/data lacks: from the hub only (task.source=hub).
        Task(
            name="sst5",
            template=templates.sst5,
            files={},
            hub=HubSource("SetFit/sst5", None, _TRAIN_VALIDATION),
            masked_template=masked_templates.sst5,
        ),
        Task(
            name="mnli",
            template=templates.mnli,
            files={},
            hub=HubSource("nyu-mll/glue", "mnli", {"train": "train", "eval": "validation_matched"}),
            masked_template=masked_templates.mnli,
        ),
        Task(
            name="trec",
            template=templates.trec,
            files={},
            hub=HubSource("CogComp/trec", None, {"train": "train", "eval": "test"}),
            masked_template=masked_templates.trec,
        ),
        *_generation("squad", generation.squad, generation.read_squad, "squad/train-v1.1.json",
                     "squad/dev-v1.1.json", HubSource("rajpurkar/squad", None, _TRAIN_VALIDATION)),
        *_generation("drop", generation.drop, generation.read_drop, "drop/drop_dataset_train.json",
                     "drop/drop_dataset_dev.json", HubSource("ucinlp/drop", None, _TRAIN_VALIDATION)),
        _puzzles("countdown", puzzles.countdown_rows, "countdown"),
        _puzzles("arithmetic", puzzles.arithmetic_rows, "numeric"),
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
