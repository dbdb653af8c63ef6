"""Which run format each weight gets, from the user's `--weights` choice and the CPU."""

from __future__ import annotations

import gguf
import torch

from thrifty.loading.weights import QuantizedWeight, WeightTensor

WEIGHT_CHOICES = ("auto", "gguf", "int8", "int4", "bf16", "fp32")
_Q = gguf.GGMLQuantizationType
# GGUF block types whose codes are 4-bit with a scale (and offset) per 32 weights, as int4 groups are.
_INT4_LIKE = {_Q.Q4_0, _Q.Q4_1, _Q.Q4_K}


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX): the packed kernels need it."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_choice(choice: str, device: torch.device) -> str:
    """Check the choice; packed formats are CPU kernels needing native bf16, else everything stays fp32."""
    if choice not in WEIGHT_CHOICES:
        raise ValueError(f"weights {choice!r} is unknown; use one of {', '.join(WEIGHT_CHOICES)}")
    if device.type != "cpu" or (choice == "auto" and not cpu_has_bf16()):
        return "fp32"
    return choice


def weight_format(choice: str, weight: WeightTensor) -> str | None:
    """The packed format for one matmul weight, or None to keep it dense in the model's dtype.

    `auto` is `gguf` for block-quantized weights (4-bit blocks run as int4, which decodes fastest;
    the rest as int8) and int8 for dense ones. Requantizing 8-bit blocks to int4 costs about 6%
    perplexity on SmolLM2 while int4 from Q4_1 and int8 stay within 0.3% (BENCHMARKS.md, "Speed").
    """
    if choice == "fp32":
        return None
    if choice in ("gguf", "auto"):
        if not isinstance(weight, QuantizedWeight):
            return "int8" if choice == "auto" else None
        return "int4" if weight.ggml_type in _INT4_LIKE else "int8"
    return choice
