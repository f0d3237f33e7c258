"""Batched, cached greedy decoding equals re-running each prompt alone, and always runs max_new_tokens forwards."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from zo_scale.models import build_byte_tokenizer, build_tiny_model
from zo_scale.models.greedy import Sampling, greedy_decode

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = build_byte_tokenizer()
PAD = TOKENIZER.pad_token_id
TEXTS = ["Title: Marrowby\nQuestion: When", "Q", "The lighthouse keeper left in", "Ab"]
PROMPTS = [TOKENIZER(t)["input_ids"] for t in TEXTS]


def tiny_gpt2():
    """GPT-2 takes absolute positions from position_ids alone (arange when absent), so a left-padded row
    decodes correctly only when the positions are given; a larger init makes positions matter."""
    config = GPT2Config(
        vocab_size=len(TOKENIZER), n_positions=128, n_embd=64, n_layer=2, n_head=4, initializer_range=0.2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=TOKENIZER.bos_token_id, eos_token_id=TOKENIZER.eos_token_id, pad_token_id=PAD,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(config).eval()


MODELS = {
    "llama": lambda: build_tiny_model("llama").eval(),
    "opt": lambda: build_tiny_model("opt").eval(),
    "gpt2": tiny_gpt2,
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


@torch.no_grad()
def naive_greedy(model, prompt, n):
    """The definition: the whole unpadded sequence, no cache, argmax of the last position, n times."""
    seq, out = list(prompt), []
    for _ in range(n):
        token = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
        out.append(token)
        seq.append(token)
    return out


def test_prompts_have_different_lengths():
    assert len({len(p) for p in PROMPTS}) == len(PROMPTS)


def test_matches_naive_reference(model):
    expected = [naive_greedy(model, p, 10) for p in PROMPTS]
    assert greedy_decode(model, PROMPTS, PAD, max_new_tokens=10) == expected
    assert len({tuple(e) for e in expected}) > 1, "a degenerate model would make the comparison vacuous"


def test_matches_transformers_generate(model):
    ids = torch.full((len(PROMPTS), max(map(len, PROMPTS))), PAD)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        ids[i, ids.shape[1] - len(p) :] = torch.tensor(p)
        mask[i, ids.shape[1] - len(p) :] = 1
    eos = TOKENIZER.eos_token_id
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                         pad_token_id=PAD, eos_token_id=eos)[:, ids.shape[1] :].tolist()
    expected = [row[: row.index(eos)] if eos in row else row for row in out]
    assert greedy_decode(model, PROMPTS, PAD, max_new_tokens=8, stop_ids={eos}) == expected


def test_stop_ids_cut_before_the_first_stop(model):
    full = greedy_decode(model, PROMPTS, PAD, max_new_tokens=10)
    stop = full[0][3]  # the 4th token of the first row
    cut = greedy_decode(model, PROMPTS, PAD, max_new_tokens=10, stop_ids=[stop])
    assert cut[0] == full[0][: full[0].index(stop)]
    assert len(cut[0]) <= 3
    for row_full, row_cut in zip(full, cut, strict=True):
        assert row_cut == (row_full[: row_full.index(stop)] if stop in row_full else row_full)


def test_always_runs_max_new_tokens_forwards_with_cache(model):
    shapes = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        everything = set(range(len(TOKENIZER)))  # every row stops at its first token
        out = greedy_decode(model, PROMPTS, PAD, max_new_tokens=6, stop_ids=everything)
    finally:
        hook.remove()
    assert out == [[] for _ in PROMPTS]
    assert len(shapes) == 6
    width = max(map(len, PROMPTS))
    assert shapes == [(len(PROMPTS), width)] + [(len(PROMPTS), 1)] * 5  # later steps feed only the new token


def test_zero_new_tokens_and_bad_arguments():
    model = MODELS["llama"]()
    assert greedy_decode(model, PROMPTS, PAD, max_new_tokens=0) == [[] for _ in PROMPTS]
    with pytest.raises(ValueError, match="at least one prompt"):
        greedy_decode(model, [], PAD, max_new_tokens=3)
    with pytest.raises(ValueError, match=r"prompt\(s\) \[1\] have no tokens"):
        greedy_decode(model, [[5], []], PAD, max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_decode(model, PROMPTS, PAD, max_new_tokens=-1)


@torch.no_grad()
def naive_sample(model, prompt, n, sampling):
    """The definition: the whole unpadded sequence, no cache; token t = argmax(logits / T + G_t), G_t the
    Gumbel noise of the row's own generator (seeded by the seed and the prompt)."""
    (generator,) = sampling.generators([prompt])
    seq, out = list(prompt), []
    for _ in range(n):
        logits = model(input_ids=torch.tensor([seq])).logits[0, -1].double()
        u = torch.rand(logits.shape[-1], generator=generator, dtype=torch.float64)
        token = int((logits / sampling.temperature - torch.log(-torch.log(u))).argmax())
        out.append(token)
        seq.append(token)
    return out


def test_sampled_decoding_draws_each_rows_noise_from_its_prompt(model):
    """A row samples what it samples alone, wherever it sits (a batch stacked three times: common random
    numbers for a population's row groups); another seed samples otherwise, and so does a lower temperature
    drift towards greedy."""
    sampling = Sampling(temperature=1.5, seed=11)
    alone = [naive_sample(model, p, 8, sampling) for p in PROMPTS]
    stacked = greedy_decode(model, PROMPTS * 3, PAD, max_new_tokens=8, sampling=sampling)
    assert stacked == alone * 3
    assert greedy_decode(model, PROMPTS[::-1], PAD, max_new_tokens=8, sampling=sampling) == alone[::-1]
    assert greedy_decode(model, PROMPTS, PAD, max_new_tokens=8, sampling=Sampling(1.5, 12)) != alone
    assert alone != greedy_decode(model, PROMPTS, PAD, max_new_tokens=8)  # sampled, not greedy
    cold = greedy_decode(model, PROMPTS, PAD, max_new_tokens=8, sampling=Sampling(1e-4, 11))
    assert cold == greedy_decode(model, PROMPTS, PAD, max_new_tokens=8)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Sampling(0.0, 1)
