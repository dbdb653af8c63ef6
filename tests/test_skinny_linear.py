"""thrifty::skinny_linear, the AVX-512 float32 kernel for matmuls of a few rows."""

import pytest
import torch

from thrifty.models import skinny_linear
from thrifty.models.layers import Linear

pytestmark = pytest.mark.skipif(not skinny_linear.available(),
                                reason="the kernel needs an AVX-512 CPU and a C++ compiler")


@pytest.mark.parametrize(("n", "k"), [(64, 96), (37, 16), (5, 7), (130, 200), (1, 33)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 17])
def test_the_kernel_computes_x_times_the_weight_transposed(n, k, rows):
    """Every tile shape and every tail: rows past a multiple of 4, weight rows past a multiple of 4,
    columns past a multiple of 16."""
    gen = torch.Generator().manual_seed(n * 1000 + k * 10 + rows)
    x, weight = torch.randn(rows, k, generator=gen), torch.randn(n, k, generator=gen)
    y = skinny_linear.skinny_linear(x, weight)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), x.double() @ weight.double().t(), rtol=1e-5, atol=1e-5)


def test_a_row_gets_the_same_bits_whatever_rows_come_with_it_and_on_any_thread_count():
    """Verify steps then round exactly as the one-row steps of plain decoding do."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(300, 576, generator=gen)
    x = torch.randn(17, 576, generator=gen)
    alone = [skinny_linear.skinny_linear(x[i:i + 1], weight) for i in range(17)]
    threads = torch.get_num_threads()
    try:
        for num_threads in (1, 2):
            torch.set_num_threads(num_threads)
            for rows in (2, 5, 8, 17):
                together = skinny_linear.skinny_linear(x[:rows], weight)
                for i in range(rows):
                    assert torch.equal(together[i], alone[i][0]), (num_threads, rows, i)
    finally:
        torch.set_num_threads(threads)


def test_leading_dimensions_are_kept_and_a_strided_input_is_read_right():
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(40, 64, generator=gen)
    x = torch.randn(2, 3, 128, generator=gen)[..., ::2]  # not contiguous
    y = skinny_linear.skinny_linear(x, weight)
    assert y.shape == (2, 3, 40)
    torch.testing.assert_close(y, x @ weight.t(), rtol=1e-5, atol=1e-5)


def test_wrong_inputs_are_refused_with_what_was_wrong():
    weight = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="float32"):
        skinny_linear.skinny_linear(torch.randn(2, 16, dtype=torch.bfloat16), weight)
    with pytest.raises(RuntimeError, match="last dimension"):
        skinny_linear.skinny_linear(torch.randn(2, 15), weight)


@pytest.mark.parametrize("bias", [False, True])
def test_a_float32_linear_uses_the_kernel_up_to_its_row_limit_and_keeps_no_weight_copy(bias):
    linear = Linear(96, 64, bias, dtype=torch.float32, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 96, generator=gen))
        if bias:
            linear.bias.copy_(torch.randn(64, generator=gen))
    linear.block_for_onednn()
    assert linear.blocked is None  # the kernel needs no second copy of the weight
    for rows in (1, 6, skinny_linear.MAX_ROWS, skinny_linear.MAX_ROWS + 1, 200):
        x = torch.randn(rows, 96, generator=gen)
        expected = skinny_linear.skinny_linear(x, linear.weight) if rows <= skinny_linear.MAX_ROWS else \
            torch.nn.functional.linear(x, linear.weight)
        if bias:
            expected = expected + linear.bias
        assert torch.equal(linear(x), expected), rows
