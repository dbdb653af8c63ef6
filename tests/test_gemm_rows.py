"""Large matmuls see a few row counts: padding rules and that padding changes no result."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from thrifty.quant.gemm_rows import PAD_ABOVE, padded_rows, with_padded_rows
from thrifty.quant.packed import Int4Weight


@given(st.integers(min_value=1, max_value=4096))
def test_padding_adds_under_an_eighth_and_never_shrinks(rows):
    padded = padded_rows(rows)
    assert rows <= padded < rows * 9 / 8 + 1
    if rows <= PAD_ABOVE:
        assert padded == rows
    else:
        assert padded % 8 == 0
    assert padded_rows(padded) == padded  # a padded count is its own bucket


def test_a_chunk_of_any_length_up_to_512_meets_a_few_shapes():
    counts = {padded_rows(rows) for rows in range(PAD_ABOVE + 1, 513)}
    assert len(counts) <= 25 and max(counts) == 512


def test_the_matmul_sees_padded_rows_and_the_caller_its_own():
    seen = []
    weight = torch.randn(48, 16)

    def matmul(x):
        seen.append(x.shape[0])
        return x @ weight.t()

    x = torch.randn(3, 67, 16)  # leading dims are flattened: 201 rows
    y = with_padded_rows(matmul, x)
    assert seen == [padded_rows(201)] and seen[0] > 201
    assert y.shape == (3, 67, 48)
    torch.testing.assert_close(y, x @ weight.t())


def test_int4_prefill_rows_are_padded_without_changing_the_rows_asked_for(monkeypatch):
    from thrifty.quant import packed

    w = Int4Weight.from_float(torch.randn(64, 64))
    x = torch.randn(150, 64)
    rows_seen = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(packed.F, "linear", lambda a, b: rows_seen.append(a.shape[0]) or linear(a, b))
    y = w.linear(x)
    assert rows_seen == [padded_rows(150)] == [160]
    expected = linear(x.to(torch.bfloat16), w._dense_bf16()).float()
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)
