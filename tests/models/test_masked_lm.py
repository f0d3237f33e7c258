"""Prompt-based masked-LM fine-tuning: tiny RoBERTa/BERT, LM-BFF prompts, label words at the mask, k-shot
sampling, and every estimator and rule of the ZO optimizer on a masked LM."""

import dataclasses
import math

import pytest
import torch

from zo_scale.core.estimators import ESTIMATORS
from zo_scale.models import ModelLoadError, build_byte_tokenizer, build_masked_tokenizer, load_model, model_head
from zo_scale.models.masked_scoring import MaskedExample, encode_masked
from zo_scale.models.scoring import accuracy, option_scores
from zo_scale.models.tiny import MASKED_LABEL_WORDS, build_tiny_masked_lm
from zo_scale.tasks import Example, TaskDataError, get_task, sample_k_shot
from zo_scale.tasks.masked_templates import MASK_SLOT
from zo_scale.train.build import build_optimizer, in_forward_unsupported
from zo_scale.train.config import Config, ModelConfig, OptimConfig
from zo_scale.train.objectives import ChoiceObjective

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENIZER = build_masked_tokenizer()


def sst2_examples(k=4, seed=0):
    train, dev, _ = sample_k_shot(get_task("sst2-demo").for_masked_lm(), k, num_eval=8, seed=seed)
    return train, dev


def test_the_masked_tokenizer_keeps_the_byte_ids_and_makes_each_label_word_one_token():
    plain = build_byte_tokenizer()
    text = "a film, It was great\n"
    assert TOKENIZER(text, add_special_tokens=False)["input_ids"][:5] == plain(text)["input_ids"][:5]
    for word in MASKED_LABEL_WORDS:
        (token,) = TOKENIZER(word, add_special_tokens=False)["input_ids"]
        assert TOKENIZER.decode([token]) == word
    ids = TOKENIZER("x<mask>.")["input_ids"]
    assert ids[0] == TOKENIZER.bos_token_id and ids[-1] == TOKENIZER.eos_token_id
    assert ids.count(TOKENIZER.mask_token_id) == 1


@pytest.mark.parametrize("name", ["tiny-roberta", "tiny-bert"])
def test_tiny_masked_lms_load_as_masked_lms_with_a_mask_token(name):
    model, tokenizer = load_model(name)
    assert type(model).__name__.endswith("ForMaskedLM") and model_head(name) == "masked"
    assert tokenizer.mask_token_id is not None and not model.training
    assert model_head("tiny-llama") == "causal"


def test_a_saved_masked_lm_is_found_masked_from_its_config_and_loads_back(tmp_path):
    model = build_tiny_masked_lm("roberta")
    model.save_pretrained(tmp_path / "m")
    TOKENIZER.save_pretrained(tmp_path / "m")
    assert model_head(str(tmp_path / "m")) == "masked"
    loaded, _ = load_model(str(tmp_path / "m"))
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_a_masked_lm_whose_tokenizer_has_no_mask_token_is_refused(tmp_path):
    build_tiny_masked_lm("bert").save_pretrained(tmp_path / "m")
    build_byte_tokenizer().save_pretrained(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="masked LM .* no mask token"):
        load_model(str(tmp_path / "m"))


def test_lm_bff_prompts_for_sst2_and_rte_and_the_mask_appended_for_other_tasks():
    row = {"sentence": "a gorgeous film ", "label": "1"}
    ex = get_task("sst2").for_masked_lm().template(row)
    assert ex.contexts == ("a gorgeous film It was{mask}.",) * 2 and ex.continuations == (" terrible", " great")
    rte = get_task("rte").for_masked_lm().template(
        {"premise": "Cats sleep a lot.", "hypothesis": "Cats are lazy", "label": "not_entailment"})
    assert rte.contexts[0] == "Cats sleep a lot?{mask}, cats are lazy" and rte.label == 1
    boolq = get_task("boolq")
    row = {"passage": "p", "question": "q", "label": True}
    assert boolq.for_masked_lm().template(row).contexts[0] == boolq.template(row).contexts[0] + MASK_SLOT
    with pytest.raises(TaskDataError, match="different contexts"):
        get_task("winogrande").for_masked_lm().template(
            {"sentence": "Ann gave _ a book.", "option1": "Bo", "option2": "Cy", "answer": "1"})
    copa = get_task("copa").for_masked_lm().template(  # one prompt, but the options are sentences
        {"premise": "It rained.", "choice1": "The grass got wet.", "choice2": "I sang.", "question": "effect",
         "label": 0})
    with pytest.raises(ValueError, match="label word ' the grass got wet.' is 18 tokens"):
        encode_masked(TOKENIZER, [copa])


