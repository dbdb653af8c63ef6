"""Llama-family decoders: Llama 2/3, SmolLM, Mistral (sliding window) and Qwen2 (QKV bias)."""

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


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype=dtype, device=device)
        self.self_attn = Attention(config, layer, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype=dtype, device=device)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: Metadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, dtype=dtype, device=device) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling,
                                          config.max_position_embeddings, device)

    def body(self, x: torch.Tensor, positions: torch.Tensor, meta: Metadata,
             run_layer: RunLayer = call_layer) -> torch.Tensor:
        cos, sin = self.rotary_emb(positions, x.dtype)
        for layer in self.layers:
            x = run_layer(layer, x, cos, sin, meta)
        return self.norm(x)


class LlamaForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(config)
        self.model = LlamaModel(config, dtype=dtype, device=device)
        self.lm_head = self._make_lm_head(dtype, device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def body(self, x: torch.Tensor, positions: torch.Tensor, meta: Metadata,
             run_layer: RunLayer = call_layer) -> torch.Tensor:
        return self.model.body(x, positions, meta, run_layer)
