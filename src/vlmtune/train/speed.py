"""Micro-benchmarks of this machine, measured in well under a second: what the doctor's precision and
time-per-step advice and the CPU precision fallback of `vlmtune train` rest on.

A CPU flag (AVX512-BF16, AMX) says bf16 instructions exist, not that PyTorch's kernels for every op of a
decoder layer use them: on the AMD EPYC of issue 16 (which has avx512_bf16) one Qwen2-VL-2B decoder layer ran
23x slower under bf16 autocast than in float32. So the slowdown is measured, on a block shaped like a decoder
layer's MLP and attention projections (linear, SiLU, elementwise product, RMS norm), forward and backward.
"""

from __future__ import annotations

import functools
import time

# Where bf16 autocast measures this many times slower than float32 on the CPU, train falls back to float32.
BF16_SLOWDOWN_FALLBACK = 1.25


def _block_step(x, w_in, w_gate, w_out, dtype) -> None:
    import torch

    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        y = (torch.nn.functional.silu(h @ w_gate) * (h @ w_in)) @ w_out
    y.float().sum().backward()


def _time_block(dtype, tokens: int, hidden: int, repeats: int) -> float:
    """Best-of-`repeats` seconds of one forward+backward of the block (float32 weights, as in training)."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g, requires_grad=True)
    w = [torch.randn(a, b, generator=g).mul_(0.02).requires_grad_() for a, b in
         ((hidden, 4 * hidden), (hidden, 4 * hidden), (4 * hidden, hidden))]
    _block_step(x, *w, dtype)  # warm-up: kernels chosen, memory allocated
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        _block_step(x, *w, dtype)
        best = min(best, time.perf_counter() - t)
    return best


@functools.lru_cache(maxsize=None)
def cpu_bf16_slowdown(tokens: int = 128, hidden: int = 256, repeats: int = 2) -> float:
    """bf16-autocast seconds / float32 seconds of one forward+backward of a decoder-like block on the CPU."""
    import torch

    return _time_block(torch.bfloat16, tokens, hidden, repeats) / _time_block(torch.float32, tokens, hidden, repeats)


@functools.lru_cache(maxsize=None)
def cpu_flops(tokens: int = 256, hidden: int = 512, repeats: int = 2) -> float:
    """Float32 FLOP/s of this machine's CPU on the same block (matmul FLOPs: forward 2·t·h·4h·3, backward 2×)."""
    import torch

    seconds = _time_block(torch.float32, tokens, hidden, repeats)
    return 3 * 2 * tokens * hidden * 4 * hidden * 3 / seconds
