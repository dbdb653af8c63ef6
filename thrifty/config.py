"""Architecture hyper-parameters of a model, independent of the file format it came from."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RopeScaling:
    """RoPE frequency scaling as Hugging Face configs describe it (`rope_scaling`)."""

    kind: str = "default"  # default | linear | dynamic | llama3 | yarn
    factor: float = 1.0
    original_max_position: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn


@dataclass
class ModelConfig:
    """What the model code needs to build itself.

    `architecture` is one of the keys of `thrifty.models.registry.ARCHITECTURES`
    ("llama", "qwen2", "mistral", "gemma3"). Weight names everywhere follow the
    Hugging Face layout (`model.layers.0.self_attn.q_proj.weight`) and Hugging Face
    semantics (Gemma norms store w - 1), whatever the file format.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has biases on q, k and v
    hidden_act: str = "silu"  # silu | gelu_pytorch_tanh
    # Gemma 3 specifics
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # "full_attention" | "sliding_attention"
    rope_local_base_freq: float | None = None  # RoPE theta of the sliding layers
    query_pre_attn_scalar: float | None = None  # attention scale is its -1/2 power
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None

    def layer_sliding_window(self, layer: int) -> int | None:
        """The attention window of `layer` in tokens, or None for full attention."""
        if self.layer_types and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes
