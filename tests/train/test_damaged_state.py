"""A damaged checkpoint or seed log (a file cut short, emptied, deleted or overwritten): ``zo-scale train``
exits 2 with one line naming the file and what to do, before any model loads, and changes nothing in the
run folder. A seed-log record cut short after the checkpoint's step (a kill during its append) is cut off
instead, and the resumed run replays like an unbroken one."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zo_scale.train import loop
from zo_scale.train.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = ["model.name=tiny-llama", "task.name=sst2-demo", "task.num_train=16", "task.num_eval=4", "task.max_length=32",
       "run.batch_size=2", "run.save_every=3", "optim.rule=adam", "run.progress=false"]
HYBRID_PEFT = ["peft.method=lora", "hybrid.fo_layers=1"]

# Every file a 3-step checkpoint of RUN holds (test_the_cases_cover_every_file checks the list is whole)
CHECKPOINT_FILES = ["model/config.json", "model/generation_config.json", "model/model.safetensors",
                    "model/tokenizer.json", "model/tokenizer_config.json", "optimizer.pt",
                    "optimizer_state.rank0.safetensors", "schedule.pt", "trainer_state.json"]
# What a peft + hybrid run's checkpoint holds instead of model/ or beside the ZO state
HYBRID_PEFT_FILES = ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "fo_optimizer.pt"]


def train(out: Path, steps: int, *extra: str) -> int:
    return main(["train", *RUN, f"run.steps={steps}", f"run.output_dir={out}", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    assert train(out, 3) == 0
    return out


@pytest.fixture(scope="module")
def trained_hybrid_peft(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "hybrid_peft"
    assert train(out, 3, *HYBRID_PEFT) == 0
    return out


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def delete(path: Path) -> None:
    path.unlink()


def garbage(path: Path) -> None:  # of the same size: only the content can tell
    path.write_bytes(random.Random(path.name).randbytes(path.stat().st_size))


DAMAGES = [cut_in_half, empty, delete, garbage]


def files(run: Path) -> dict[str, bytes]:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model_loads(monkeypatch):
    """A damage found before the model loads (the checks are cheap; a model may take minutes)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded: the damage was not found up front")

    monkeypatch.setattr(loop, "load_trainable", refuse)


def refused(capsys, named: Path) -> str:
    """The run's one error line, which names ``named`` and says what to do; no traceback."""
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("zo-scale: error:")]
    assert len(errors) == 1 and "Traceback" not in out + err, err[-3000:]
    assert str(named) in errors[0], errors[0]
    assert "move" in errors[0] and "away" in errors[0], errors[0]
    return errors[0]


def test_the_cases_cover_every_file(trained, trained_hybrid_peft):
    assert sorted(files(trained / "checkpoint")) == sorted(CHECKPOINT_FILES)
    assert set(HYBRID_PEFT_FILES) <= set(files(trained_hybrid_peft / "checkpoint"))


@pytest.mark.parametrize(("name", "damage"), [
    (name, damage) for name in [f"checkpoint/{f}" for f in CHECKPOINT_FILES] + ["seedlog.jsonl"] for damage in DAMAGES
    # moving the seed log away is how to resume without a log that replays: see the test of a missing log
    if (name, damage) != ("seedlog.jsonl", delete)
])
def test_a_damaged_file_exits_2_naming_it_and_changes_nothing(trained, tmp_path, capsys, no_model_loads, name,
                                                              damage):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    damage(run / name)
    left = files(run)
    assert train(run, 4) == 2
    refused(capsys, run / name)
    assert files(run) == left


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", HYBRID_PEFT_FILES)
def test_a_damaged_adapter_or_fo_state_exits_2_naming_it(trained_hybrid_peft, tmp_path, capsys, no_model_loads,
                                                         name, damage):
    run = tmp_path / "run"
    shutil.copytree(trained_hybrid_peft, run)
    damage(run / "checkpoint" / name)
    left = files(run)
    assert train(run, 4, *HYBRID_PEFT) == 2
    refused(capsys, run / "checkpoint" / name)
    assert files(run) == left


def test_a_deleted_model_folder_is_named(trained, tmp_path, capsys, no_model_loads):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "checkpoint" / "model")
    assert train(run, 4) == 2
    assert refused(capsys, run / "checkpoint" / "model").endswith(
        f"{run / 'checkpoint' / 'model'}: missing. Nothing was changed; move {run / 'checkpoint'} away to start the "
        "run afresh, or restore it from a backup")


