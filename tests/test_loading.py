"""GGUF and Hugging Face loading: block formats, llama.cpp's layout changes undone, configs, errors."""

import json
import math
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures.tiny_models import LLAMA_TYPES, permute_qk, write_tiny_llama_gguf
from thrifty.config import RopeScaling
from thrifty.errors import ModelLoadError, UnsupportedModelError
from thrifty.loading.gguf import open_gguf, unpermute_index
from thrifty.loading.safetensors import read_hf_config
from thrifty.loading.source import open_model_source
from thrifty.loading.weights import QuantizedWeight

Q = gguf.GGMLQuantizationType
WRITABLE_TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
# gguf-py cannot quantize K-types: random blocks with sane float16 scales stand in.
K_TYPE_SCALE_OFFSETS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.Q2_K: (80, 82), Q.Q3_K: (108,)}


def quantized(kind: Q, rows: int, cols: int, seed: int = 0) -> QuantizedWeight:
    rng = np.random.default_rng(seed)
    if kind in K_TYPE_SCALE_OFFSETS:
        block_size, block_bytes = gguf.GGML_QUANT_SIZES[kind]
        blocks = rng.integers(0, 256, (rows, cols // block_size, block_bytes), dtype=np.uint8)
        for offset in K_TYPE_SCALE_OFFSETS[kind]:
            scales = rng.uniform(0.001, 0.01, blocks.shape[:2]).astype(np.float16)
            blocks[..., offset:offset + 2] = scales[..., None].view(np.uint8).reshape(*blocks.shape[:2], 2)
        raw = blocks.reshape(rows, -1)
    else:
        raw = gguf.quants.quantize(rng.normal(size=(rows, cols)).astype(np.float32), kind)
    return QuantizedWeight(kind, (rows, cols), raw)


@pytest.mark.parametrize("kind", WRITABLE_TYPES + list(K_TYPE_SCALE_OFFSETS), ids=lambda k: k.name)
def test_dequantize_and_select_rows_match_gguf(kind):
    weight = quantized(kind, 12, 512)
    expected = torch.from_numpy(gguf.quants.dequantize(weight.raw, kind))
    dense = weight.dequantize()
    assert dense.shape == (12, 512) and torch.isfinite(dense).all()
    assert torch.equal(dense, expected)
    assert weight.dequantize(torch.bfloat16).dtype == torch.bfloat16
    index = torch.tensor([11, 0, 5, 5, 3])
    assert torch.equal(weight.select_rows(index).dequantize(), expected[index])


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_unpermute_undoes_llama_cpp_permutation(heads):
    head_dim = 32
    hf = np.random.default_rng(0).normal(size=(heads * head_dim, 64)).astype(np.float32)
    stored = permute_qk(hf, heads)
    assert not np.array_equal(stored, hf)
    index = unpermute_index(heads * head_dim, heads)
    assert np.array_equal(stored[index.numpy()], hf)
    # On blocks: row-wise quantization commutes with the row permutation, byte for byte.
    blocks = QuantizedWeight(Q.Q4_0, hf.shape, gguf.quants.quantize(stored, Q.Q4_0))
    assert np.array_equal(blocks.select_rows(index).raw, gguf.quants.quantize(hf, Q.Q4_0))


def test_llama_config_and_weights(tiny_llama_gguf):
    source = open_model_source(tiny_llama_gguf)
    config = source.config
    assert source.format == "gguf" and source.gguf_reader is not None
    assert (config.architecture, config.vocab_size, config.hidden_size, config.intermediate_size) == (
        "llama", 320, 64, 128)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (3, 4, 2, 16)
    assert config.max_position_embeddings == 512 and config.rope_theta == 10000.0
    assert config.rms_norm_eps == pytest.approx(1e-5) and config.hidden_act == "silu"
    assert not config.tie_word_embeddings and config.rope_scaling is None and config.layer_types == []

    weights = dict(source.iter_weights())
    assert set(weights) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{name}.weight" for i in range(3) for name in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert weights["model.embed_tokens.weight"].shape == (320, 64)
    assert isinstance(weights["model.layers.0.self_attn.q_proj.weight"], QuantizedWeight)
    assert weights["model.layers.0.self_attn.o_proj.weight"].dtype == torch.float16
    assert weights["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (64, 128)
    assert weights["model.norm.weight"].dtype == torch.float32


def test_llama_q_and_k_come_out_unpermuted(tiny_llama_gguf):
    reader = open_gguf(tiny_llama_gguf)
    stored = {t.name: t for t in reader.tensors}["blk.1.attn_k.weight"]
    stored = torch.from_numpy(gguf.quants.dequantize(stored.data, stored.tensor_type))
    weights = dict(open_model_source(tiny_llama_gguf).iter_weights())
    k = weights["model.layers.1.self_attn.k_proj.weight"].dequantize()
    assert torch.equal(torch.from_numpy(permute_qk(k.numpy(), 2)), stored)


def test_gemma3_config_and_norms(tiny_gemma3_gguf):
    source = open_model_source(tiny_gemma3_gguf)
    config = source.config
    assert config.architecture == "gemma3" and config.tie_word_embeddings
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (7, 4, 2, 32)
    assert config.hidden_act == "gelu_pytorch_tanh"
    assert config.sliding_window == 8 and config.rope_theta == 1e6 and config.rope_local_base_freq == 1e4
    assert config.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert config.layer_sliding_window(5) is None and config.layer_sliding_window(6) == 8
    assert config.query_pre_attn_scalar == 32  # head_dim, as llama.cpp

    reader = open_gguf(tiny_gemma3_gguf)
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    weights = dict(source.iter_weights())
    assert "lm_head.weight" not in weights
    for gguf_name, hf_name in [("blk.2.attn_norm.weight", "input_layernorm"),
                               ("blk.2.post_attention_norm.weight", "post_attention_layernorm"),
                               ("blk.2.ffn_norm.weight", "pre_feedforward_layernorm"),
                               ("blk.2.post_ffw_norm.weight", "post_feedforward_layernorm"),
                               ("blk.2.attn_q_norm.weight", "self_attn.q_norm"),
                               ("blk.2.attn_k_norm.weight", "self_attn.k_norm")]:
        assert torch.equal(weights[f"model.layers.2.{hf_name}.weight"], torch.from_numpy(stored[gguf_name]) - 1)
    assert torch.equal(weights["model.norm.weight"], torch.from_numpy(stored["output_norm.weight"]) - 1)


def llama3_rope_freqs(theta: float, head_dim: int, factor: float) -> np.ndarray:
    """llama.cpp's converter (LlamaModel.generate_extra_tensors) for Llama 3.1 scaling."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4:
            out.append(1.0)
        elif wavelen > 8192 / 1:
            out.append(factor)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path):
    def add_freqs(writer):
        writer.add_tensor("rope_freqs.weight", llama3_rope_freqs(10000.0, 16, 8.0))

    source = open_model_source(write_tiny_llama_gguf(tmp_path / "l3.gguf", extra=add_freqs))
    assert source.config.rope_scaling == RopeScaling(kind="llama3", factor=8.0, original_max_position=8192,
                                                     low_freq_factor=1.0, high_freq_factor=4.0)
    assert not any("rope_freqs" in name for name, _ in source.iter_weights())

    def add_odd_freqs(writer):
        writer.add_tensor("rope_freqs.weight", np.linspace(1, 3, 8, dtype=np.float32))

    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        open_model_source(write_tiny_llama_gguf(tmp_path / "odd.gguf", extra=add_odd_freqs))


def test_rope_scaling_keys(tmp_path):
    def yarn(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(4.0)
        writer.add_rope_scaling_orig_ctx_len(128)

    config = open_model_source(write_tiny_llama_gguf(tmp_path / "yarn.gguf", extra=yarn)).config
    assert config.rope_scaling == RopeScaling(kind="yarn", factor=4.0, original_max_position=128)

    def linear(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(2.0)

    config = open_model_source(write_tiny_llama_gguf(tmp_path / "linear.gguf", extra=linear)).config
    assert config.rope_scaling == RopeScaling(kind="linear", factor=2.0)


# --- errors -------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match=r"file not found: .*thrifty models"):
        open_model_source(tmp_path / "nope.gguf")


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.02])
def test_truncated_file(tiny_llama_gguf, tmp_path, keep):
    data = tiny_llama_gguf.read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match="truncated, corrupt"):
        open_model_source(path)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not a gguf file at all" * 10])
def test_not_a_gguf_file(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        open_model_source(path)


def test_unsupported_architecture(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "falcon.gguf", arch="falcon")
    with pytest.raises(UnsupportedModelError, match=r"'falcon'.*llama, qwen2, gemma3"):
        open_model_source(path)


def test_unsupported_tensor_type(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "f64.gguf", types={**LLAMA_TYPES, "attn_v": Q.F64})
    source = open_model_source(path)  # the config is readable; the tensor is not
    with pytest.raises(UnsupportedModelError, match=r"'blk.0.attn_v.weight' is stored as F64.*Q4_K.*llama-quantize"):
        list(source.iter_weights())


def test_unknown_tensor(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "extra.gguf",
                                 extra=lambda w: w.add_tensor("blk.0.mystery.weight", np.zeros(4, np.float32)))
    with pytest.raises(UnsupportedModelError, match="blk.0.mystery.weight"):
        list(open_model_source(path).iter_weights())


def test_directories(tmp_path, tiny_llama_gguf):
    with pytest.raises(ModelLoadError, match="no config.json and no .gguf file"):
        open_model_source(tmp_path)
    shutil.copy(tiny_llama_gguf, tmp_path / "model.gguf")
    assert open_model_source(tmp_path).path == tmp_path / "model.gguf"  # the one GGUF inside
    shutil.copy(tiny_llama_gguf, tmp_path / "other.gguf")
    with pytest.raises(ModelLoadError, match="several .gguf files"):
        open_model_source(tmp_path)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(LLAMA_JSON))
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weights"):
        open_model_source(hf)
    (hf / "config.json").write_text(json.dumps({**LLAMA_JSON, "model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        read_hf_config(hf)
    (hf / "config.json").write_text(json.dumps({**LLAMA_JSON, "quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(UnsupportedModelError, match="quantized \\(awq\\)"):
        read_hf_config(hf)
    (hf / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read"):
        read_hf_config(hf)


# --- Hugging Face directories -------------------------------------------------------------------

LLAMA_JSON = {"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
              "tie_word_embeddings": True}


def hf_config(tmp_path, raw):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return read_hf_config(tmp_path)


def test_hf_llama_config(tmp_path):
    config = hf_config(tmp_path, LLAMA_JSON)
    assert (config.architecture, config.hidden_size, config.num_kv_heads, config.head_dim) == ("llama", 32, 2, 8)
    assert config.rope_theta == 500000.0 and config.tie_word_embeddings and not config.attention_bias
    assert config.rope_scaling == RopeScaling(kind="llama3", factor=8.0, original_max_position=8192)
    # transformers 5 writes rope_parameters instead of rope_scaling + rope_theta
    v5 = {k: v for k, v in LLAMA_JSON.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**LLAMA_JSON["rope_scaling"], "rope_theta": 500000.0}
    assert hf_config(tmp_path, v5) == config


def test_hf_qwen2_and_mistral_configs(tmp_path):
    qwen = hf_config(tmp_path, {**LLAMA_JSON, "model_type": "qwen2", "rope_scaling": None,
                                "use_sliding_window": False})
    assert qwen.architecture == "qwen2" and qwen.attention_bias and qwen.layer_types == []
    mistral = hf_config(tmp_path, {**LLAMA_JSON, "model_type": "mistral", "rope_scaling": None,
                                   "sliding_window": 16, "head_dim": 16})
    assert mistral.head_dim == 16 and all(mistral.layer_sliding_window(i) == 16 for i in range(2))


def test_hf_gemma3_multimodal_config_uses_text_defaults(tmp_path):
    # The shape of google/gemma-3-4b-it's config.json: text_config holds only what differs.
    config = hf_config(tmp_path, {"model_type": "gemma3", "text_config": {
        "model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}})
    assert (config.architecture, config.hidden_size, config.num_heads, config.num_kv_heads) == ("gemma3", 2560, 8, 4)
    assert config.head_dim == 256 and config.query_pre_attn_scalar == 256 and config.vocab_size == 262208
    assert config.rope_theta == 1e6 and config.rope_local_base_freq == 1e4 and config.tie_word_embeddings
    assert config.rope_scaling == RopeScaling(kind="linear", factor=8.0)
    assert config.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert config.hidden_act == "gelu_pytorch_tanh"


def test_hf_sharded_weights_and_multimodal_names(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_JSON))
    shards = {"a.safetensors": {"language_model.model.embed_tokens.weight": torch.ones(2, 2),
                                "vision_tower.patch.weight": torch.ones(1)},
              "b.safetensors": {"model.language_model.norm.weight": torch.zeros(2),
                                "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(1)}}
    weight_map = {}
    for file, tensors in shards.items():
        save_file(tensors, tmp_path / file)
        weight_map.update(dict.fromkeys(tensors, file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    source = open_model_source(tmp_path)
    assert source.format == "hf" and source.gguf_reader is None
    assert sorted(name for name, _ in source.iter_weights()) == ["model.embed_tokens.weight", "model.norm.weight"]
    (tmp_path / "b.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="lacks weight shards b.safetensors"):
        open_model_source(tmp_path)
