"""run.trackers: every metrics record mirrored to accelerate's trackers; a missing one refused before the run."""

import json

from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, register_tracker_class

from zo_scale.train.metrics import read_metrics


class FileTracker(GeneralTracker):
    """An accelerate tracker of our own, registered the way a user adds one: JSON lines in its logging dir."""

    name = "jsonfile"
    requires_logging_directory = True

    def __init__(self, run_name, logging_dir, **kwargs):
        super().__init__()
        self.path = f"{logging_dir}/{run_name}.jsonl"

    @property
    def tracker(self):
        return self.path

    def start(self):
        import os

        os.makedirs(os.path.dirname(self.path), exist_ok=True)

    def store_init_configuration(self, values):
        self._write({"config": values})

    def log(self, values, step=None, **kwargs):
        self._write({"step": step, "values": values})

    def finish(self):
        self._write({"finished": True})

    def _write(self, row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def test_every_record_reaches_a_registered_tracker(run_cli):
    if FileTracker.name not in LOGGER_TYPE_TO_CLASS:
        register_tracker_class(FileTracker)
    code, out = run_cli("run.steps=4", "run.trackers=[jsonfile]")
    assert code == 0
    rows = [json.loads(line) for line in (out / "trackers" / f"{out.name}.jsonl").read_text().splitlines()]
    assert rows[0]["config"]["optim.lr"] == 1e-3 and rows[0]["config"]["run.trackers"] == "['jsonfile']"
    assert rows[-1] == {"finished": True}
    logged = [(r["step"], r["values"]) for r in rows[1:-1]]
    expected = [(m["step"], {f"{m['kind']}/{k}": v for k, v in m.items()
                             if k not in ("step", "kind") and isinstance(v, int | float) and not isinstance(v, bool)})
                for m in read_metrics(out / "metrics.jsonl")]
    assert logged == expected and any("train/loss" in v for _, v in logged) and any("eval/accuracy" in v
                                                                                   for _, v in logged)


def test_a_missing_or_unknown_tracker_is_refused_before_anything_runs(run_cli, capsys):
    code, out = run_cli("run.trackers=[wandb]")
    assert code == 2 and not out.exists()
    assert "pip install wandb" in capsys.readouterr().err
    code, out = run_cli("run.trackers=[neptune]")
    assert code == 2 and not out.exists()
    assert "run.trackers: unknown 'neptune'" in capsys.readouterr().err
