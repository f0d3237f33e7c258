import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core machine extra threads only wait on each other.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_overrides():
    """The config overrides every tiny training run starts from (a tiny model, a few examples)."""
    return ["model.name=tiny-llama", "task.name=sst2-demo", "task.num_train=32", "task.num_eval=16",
            "run.batch_size=4", "run.eval_batch_size=16", "run.progress=false", "optim.lr=1e-3", "run.log_every=2"]
