"""The Task type: where a task's rows live and how they become Examples (or GenerationExamples)."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zo_scale.tasks.example import Example, TaskDataError
from zo_scale.tasks.generation import GenerationExample
from zo_scale.tasks.loaders import load_hub_rows, read_rows
from zo_scale.tasks.masked_templates import mask_after

DATA_ENV_VAR = "ZO_SCALE_DATA"
SPLITS = ("train", "eval")
# multiple choice (Example) | a free-text answer (GenerationExample) | a continuation a reward scores (RewardExample)
KINDS = ("choice", "generation", "reward")


def find_data_dir() -> Path:
    """The benchmark data folder: $ZO_SCALE_DATA, else the first `shared/data` found walking up from
    the current directory and from this package (the repo checkout sits beside `shared/`)."""
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env)
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "data"
            if candidate.is_dir():
                return candidate
    raise FileNotFoundError(
        f"no shared/data folder found above {Path.cwd()} or {Path(__file__).parent}; "
        f"set task.data_dir (or {DATA_ENV_VAR}) to the folder holding the task files"
    )


@dataclass(frozen=True)
class HubSource:
    """Where the same data lives on the Hugging Face hub, for users who have network access."""

    path: str
    name: str | None
    splits: dict[str, str]  # our split ("train"/"eval") -> the hub's split name


@dataclass(frozen=True)
class Task:
    """A task: its files per split, how to read them, and the template that renders a row."""

    name: str
    template: Callable[[dict], Example] | Callable[[dict], GenerationExample]
    files: dict[str, str]  # "train"/"eval" -> file, relative to the data dir (or to `root`)
    hub: HubSource | None = None
    # Turns one row of the official file into template rows (MultiRC nests answers in passages).
    flatten: Callable[[dict], list[dict]] | None = None
    # Fixed folder of the files (package demo data, a custom task's YAML folder); ignores data_dir.
    root: Path | None = None
    # The prompt for masked LMs (see zo_scale.tasks.masked_templates); None: `template` with the mask appended.
    masked_template: Callable[[dict], Example] | None = None
    kind: str = "choice"  # one of KINDS: what the template returns
    # Reads a file into rows; None: by its extension (read_rows). SQuAD's and DROP's nested JSON have their own.
    reader: Callable[[Path], list[dict]] | None = None
    from_hub: bool = False  # examples() reads `hub` through datasets instead of the files (see on_hub)
    # The rows of a split made by a function of the split (a generated task: no files); None: read from files.
    generate: Callable[[str], list[dict]] | None = None
    reward: str | None = None  # a reward task's reward (zo_scale.tasks.rewards), unless task.reward names another

    def on_hub(self) -> Task:
        """This task read from the Hugging Face hub (``task.source=hub``): needs network or a warm cache."""
        if self.hub is None:
            raise ValueError(f"{self.name}: no hub dataset is known for this task; read its files (task.source=files)")
        return dataclasses.replace(self, from_hub=True)

    def for_masked_lm(self) -> Task:
        """This task with the prompts a masked LM scores: `masked_template`, else `template` + mask slot."""
        if self.kind != "choice":
            raise TaskDataError(f"{self.name} is a {self.kind} task: a masked LM scores label words at a mask, it "
                                "does not generate answers; use a causal LM")
        template = self.masked_template or functools.partial(_mask_after_template, self.template, self.name)
        return dataclasses.replace(self, template=template, masked_template=None)

    def path(self, split: str, data_dir: str | Path | None = None) -> Path:
        """The file holding `split`."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if self.from_hub:  # a name for messages; two splits are one "file" when they are one hub split
            return Path(f"hub:{self.hub.path}/{self.hub.name or ''}[{self.hub.splits[split]}]")
        if self.generate is not None:
            return Path(f"generated:{self.name}[{split}]")
        if split not in self.files:
            raise FileNotFoundError(f"{self.name} has no data files here, only a hub dataset "
                                    f"({self.hub.path if self.hub else 'none'}): set task.source=hub")
        if self.root is not None:
            base = self.root
        elif data_dir is not None:
            base = Path(data_dir)
        else:
            base = find_data_dir()
        return base / self.files[split]

    def examples(self, split: str, data_dir: str | Path | None = None) -> list[Example] | list[GenerationExample]:
        """All Examples of `split`, read from the task's file (or the hub, see `on_hub`; or generated)."""
        if self.from_hub:
            return self.hub_examples(split)
        path = self.path(split, data_dir)
        if self.generate is not None:
            return self._render(self.generate(split), str(path), self.flatten)
        if not path.is_file():
            hint = (f"a custom task's files are relative to the folder of its definition ({self.root}); "
                    "task.data_dir does not apply to them" if self.root is not None else
                    f"set task.data_dir (or {DATA_ENV_VAR}) to the folder holding {self.files[split]}")
            raise FileNotFoundError(f"{self.name}: data file {path} not found; {hint}")
        return self._render((self.reader or read_rows)(path), str(path), self.flatten)

    def hub_examples(self, split: str) -> list[Example] | list[GenerationExample]:
        """All Examples of `split`, downloaded from the hub (rows there are already flat)."""
        if self.hub is None:
            raise ValueError(f"{self.name}: no hub dataset is known for this task")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        hub_split = self.hub.splits[split]
        rows = load_hub_rows(self.hub.path, self.hub.name, hub_split)
        return self._render(rows, f"hub {self.hub.path}/{self.hub.name} [{hub_split}]", None)

    def _render(
        self, rows: list[dict], source: str, flatten: Callable[[dict], list[dict]] | None
    ) -> list[Example] | list[GenerationExample]:
        examples = []
        for row_no, row in enumerate(rows, start=1):
            try:
                for item in flatten(row) if flatten else (row,):
                    examples.append(self.template(item))
            except ValueError as err:
                # Template errors name the task already; Example's own checks do not.
                what = err if isinstance(err, TaskDataError) else f"{self.name}: {err}"
                raise TaskDataError(f"{source}, data row {row_no}: {what}") from err
        return examples


def _mask_after_template(template: Callable[[dict], Example], task: str, row: dict) -> Example:
    return mask_after(template(row), task)
