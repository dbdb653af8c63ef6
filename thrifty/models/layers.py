"""The building blocks of the decoder-only models: norms, RoPE, linear layers, MLP, attention.

Numerics follow Hugging Face transformers step by step (which dtype each operation runs
in), so thrifty's logits match it to float rounding in every compute dtype. Parameters
are allocated uninitialised: the loader overwrites every one through `load_param`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from thrifty.config import ModelConfig, RopeScaling
from thrifty.cpu_info import cpuinfo_field
from thrifty.loading.weights import QuantizedWeight, WeightTensor, to_tensor
from thrifty.models import blocked_linear, skinny_linear
from thrifty.models.decode_attention import DecodeMetadata, decode_attention
from thrifty.models.paged_attention import AttentionMetadata, paged_attention
from thrifty.quant.formats import weight_format
from thrifty.quant.gemm_rows import with_padded_rows
from thrifty.quant.packed import PackedWeight, concat, pack, pack_rows


def _param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


# A float32 matmul of a few rows on the CPU is bound by reading the weight. F.linear (x @ W^T) reaches
# MKL, which reads it at full bandwidth on Intel CPUs but takes slower paths on AMD ones; there W @ x^T
# (one row padded to two) read it 1.3-3x faster, and a single row 3x faster still. From a few rows on,
# oneDNN's matmul on a copy of the weight reordered into its blocked layout wins on both: those are the
# verify steps of speculative decoding and prefill chunks. Whole SmolLM2-135M steps, 2 threads, torch
# 2.13 (scripts/bench_fp32_matmul.py): on an AMD EPYC the blocked copy won from 3 rows (1.3-1.5x at
# 3-4, 2x at 8-16); on an Intel Sapphire Rapids F.linear took 26 ms at one row against 70 for W @ x^T,
# and the blocked copy won from 4 rows (36 against 45 ms). On AVX-512 CPUs thrifty's own kernel
# (thrifty.models.skinny_linear) takes up to 64 rows, faster than all of these, and no copy is kept.
_ON_AMD = cpuinfo_field("vendor_id") == "AuthenticAMD"
_BLOCKED_FP32_ROWS = 3 if _ON_AMD else 4
# Up to this many rows, with no blocked copy, W @ x^T (it loses to F.linear from about 512 rows on AMD).
_TRANSPOSED_FP32_ROWS = 128 if _ON_AMD else 0


def onednn_blocked(weight: torch.Tensor) -> torch.Tensor | None:
    """A float32 CPU weight [out, in] reordered into oneDNN's blocked layout, None where oneDNN
    cannot run it. The copy costs as much memory as the weight itself."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64)  # 64: the row count it tunes for


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 blocked: torch.Tensor | None = None) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    # A compiled graph's row count is symbolic (1-17 rows, all the kernel's); comparing it would pin
    # the graph to its example's count.
    few_rows = not isinstance(rows, int) or 0 < rows <= skinny_linear.MAX_ROWS
    if few_rows and weight.dtype == torch.float32 and weight.device.type == "cpu" and skinny_linear.available():
        y = skinny_linear.skinny_linear(x, weight)
        return y if bias is None else y + bias
    if blocked is not None and torch.compiler.is_compiling():
        # A graph's row count is symbolic where it takes several (2-16 sequences, 2-17 new tokens);
        # comparing it would pin the graph to its example's count, so the op picks by rows at run time.
        if not isinstance(rows, int):
            y = blocked_linear.blocked_linear(x, weight)
            return y if bias is None else y + bias
    elif blocked is not None and rows >= _BLOCKED_FP32_ROWS:
        return with_padded_rows(lambda rows: torch.ops.mkldnn._linear_pointwise(rows, blocked, bias, "none", [], ""), x)
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or not 0 < rows <= _TRANSPOSED_FP32_ROWS:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:
        flat = torch.cat((flat, flat))
    y = (weight @ flat.t()).t()[:rows].contiguous()
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


class WeightModule(nn.Module):
    """A module whose parameters the model loader fills, one named weight at a time."""

    def load_param(self, name: str, weight: WeightTensor) -> None:
        # GGUF-quantized weights are dequantized to the parameter's dtype here. A module with a
        # quantized matmul would override this to keep the QuantizedWeight's blocks instead.
        param = getattr(self, name)
        with torch.no_grad():
            param.copy_(to_tensor(weight, param.dtype))


