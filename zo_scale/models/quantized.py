r"""bitsandbytes-quantized base models, and their scales as ZO-trainable tensors (QZO-style).

A bitsandbytes layer stores its weight as frozen low-bit codes :math:`\bar w` and float scales
:math:`\Delta`, and computes with :math:`W = \Delta \odot \bar w` (the scale broadcast over its group):

- int8 (``bnb.nn.Linear8bitLt``, LLM.int8, row-wise absmax), W of shape (out, in)::

      W[i, :] = SCB[i] / 127 * CB[i, :]        CB: int8 (out, in)   SCB: float32 (out,)

- NF4 (``bnb.nn.Linear4bit``, blockwise absmax, block size 64 elements of the flattened weight)::

      W.flatten()[64 b : 64 (b + 1)] = absmax[b] * NF4[codes[64 b : 64 (b + 1)]]
      codes: 4-bit, packed two per uint8 (out * in / 2, 1)   absmax: float32 (ceil(out * in / 64),)

:func:`quantized_scales` hands a :class:`~zo_scale.core.optimizer.ZOOptimizer` the scales in place of
the quantized weights, so a ZO step perturbs and updates :math:`\Delta` only and the codes stay
bitwise unchanged (QZO: Shang et al., "Fine-tuning Quantized Neural Networks with Zeroth-order
Optimization", arXiv:2505.13430). "Full-parameter" means every parameter: the quantized
ones through their scales, and the parameters bitsandbytes leaves in float (embeddings, norms,
biases, lm_head) directly::

    theta = {Delta of every quantized layer} U {every float parameter with requires_grad}
    W(Delta + eps z_Delta) = W + eps z_Delta * w_bar  (a scale move shifts its whole row or block)

``scales_only=True`` leaves the float parameters out (theta = the scales alone). Unlike the paper, the
projected gradient is not clipped (its DDC) and the scales are not clamped at 0: the update is the
optimizer's own rule (a negative scale flips the sign of its row or block, still a valid weight).

Step sizes: ``eps`` and ``lr`` act on the scales, so they are relative to the scale magnitude. A
scale perturbation eps * z moves every weight of its row (int8) or block (NF4) by eps * z * w_bar / 127
(int8) or eps * z * NF4[code] (NF4; both factors are at most 1 in magnitude): at most eps * |z| per
weight, as in weight-space ZO. MeZO's eps = 1e-3 therefore carries over. Measured on the random tiny
models (scales ~0.05, weights ~0.02; 50 ZO-SGD steps, eps 1e-3, see tests/models/test_quantized.py):

- full mode (scales + float parameters): lr 3e-3 to 5e-3, the same range as full-parameter fp32 ZO
  on the same models (the float embeddings, not the scales, set the largest stable lr); lr 1e-2
  diverges for both;
- ``scales_only``: lr 1e-2 (the loss falls less far: a scale can only stretch its row or block).

For real models start from MeZO's full-parameter settings (lr 1e-6 to 1e-7, eps 1e-3).

int8 needs eps >= ~1e-4: LLM.int8 also quantizes each activation row to int8, so the loss is piecewise
constant at the scale of one activation code (1/127 of a row's absmax) and smaller perturbations give
projected gradients that are rounding noise (measured on tiny-llama, same 10 directions: at eps 1e-6
and 1e-5 the estimates are up to 40x off those at eps 1e-3, some of the wrong sign; at 1e-4 they
roughly agree). NF4 computes in float, and its estimates agree from eps 1e-3 down to 1e-5.

.. note::
    On a CPU with AVX512-BF16, bnb's ``Linear4bit`` repacks itself at its first inference forward
    into a CPU layout whose scales are a **bf16**, transposed copy of ``absmax``. A ZO move of a
    float32 ``absmax`` then never reaches the forward (and a bf16 scale would round away moves
    below 0.4% anyway), and bnb 0.50.2's inverse repack on ``state_dict()`` keeps that bf16
    transposed copy, so a model saved after inference has scrambled scales. :func:`keep_4bit_layout`
    turns the repacking off (the forward then dequantizes the float32 scales it was given);
    :func:`~zo_scale.models.loading.load_model` and :func:`quantized_scales` call it.

bitsandbytes is imported lazily, only when quantization is asked for (``pip install 'zo-scale[quant]'``).
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

QUANTIZATIONS = ("none", "int8", "nf4")
INSTALL_HINT = "pip install 'zo-scale[quant]'"


def check_quantization(quantization: str) -> str:
    """``quantization`` itself if it is one of ``QUANTIZATIONS``, else ValueError naming the choices."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    return quantization


def require_bitsandbytes() -> ModuleType:
    """The ``bitsandbytes`` module, imported now; ImportError naming the extra to install if it is missing."""
    # On AVX512-BF16 CPUs, bnb's import warns that the optional `kernels` package for its repacked 4-bit
    # CPU layout is missing; zo-scale never uses that layout (keep_4bit_layout), so the warning only misleads.
    cpu_ops_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops_logger.level
    cpu_ops_logger.setLevel(logging.ERROR)
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as err:
        raise ImportError(f"8-bit and 4-bit base models need bitsandbytes, which is not installed ({err}); "
                          f"install it with: {INSTALL_HINT}") from err
    finally:
        cpu_ops_logger.setLevel(level)


def bnb_config(quantization: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """The ``BitsAndBytesConfig`` for ``quantization`` ('int8' or 'nf4'; None for 'none').

    NF4 computes in ``compute_dtype`` and has double quantization off, so its ``absmax`` scales are
    plain float32 tensors that ZO can move (with it on they would themselves be 8-bit codes).
    """
    if check_quantization(quantization) == "none":
        return None
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=False)


