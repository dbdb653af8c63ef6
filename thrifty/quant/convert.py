"""Put a model into its run format: choose the weight format before loading, fuse after."""

from __future__ import annotations

import torch

from thrifty.models.layers import Attention, GatedMLP, Linear


def set_weights_choice(model: torch.nn.Module, choice: str) -> None:
    """Make every Linear pack its weight as it loads (`choice` as from formats.resolve_choice)."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.weights_choice = choice


def finish_loading(model: torch.nn.Module) -> None:
    """Pack what was loaded dense (a tied lm_head) and fuse the QKV and gate/up projections."""
    for module in list(model.modules()):
        if isinstance(module, Linear):
            module.pack_loaded()
        elif isinstance(module, (Attention, GatedMLP)):
            module.fuse()
