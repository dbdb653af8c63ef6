"""Where the packed weights' kernels stop paying: thrifty.quant.packed.DENSE_ROWS.

For SmolLM2-135M's matmul shapes and several row counts, times the weight-only kernel
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) against expanding the weight to
bfloat16 and running a dense GEMM (the prefill path). The kernel's time grows with the rows;
the expansion is a fixed cost per call, large for int4 (nibbles to unpack). Int8 weights of
INT8_GEMM_MIN_OUT outputs or more (the lm_head) also time fbgemm's int8 GEMM on two-part
int8 activations, the path `Int8Weight.linear` takes for them up to INT8_GEMM_ROWS rows.
Run: python scripts/bench_packed_rows.py [--threads 2] [--rows 1,4,16,32,64,128,256]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from thrifty.quant.packed import (
    DENSE_ROWS,
    INT4_GROUP,
    INT8_GEMM_MIN_OUT,
    INT8_GEMM_ROWS,
    Int4Weight,
    Int8Weight,
)

SHAPES = {"gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def _ms(fn, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="16,32,64,128,256")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"DENSE_ROWS now: {DENSE_ROWS}\n")
    print("| format | weight | rows | kernel ms | expand + GEMM ms | int8 GEMM, two-part activations ms |")
    print("|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k)
        int8, int4 = Int8Weight.from_float(w), Int4Weight.from_float(w)
        codes = int8.q  # unpacked once: a weight on the GEMM path keeps only the GEMM's packed copy
        for rows in map(int, args.rows.split(",")):
            x = torch.randn(rows, k).to(torch.bfloat16)
            cases = {
                "int8": (lambda: torch.ops.aten._weight_int8pack_mm(x, codes, int8.scale),
                         lambda: F.linear(x, codes.to(torch.bfloat16) * int8.scale[:, None])),
                "int4": (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4.packed, INT4_GROUP,
                                                                            int4.scales_and_zeros),
                         lambda: F.linear(x, int4._dense_bf16())),
            }
            for fmt, (kernel, dense) in cases.items():
                gemm = "-"
                if fmt == "int8" and n >= INT8_GEMM_MIN_OUT and rows <= INT8_GEMM_ROWS:
                    gemm = f"{_ms(lambda: int8.linear(x.float())):.2f}"
                print(f"| {fmt} | {name} {n}x{k} | {rows} | {_ms(kernel):.2f} | {_ms(dense):.2f} | {gemm} |", flush=True)


if __name__ == "__main__":
    main()