def saved_quantization(config: dict[str, object] | None) -> str:
    """Which of ``QUANTIZATIONS`` a ``config.json``'s ``quantization_config`` (a dict, or None) describes.

    ValueError for a quantization zo-scale does not load (not bitsandbytes, 4-bit other than NF4).
    """
    if not config:
        return "none"
    if config.get("quant_method") != "bitsandbytes":
        raise ValueError(f"quantization method {config.get('quant_method')!r} is not supported (only bitsandbytes "
                         f"int8 and nf4)")
    if config.get("load_in_8bit"):
        return "int8"
    if config.get("load_in_4bit") and config.get("bnb_4bit_quant_type") == "nf4":
        return "nf4"
    raise ValueError(f"bitsandbytes 4-bit type {config.get('bnb_4bit_quant_type')!r} is not supported (only nf4)")


class _DropInt8CastWarning(logging.Filter):
    """bnb's int8 matmul logs 'inputs will be cast from ... to float16' at every layer of every forward
    (hundreds of lines per ZO step); the cast is by design (LLM.int8 quantizes fp16 activations)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast from" not in record.getMessage()


_INT8_CAST_FILTER = _DropInt8CastWarning()


def quiet_int8_cast_warning() -> None:
    """Drop bnb's per-forward int8 cast warning (that one message only; idempotent)."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if _INT8_CAST_FILTER not in logger.filters:
        logger.addFilter(_INT8_CAST_FILTER)


def keep_4bit_layout(model: torch.nn.Module) -> int:
    """Stop every ``Linear4bit`` of ``model`` from repacking into bnb's CPU layout (see the module note).

    Returns how many layers it set. ValueError if a layer has already been repacked: its scales are a
    bf16 copy by then, so reload the model (``load_model`` keeps the layout from the start).
    """
    bnb = require_bitsandbytes()
    count = 0
    for name, module in _bnb_layers(model, bnb):
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            raise ValueError(f"{name} was already repacked into bitsandbytes' CPU inference layout (bf16 scales); "
                             "load the model with zo_scale.models.load_model, which keeps the float32 layout")
        module.support_avx512bf16_for_cpu = False  # the only switch bnb 0.50.2 reads before repacking
        count += 1
    return count


def _bnb_layers(model: torch.nn.Module, bnb: ModuleType) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))]


def _scale_of(name: str, module: torch.nn.Module, bnb: ModuleType) -> tuple[str, torch.Tensor]:
    """(stable name, the float32 scale tensor the forward reads) of one bitsandbytes layer."""
    if isinstance(module, bnb.nn.Linear8bitLt):
        if module.state.has_fp16_weights:
            raise ValueError(f"{name} keeps fp16 weights (has_fp16_weights=True): it has no fixed int8 codes to "
                             "scale; load with BitsAndBytesConfig(load_in_8bit=True)")
        # The first forward moves SCB from the weight to module.state (init_8bit_state); it is the same
        # tensor object either way, and both the int8 matmul (MatMul8bitLt, eval) and the dequantizing
        # one (MatMul8bitFp, train mode on CPU) read state.SCB.
        scale = getattr(module.weight, "SCB", None)
        scale = module.state.SCB if scale is None else scale
        kind = "SCB"
    else:
        quant_state = module.weight.quant_state
        if quant_state is None:
            raise ValueError(f"{name} is not quantized yet (no quant_state)")
        if quant_state.nested:
            raise ValueError(f"{name} uses double quantization: its absmax scales are 8-bit codes themselves; "
                             "load with bnb_4bit_use_double_quant=False (zo_scale.models.load_model does)")
        scale, kind = quant_state.absmax, "absmax"
    if scale is None:
        raise ValueError(f"{name} has no {kind} scale yet (not quantized)")
    if scale.dtype != torch.float32 or not scale.is_contiguous():
        raise ValueError(f"{name}.weight.{kind} is {scale.dtype}, contiguous={scale.is_contiguous()}; "
                         "ZO needs a contiguous float32 tensor")
    return f"{name}.weight.{kind}", scale


def quantized_scales(model: torch.nn.Module, *, scales_only: bool = False) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs for full-parameter ZO of a bitsandbytes-quantized model (module docstring).

    In ``model.named_parameters()`` order: each int8/NF4 weight is replaced by its scale, named
    ``<module>.weight.SCB`` (int8, shape (out,)) or ``<module>.weight.absmax`` (NF4, shape
    (ceil(out * in / 64),)); every other floating-point parameter with ``requires_grad`` follows as
    it is, unless ``scales_only``. The tensors are the very ones the forward reads, so pass the list
    straight to ``ZOOptimizer(quantized_scales(model), ...)``; names are stable (they seed the noise).

    Turns off bnb's CPU repacking of 4-bit layers (:func:`keep_4bit_layout`). ValueError if the
    model has no bitsandbytes layers or a layer's scales are not plain float32 (double quantization).
    """
    bnb = require_bitsandbytes()
    layers = _bnb_layers(model, bnb)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no bitsandbytes-quantized layers (Linear8bitLt or Linear4bit); "
                         "load it with zo_scale.models.load_model(..., quantization='int8' or 'nf4')")
    keep_4bit_layout(model)
    scales = {id(m.weight): _scale_of(n, m, bnb) for n, m in layers}
    out: list[tuple[str, torch.Tensor]] = []
    for name, param in model.named_parameters():
        if id(param) in scales:
            out.append(scales[id(param)])
        elif not scales_only and param.requires_grad and param.is_floating_point():
            out.append((name, param))
    return out
