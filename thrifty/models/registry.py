"""Which model class runs which architecture."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from thrifty.config import ModelConfig
from thrifty.errors import UnsupportedModelError
from thrifty.loading.source import ModelSource
from thrifty.loading.weights import WeightTensor
from thrifty.models.base import CausalLM
from thrifty.models.gemma3 import Gemma3ForCausalLM
from thrifty.models.llama import LlamaForCausalLM
from thrifty.quant.convert import finish_loading, set_weights_choice

ARCHITECTURES: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "gemma3": Gemma3ForCausalLM,
}

__all__ = ["ARCHITECTURES", "CausalLM", "build_model", "load_model"]


def build_model(config: ModelConfig, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> CausalLM:
    """An uninitialised model for `config`; fill it with `load_weights` before use."""
    cls = ARCHITECTURES.get(config.architecture)
    if cls is None:
        raise UnsupportedModelError(
            f"architecture {config.architecture!r} is not supported; thrifty runs {', '.join(ARCHITECTURES)}")
    return cls(config, dtype, torch.device(device)).eval()


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device, weights_choice: str,
               wrap: Callable[[Iterable[tuple[str, WeightTensor]]], Iterable[tuple[str, WeightTensor]]] | None = None,
               ) -> CausalLM:
    """Build the model of `source` and load its weights in the run format `weights_choice`
    (as resolved by thrifty.quant.formats.resolve_choice); `wrap` may decorate the weight stream (progress)."""
    model = build_model(source.config, dtype, device)
    set_weights_choice(model, weights_choice)
    weights = source.iter_weights()
    model.load_weights(wrap(weights) if wrap else weights)
    finish_loading(model)
    return model
