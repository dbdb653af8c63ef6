"""Put a model into its run format: choose the weight format before loading, fuse after."""

from __future__ import annotations

import torch

from thrifty.loading.memory import release_free_memory
from thrifty.models.layers import Attention, GatedMLP, Linear


def set_weights_choice(model: torch.nn.Module, choice: str) -> None:
    """Make every Linear pack its weight as it loads (`choice` as from formats.resolve_choice)."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.weights_choice = choice


def finish_loading(model: torch.nn.Module) -> None:
    """Pack what was loaded dense (a tied lm_head) and fuse the QKV and gate/up projections.

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
