"""Packed weight formats on small hand-made tensors: each matmul equals dequantize-then-matmul."""

import gguf
import numpy as np
import pytest
import torch

from thrifty.loading.weights import QuantizedWeight
from thrifty.quant import packed
from thrifty.quant.formats import resolve_choice, weight_format
from thrifty.quant.packed import (
    DENSE_ROWS,
    BF16Weight,
    Int4Weight,
    Int8Weight,
    concat,
    pack,
)

N, K = 64, 96  # int4 wants N % 32 == 0 (its AMX tiles) and K % 32 == 0


def weight(seed: int = 0) -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cls", [BF16Weight, Int8Weight, Int4Weight])
# The kernel path, and the dense bf16 path above each format's DENSE_ROWS (int8 first, then int4 too).
@pytest.mark.parametrize("rows", [1, 5, DENSE_ROWS["int8"] + 7, DENSE_ROWS["int4"] + 7])
def test_packed_matmul_equals_dequantize_then_matmul(cls, rows):
    packed = cls.from_float(weight())
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(N)
    reference = x @ packed.dequantize().t() + bias
    # bf16 activations (8-bit mantissa) over K=96 products: about 1% of the output scale.
    tolerance = 0.02 * float(reference.abs().max())
    out = packed.linear(x, bias)
    assert out.dtype == x.dtype and out.shape == (rows, N)
    assert float((out - reference).abs().max()) < tolerance


@pytest.mark.parametrize("cls,max_error", [(BF16Weight, 0.01), (Int8Weight, 0.01), (Int4Weight, 0.1)])
def test_quantization_error_is_bounded(cls, max_error):
    w = weight()
    err = (cls.from_float(w).dequantize() - w).abs().max() / w.abs().max()
    assert float(err) < max_error


def test_int4_repacks_a_q4_1_gguf_weight_onto_its_own_grid():
    w = weight(2).numpy()
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1)
    stored = QuantizedWeight(gguf.GGMLQuantizationType.Q4_1, (N, K), raw).dequantize()
    repacked = Int4Weight.from_float(stored).dequantize()
    # Same 4-bit grid per 32 weights, so only the bf16 rounding of scale and offset remains.
    assert float((repacked - stored).abs().max()) < 0.02 * float(stored.abs().max())


