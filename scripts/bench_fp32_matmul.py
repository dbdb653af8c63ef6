"""Which float32 Linear thrifty runs by row count (thrifty.models.layers.dense_linear): its own
AVX-512 kernel (thrifty.models.skinny_linear) up to 64 rows where it can run, else W @ x^T or
F.linear for one or two rows and a oneDNN-blocked copy of the weight for more.

Times F.linear (x @ W^T), W @ x^T, oneDNN's matmul on the blocked copy and thrifty's kernel for
SmolLM2-135M's matmul shapes at several row counts, cycling through several copies of each weight so
that it is read from memory, not cache, as in a real decode step; then sums one whole step (30 layers
of each shape plus the lm_head). Run: python scripts/bench_fp32_matmul.py [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from thrifty.models import skinny_linear
from thrifty.models.layers import onednn_blocked

SHAPES = {"lm_head": (49152, 576), "qkv": (960, 576), "o_proj": (576, 576), "gate_up": (3072, 576),
          "down": (576, 1536)}
LAYERS = 30  # SmolLM2-135M: every shape but the lm_head once per layer
PATHS = ("linear", "W@x^T", "blocked", "skinny")


def _transposed(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """W @ x^T, one row padded to two (MKL's matrix-vector path is slower on AMD)."""
    padded = torch.cat((x, x)) if x.shape[0] == 1 else x
    return (weight @ padded.t()).t()[:x.shape[0]]


def _ms(fn, reps: int, trials: int = 5) -> float:
    """Median over `trials` of the mean time of `reps` calls (the machine is shared and noisy)."""
    for _ in range(2):
        fn()
    means = []
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(reps):
            fn()
        means.append((time.perf_counter() - started) / reps * 1e3)
    return statistics.median(means)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,2,3,4,8,16,32,64,128,512")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows_list = list(map(int, args.rows.split(",")))
    kernel = skinny_linear.available()
    paths = PATHS if kernel else PATHS[:-1]
    step = {(path, rows): 0.0 for path in paths for rows in rows_list}
    print("| weight | rows | F.linear ms | W @ x^T ms | oneDNN blocked ms |" + (" thrifty kernel ms |" if kernel else ""))
    print("|---|---|---|---|---|" + ("---|" if kernel else ""))
    for name, (n, k) in SHAPES.items():
        copies = [torch.randn(n, k) for _ in range(max(2, 300_000_000 // (n * k * 4)))]
        blocked = [onednn_blocked(w) for w in copies]
        turn = iter(range(1 << 62))
        for rows in rows_list:
            x = torch.randn(rows, k)
            reps = max(1, (4 if name == "lm_head" else 30) // max(1, rows // 32))
            times = {
                "linear": _ms(lambda: F.linear(x, copies[next(turn) % len(copies)]), reps),
                "W@x^T": _ms(lambda: _transposed(x, copies[next(turn) % len(copies)]), reps),
                "blocked": _ms(lambda: torch.ops.mkldnn._linear_pointwise(
                    x, blocked[next(turn) % len(blocked)], None, "none", [], ""), reps),
            }
            if kernel:
                times["skinny"] = _ms(lambda: skinny_linear.skinny_linear(x, copies[next(turn) % len(copies)]), reps)
            for path, ms in times.items():
                step[path, rows] += ms * (1 if name == "lm_head" else LAYERS)
            print(f"| {name} {n}x{k} | {rows} | " + " | ".join(f"{times[p]:.3f}" for p in paths) + " |", flush=True)
    print("\nWhole step (lm_head + 30 x each layer shape):\n")
    print("| rows | F.linear ms | W @ x^T ms | oneDNN blocked ms |" + (" thrifty kernel ms | best PyTorch / kernel |" if kernel else ""))
    print("|---|---|---|---|" + ("---|---|" if kernel else ""))
    for rows in rows_list:
        line = f"| {rows} | " + " | ".join(f"{step[p, rows]:.1f}" for p in paths) + " |"
        if kernel:
            best = min(step[p, rows] for p in PATHS[:-1])
            line += f" {best / step['skinny', rows]:.2f}x |"
        print(line)

if __name__ == "__main__":
    main()
