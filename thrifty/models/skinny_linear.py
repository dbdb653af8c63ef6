"""float32 matmuls of a few rows through thrifty's own AVX-512 kernel (skinny_linear.cpp).

Decode and verify steps multiply 1-17 rows by every weight. PyTorch's CPU matmuls take those at
1-row speed only up to 2-3 rows; from there a step costs up to 1.7x a one-row step (MKL, and oneDNN
on a blocked copy of the weight that doubles a float32 model's memory). The kernel keeps the FMA
units busy while the weight streams in: a 6-8 row step of SmolLM2-135M costs about 1.3x a one-row
step, and a one-row step is as fast as MKL's or faster (scripts/bench_fp32_matmul.py). Each row's
result is the same bits whatever the other rows, so verify steps are batch-invariant with plain ones.

The op `thrifty::skinny_linear(x, weight)` is a C++ kernel behind the dispatcher, so compiled
graphs call it with no Python in between. It is compiled from source the first time a process
needs it (10-15 s with g++; the library lands in $THRIFTY_CACHE_DIR/kernels and is loaded from
there afterwards). Where it cannot run (no AVX-512, no compiler), or with THRIFTY_SKINNY_KERNEL=0 in
the environment, `available()` is False and float32 matmuls take PyTorch's paths.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from pathlib import Path

import torch

from thrifty.cache_dir import cache_dir

log = logging.getLogger(__name__)

# Whole SmolLM2-135M steps (Sapphire Rapids, 2 threads): the kernel beat or matched oneDNN's blocked
# matmul up to 64 rows (1.2x at 1-8 rows, 1.0x at 32-64) and lost from 128 (0.86x), where F.linear,
# which matches oneDNN there, takes over.
MAX_ROWS = 64

SOURCE = Path(__file__).with_name("skinny_linear.cpp")
_FLAGS = ["-O3", "-mavx512f", "-mfma", "-fopenmp"]

_LIBRARY = torch.library.Library("thrifty", "FRAGMENT")
_LIBRARY.define("skinny_linear(Tensor x, Tensor weight) -> Tensor")


@torch.library.register_fake("thrifty::skinny_linear")
def _shape(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def available() -> bool:
    """Whether float32 matmuls of a few rows take the kernel, building or loading it on the first call."""
    # The environment is read on every call, so graph builds in a child process see what the parent does.
    return os.environ.get("THRIFTY_SKINNY_KERNEL") != "0" and _loaded()


@functools.cache
def _loaded() -> bool:
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(_FLAGS).encode() + torch.__version__.encode()).hexdigest()
    build_dir = cache_dir("kernels") / f"skinny_linear-{digest[:16]}"
    build_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load

        load(name=f"thrifty_skinny_linear_{digest[:16]}", sources=[str(SOURCE)], extra_cflags=_FLAGS,
             extra_ldflags=["-fopenmp"], build_directory=str(build_dir), is_python_module=False, verbose=False)
    except Exception as error:  # noqa: BLE001 - no compiler, a failed build: PyTorch's matmuls still run
        log.warning("float32 few-row kernel unavailable (%s: %s); using PyTorch's matmuls",
                    type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        return False
    elapsed = time.perf_counter() - start
    if elapsed > 2:
        log.info("built the float32 few-row kernel in %.0f s (%s)", elapsed, build_dir)
    return True


def skinny_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T for float32 CPU tensors; call only where `available()`."""
    return torch.ops.thrifty.skinny_linear(x, weight)