def test_encoding_puts_one_mask_where_the_slot_was_and_the_label_words_as_single_ids():
    train, _ = sst2_examples()
    enc = encode_masked(TOKENIZER, train)
    for ex, e in zip(train, enc, strict=True):
        assert e.ids[e.mask_at] == TOKENIZER.mask_token_id and e.ids.count(TOKENIZER.mask_token_id) == 1
        before = ex.contexts[0].split(MASK_SLOT)[0]
        assert TOKENIZER.decode(e.ids[1 : e.mask_at]) == before
        assert [TOKENIZER.decode([i]) for i in e.label_ids] == list(ex.continuations)


def test_a_long_prompt_loses_its_start_but_keeps_the_mask_and_what_follows():
    ex = Example(("word " * 100 + "It was{mask}.",) * 2, (" terrible", " great"), 1)
    (e,) = encode_masked(TOKENIZER, [ex], max_length=40)
    assert len(e.ids) == 40 and e.ids[0] == TOKENIZER.bos_token_id and e.ids[-1] == TOKENIZER.eos_token_id
    assert TOKENIZER.decode(e.ids[e.mask_at + 1 : -1]) == "." and TOKENIZER.decode(e.ids[e.mask_at - 6 : e.mask_at]) \
        == "It was"
    with pytest.raises(ValueError, match="after the mask does not fit"):
        encode_masked(TOKENIZER, [Example(("It was{mask}" + " x" * 50,) * 2, (" terrible", " great"), 1)], 20)


@pytest.mark.parametrize(("contexts", "words", "tokenizer", "error"), [
    (("It was{mask}",) * 2, (" fantastic", " great"), TOKENIZER, "' fantastic' is 10 tokens"),
    (("It was",) * 2, (" terrible", " great"), TOKENIZER, "mask slot"),
    (("{mask} and {mask}",) * 2, (" terrible", " great"), TOKENIZER, "mask slot"),
    (("It was <mask>{mask}",) * 2, (" terrible", " great"), TOKENIZER, "2 mask tokens"),
    (("It was{mask}",) * 2, (" terrible", " great"), build_byte_tokenizer(), "no mask token"),
    (("a{mask}", "b{mask}"), (" terrible", " great"), TOKENIZER, "different contexts"),
])
def test_bad_masked_prompts_and_label_words_are_named(contexts, words, tokenizer, error):
    with pytest.raises(ValueError, match=error):
        encode_masked(tokenizer, [Example(contexts, words, 0)])


@pytest.mark.parametrize("arch", ["roberta", "bert"])
def test_scores_are_the_label_words_log_probabilities_at_the_mask_of_each_unpadded_prompt(arch):
    """A batch of prompts of different lengths (right-padded) scores as each prompt alone, full logits."""
    model = build_tiny_masked_lm(arch).eval()
    train, _ = sst2_examples()
    enc = encode_masked(TOKENIZER, train)
    assert len({e.length for e in enc}) > 1
    batched = option_scores(model, enc, TOKENIZER.pad_token_id)
    for i, e in enumerate(enc):
        logits = model(input_ids=torch.tensor([e.ids])).logits[0, e.mask_at].float().log_softmax(-1)
        assert torch.allclose(batched[i], logits[list(e.label_ids)], atol=1e-5), i


def test_examples_with_fewer_options_score_minus_infinity_beyond_them():
    model = build_tiny_masked_lm("roberta").eval()
    two = MaskedExample((1, 282, 2), 1, (263, 271), 0)
    three = MaskedExample((1, 70, 282, 2), 2, (263, 271, 264), 2)
    scores = option_scores(model, [two, three], TOKENIZER.pad_token_id)
    assert scores.shape == (2, 3) and scores[0, 2] == float("-inf") and torch.isfinite(scores[1]).all()


