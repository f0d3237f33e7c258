import pytest

from zo_scale.train.cli import main

TINY = ["model.name=tiny-llama", "task.name=sst2-demo", "task.num_train=32", "task.num_eval=16",
        "run.batch_size=4", "run.eval_batch_size=16", "run.progress=false", "optim.lr=1e-3", "run.log_every=2"]


@pytest.fixture(scope="session")
def tiny_overrides():
    """The overrides every run_cli run starts from (a tiny model, a few examples), for subprocess runs."""
    return list(TINY)


@pytest.fixture
def run_cli(tmp_path):
    """Run ``zo-scale`` in-process; returns (exit code, output dir)."""

    def run(*args, command="train", out="run", flags=()):
        out_dir = tmp_path / out
        code = main([command, *flags, *TINY, f"run.output_dir={out_dir}", *args])
        return code, out_dir

    return run
