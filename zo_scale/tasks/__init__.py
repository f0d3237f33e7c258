"""Tasks for zo-scale: prompt templates, data loaders, built-in and user-defined tasks, MeZO sampling."""

from zo_scale.tasks.custom import load_custom_task
from zo_scale.tasks.example import Example, TaskDataError
from zo_scale.tasks.loaders import load_hub_rows, read_csv, read_json, read_jsonl, read_rows, read_tsv
from zo_scale.tasks.registry import BUILTIN_TASKS, DEMO_DATA_DIR, get_task
from zo_scale.tasks.sampling import sample_k_shot, sample_splits
from zo_scale.tasks.task import DATA_ENV_VAR, HubSource, Task, find_data_dir
from zo_scale.tasks.templates import continuation

__all__ = [
    "BUILTIN_TASKS",
    "DATA_ENV_VAR",
    "DEMO_DATA_DIR",
    "Example",
    "HubSource",
    "Task",
    "TaskDataError",
    "continuation",
    "find_data_dir",
    "get_task",
    "load_custom_task",
    "load_hub_rows",
    "read_csv",
    "read_json",
    "read_jsonl",
    "read_rows",
    "read_tsv",
    "sample_k_shot",
    "sample_splits",
]
