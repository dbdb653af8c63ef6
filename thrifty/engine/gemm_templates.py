"""Inductor's AMX int4 GEMM template for the compiled batch step (build time only).

Inductor lowers an int4 weight-only matmul to its C++ GEMM template only under max-autotune and
only for a weight that is a constant of the graph, while the decode graphs take their weights as
inputs (thrifty.engine.compiled_decode). The `batch_tiles` graph calls `thrifty::int4_tiles_mm`
(thrifty.quant.int4_tiles) instead, and while it builds `int4_gemm_templates()` lowers that op to
the template and only to it. The graph's row count is symbolic, so the template takes its AMX
micro-kernel, the one that reads the tile layout; a row count that is not symbolic fails the build
(the engine then runs eagerly), and the builder checks the graph against eager anyway.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch


@functools.cache
def _register_tiles_lowering() -> None:
    # lowering first: the modules below cannot be imported before it
    from torch._inductor import lowering
    from torch._inductor.codegen.cpp_gemm_template import CppWoqInt4GemmTemplate
    from torch._inductor.kernel.mm_common import mm_args
    from torch._inductor.select_algorithm import autotune_select_algorithm
    from torch._inductor.utils import has_free_symbols, use_cpp_gemm_template
    from torch._inductor.virtualized import V

    import thrifty.quant.int4_tiles  # noqa: F401  (defines the op)

    def random_codes(node) -> torch.Tensor:  # autotuning's example weight: any codes will do
        return torch.randint(0, 255, node.get_size(), dtype=torch.uint8)

    @lowering.register_lowering(torch.ops.thrifty.int4_tiles_mm.default, type_promotion_kind=None)
    def int4_tiles_mm(x, tiles, group_size: int, scales_and_zeros, *, layout=None):
        m, _, _, layout, mat1, mat2 = mm_args(x, tiles, layout=layout, use_4x2_dim=True, mat2_transposed=True)
        if not has_free_symbols((m,)):
            raise RuntimeError("int4_tiles_mm needs a symbolic row count: only then does the template "
                               "take the AMX micro-kernel that reads the tile layout")
        if not use_cpp_gemm_template(layout, mat1, mat2, mat2_transposed=True, require_constant_mat2=False,
                                     is_woq_int4=True, q_group_size=group_size):
            raise RuntimeError("inductor's int4 GEMM template does not apply here (no AMX, or a shape it "
                               "cannot take)")
        group = V.graph.add_tensor_constant(torch.tensor(group_size, dtype=torch.int64), name=None)
        inputs = [mat1, mat2, group, scales_and_zeros]
        choices: list = []
        CppWoqInt4GemmTemplate[group_size].add_choices(choices, layout, inputs)
        return autotune_select_algorithm("int4_tiles_mm", choices, inputs, layout,
                                         input_gen_fns={1: random_codes,
                                                        2: lambda node: V.graph.constants[node.get_name()]})[0]


@contextlib.contextmanager
def int4_gemm_templates() -> Iterator[None]:
    """For the builds run inside: `thrifty::int4_tiles_mm` through inductor's AMX GEMM template."""
    from torch._inductor import config

    _register_tiles_lowering()
    with config.patch(max_autotune_gemm=True, max_autotune_gemm_backends="CPP,ATEN"):
        yield
