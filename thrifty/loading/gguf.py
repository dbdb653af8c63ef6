"""GGUF files (llama.cpp's format) -> ModelConfig and Hugging Face-named weights.

llama.cpp's converter changes some tensors on the way in; this module undoes that so
the models see Hugging Face layout and semantics whatever the file format:

- llama-architecture Q/K projections are row-permuted for llama.cpp's interleaved RoPE;
  they are permuted back so the models use half-rotation RoPE everywhere.
- Gemma norm weights are stored as 1 + w; they come out as w.
- Llama 3.1-style RoPE scaling is baked into a `rope_freqs` tensor; it is turned back
  into RoPE scaling parameters.
"""

from __future__ import annotations

import functools
import math
import mmap
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from thrifty.config import ModelConfig, RopeScaling
from thrifty.errors import ModelLoadError, UnsupportedModelError
from thrifty.loading.weights import QuantizedWeight, WeightTensor

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")  # GGUF names; Mistral files say "llama"

_T = gguf.GGMLQuantizationType
_DENSE_TYPES = (_T.F32, _T.F16, _T.BF16)
# The types named in error messages; anything else gguf-py can dequantize also loads.
_COMMON_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

# GGUF tensor name (after `blk.N.`) -> Hugging Face name (after `model.layers.N.`).
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_ARCH_LAYER_TENSORS = {
    "llama": {**_LAYER_TENSORS, "ffn_norm": "post_attention_layernorm"},
    "qwen2": {**_LAYER_TENSORS, "ffn_norm": "post_attention_layernorm"},
    # Gemma 3 has four norms per layer; its HF "post_attention_layernorm" follows attention.
    "gemma3": {
        **_LAYER_TENSORS,
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_ROPE_FREQS = "rope_freqs.weight"  # folded into the config, not a model weight

_MISSING = object()


class _Reader(gguf.GGUFReader):
    """GGUFReader over a plain ndarray view of the memory map instead of the np.memmap itself.

    The parser slices the map once per metadata item (a million times for Gemma's 262k-token
    vocabulary), and np.memmap's per-slice bookkeeping makes that 3-5x slower. Long metadata
    arrays (the tokenizer's vocabulary and merges) are parsed only when read (`_LazyArrayField`):
    the model loader never reads them (the tokenizer has its own reader), and parsed they hold
    several small ndarrays per entry, about 50 MB for a 49k-token vocabulary.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(path)
        base = self._data.base
        while base is not None and not isinstance(base, mmap.mmap):
            base = getattr(base, "_mmap", None) or getattr(base, "base", None)
        self._map = base

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._data = value.view(np.ndarray)  # still backed by the map: nothing is copied

    def _build_fields(self, offs: int, count: int) -> int:
        if self.byte_order != "I":
            return super()._build_fields(offs, count)
        for _ in range(count):
            orig_offs = offs
            kv_klen, kv_kdata = self._get_str(offs)
            offs += int(kv_klen.nbytes + kv_kdata.nbytes)
            raw_kv_type = self._get(offs, np.uint32)
            offs += int(raw_kv_type.nbytes)
            key_parts = [kv_klen, kv_kdata, raw_kv_type]
            name = str(bytes(kv_kdata), encoding="utf-8")
            lazy = self._lazy_array(orig_offs, name, key_parts, offs, int(raw_kv_type[0]))
            if lazy is not None:
                field, field_size = lazy
                self._push_field(field, skip_sum=True)
            else:
                field_size, field_parts, field_idxs, field_types = self._get_field_parts(offs, raw_kv_type[0])
                self._push_field(gguf.ReaderField(orig_offs, name, key_parts + field_parts,
                                                  [idx + len(key_parts) for idx in field_idxs], field_types),
                                 skip_sum=True)
            offs += field_size
        return offs

    def _lazy_array(self, orig_offs: int, name: str, key_parts: list[np.ndarray], offs: int,
                    raw_type: int) -> tuple[gguf.ReaderField, int] | None:
        """A long array of strings or scalars as a field parsed on first use, and its size in bytes."""
        if raw_type != gguf.GGUFValueType.ARRAY:
            return None
        item_type = gguf.GGUFValueType(int(self._get(offs, np.uint32)[0]))
        length = int(self._get(offs + 4, np.uint64)[0])
        if length < _LAZY_ARRAY_LENGTH:
            return None
        size = 12
        if item_type == gguf.GGUFValueType.STRING:
            view = memoryview(self._data)
            for _ in range(length):
                size += 8 + int.from_bytes(view[offs + size:offs + size + 8], "little")
        elif (scalar := self.gguf_scalar_to_np.get(item_type)) is not None:
            size += length * np.dtype(scalar).itemsize
        else:
            return None  # nested arrays: parse now, as gguf-py does
        parser = gguf.GGUFReader.__new__(gguf.GGUFReader)  # parses from the data alone: no cycle via self
        parser.data = self._data
        return _LazyArrayField(parser, orig_offs, name, key_parts, offs, [gguf.GGUFValueType.ARRAY, item_type]), size

    def release(self, tensor: Any) -> None:
        """Drop the file pages of a tensor that has been read from this process's RSS.

        The map is read-only and file-backed: the page cache keeps the bytes, and any later read
        of the tensor (a view somebody kept) faults them in again, unchanged.
        """
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = int(tensor.data_offset) // page * page
        end = min(-(-(int(tensor.data_offset) + int(tensor.n_bytes)) // page) * page, len(self._map))
        if end > start:
            try:
                self._map.madvise(mmap.MADV_DONTNEED, start, end - start)
            except (OSError, ValueError):
                pass


# Metadata arrays at least this long are parsed lazily (see _Reader).
_LAZY_ARRAY_LENGTH = 1024


class _LazyArrayField(gguf.ReaderField):
    """A ReaderField whose `parts` and `data` are parsed from the map on first access."""

    def __new__(cls, parser: gguf.GGUFReader, offset: int, name: str, key_parts: list[np.ndarray],
                value_offset: int, types: list[gguf.GGUFValueType]) -> _LazyArrayField:
        field = super().__new__(cls, offset, name, [], [-1], types)
        field._source = (parser, key_parts, value_offset)
        field._parsed = None
        return field

    def _parse(self) -> tuple[list[np.ndarray], list[int]]:
        if self._parsed is None:
            parser, key_parts, value_offset = self._source
            _, parts, idxs, _ = parser._get_field_parts(value_offset, gguf.GGUFValueType.ARRAY)
            self._parsed = (key_parts + parts, [idx + len(key_parts) for idx in idxs])
        return self._parsed

    @property
    def parts(self) -> list[np.ndarray]:  # type: ignore[override]
        return self._parse()[0]

    @property
    def data(self) -> list[int]:  # type: ignore[override]
        return self._parse()[1]


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """Memory-map a GGUF file, turning every way it can be unreadable into a ModelLoadError."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"file not found: {path}; run `thrifty models` to see installable models")
    try:
        return _Reader(path)
    except Exception as error:  # the parser fails in many ways on bad bytes; all mean the same here
        raise ModelLoadError(
            f"{path} is not a readable GGUF file ({type(error).__name__}: {error}); it is truncated, "
            f"corrupt or not GGUF at all. Download or convert it again.") from error


def read_gguf_config(reader: gguf.GGUFReader) -> ModelConfig:
    """The model hyper-parameters from the file's metadata, matching what llama.cpp runs."""
    arch = _architecture(reader)

    def key(name: str, default: Any = _MISSING) -> Any:
        return _field(reader, f"{arch}.{name}", default)

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ModelLoadError(f"{_file(reader)} has no token_embd.weight tensor; the file is incomplete")

    hidden = int(key("embedding_length"))
    num_heads = int(key("attention.head_count"))
    num_kv_heads = _uniform(key("attention.head_count_kv", num_heads), "attention.head_count_kv", reader)
    head_dim = int(key("attention.key_length", hidden // num_heads))
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise UnsupportedModelError(
            f"{_file(reader)} applies RoPE to only part of each head, which thrifty does not support")
    num_layers = int(key("block_count"))
    rope_theta = float(key("rope.freq_base", 10000.0))
    config = ModelConfig(
        architecture=arch,
        vocab_size=int(tensors["token_embd.weight"].shape[-1]),  # GGUF lists dims innermost first
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(key("context_length")),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_theta=rope_theta,
        rope_scaling=_rope_scaling(reader, arch, tensors.get(_ROPE_FREQS), rope_theta, head_dim),
        tie_word_embeddings="output.weight" not in tensors,  # llama.cpp omits a tied output matrix
        attention_bias="blk.0.attn_q.bias" in tensors,
    )
    if arch == "gemma3":
        config.hidden_act = "gelu_pytorch_tanh"
        config.sliding_window = int(key("attention.sliding_window"))
        # llama.cpp hard-codes Gemma 3's pattern: every 6th layer is global, the rest slide.
        config.layer_types = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(num_layers)]
        config.rope_local_base_freq = float(key("rope.freq_base_swa", 10000.0))
        # As llama.cpp: scale by head_dim, except Gemma 3 27B (62 layers) which uses hidden / heads.
        config.query_pre_attn_scalar = float(hidden // num_heads if num_layers == 62 else head_dim)
        config.final_logit_softcapping = key("final_logit_softcapping", None)
        config.attn_logit_softcapping = key("attn_logit_softcapping", None)
    return config


def iter_gguf_weights(reader: gguf.GGUFReader, config: ModelConfig) -> Iterator[tuple[str, WeightTensor]]:
    """Yield (Hugging Face name, weight) for every tensor, in Hugging Face layout and semantics.

    Dense tensors come out as torch tensors; quantized ones as QuantizedWeight, still in blocks.
    """
    arch = _architecture(reader)
    layer_names = _ARCH_LAYER_TENSORS[arch]
    for tensor in reader.tensors:
        if tensor.name == _ROPE_FREQS:
            continue
        name = _hf_name(tensor.name, layer_names, arch, reader)
        weight = _weight(tensor, reader)
        if arch == "llama" and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
            heads = config.num_heads if ".attn_q." in tensor.name else config.num_kv_heads
            weight = _unpermute_rows(weight, heads)
        if arch == "gemma3" and tensor.name.endswith("norm.weight"):
            weight = _as_float(weight) - 1.0
        yield name, weight
        del weight
        if isinstance(reader, _Reader):
            reader.release(tensor)  # the consumer is done with it: its file pages need not stay in RSS


def unpermute_index(num_rows: int, num_heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's Q/K permutation.

    Per head, llama.cpp stores row (i, half) of Hugging Face's [half, i] layout at 2*i + half,
    so that rotated pairs sit next to each other for its interleaved RoPE.
    """
    head_dim = num_rows // num_heads
    gguf_rows = torch.arange(num_rows).view(num_heads, head_dim // 2, 2)
    return gguf_rows.transpose(1, 2).reshape(-1)


def _unpermute_rows(weight: WeightTensor, num_heads: int) -> WeightTensor:
    index = unpermute_index(weight.shape[0], num_heads)
    return weight.select_rows(index) if isinstance(weight, QuantizedWeight) else weight[index]


def _as_float(weight: WeightTensor) -> torch.Tensor:
    return weight.dequantize() if isinstance(weight, QuantizedWeight) else weight.float()


def _hf_name(gguf_name: str, layer_names: dict[str, str], arch: str, reader: gguf.GGUFReader) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match and match[2] in layer_names:
        return f"model.layers.{match[1]}.{layer_names[match[2]]}.{match[3]}"
    raise UnsupportedModelError(
        f"{_file(reader)} has a tensor {gguf_name!r} that thrifty's {arch} model does not know; "
        f"the file is a variant of {arch} that thrifty does not support")


def _weight(tensor: Any, reader: gguf.GGUFReader) -> WeightTensor:
    """The tensor in torch order ([out, in]); dense types copied out of the memory map."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    kind = tensor.tensor_type
    if kind in (_T.F32, _T.F16):
        return torch.from_numpy(np.array(tensor.data)).reshape(shape)
    if kind == _T.BF16:
        return torch.from_numpy(np.array(tensor.data).view(np.int16)).view(torch.bfloat16).reshape(shape)
    if _can_dequantize(kind):
        return QuantizedWeight(kind, shape, tensor.data)
    raise UnsupportedModelError(
        f"{_file(reader)}: tensor {tensor.name!r} is stored as {kind.name}, which thrifty cannot read. "
        f"Supported types: {', '.join(_COMMON_TYPES)} (and the other llama.cpp quantizations gguf-py "
        f"decodes). Re-quantize the file to one of them with llama.cpp, e.g. "
        f"`llama-quantize --allow-requantize in.gguf out.gguf Q4_K_M`, or convert the original weights again.")


@functools.cache
def _can_dequantize(kind: gguf.GGMLQuantizationType) -> bool:
    """Whether gguf-py can decode this block type (probed on one zero block)."""
    if kind in _DENSE_TYPES:
        return True
    block_bytes = gguf.GGML_QUANT_SIZES[kind][1]
    try:
        gguf.quants.dequantize(np.zeros((1, block_bytes), dtype=np.uint8), kind)
    except NotImplementedError:
        return False
    return True


def _rope_scaling(reader: gguf.GGUFReader, arch: str, rope_freqs: Any, rope_theta: float,
                  head_dim: int) -> RopeScaling | None:
    def key(name: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.rope.scaling.{name}", default)

    if rope_freqs is not None:
        return _llama3_scaling(np.array(rope_freqs.data, dtype=np.float32), rope_theta, head_dim, reader)
    kind, factor = key("type"), key("factor")
    if kind is None and (linear := _field(reader, f"{arch}.rope.scale_linear", None)) is not None:
        kind, factor = "linear", linear  # the key older converters wrote
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if float(key("attn_factor", 1.0)) != 1.0:
        raise UnsupportedModelError(f"{_file(reader)} sets rope.scaling.attn_factor, which thrifty does not support")
    original = key("original_context_length")
    original = int(original) if original is not None else None
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(factor))
    if kind == "yarn":
        return RopeScaling(kind="yarn", factor=float(factor), original_max_position=original,
                           beta_fast=float(key("yarn_beta_fast", 32.0)), beta_slow=float(key("yarn_beta_slow", 1.0)))
    raise UnsupportedModelError(
        f"{_file(reader)} uses RoPE scaling {kind!r}; thrifty supports linear, yarn and Llama 3 scaling")


def _llama3_scaling(freq_factors: np.ndarray, rope_theta: float, head_dim: int,
                    reader: gguf.GGUFReader) -> RopeScaling:
    """Recover Llama 3.1 RoPE scaling from the per-frequency divisors llama.cpp stores instead.

    The converter keeps only the divisors, computed from factor, low/high frequency factors 1
    and 4 and an 8192-token original context (every Llama 3.x release). Rebuild them from
    those and check they match, so a file made otherwise is refused rather than run wrong.
    """
    scaling = RopeScaling(kind="llama3", factor=float(freq_factors.max()), original_max_position=8192,
                          low_freq_factor=1.0, high_freq_factor=4.0)
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    expected = np.where(wavelen < high_wavelen, 1.0,
                        np.where(wavelen > low_wavelen, scaling.factor,
                                 1.0 / ((1 - smooth) / scaling.factor + smooth)))
    if expected.shape != freq_factors.shape or not np.allclose(expected, freq_factors, rtol=1e-4):
        raise UnsupportedModelError(
            f"{_file(reader)} has a rope_freqs tensor that is not Llama 3 RoPE scaling; thrifty cannot run it")
    return scaling


def _architecture(reader: gguf.GGUFReader) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{_file(reader)} is a {arch!r} model; thrifty runs GGUF architectures "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Mistral files are 'llama'). Pick a supported model "
            f"(`thrifty models` lists some).")
    return arch


def _field(reader: gguf.GGUFReader, key: str, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ModelLoadError(
                f"{_file(reader)} lacks the metadata key {key!r}; the file is incomplete or was not "
                f"written by llama.cpp's converter")
        return default
    return field.contents()


def _uniform(value: Any, key: str, reader: gguf.GGUFReader) -> int:
    """A per-model count that some files store per layer; thrifty needs it the same on every layer."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise UnsupportedModelError(f"{_file(reader)} varies {key} across layers, which thrifty does not support")
        value = value[0]
    return int(value)


def _file(reader: gguf.GGUFReader) -> str:
    return str(getattr(reader, "path", None) or getattr(reader.data, "filename", "the GGUF file"))
