"""The shared benchmark data, found the way the package finds it. Missing data fails the tests."""

from pathlib import Path

import pytest

from zo_scale.tasks import find_data_dir


@pytest.fixture(scope="session")
def data_dir() -> Path:
    folder = find_data_dir()  # raises FileNotFoundError (a test error, not a skip) when absent
    assert (folder / "glue_sst2" / "train.tsv").is_file(), f"{folder} does not hold the benchmark data"
    return folder
