"""Which model class runs which architecture."""

from __future__ import annotations

import torch

from thrifty.config import ModelConfig
from thrifty.errors import UnsupportedModelError
from thrifty.models.base import CausalLM
from thrifty.models.gemma3 import Gemma3ForCausalLM
from thrifty.models.llama import LlamaForCausalLM

ARCHITECTURES: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "gemma3": Gemma3ForCausalLM,
}

__all__ = ["ARCHITECTURES", "CausalLM", "build_model"]


def build_model(config: ModelConfig, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> CausalLM:
    """An uninitialised model for `config`; fill it with `load_weights` before use."""
    cls = ARCHITECTURES.get(config.architecture)
    if cls is None:
        raise UnsupportedModelError(
            f"architecture {config.architecture!r} is not supported; thrifty runs {', '.join(ARCHITECTURES)}")
    return cls(config, dtype, torch.device(device)).eval()