def test_k_shot_draws_k_train_and_k_dev_examples_of_each_class_disjoint_and_seeded():
    task = get_task("sst2-demo")
    train, dev, evals = sample_k_shot(task, 16, num_eval=50, seed=13)
    assert [sum(ex.label == c for ex in train) for c in (0, 1)] == [16, 16]
    assert [sum(ex.label == c for ex in dev) for c in (0, 1)] == [16, 16]
    assert not set(train) & set(dev) and len(evals) == 50
    assert sample_k_shot(task, 16, num_eval=50, seed=13) == (train, dev, evals)
    assert sample_k_shot(task, 16, num_eval=50, seed=42)[0] != train
    assert [ex.label for ex in train] != sorted(ex.label for ex in train)  # shuffled, not grouped by class
    with pytest.raises(ValueError, match="k=512 per class takes 1024"):
        sample_k_shot(task, 512, num_eval=10)
    with pytest.raises(ValueError, match="k .* must be an int >= 1"):
        sample_k_shot(task, 0)


def _method_configs():
    rules = {"sgd": {}, "sign": {}, "sign-momentum": {}, "momentum": {}, "adam": {},
             "lozo-m": {"sampler": "lowrank"}, "hizoo": {"estimator": "hizoo"}}
    configs = {f"rule={r}": OptimConfig(rule=r, **extra) for r, extra in rules.items()}
    configs.update({f"estimator={e}": OptimConfig(estimator=e, queries=2 if e == "fzoo" else 1)
                    for e in ESTIMATORS if e != "hizoo"})
    configs.update({f"sampler={s}": OptimConfig(sampler=s) for s in ("rademacher", "sparse", "lowrank", "block",
                                                                       "lezo")})
    return configs


@pytest.mark.parametrize("name", list(_method_configs()))
def test_every_estimator_rule_and_sampler_trains_a_masked_lm(name):
    cfg = dataclasses.replace(_method_configs()[name], lr=1e-3, eps=1e-2, kernel="eager")
    model = build_tiny_masked_lm("roberta").eval()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    train, _ = sst2_examples()
    objective = ChoiceObjective(TOKENIZER, "masked", "ce", 256)
    batch = objective.encode(train)
    optimizer, _ = build_optimizer(model.named_parameters(), cfg, seed=0, total_steps=3, model=model)
    losses = [optimizer.step(lambda groups=None: objective.loss(model, batch, groups)) for _ in range(3)]
    optimizer.flush()
    assert all(math.isfinite(loss) for loss in losses)
    moved = sum(not torch.equal(p, start[n]) for n, p in model.named_parameters())
    assert moved > 0, "no parameter moved"


def test_a_masked_lm_takes_the_in_place_step_and_a_direct_perturbed_forward_fails_by_name():
    assert "masked LM" in in_forward_unsupported(Config(model=ModelConfig(name="tiny-bert"),
                                                        optim=OptimConfig(perturb="in_forward")))
    assert in_forward_unsupported(Config(optim=OptimConfig(perturb="in_forward"))) is None
    model = build_tiny_masked_lm("roberta").eval()
    objective = ChoiceObjective(TOKENIZER, "masked", "ce", 256)
    batch = objective.encode(sst2_examples()[0])
    optimizer, _ = build_optimizer(model.named_parameters(), OptimConfig(perturb="in_forward", kernel="eager"),
                                   seed=0, total_steps=1, model=model)
    with pytest.raises(ValueError, match="perturb='in_forward', is not supported for masked LMs"):
        optimizer.step(lambda groups=None: objective.loss(model, batch, groups))


def test_fine_tuning_a_tiny_roberta_raises_its_accuracy_on_its_own_training_examples():
    """A learnable signal: 16 examples per class, scored where they trained (not a quality claim)."""
    torch.manual_seed(0)
    model = build_tiny_masked_lm("roberta").eval()
    train, _ = sst2_examples(k=8)
    objective = ChoiceObjective(TOKENIZER, "masked", "ce", 256)
    batch = objective.encode(train)
    before = accuracy(model, batch, TOKENIZER.pad_token_id)
    optimizer, _ = build_optimizer(model.named_parameters(), OptimConfig(rule="adam", lr=3e-3, eps=1e-3,
                                                                         kernel="eager", queries=4),
                                   seed=0, total_steps=150, model=model)
    losses = [optimizer.step(lambda groups=None: objective.loss(model, batch, groups)) for _ in range(150)]
    optimizer.flush()
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20
    assert accuracy(model, batch, TOKENIZER.pad_token_id) > before
