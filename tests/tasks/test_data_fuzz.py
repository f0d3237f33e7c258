"""Fuzzed data files for a custom task: every generated file either loads, samples and tokenizes, or
is refused with a TaskDataError naming the file; never another exception."""

import csv
import io
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zo_scale.models import build_byte_tokenizer
from zo_scale.models.scoring import encode
from zo_scale.tasks import TaskDataError, get_task, sample_splits

DEFINITION = """\
name: fuzzed
train_file: train.{ext}
eval_file: eval.{ext}
template: "Review: {{text}}\\nSentiment:"
label_field: label
label_words: {{positive: " good", negative: " bad"}}
"""
TOKENIZER = build_byte_tokenizer()
TEXT = st.one_of(st.text(max_size=30), st.just(""), st.just("x" * 5000), st.sampled_from(['a "quoted" one', "tab\there",
                                                                                           "new\nline", "комментарий"]))
LABEL = st.one_of(st.sampled_from(["positive", "negative"]), st.sampled_from(["Positive", "", "2", "neutral"]),
                  st.integers(-2, 3), st.none(), st.booleans())
ROW = st.fixed_dictionaries({}, optional={"text": TEXT, "label": LABEL, "extra": TEXT})


def render(rows: list[dict], ext: str) -> str:
    if ext == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows)
    if ext == "json":
        return json.dumps(rows)
    out = io.StringIO()
    writer = csv.writer(out, delimiter="\t" if ext == "tsv" else ",", lineterminator="\n",
                        quoting=csv.QUOTE_NONE if ext == "tsv" else csv.QUOTE_MINIMAL, escapechar="\\")
    writer.writerow(["text", "label"])
    for r in rows:
        writer.writerow([r.get("text", ""), r.get("label", "")])
    return out.getvalue()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(ext=st.sampled_from(["jsonl", "json", "tsv", "csv"]), train=st.lists(ROW, max_size=8),
       evaluation=st.lists(ROW, max_size=4), garbage=st.sampled_from([b"", b"\xff\xfe", b"\xc3("]),
       truncate=st.booleans())
def test_any_data_file_loads_or_is_refused_naming_the_file(tmp_path_factory, ext, train, evaluation, garbage,
                                                             truncate):
    folder = tmp_path_factory.mktemp("task")
    (folder / "task.yaml").write_text(DEFINITION.format(ext=ext))
    body = render(train, ext).encode()
    (folder / f"train.{ext}").write_bytes((body[: len(body) // 2] if truncate else body) + garbage)
    (folder / f"eval.{ext}").write_bytes(render(evaluation, ext).encode())
    try:
        task = get_task(str(folder / "task.yaml"))
        train_ex, _, eval_ex = sample_splits(task, num_train=4, num_dev=0, num_eval=2, seed=0)
        encode(TOKENIZER, train_ex + eval_ex, max_length=64)
    except TaskDataError as err:
        assert str(folder) in str(err) or "fuzzed" in str(err), str(err)
