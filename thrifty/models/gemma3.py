"""Gemma 3 (text): scaled embeddings, Q/K norms, sandwich norms, and sliding-window layers
that use their own RoPE base."""

from __future__ import annotations

import torch
from torch import nn

from thrifty.config import ModelConfig
from thrifty.models.base import CausalLM, Metadata, RunLayer, call_layer
from thrifty.models.layers import (
    Attention,
    Embedding,
    GatedMLP,
    RMSNorm,
    RotaryEmbedding,
)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.is_sliding = config.layer_sliding_window(layer) is not None

        def norm() -> RMSNorm:
            return RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=True, dtype=dtype, device=device)

        self.input_layernorm = norm()
        self.self_attn = Attention(config, layer, qk_norm=True, dtype=dtype, device=device)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            dtype=dtype, device=device)
        self.post_feedforward_layernorm = norm()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: Metadata) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Model(nn.Module):
    def __init__(self, config: ModelConfig, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, i, dtype=dtype, device=device) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=True, dtype=dtype, device=device)
        # RoPE scaling applies to the global layers only; sliding layers use the local base.
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling,
                                          config.max_position_embeddings, device)
        self.rotary_emb_local = RotaryEmbedding(config.head_dim, config.rope_local_base_freq or config.rope_theta,
                                                None, config.max_position_embeddings, device)
        # Rounded to the compute dtype before multiplying, as transformers does.
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size ** 0.5).to(dtype).to(device),
                             persistent=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.embed_scale

    def body(self, x: torch.Tensor, positions: torch.Tensor, meta: Metadata,
             run_layer: RunLayer = call_layer) -> torch.Tensor:
        rope_global = self.rotary_emb(positions, x.dtype)
        rope_local = self.rotary_emb_local(positions, x.dtype)
        for layer in self.layers:
            x = run_layer(layer, x, *(rope_local if layer.is_sliding else rope_global), meta)
        return self.norm(x)


class Gemma3ForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(config)
        self.model = Gemma3Model(config, dtype=dtype, device=device)
        self.lm_head = self._make_lm_head(dtype, device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(input_ids)

    def body(self, x: torch.Tensor, positions: torch.Tensor, meta: Metadata,
             run_layer: RunLayer = call_layer) -> torch.Tensor:
        return self.model.body(x, positions, meta, run_layer)