@pytest.mark.parametrize(("name", "damage", "message"), [
    ("optimizer.pt", delete, "optimizer.pt: missing"),
    ("schedule.pt", delete, "schedule.pt: missing"),
    ("optimizer.pt", cut_in_half, "optimizer.pt: cannot be read (File is not a zip file)"),
])
def test_a_checkpoint_without_its_file_list_names_a_damaged_file_when_it_is_read(trained, tmp_path, capsys, name,
                                                                                 damage, message):
    """A checkpoint written before trainer_state.json listed its files: what is there is looked at up front,
    and a file deleted is named by the read that misses it (the model loads first)."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    state_file = run / "checkpoint" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["files"]
    state_file.write_text(json.dumps(state))
    damage(run / "checkpoint" / name)
    left = files(run)
    assert train(run, 4) == 2
    assert message in refused(capsys, run / "checkpoint" / name)
    assert files(run) == left


def test_a_checkpoint_without_its_file_list_or_model_folder_names_the_folder(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    state_file = run / "checkpoint" / "trainer_state.json"
    state_file.write_text(json.dumps({k: v for k, v in json.loads(state_file.read_text()).items() if k != "files"}))
    shutil.rmtree(run / "checkpoint" / "model")
    assert train(run, 4) == 2
    assert f"with weights from {run / 'checkpoint' / 'model'}: no such folder" in capsys.readouterr().err


def test_a_model_path_that_does_not_exist_is_named(tmp_path, capsys):
    assert main(["train", *RUN, "model.name=./no/such/folder", f"run.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "model './no/such/folder': no such folder" in err and "Repo id" not in err
    assert not (tmp_path / "run").exists()


def records(run: Path) -> list[str]:
    return (run / "seedlog.jsonl").read_text().splitlines(keepends=True)[1:]


def test_a_record_cut_short_after_the_checkpoint_is_cut_off_and_the_run_replays(trained, tmp_path, caplog):
    run, straight = tmp_path / "run", tmp_path / "straight"
    shutil.copytree(trained, run)
    kept = records(run)
    step_3 = kept[-1].replace('"step": 2,', '"step": 3,')
    with (run / "seedlog.jsonl").open("a") as f:  # a kill while step 3's record was being appended
        f.write(step_3[: len(step_3) // 2])
    assert train(run, 4) == 0
    assert "line 5: a step record cut short after the checkpoint's step 3" in caplog.text
    assert records(run)[:3] == kept and [json.loads(r)["step"] for r in records(run)] == [0, 1, 2, 3]
    assert train(straight, 4) == 0
    assert records(run) == records(straight)
    assert main(["replay", str(run / "seedlog.jsonl"), str(tmp_path / "replayed")]) == 0
    trained_weights = load_file(straight / "checkpoint" / "model" / "model.safetensors")
    replayed = load_file(tmp_path / "replayed" / "model.safetensors")
    assert replayed.keys() == trained_weights.keys()
    assert all(torch.equal(replayed[k], trained_weights[k]) for k in replayed)


def cut_in_the_header(lines: list[str]) -> list[str]:
    return [lines[0][:40]]


def cut_before_the_checkpoint(lines: list[str]) -> list[str]:  # step 1's record: the checkpoint is at step 3
    return [*lines[:2], lines[2][:30] + "\n", *lines[3:]]


def lose_the_last_record(lines: list[str]) -> list[str]:
    return lines[:-1]


def repeat_a_record(lines: list[str]) -> list[str]:
    return [*lines[:2], lines[1], *lines[3:]]


def start_after_the_checkpoint(lines: list[str]) -> list[str]:  # a log begun anew at step 5, then an older checkpoint
    return [json.dumps({**json.loads(lines[0]), "first_step": 5}) + "\n"]


@pytest.mark.parametrize(("damage", "message"), [
    (cut_in_the_header, "seedlog.jsonl, line 1: not a whole seed-log header"),
    (start_after_the_checkpoint, "seedlog.jsonl starts at step 5, after the checkpoint's step 3"),
    (cut_before_the_checkpoint, "seedlog.jsonl, line 3: not a whole step record, before the checkpoint's step 3"),
    (lose_the_last_record, "ends before step 2 but the checkpoint is at step 3: the record of step 2 is lost"),
    (repeat_a_record, "seedlog.jsonl, line 3: step 0 where step 1 belongs"),
])
def test_a_seed_log_that_cannot_go_on_exits_2_and_is_left_as_it_was(trained, tmp_path, capsys, no_model_loads,
                                                                    damage, message):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    log = run / "seedlog.jsonl"
    log.write_text("".join(damage(log.read_text().splitlines(keepends=True))))
    left = files(run)
    assert train(run, 4) == 2
    assert message in refused(capsys, log)
    assert files(run) == left


def test_a_missing_seed_log_resumes_with_a_new_log_that_cannot_replay(trained, tmp_path, caplog, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "seedlog.jsonl").unlink()
    assert train(run, 4) == 0
    assert "seedlog.jsonl is missing: a new seed log starts at step 3" in caplog.text
    assert json.loads((run / "seedlog.jsonl").read_text().splitlines()[0])["first_step"] == 3
    assert [json.loads(r)["step"] for r in records(run)] == [3]
    assert train(run, 5) == 0  # the new log goes on at the next resume
    assert [json.loads(r)["step"] for r in records(run)] == [3, 4]
    capsys.readouterr()
    assert main(["replay", str(run / "seedlog.jsonl"), str(tmp_path / "replayed")]) == 2
    assert "starts at step 3" in capsys.readouterr().err and not (tmp_path / "replayed").exists()


def test_a_pure_backprop_run_resumes_with_its_log_of_no_steps(tmp_path):
    fo = ["hybrid.fo_layers=-1", "hybrid.fo_lr=1e-3"]
    assert train(tmp_path / "run", 3, *fo) == 0
    header = (tmp_path / "run" / "seedlog.jsonl").read_bytes()
    assert train(tmp_path / "run", 4, *fo) == 0
    assert (tmp_path / "run" / "seedlog.jsonl").read_bytes() == header
