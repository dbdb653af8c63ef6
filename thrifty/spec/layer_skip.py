"""Self-speculation by layer skipping: the target with some of its layers left out drafts for itself.

As in Draft & Verify (Zhang et al. 2023) and SWIFT (Xia et al. 2024) the draft needs no
second model: it runs the target's own weights, skipping intermediate layers (the first
and last layers matter most and are always kept). The view shares every parameter with
the target; only the attention modules are shallow copies so they can bind the
drafter's own, smaller KV cache (one per kept layer).
"""

from __future__ import annotations

import copy

from torch import nn

from thrifty.models.base import CausalLM


def default_kept_layers(num_layers: int, keep_fraction: float = 0.5, edge: int = 2) -> list[int]:
    """`edge` layers at each end plus evenly spaced middle layers, about `keep_fraction` of all."""
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    wanted = max(1, round(num_layers * keep_fraction))
    if wanted >= num_layers:
        return list(range(num_layers))
    edge = min(edge, wanted // 2)
    ends = [*range(wanted - edge if wanted <= 2 * edge else edge), *range(num_layers - edge, num_layers)]
    middle = list(range(len(ends) - edge, num_layers - edge))
    extra = wanted - len(ends)
    step = len(middle) / extra if extra else 0
    return sorted({*ends, *(middle[int(i * step)] for i in range(extra))})


def layer_skip_view(target: CausalLM, kept_layers: list[int]) -> CausalLM:
    """A CausalLM running only `kept_layers` of `target`, sharing its weights."""
    layers = target.model.layers
    if not kept_layers or any(not 0 <= i < len(layers) for i in kept_layers):
        raise ValueError(f"kept layers {kept_layers} must be a non-empty subset of 0..{len(layers) - 1}")
    view_layers = nn.ModuleList()
    for i in sorted(kept_layers):
        layer = copy.copy(layers[i])
        layer._modules = dict(layer._modules)
        layer._modules["self_attn"] = copy.copy(layers[i].self_attn)  # gets its own KV binding
        view_layers.append(layer)
    body = copy.copy(target.model)
    body._modules = dict(body._modules)
    body._modules["layers"] = view_layers
    view = copy.copy(target)
    view._modules = dict(view._modules)
    view._modules["model"] = body
    return view
