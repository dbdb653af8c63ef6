"""The tensors a model source hands to a model: plain torch tensors, or GGUF blocks kept as stored."""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight still in its GGUF block format.

    Blocks run along the input dimension, so each output row is a contiguous run of
    whole blocks: rows can be selected or reordered without decoding them, and a
    quantized matmul can later consume `raw` directly.
    """

    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: [out_features, in_features]
    raw: np.ndarray  # uint8 [rows, bytes_per_row], the blocks as stored in the file

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        values = gguf.quants.dequantize(self.raw, self.ggml_type)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(self.shape).to(dtype)

    def dequantize_rows(self, index: np.ndarray) -> torch.Tensor:
        """float32 rows `index` ([n] int) of the weight, decoded from their blocks alone: [n, in_features].

        Blocks never straddle rows, so each value is exactly what `dequantize()` gives for it.
        """
        rows = self.raw.reshape(self.shape[0], -1)[np.asarray(index, dtype=np.int64)]
        values = gguf.quants.dequantize(rows, self.ggml_type)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(len(rows), *self.shape[1:])

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    def select_rows(self, index: torch.Tensor | np.ndarray | list[int]) -> QuantizedWeight:
        """A new weight whose row i is row `index[i]` of this one (a permutation or a subset)."""
        index = np.asarray(index, dtype=np.int64)
        rows = self.raw.reshape(self.shape[0], -1)[index]
        return QuantizedWeight(self.ggml_type, (len(index), *self.shape[1:]), rows)


WeightTensor = torch.Tensor | QuantizedWeight


def to_tensor(weight: WeightTensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight as a dense tensor of `dtype` (dequantizing GGUF blocks)."""
    if isinstance(weight, QuantizedWeight):
        return weight.dequantize(dtype)
    return weight.to(dtype)
