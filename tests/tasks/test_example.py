import pytest

from zo_scale.tasks import Example


def test_lists_become_tuples():
    ex = Example(contexts=["a", "a"], continuations=[" x", " y"], label=1)
    assert ex.contexts == ("a", "a") and ex.continuations == (" x", " y")
    assert hash(ex) == hash(Example(("a", "a"), (" x", " y"), 1))


@pytest.mark.parametrize(
    ("contexts", "continuations", "label", "problem"),
    [
        (("a",), (" x", " y"), 0, "1 contexts but 2 continuations"),
        (("a",), (" x",), 0, "at least 2 options"),
        (("a", "a"), (" x", " y"), 2, "out of range"),
        (("a", "a"), (" x", " y"), -1, "out of range"),
        (("a", "a"), (" x", " y"), True, "must be an int"),
        (("a", "a"), (" x", "  "), 0, "continuation(s) [1] are empty"),
        (("a", None), (" x", " y"), 0, "context 1 is NoneType"),
    ],
)
def test_invalid_examples_are_rejected(contexts, continuations, label, problem):
    with pytest.raises(ValueError, match="Example") as err:
        Example(contexts, continuations, label)
    assert problem in str(err.value)