class Linear(WeightModule):
    """y = x W^T + b, with W loadable from a dense or a GGUF-quantized weight.

    With a `weights_choice` other than fp32 (set before loading), W is packed as it loads
    (int8, int4 or bfloat16) and the float parameter is never filled, so it takes no memory.
    """

    weights_choice: str = "fp32"
    packed: PackedWeight | None = None
    blocked: torch.Tensor | None = None  # a float32 weight's oneDNN copy for multi-row matmuls

    def __init__(self, in_features: int, out_features: int, bias: bool, *, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.weight = _param(out_features, in_features, dtype=dtype, device=device)
        self.bias = _param(out_features, dtype=dtype, device=device) if bias else None

    def load_param(self, name: str, weight: WeightTensor) -> None:
        fmt = weight_format(self.weights_choice, weight) if name == "weight" else None
        if fmt is None:
            super().load_param(name, weight)
            return
        self.packed = pack(to_tensor(weight, torch.float32), fmt)
        self.weight = _param(0, dtype=self.weight.dtype, device=self.weight.device)

    def pack_loaded(self) -> None:
        """Pack a weight that was loaded dense under another name (an lm_head tied to the embedding).

        An embedding kept in GGUF blocks is decoded a slice of rows at a time for this, so the whole
        float table never exists; the packed result is the same as from the float table.
        """
        if self.weights_choice == "fp32" or self.packed is not None:
            return
        tied = self.__dict__.get("tied_embedding")
        if tied is not None and tied.packed is not None:
            blocks = tied.packed
            fmt = weight_format(self.weights_choice, self.weight.detach())
            if fmt is None:  # set_weights_choice keeps the blocks only where the head is packed
                raise RuntimeError("a tied lm_head must be packed when its embedding stays in blocks")
            self.packed = pack_rows(lambda start, stop: blocks.dequantize_rows(np.arange(start, stop)),
                                    tuple(blocks.shape), fmt)
            self.weight = _param(0, dtype=self.weight.dtype, device=self.weight.device)
            return
        fmt = weight_format(self.weights_choice, self.weight.detach())
        if fmt is not None:
            self.packed = pack(self.weight.detach(), fmt)
            self.weight = _param(0, dtype=self.weight.dtype, device=self.weight.device)

    @classmethod
    def fuse(cls, parts: list[Linear]) -> Linear:
        """One Linear computing all parts' outputs side by side: one matmul call instead of several."""
        first = parts[0]
        fused = cls.__new__(cls)
        WeightModule.__init__(fused)
        fused.weights_choice = first.weights_choice
        biases = [p.bias for p in parts]
        fused.bias = None if biases[0] is None else nn.Parameter(torch.cat(biases), requires_grad=False)
        if all(p.packed is not None for p in parts):
            fused.packed = concat([p.packed for p in parts])
            fused.weight = _param(0, dtype=first.weight.dtype, device=first.weight.device)
        else:
            dense = [p.weight if p.packed is None else p.packed.dequantize().to(first.weight.dtype) for p in parts]
            fused.weight = nn.Parameter(torch.cat(dense), requires_grad=False)
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.linear(x, self.bias)
        return dense_linear(x, self.weight, self.bias, self.blocked)

    def block_for_onednn(self) -> None:
        """Keep a oneDNN-blocked copy of a dense float32 weight for calls of several rows, where
        thrifty's own kernel, which needs none, cannot run."""
        if self.packed is None and self.weights_choice == "fp32" and not skinny_linear.available():
            self.blocked = onednn_blocked(self.weight)
            if self.blocked is not None:
                blocked_linear.register(self.weight, self.blocked)


class Embedding(WeightModule):
    """Token embeddings. With `keep_blocks` (set before loading), a GGUF-quantized table stays in its
    blocks (a Q4_1 table is a sixth of its float32 size) and each lookup decodes only the rows it
    gathers, to the same values the float table would hold.
    """

    keep_blocks: bool = False
    packed: QuantizedWeight | None = None

    def __init__(self, num_embeddings: int, dim: int, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = _param(num_embeddings, dim, dtype=dtype, device=device)
        self.dtype, self.device = dtype, device

    def load_param(self, name: str, weight: WeightTensor) -> None:
        if not (self.keep_blocks and name == "weight" and isinstance(weight, QuantizedWeight)
                and self.device.type == "cpu"):
            super().load_param(name, weight)
            return
        # Copied out of the file's memory map, so the model owns it as it owns every other weight.
        self.packed = QuantizedWeight(weight.ggml_type, tuple(weight.shape), np.array(weight.raw, copy=True))
        self.weight = _param(0, dtype=self.dtype, device=self.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            rows = self.packed.dequantize_rows(ids.reshape(-1).cpu().numpy())
            return rows.reshape(*ids.shape, rows.shape[-1]).to(self.dtype)
        return F.embedding(ids, self.weight)


class RMSNorm(WeightModule):
    """RMS normalisation in float32. `unit_offset` is Gemma's variant: scale by (1 + w), in float32."""

    def __init__(self, dim: int, eps: float, *, unit_offset: bool = False, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = _param(dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One call instead of six small ops, with the same float32 arithmetic bit for bit.
            scale = 1.0 + self.weight if self.unit_offset else self.weight
            return F.rms_norm(x, (x.shape[-1],), scale, self.eps)
        normed = x.float()
        normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight.float())).type_as(x)
        return self.weight * normed.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None, max_position: int,
                  seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim / 2] and the cos/sin scale, as transformers' rope_init_fns.

    `seq_len` matters only to dynamic NTK scaling, which grows the base past max_position.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    if scaling is None or scaling.kind == "default":
        return 1.0 / theta ** exponents, 1.0
    if scaling.kind == "linear":
        return 1.0 / theta ** exponents / scaling.factor, 1.0
    if scaling.kind == "dynamic":
        seq_len = max(seq_len or max_position, max_position)
        base = theta * ((scaling.factor * seq_len / max_position) - (scaling.factor - 1)) ** (
            head_dim / (head_dim - 2))
        return 1.0 / base ** exponents, 1.0
    original = scaling.original_max_position or max_position
    if scaling.kind == "llama3":
        inv_freq = 1.0 / theta ** exponents
        low_wavelen = original / scaling.low_freq_factor
        high_wavelen = original / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (original / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    if scaling.kind == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling, original)
    raise ValueError(f"unknown RoPE scaling {scaling.kind!r}")


def _yarn_inv_freq(head_dim: int, theta: float, scaling: RopeScaling, original: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, blend in between; scale attention up."""
    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = 1 - ramp  # weight of the unscaled frequency, per dimension pair
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    inv_freq = (1.0 / (scaling.factor * pos_freqs)) * (1 - extrapolated) + (1.0 / pos_freqs) * extrapolated
    attention_factor = 0.1 * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """cos and signed sin tables for positions, in Hugging Face's half-rotation layout ([T, 1, head_dim]:
    the 1 broadcasts over heads, shaped once per step rather than in every layer).

    The sin table's first half is negated (`apply_rotary` rotates by rolling, which does not negate).
    """

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None, max_position: int,
                 device: torch.device) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling, self.max_position = head_dim, theta, scaling, max_position
        inv_freq, self.attention_factor = rope_inv_freq(head_dim, theta, scaling, max_position)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.scaling is not None and self.scaling.kind == "dynamic":
            # As transformers: past max_position the base grows with the longest position in the step.
            seq_len = int(positions.max()) + 1
            if seq_len > self.max_position:
                inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling, self.max_position,
                                         seq_len)[0].to(positions.device)
        freqs = positions[:, None].float() * inv_freq[None, :]
        cos = (torch.cat((freqs, freqs), dim=-1).cos() * self.attention_factor).to(dtype)
        sin = (freqs.sin() * self.attention_factor).to(dtype)
        return cos[:, None, :], torch.cat((-sin, sin), dim=-1)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] by the per-token angles (cos and signed sin [T, 1, head_dim]).

    Hugging Face's x * cos + [-x2, x1] * sin, as x * cos + [x2, x1] * [-sin, sin]: the same
    products bit for bit, in three ops instead of five.
    """
    rolled = torch.roll(x, x.shape[-1] // 2, dims=-1)
    return x * cos + rolled * signed_sin


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with SiLU (Llama, Qwen2) or tanh-approximated GELU (Gemma)."""

    def __init__(self, hidden: int, intermediate: int, activation: str, *, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        if activation not in ("silu", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported activation {activation!r}; expected silu or gelu_pytorch_tanh")
        self.activation = activation
        self.intermediate = intermediate
        self.gate_proj = Linear(hidden, intermediate, False, dtype=dtype, device=device)
        self.up_proj = Linear(hidden, intermediate, False, dtype=dtype, device=device)
        self.down_proj = Linear(intermediate, hidden, False, dtype=dtype, device=device)

        self.gate_up_proj: Linear | None = None

    def fuse(self) -> None:
        """Replace gate_proj and up_proj by one fused projection (after loading)."""
        self.gate_up_proj = Linear.fuse([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        gate = F.silu(gate) if self.activation == "silu" else F.gelu(gate, approximate="tanh")
        return self.down_proj(gate * up)


class Attention(nn.Module):
    """Self-attention of one layer over the paged KV cache (GQA, optional QKV bias and Q/K norms)."""

    bf16_chunks: bool = False  # long chunks (prefill) attend in bfloat16 matmuls; set with the weight format

    def __init__(self, config: ModelConfig, layer: int, *, qk_norm: bool = False, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.layer = layer
        self.scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
        self.sliding_window = config.layer_sliding_window(layer)
        self.softcap = config.attn_logit_softcapping
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, q_dim, bias, dtype=dtype, device=device)
        self.k_proj = Linear(config.hidden_size, kv_dim, bias, dtype=dtype, device=device)
        self.v_proj = Linear(config.hidden_size, kv_dim, bias, dtype=dtype, device=device)
        self.o_proj = Linear(q_dim, config.hidden_size, False, dtype=dtype, device=device)
        # Gemma 3 normalises each head's query and key (Gemma-style, 1 + w) before RoPE.
        self.q_norm = self.k_norm = None
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, unit_offset=True, dtype=dtype, device=device)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, unit_offset=True, dtype=dtype, device=device)
        self.qkv_proj: Linear | None = None
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def fuse(self) -> None:
        """Replace q_proj, k_proj and v_proj by one fused projection (after loading)."""
        self.qkv_proj = Linear.fuse([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def bind_kv_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        expected = (self.num_kv_heads, self.head_dim)
        for cache in (k_cache, v_cache):
            if tuple(cache.shape[1:]) != expected:
                raise ValueError(f"KV cache of shape {tuple(cache.shape)} does not fit this layer; "
                                 f"expected [num_slots, {expected[0]}, {expected[1]}]")
        self.k_cache, self.v_cache = k_cache, v_cache

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata | DecodeMetadata) -> torch.Tensor:
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("the model has no KV cache; call bind_kv_cache() before running it")
        tokens = x.shape[0]
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)
        else:
            qkv = torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)
        heads = qkv.reshape(tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        v = heads[:, self.num_heads + self.num_kv_heads:]
        if self.q_norm is not None and self.k_norm is not None:
            q = apply_rotary(self.q_norm(heads[:, :self.num_heads]), cos, sin)
            k = apply_rotary(self.k_norm(heads[:, self.num_heads:self.num_heads + self.num_kv_heads]), cos, sin)
        else:  # queries and keys side by side: one rotation for both
            qk = apply_rotary(heads[:, :self.num_heads + self.num_kv_heads], cos, sin)
            q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        if isinstance(meta, DecodeMetadata):
            if self.softcap is not None:
                raise ValueError("attention logit soft-capping needs AttentionMetadata, not DecodeMetadata")
            out = decode_attention(q, k, v, self.k_cache, self.v_cache, meta, scale=self.scale,
                                   sliding_window=self.sliding_window)
        else:
            out = paged_attention(q, k, v, self.k_cache, self.v_cache, meta, scale=self.scale, layer=self.layer,
                                  sliding_window=self.sliding_window, softcap=self.softcap,
                                  bf16_chunks=self.bf16_chunks)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim))
