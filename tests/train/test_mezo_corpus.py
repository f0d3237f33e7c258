"""MeZO's own command lines through ``zo-scale mezo``: every line of tests/corpus/mezo (mezo.sh for each TASK x
MODE, the README's examples, overrides appended through mezo.sh's "$@") maps to the config its entry expects,
with the flags it sets aside named in one warning line, or is refused by the flag its entry names; four of
them then train for real, shrunk to tiny-llama by flags appended at the end (the last value wins)."""

import json
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from zo_scale.tasks import DEMO_DATA_DIR
from zo_scale.train.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = Path(__file__).parents[1] / "corpus" / "mezo"
MEZO_TASKS = ("SST2", "RTE", "CB", "BoolQ", "WSC", "WIC", "MultiRC", "Copa", "ReCoRD", "SQuAD", "DROP")


@dataclass
class Entry:
    file: str
    source: str  # '# <repo>@<commit> <path>, run as: <env> bash <script> <"$@">'
    flags: list[str]
    expect: dict[str, str]
    set_aside: list[str]
    refused: str | None


def _entries() -> list[Entry]:
    entries = []
    for path in sorted(CORPUS.glob("*.txt")):
        for block in path.read_text().split("\n\n"):
            lines = block.strip().splitlines()
            if not lines or lines[-1].startswith("#"):  # the file's header: no command line
                continue
            notes = dict(line[2:].split(": ", 1) for line in lines[1:-1])
            expect = dict(item.split("=", 1) for item in notes.get("expect", "").split())
            entries.append(Entry(path.stem, lines[0], shlex.split(lines[-1]), expect,
                                 notes.get("set aside", "").split(), notes.get("refused")))
    return entries


ENTRIES = _entries()


def _id(entry: Entry) -> str:
    return f"{entry.file}:{entry.source.split('run as: ')[1]}"


def test_the_corpus_holds_every_task_and_mode_of_mezo_sh_and_the_readme():
    grid = {re.search(r"TASK=(\w+) MODE=(\w+)", e.source).groups() for e in ENTRIES
            if e.file == "mezo_sh" and e.source.endswith("bash mezo.sh")}
    assert grid == {(task, mode) for task in MEZO_TASKS for mode in ("ft", "lora", "prefix")}
    readme = [e.source.split("run as: ")[1] for e in ENTRIES if e.file == "readme"]
    assert "MODEL=facebook/opt-13b TASK=SQuAD MODE=prefix LR=1e-2 EPS=1e-1 bash mezo.sh --non_diff " \
           "--evaluation_strategy no --save_strategy no --save_model" in readme and len(readme) == 9
    assert all(e.source.startswith("# princeton-nlp/MeZO@") for e in ENTRIES)


@pytest.mark.parametrize("entry", ENTRIES, ids=_id)
def test_each_mezo_line_maps_or_is_refused_by_name(entry, capsys):
    code = main(["mezo", "--dry-run", *entry.flags])
    out, err = capsys.readouterr()
    if entry.refused:
        assert code == 2
        assert err.count("\n") == 1 and entry.refused in err, err  # one line, naming the flag
        return
    assert code == 0, err
    command, config = out.split("\n", 1)
    cfg = yaml.safe_load(config)
    for key, want in entry.expect.items():
        section, name = key.split(".")
        got = cfg[section][name]
        assert got == type(got)(want), f"{key}: {got!r}, want {want}"
    keys = [item.split("=")[0] for item in command.split()[3:]]
    assert len(keys) == len(set(keys)), "two flags set one key: the result would hang on their order"
    warnings = [line for line in err.splitlines() if line.startswith("zo-scale mezo: warning: set aside ")]
    assert len(warnings) == 1
    named = [item.split()[0] for item in warnings[0].removeprefix("zo-scale mezo: warning: set aside ").split("; ")]
    assert sorted(named) == sorted(entry.set_aside)


TINY = ["--model_name", "tiny-llama", "--max_steps", "2", "--num_train", "8", "--num_dev", "0", "--num_eval", "4",
        "--max_length", "64", "--per_device_train_batch_size", "2", "--max_new_tokens", "4"]


@pytest.mark.parametrize("source", [
    "TASK=SST2 MODE=ft LR=1e-7 EPS=1e-3 bash mezo.sh",
    "TASK=RTE MODE=lora LR=5e-5 EPS=1e-2 bash mezo.sh",
    "TASK=Copa MODE=prefix LR=1e-3 EPS=1e-1 bash mezo.sh",
    # the README's: F1 of generated answers as the objective
    "MODEL=facebook/opt-13b TASK=SQuAD MODE=prefix LR=1e-2 EPS=1e-1 bash mezo.sh --non_diff --evaluation_strategy no "
    "--save_strategy no --save_model",
], ids=["SST2-ft", "RTE-lora", "Copa-prefix", "SQuAD-prefix-F1"])
def test_mezo_lines_train_for_real_on_tiny_llama(source, tmp_path, monkeypatch):
    (entry,) = [e for e in ENTRIES if e.source.endswith(f"run as: {source}")]
    if "SQuAD" in source:  # zo-scale's SQuAD reads the official file names; the demo file has their layout
        for name in ("train-v1.1.json", "dev-v1.1.json"):
            (tmp_path / "data" / "squad").mkdir(parents=True, exist_ok=True)
            shutil.copy(DEMO_DATA_DIR / "squad_demo.json", tmp_path / "data" / "squad" / name)
        monkeypatch.setenv("ZO_SCALE_DATA", str(tmp_path / "data"))
    out = tmp_path / "run"
    assert main(["mezo", *entry.flags, *TINY, "--output_dir", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    ran = yaml.safe_load((out / "config.yaml").read_text())
    for key in ("task.name", "task.loss", "peft.method", "optim.lr", "optim.eps"):
        section, name = key.split(".")
        assert ran[section][name] == type(ran[section][name])(entry.expect[key]), key
