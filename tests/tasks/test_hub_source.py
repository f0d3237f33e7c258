"""``task.source=hub``: a task's rows through ``datasets.load_dataset`` (a local dataset folder here: no
machine in CI reaches the hub), and MeZO's medium-model tasks that exist only there (SST-5, MNLI, TREC)."""

import dataclasses
import json

import pytest

from zo_scale.models.masked_scoring import encode_masked
from zo_scale.models.tiny import build_byte_tokenizer
from zo_scale.tasks import HubSource, get_task, sample_k_shot, sample_splits
from zo_scale.tasks.masked_templates import MASK_SLOT


def local_hub(tmp_path, splits):
    """A dataset folder in the layout load_dataset reads offline: one JSON-lines file per split."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    for split, rows in splits.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def test_a_task_on_the_hub_reads_its_rows_through_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = {"train": [{"text": f"film {i}", "label": i % 5} for i in range(40)],
            "validation": [{"text": f"movie {i}", "label": i % 5} for i in range(10)]}
    task = dataclasses.replace(get_task("sst5"), hub=HubSource(local_hub(tmp_path, rows), None,
                                                               {"train": "train", "eval": "validation"}))
    hub = task.on_hub()
    train, dev, evals = sample_splits(hub, 20, 5, 10)
    assert len(train) == 20 and len(dev) == 5 and {e.contexts[0] for e in evals} == {
        f"movie {i} It was" for i in range(10)}
    k_train, k_dev, _ = sample_k_shot(hub.for_masked_lm(), 2, num_eval=4)
    assert sorted(e.label for e in k_train) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and len(k_dev) == 10
    assert k_train[0].contexts[0].endswith(f"It was{MASK_SLOT}.")
    assert str(hub.path("eval")).startswith("hub:") and hub.path("train") != hub.path("eval")


def test_hub_only_tasks_say_how_to_read_them_and_file_tasks_without_a_hub_refuse_it():
    with pytest.raises(FileNotFoundError, match="set task.source=hub"):
        sample_splits(get_task("trec"), 10, 0, 10)
    with pytest.raises(ValueError, match="no hub dataset is known"):
        get_task("sst2-demo").on_hub()


def test_the_medium_model_tasks_prompts_causal_and_masked():
    sst5 = {"text": "a quiet, lovely film", "label": 3}
    assert get_task("sst5").template(sst5).continuations == (" terrible", " bad", " okay", " good", " great")
    assert get_task("sst5").for_masked_lm().template(sst5).contexts[0] == f"a quiet, lovely film It was{MASK_SLOT}."
    mnli = {"premise": "The dog ran home.", "hypothesis": "A dog moved", "label": 1}
    masked = get_task("mnli").for_masked_lm().template(mnli)
    assert (masked.contexts[0], masked.continuations, masked.label) == (
        f"The dog ran home?{MASK_SLOT}, a dog moved", (" Yes", " Maybe", " No"), 1)
    assert get_task("mnli").hub.splits["eval"] == "validation_matched"
    trec = {"text": "Who wrote Hamlet?", "coarse_label": 3}
    causal, masked = get_task("trec").template(trec), get_task("trec").for_masked_lm().template(trec)
    assert causal.label == masked.label == 3 and masked.continuations[3] == " Human"
    assert masked.contexts[0] == f"{MASK_SLOT}: Who wrote Hamlet?"
    # every label word of these prompts is one token of a byte tokenizer that learned them
    words = sorted({w for ex in (masked, get_task("sst5").for_masked_lm().template(sst5)) for w in ex.continuations})
    tokenizer = build_byte_tokenizer(words, mask=True)
    (encoded,) = encode_masked(tokenizer, [masked])
    assert encoded.mask_at == 1 and len(encoded.label_ids) == 6
