"""Why thrifty's float32 Linear runs one or two rows as W @ x^T and more through a oneDNN-blocked
copy of the weight (thrifty.models.layers.dense_linear).

Times F.linear (x @ W^T), W @ x^T and oneDNN's matmul on the blocked copy for SmolLM2-135M's
matmul shapes at several row counts, cycling through several copies of each weight so that it is
read from memory, not cache, as in a real decode step; then sums one whole step (30 layers of
each shape plus the lm_head). Run: python scripts/bench_fp32_matmul.py [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from thrifty.models.layers import dense_linear, onednn_blocked

SHAPES = {"lm_head": (49152, 576), "qkv": (960, 576), "o_proj": (576, 576), "gate_up": (3072, 576),
          "down": (576, 1536)}
LAYERS = 30  # SmolLM2-135M: every shape but the lm_head once per layer


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
    step = {(path, rows): 0.0 for path in ("linear", "W@x^T", "blocked") for rows in rows_list}
    print("| weight | rows | F.linear ms | W @ x^T ms | oneDNN blocked ms |")
    print("|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        copies = [torch.randn(n, k) for _ in range(max(2, 300_000_000 // (n * k * 4)))]
        blocked = [onednn_blocked(w) for w in copies]
        turn = iter(range(1 << 62))
        for rows in rows_list:
            x = torch.randn(rows, k)
            reps = max(1, (4 if name == "lm_head" else 30) // max(1, rows // 32))
            times = {
                "linear": _ms(lambda: F.linear(x, copies[next(turn) % len(copies)]), reps),
                "W@x^T": _ms(lambda: dense_linear(x, copies[next(turn) % len(copies)], None), reps),
                # the op itself: dense_linear takes it from 3 rows on
                "blocked": _ms(lambda: torch.ops.mkldnn._linear_pointwise(
                    x, blocked[next(turn) % len(blocked)], None, "none", [], ""), reps),
            }
            for path, ms in times.items():
                step[path, rows] += ms * (1 if name == "lm_head" else LAYERS)
            print(f"| {name} {n}x{k} | {rows} | {times['linear']:.3f} | {times['W@x^T']:.3f} | {times['blocked']:.3f} |",
                  flush=True)
    print("\nWhole step (lm_head + 30 x each layer shape):\n")
    print("| rows | F.linear ms | W @ x^T ms | oneDNN blocked ms | W @ x^T / blocked |")
    print("|---|---|---|---|---|")
    for rows in rows_list:
        print(f"| {rows} | {step['linear', rows]:.1f} | {step['W@x^T', rows]:.1f} | {step['blocked', rows]:.1f} | "
              f"{step['W@x^T', rows] / step['blocked', rows]:.2f}x |")

if __name__ == "__main__":
    main()
