"""What the memory planner needs to know about a model: counts read off its meta-device build.

Every count is in elements (multiply by the bytes of an element for bytes). Nothing is allocated:
the model comes from :func:`zo_scale.models.architectures.meta_model`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from zo_scale.models.architectures import DEFAULT_LORA_TARGETS, meta_model
from zo_scale.train.hybrid import decoder_blocks, split_fo_parameters


@dataclass(frozen=True)
class ModelShape:
    """Element counts and dimensions of a causal LM.

    ``largest_parameter``: the biggest single tensor (a ZeRO-3 gather of one parameter, a save's
    buffer, an NVMe swap buffer). ``largest_module``: the most elements one module owns directly (the
    unit ZeRO-3 gathers and the perturbed forward copies K times). ``block``: one transformer block.
    ``linear``: the elements of the blocks' ``nn.Linear`` weights (what int8/NF4 quantize), whose
    output rows number ``linear_rows`` (one fp32 int8 scale each). ``lora_per_rank``: LoRA elements
    per unit of r over the architecture's default target modules (sum of in + out features).
    ``fo_parameters``: what a hybrid run with ``fo_layers`` = k trains by backprop (the last k blocks,
    the final norm, an untied LM head; :func:`zo_scale.train.hybrid.split_fo_parameters`).
    """

    model_type: str
    parameters: int
    largest_parameter: int
    largest_module: int
    block: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    linear: int
    linear_rows: int
    lora_per_rank: int
    fo_layers: int
    fo_parameters: int

    @classmethod
    def of(cls, config: PretrainedConfig, fo_layers: int = 0) -> ModelShape:
        """The shape of ``config``'s model; ``fo_layers``: k of a hybrid run (ValueError if out of range)."""
        model = meta_model(config, torch.float32)
        _, blocks = decoder_blocks(model)
        own = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
        linears = [m for m in blocks.modules() if isinstance(m, nn.Linear)]
        targets = DEFAULT_LORA_TARGETS.get(config.model_type, ["q_proj", "v_proj"])
        lora = sum(m.in_features + m.out_features for name, m in blocks.named_modules()
                   if isinstance(m, nn.Linear) and name.rpartition(".")[2] in targets)
        fo = sum(p.numel() for _, p in split_fo_parameters(model, fo_layers)[0])
        hidden = config.hidden_size
        return cls(
            model_type=config.model_type,
            parameters=sum(p.numel() for p in model.parameters()),
            largest_parameter=max(p.numel() for p in model.parameters()),
            largest_module=max(own),
            block=sum(p.numel() for p in blocks[0].parameters()),
            layers=len(blocks),
            hidden=hidden,
            intermediate=getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", 4 * hidden),
            vocab=config.vocab_size,
            heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            linear=sum(m.weight.numel() for m in linears),
            linear_rows=sum(m.out_features for m in linears),
            lora_per_rank=lora,
            fo_layers=fo_layers,
            fo_parameters=fo,
        )
