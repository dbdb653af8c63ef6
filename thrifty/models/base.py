"""What every causal LM in thrifty implements, and the parts they share (weights, KV cache, logits).

Module attribute names mirror Hugging Face's, so parameter names are the Hugging Face
weight names (`model.layers.0.self_attn.q_proj.weight`) and loading is a name lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from thrifty.config import ModelConfig
from thrifty.errors import ModelLoadError
from thrifty.loading.memory import release_free_memory
from thrifty.loading.weights import WeightTensor
from thrifty.models.decode_attention import DecodeMetadata
from thrifty.models.layers import Linear
from thrifty.models.paged_attention import AttentionMetadata

Metadata = AttentionMetadata | DecodeMetadata
# How a model body runs one decoder layer: (layer, x, cos, sin, meta) -> x. thrifty.engine.compiled_decode
# passes one torch.compile'd function that serves every layer (regional compilation: one graph, not 30).
RunLayer = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, Metadata], torch.Tensor]


def call_layer(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: Metadata) -> torch.Tensor:
    return layer(x, cos, sin, meta)


class CausalLM(nn.Module):
    """A decoder-only model over a flat, variable-length batch of tokens (no batch dimension).

    Subclasses build `self.model` (with `embed_tokens`, `layers` whose items have a
    `self_attn`, and `norm`) and call `_make_lm_head`.
    """

    model: nn.Module
    lm_head: Linear

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Metadata) -> torch.Tensor:
        """Final hidden states [T, hidden_size] of the T new tokens described by `meta`."""
        return self.body(self.embed(input_ids), positions, meta)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings [T, hidden_size]."""
        raise NotImplementedError

    def body(self, x: torch.Tensor, positions: torch.Tensor, meta: Metadata,
             run_layer: RunLayer = call_layer) -> torch.Tensor:
        """Final hidden states from input embeddings: RoPE, every layer through `run_layer`, final norm.
        Apart from `embed`, which torch.compile need not see (a lookup in GGUF blocks runs in numpy)."""
        raise NotImplementedError

    def _make_lm_head(self, dtype: torch.dtype, device: torch.device) -> Linear:
        head = Linear(self.config.hidden_size, self.config.vocab_size, False, dtype=dtype, device=device)
        if self.config.tie_word_embeddings:
            head.weight = self.model.embed_tokens.weight  # one parameter, listed under the embedding's name
            # A plain attribute, not a submodule: the head packs itself from the embedding's blocks.
            head.__dict__["tied_embedding"] = self.model.embed_tokens
        return head

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab_size] for hidden states [N, hidden_size]."""
        logits = self.lm_head(hidden)
        if (cap := self.config.final_logit_softcapping) is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def kv_cache_shape(self) -> tuple[int, int]:
        """The shape of one cache slot in every layer: (num_kv_heads, head_dim)."""
        return self.config.num_kv_heads, self.config.head_dim

    def bind_kv_cache(self, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Give each layer its flat K and V cache tensors [num_slots, num_kv_heads, head_dim]."""
        layers = self.model.layers
        if len(caches) != len(layers):
            raise ValueError(f"got KV caches for {len(caches)} layers; the model has {len(layers)}")
        for layer, (k_cache, v_cache) in zip(layers, caches):
            layer.self_attn.bind_kv_cache(k_cache, v_cache)

    def load_weights(self, weights: Iterable[tuple[str, WeightTensor]]) -> None:
        """Fill every parameter from (Hugging Face name, weight) pairs; all must be present and fit."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        unexpected: list[str] = []
        for name, weight in weights:
            param = params.get(name)
            if param is None:
                # Tied checkpoints may still carry their copy of the embedding as lm_head.
                if not (name == "lm_head.weight" and self.config.tie_word_embeddings):
                    unexpected.append(name)
                continue
            if tuple(weight.shape) != tuple(param.shape):
                raise ModelLoadError(
                    f"weight {name} has shape {list(weight.shape)} but the model config implies "
                    f"{list(param.shape)}; the weights and the config do not belong together")
            owner_name, _, attr = name.rpartition(".")
            self.get_submodule(owner_name).load_param(attr, weight)
            loaded.add(name)
            del weight
            release_free_memory()  # this tensor's float temporaries: keep them out of the peak RSS
        missing = sorted(set(params) - loaded)
        if missing or unexpected:
            problems = []
            if missing:
                problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
            if unexpected:
                problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
            raise ModelLoadError(
                f"the weights do not match the {self.config.architecture} model: {'; '.join(problems)}. "
                f"The file is incomplete or is a model variant thrifty does not support.")
