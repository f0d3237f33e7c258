"""MeZO sampling: sizes, disjointness, determinism per seed."""

import pytest

from zo_scale.tasks import get_task, sample_splits


def ids(examples):
    # Task.examples makes one object per data row, so object ids tell rows apart even when two rows are equal.
    return {id(ex) for ex in examples}


def test_sizes_disjoint_and_deterministic(data_dir):
    task = get_task("rte")
    train, dev, test = sample_splits(
        task, num_train=1000, num_dev=500, num_eval=100, seed=0, data_dir=data_dir
    )
    assert (len(train), len(dev), len(test)) == (1000, 500, 100)
    assert len(ids(train)) == 1000 and not ids(train) & ids(dev)
    # RTE train repeats 2 rows, so train/dev are compared by row; no train row appears in val at all.
    assert not set(train + dev) & set(test)
    again = sample_splits(task, num_train=1000, num_dev=500, num_eval=100, seed=0, data_dir=data_dir)
    assert again == (train, dev, test)
    other = sample_splits(task, num_train=1000, num_dev=500, num_eval=100, seed=1, data_dir=data_dir)
    assert other[0] != train and set(other[0]) != set(train) and set(other[2]) != set(test)


def test_eval_all_when_smaller_or_none(data_dir):
    task = get_task("rte")
    assert len(sample_splits(task, 10, 5, num_eval=1000, data_dir=data_dir)[2]) == 277
    full_eval = sample_splits(task, 10, 5, num_eval=None, data_dir=data_dir)[2]
    assert full_eval == task.examples("eval", data_dir)
    assert len(sample_splits(task, num_train=-1, num_dev=5, num_eval=-1, data_dir=data_dir)[0]) == 2_490 - 5


def test_num_eval_does_not_change_train_for_two_file_tasks(data_dir):
    task = get_task("cb")
    assert (
        sample_splits(task, 20, 10, 5, data_dir=data_dir)[:2]
        == sample_splits(task, 20, 10, 50, data_dir=data_dir)[:2]
    )


@pytest.mark.parametrize("name", ["boolq", "wic", "multirc"])
def test_shared_file_keeps_eval_apart(data_dir, name):
    task = get_task(name)
    total = len(task.examples("eval", data_dir))
    train, dev, test = sample_splits(
        task, num_train=None, num_dev=100, num_eval=300, seed=3, data_dir=data_dir
    )
    assert (len(train), len(dev), len(test)) == (total - 400, 100, 300)
    assert not ids(train) & ids(dev) and not ids(train) & ids(test) and not ids(dev) & ids(test)
    # Rows are distinct in these files, so value-level disjointness holds as well.
    assert not set(train) & set(test) and not set(dev) & set(test)


def test_small_train_split_keeps_dev_and_warns(data_dir):
    with pytest.warns(UserWarning, match="cb: asked for 1000 train \\+ 100 dev .* training on 150"):
        train, dev, _ = sample_splits(get_task("cb"), num_train=1000, num_dev=100, data_dir=data_dir)
    assert (len(train), len(dev)) == (150, 100)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"num_dev": 250}, "its train split has 250 rows, and num_dev=250 takes all of them: no training examples"),
        ({"num_dev": None}, "num_dev must be an int >= 0"),
        ({"num_train": -2}, "num_train must be an int >= 0, or None/-1 for all"),
    ],
)
def test_bad_sizes(data_dir, kwargs, problem):
    with pytest.raises(ValueError) as err:
        sample_splits(get_task("cb"), data_dir=data_dir, **kwargs)
    assert problem in str(err.value)


def test_shared_file_with_all_rows_for_eval_is_an_error(data_dir):
    with pytest.raises(ValueError, match=r"wic: \d+ rows in its one file, \d+ of them the eval sample \(num_eval\), "
                                         r"leave 0, and num_dev=5 takes more than all of them.*or num_eval"):
        sample_splits(get_task("wic"), num_train=10, num_dev=5, num_eval=None, data_dir=data_dir)
