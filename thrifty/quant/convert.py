"""Put a model into its run format: choose the weight format before loading, fuse after."""

from __future__ import annotations

import torch

from thrifty.loading.memory import release_free_memory
from thrifty.models.layers import Attention, Embedding, GatedMLP, Linear
from thrifty.quant.formats import cpu_has_bf16, weight_format


def set_weights_choice(model: torch.nn.Module, choice: str) -> None:
    """Make every Linear pack its weight as it loads (`choice` as from formats.resolve_choice).

    Unless weights run as float32, a GGUF-quantized embedding table stays in its blocks too, where
    nothing needs it as a float matrix: a tied lm_head must then be packed, not run dense. And
    attention of long chunks then runs in bfloat16 matmuls as the packed weights do, where the CPU
    multiplies bfloat16 natively.
    """
    config = getattr(model, "config", None)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head_packed = weight_format(choice, torch.empty(0)) is not None  # how a tied, dense-loaded head goes
    for module in model.modules():
        if isinstance(module, Linear):
            module.weights_choice = choice
        elif isinstance(module, Embedding):
            module.keep_blocks = choice != "fp32" and (head_packed or not tied)
        elif isinstance(module, Attention):
            module.bf16_chunks = choice != "fp32" and cpu_has_bf16()


def finish_loading(model: torch.nn.Module) -> None:
    """Pack what was loaded dense (a tied lm_head), fuse the QKV and gate/up projections, and give
    float32 matmul weights their oneDNN-blocked copy for calls of several rows.

    Modules are looked up by name as they are reached, so the projections a fusion replaces are
    freed at once (a list of the modules would keep every one of them alive to the end).
    """
    names = [name for name, module in model.named_modules() if isinstance(module, (Linear, Attention, GatedMLP))]
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # a projection already fused away
        if isinstance(module, Linear):
            module.pack_loaded()
        else:
            module.fuse()
        del module
        release_free_memory()  # the replaced parts and packing scratch, before the next module's
    for module in model.modules():
        if isinstance(module, Linear):
            module.block_for_onednn()