def test_int4_tiles_hold_the_codes_and_multiply_as_the_int4_kernel():
    from thrifty.quant.int4_tiles import TILE_N, int4_tiles_mm, to_tiles

    w = weight(8)
    packed = Int4Weight.from_float(w)
    codes = torch.round((w.view(N, -1, 32) - packed.low.float()[..., None]) / packed.scale.float()[..., None])
    codes = codes.clamp(0, 15).to(torch.uint8).view(N, K)
    assert torch.equal(packed.codes(), codes)
    # The layout itself, on one hand-checked entry: feature n of a tile sits in byte n % (TILE_N / 2),
    # low nibble for the tile's first half.
    tiles = to_tiles(codes).view(N // TILE_N, K, TILE_N // 2)
    assert int(tiles[1, 5, 3]) == int(codes[TILE_N + 3, 5]) | int(codes[TILE_N + TILE_N // 2 + 3, 5]) << 4
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed.packed, 32, packed.scales_and_zeros)
    tiled = int4_tiles_mm(x, packed.tiles, 32, packed.scales_and_zeros)
    assert tiled.dtype == torch.bfloat16 and tiled.shape == (5, N)
    torch.testing.assert_close(tiled.float(), kernel.float(), atol=0.01 * float(kernel.abs().max()), rtol=0)


def test_concat_stacks_outputs_and_mixes_formats():
    a, b = Int4Weight.from_float(weight(3)), Int8Weight.from_float(weight(4))
    x = torch.randn(2, K)
    for parts in ([a, Int4Weight.from_float(weight(5))], [b, Int8Weight.from_float(weight(6))], [a, b]):
        fused = concat(parts)
        expected = torch.cat([p.linear(x) for p in parts], dim=-1)
        assert fused.out_features == 2 * N
        torch.testing.assert_close(fused.linear(x), expected, atol=0.05 * float(expected.abs().max()), rtol=0)


needs_vnni = pytest.mark.skipif(not torch.cpu._is_vnni_supported(), reason="the int8 GEMM path needs VNNI")


@needs_vnni
@pytest.mark.parametrize("gemm", ["onednn", "fbgemm"])
def test_int8_gemm_path_is_precise_and_batch_invariant(monkeypatch, gemm):
    if gemm == "onednn" and not packed.amx_available():
        pytest.skip("oneDNN's int8 GEMM is taken on CPUs with AMX")
    monkeypatch.setattr(packed, "amx_available", lambda: gemm == "onednn")
    plain = Int8Weight.from_float(weight(7))  # the weight-only kernel's codes
    monkeypatch.setattr(packed, "INT8_GEMM_MIN_OUT", N)  # send this small weight down the vocabulary-head path
    head = Int8Weight.from_float(weight(7))
    assert plain._q is not None and head._q is None
    assert (head._onednn is not None) == (gemm == "onednn") and (head._gemm is not None) == (gemm == "fbgemm")
    assert torch.equal(head.q, plain.q)  # the GEMM holds the very codes, and gives them back
    x = torch.randn(packed.INT8_GEMM_ROWS, K, generator=torch.Generator().manual_seed(8)) * 3
    reference = x @ head.dequantize().t()
    out = head.linear(x)
    # Activations kept to about 16 bits per row: far inside the bfloat16 kernel's 1%.
    assert float((out - reference).abs().max()) < 1e-3 * float(reference.abs().max())
    for i in (0, 5, packed.INT8_GEMM_ROWS - 1):  # exact integer sums: a row's result ignores its batch
        assert torch.equal(head.linear(x[i:i + 1])[0], out[i])
    wide = torch.randn(packed.INT8_GEMM_ROWS + 3, K)  # above the row limit: the dense bfloat16 path
    expected = wide @ head.dequantize().t()
    assert float((head.linear(wide) - expected).abs().max()) < 0.02 * float(expected.abs().max())
    assert torch.equal(head.linear(torch.zeros(2, K)), torch.zeros(2, N))  # an all-zero row stays finite
    assert head.linear(x[:3].bfloat16()).dtype == torch.bfloat16  # in the activations' dtype, as every path


def test_int4_falls_back_to_int8_for_shapes_its_kernel_cannot_take():
    assert isinstance(pack(torch.randn(10, 40), "int4"), Int8Weight)


def test_weight_choices():
    cpu = torch.device("cpu")
    assert resolve_choice("fp32", cpu) == "fp32"
    assert resolve_choice("auto", torch.device("meta")) == "fp32"
    with pytest.raises(ValueError, match="weights"):
        resolve_choice("int3", cpu)
    q4 = QuantizedWeight(gguf.GGMLQuantizationType.Q4_1, (N, K), np.zeros((N, K // 32 * 20), np.uint8))
    q8 = QuantizedWeight(gguf.GGMLQuantizationType.Q8_0, (N, K), np.zeros((N, K // 32 * 34), np.uint8))
    assert weight_format("gguf", q4) == "int4" and weight_format("gguf", q8) == "int8"
    assert weight_format("gguf", torch.zeros(N, K)) is None and weight_format("fp32", q4) is None
    assert weight_format("auto", q4) == "int4" and weight_format("auto", torch.zeros(N, K)) == "int8"


@pytest.mark.parametrize("choice", ["int8", "int4", "bf16"])
def test_quantized_engine_follows_the_fp32_engine(tiny_llama_gguf, choice):
    from thrifty import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    prompt = "the answer to everything is"
    top = {}
    for weights in ("fp32", choice):
        llm = LLM(str(tiny_llama_gguf), weights=weights, kv_cache_tokens=256, block_size=4)
        top[weights] = llm.generate(prompt, params)[0].outputs[0].token_ids
    assert top[choice] == top["fp32"]


@pytest.mark.parametrize("fmt", ["int8", "int4", "bf16"])
def test_big_weights_pack_in_slices_to_the_same_result(fmt, monkeypatch):
    import thrifty.quant.packed as packed_module

    w = torch.randn(64, K)
    whole = pack(w, fmt).dequantize()
    monkeypatch.setattr(packed_module, "PACK_ROWS", 32)  # a multiple of int4's tile rows
    torch.testing.assert_close(pack(w, fmt).dequantize(), whole)


@pytest.mark.parametrize("rows", [1, 2, 3, 9, 200])
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_linear_with_its_onednn_copy_equals_the_plain_matmul(rows, bias, without_skinny_kernel):
    from thrifty.models.layers import Linear

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    linear = Linear(K, N, bias, dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        linear.weight.copy_(weight())
        if bias:
            linear.bias.copy_(torch.randn(N))
    x = torch.randn(2, rows, K, generator=torch.Generator().manual_seed(1))
    reference = torch.nn.functional.linear(x.double(), linear.weight.double(),
                                           None if linear.bias is None else linear.bias.double())
    plain = linear(x)
    linear.block_for_onednn()
    assert linear.blocked is not None
    blocked = linear(x)
    assert blocked.shape == plain.shape == (2, rows, N)
    torch.testing.assert_close(blocked.double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain.double(), reference, rtol=1e-5, atol=1e-5)


def test_the_blocked_linear_op_finds_a_weights_copy_while_the_weight_lives(without_skinny_kernel):
    import gc

    from thrifty.models import blocked_linear
    from thrifty.models.layers import Linear

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    linear = Linear(K, N, False, dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        linear.weight.copy_(weight())
    x = torch.randn(6, K, generator=torch.Generator().manual_seed(2))
    reference = x.double() @ linear.weight.double().t()
    key = blocked_linear._key(linear.weight)
    unblocked = blocked_linear.blocked_linear(x, linear.weight)  # no copy yet: the plain matmul
    linear.block_for_onednn()
    assert blocked_linear._BLOCKED[key] is linear.blocked
    torch.testing.assert_close(unblocked.double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(blocked_linear.blocked_linear(x, linear.weight).double(), reference,
                               rtol=1e-5, atol=1e-5)
    del linear
    gc.collect()
    assert key not in blocked_linear._BLOCKED  # a later weight at the same address must not find it


def test_the_blocked_linear_op_computes_what_an_eager_step_does_at_every_row_count(without_skinny_kernel):
    """A compiled graph's row count is symbolic, so the op itself picks the plain or the blocked matmul
    by rows, as eager steps do: a row gets the same bits compiled or not."""
    from thrifty.models import blocked_linear
    from thrifty.models.layers import Linear

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    linear = Linear(K, N, False, dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        linear.weight.copy_(weight())
    linear.block_for_onednn()
    for rows in range(1, 10):
        x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
        assert torch.equal(blocked_linear.blocked_linear(x, linear.weight), linear(x)), rows


@pytest.mark.parametrize("kernel", [True, False])
def test_only_fp32_engines_without_the_skinny_kernel_keep_onednn_copies(tiny_llama_gguf, request, kernel):
    from thrifty import LLM
    from thrifty.models import skinny_linear
    from thrifty.models.layers import Linear

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    if kernel and not skinny_linear.available():
        pytest.skip("the kernel needs an AVX-512 CPU and a C++ compiler")
    if not kernel:
        request.getfixturevalue("without_skinny_kernel")
    for weights, expect_copies in (("fp32", not kernel), ("int8", False)):
        llm = LLM(str(tiny_llama_gguf), weights=weights, kv_cache_tokens=256, block_size=4)
        linears = [m for m in llm.engine.model.modules() if isinstance(m, Linear)]
        assert linears and all((m.blocked is not None) == expect_copies for m in linears), weights
