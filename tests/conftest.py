import subprocess
import sys

import pytest
import torch

# Builds DeepSpeed's async I/O op if libaio is there and the op is not built yet (load() returns at once if it
# is); it says nothing and exits 0 where libaio is missing: the test that needs the op then skips saying why.
_BUILD_AIO = ("from deepspeed.ops.op_builder import AsyncIOBuilder\n"
              "b = AsyncIOBuilder()\n"
              "if b.is_compatible(verbose=False):\n"
              "    b.load(verbose=False)\n")
_AIO_BUILD = pytest.StashKey[subprocess.Popen]()


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: no build for a test that will not run
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked needs_aio run last, and the op they need (a JIT build of a few minutes on 2 cores, on a
    fresh machine) is built meanwhile in a background process at the lowest priority, on whatever CPU
    time the other tests leave idle: most of them wait on subprocesses and imports."""
    aio = [item for item in items if item.get_closest_marker("needs_aio")]
    if not aio:
        return
    items[:] = [item for item in items if item not in aio] + aio
    config.stash[_AIO_BUILD] = subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", _BUILD_AIO],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def aio_built(request: pytest.FixtureRequest) -> None:
    """Waits for the background build of DeepSpeed's async I/O op (see above); fails with its error if it failed."""
    build = request.config.stash.get(_AIO_BUILD, None)
    if build is None:  # the test was not collected through this conftest's hook: the job builds the op itself
        return
    _, err = build.communicate()
    assert build.returncode == 0, f"the background build of DeepSpeed's async_io op failed:\n{err[-3000:]}"


def pytest_unconfigure(config: pytest.Config) -> None:
    build = config.stash.get(_AIO_BUILD, None)
    if build is not None and build.poll() is None:  # the run ended (or was cut short) before the op was needed
        build.kill()
        build.wait()


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
