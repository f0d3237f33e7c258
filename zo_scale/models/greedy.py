"""Batched greedy decoding with a KV cache, for any Hugging Face causal LM, in a fixed number of forwards.

Prompts of different lengths are left-padded, so every row's next token comes from the last position.
Step 0 runs the whole padded batch (B, T); each later step feeds only the token just chosen, shape
(B, 1), with the cache of the earlier steps. Token t of a row is

    y_t = argmax_v logits(prompt + y_0 .. y_{t-1})[v],

so the result equals re-running every row alone, unpadded and without cache, each step.

Positions are given explicitly: ``position_ids = cumsum(attention_mask) - 1``, clamped at 0 on the pads.
Llama-style models otherwise number positions 0..T-1 from the left edge of the padded batch, which
shifts every rotary position of a padded row; OPT derives them from the mask itself and accepts ours.

Every call runs exactly ``max_new_tokens`` forwards, even when every row has already stopped: under
ZeRO-3 each forward gathers the parameters collectively, and ranks decoding different rows must join
the same number of forwards or they hang.

With ``sampling`` (a temperature T > 0 and a seed) token t is drawn by the Gumbel-max trick,

    y_t = argmax_v (logits[v] / T + G_t[v]),   G_t standard Gumbel noise,

a draw from softmax(logits / T), where G_t of a row comes from a generator seeded by the seed and the row's
prompt tokens: the same prompt draws the same noise wherever it sits, in a batch of any size, on any rank. A
population's row groups (the same batch stacked K times) therefore sample with common random numbers, and
each member's tokens equal those of its point decoded alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from zo_scale.models.scoring import _left_pad


def _cut(tokens: list[int], stop_ids: Collection[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i]
    return tokens


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding: softmax(logits / ``temperature``), the noise of each row seeded by ``seed`` and its prompt."""

    temperature: float
    seed: int

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"a sampling temperature must be > 0 (0 is greedy decoding), got {self.temperature}")

    def generators(self, prompts: Sequence[Sequence[int]]) -> list[torch.Generator]:
        """One CPU generator per row, seeded by the seed and the row's prompt tokens."""
        out = []
        for prompt in prompts:
            digest = hashlib.blake2b(f"{self.seed}:{','.join(map(str, prompt))}".encode(), digest_size=8).digest()
            out.append(torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1))
        return out


def _gumbel(generators: list[torch.Generator], vocab: int, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise, one row of ``vocab`` from each generator (on the CPU, so any device draws the same)."""
    u = torch.stack([torch.rand(vocab, generator=g, dtype=torch.float64) for g in generators])
    return (-torch.log(-torch.log(u.clamp_min(1e-300)))).to(device)


@torch.no_grad()  # not inference_mode: ZeRO-3's gather hooks write parameters in place during the forward
def greedy_decode(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    max_new_tokens: int,
    stop_ids: Collection[int] = (),
    sampling: Sampling | None = None,
) -> list[list[int]]:
    """For each prompt (token ids), the ids greedy decoding (``sampling``: sampled decoding, see the module
    docstring) generates after it, without the prompt and cut before the first id in ``stop_ids`` (at most
    ``max_new_tokens`` of them).

    Always ``max_new_tokens`` forward passes (see the module docstring); rows that stopped keep decoding
    and their extra tokens are dropped. The model's train/eval mode is left as it is: call ``eval()``
    first if it has dropout.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not prompts:
        # A rank with no rows could not join the collective forwards; the caller must give it a dummy row.
        raise ValueError("greedy_decode needs at least one prompt")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"prompt(s) {empty} have no tokens; a prompt needs at least one (e.g. BOS)")
    stop = frozenset(stop_ids)
    device = next(model.parameters()).device
    ids, mask = _left_pad([tuple(p) for p in prompts], pad_id, device)  # (B, T) each
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generated = torch.empty((len(prompts), max_new_tokens), dtype=torch.long, device=device)
    cache = None
    generators = sampling.generators(prompts) if sampling is not None else None
    for step in range(max_new_tokens):
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,  # the LM head over the vocabulary only at the last position
        )
        cache = out.past_key_values
        logits = out.logits[:, -1]
        if sampling is not None:
            logits = logits.double() / sampling.temperature + _gumbel(generators, logits.shape[-1], logits.device)
        ids = logits.argmax(-1, keepdim=True)  # (B, 1)
        generated[:, step] = ids[:, 0]
        # The new token is real for every row: its mask is 1 and its position follows the row's last one.
        mask = torch.cat([mask, torch.ones_like(ids)], dim=-1)
        positions = positions[:, -1:] + 1
    return [_cut(row, stop) for row in generated.tolist()]
