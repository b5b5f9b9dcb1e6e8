"""The CPU precision decision (`cpu_bf16`, the one place that makes it for train, doctor and chat) and
micro-benchmarks of this machine, measured in well under a second, that the doctor shows as advice.

The decision is deterministic: it reads which bf16 instructions the CPU has, never a timing (on a busy machine
the measured factor ranged from 0.5x to 26x between runs of the same config, issue 21). bf16 stays on where the
CPU has AMX-BF16 tiles, which oneDNN's bf16 matmuls use; AVX512-BF16 alone is not enough: on the AMD EPYC of
issue 16 (which has avx512_bf16) one Qwen2-VL-2B decoder layer ran 23x slower under bf16 autocast than in
float32. The measured slowdown (a block shaped like a decoder layer's MLP and attention projections: linear,
SiLU, elementwise product, RMS norm, forward and backward) is shown by the doctor as advice only.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass

# Where bf16 autocast measures this many times slower than float32, the doctor advises float32 (advice only).
BF16_SLOWDOWN_FALLBACK = 1.25


@dataclass(frozen=True)
class CpuBf16:
    """Whether this CPU trains and runs in bf16 (`keep`), and the instruction facts that decided it."""

    keep: bool
    flags: frozenset[str]  # of "avx512_bf16", "amx_bf16" present

    @property
    def why(self) -> str:
        if "amx_bf16" in self.flags:
            return "the CPU has AMX-BF16"
        if "avx512_bf16" in self.flags:
            return "the CPU has AVX512-BF16 but no AMX-BF16, and its bf16 kernels are slower than float32 there"
        return "the CPU has no bf16 instructions (AVX512-BF16 or AMX-BF16)"


def cpu_bf16_flags() -> frozenset[str]:
    """The CPU's bf16 instruction sets: /proc/cpuinfo's flags, or PyTorch's own query where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            m = re.search(r"^flags\s*:\s*(.+)$", f.read(1 << 20), re.M)
        if m:
            return frozenset({"avx512_bf16", "amx_bf16"} & set(m.group(1).split()))
    except OSError:
        pass
    import torch

    cpu = torch.cpu
    found = set()
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        found.add("avx512_bf16")
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        found.add("amx_bf16")
    return frozenset(found)


@functools.lru_cache(maxsize=None)
def cpu_bf16(flags: frozenset[str] | None = None) -> CpuBf16:
    """THE decision: bf16 on this CPU only with AMX-BF16 (see the module's docstring). `flags` for tests."""
    flags = cpu_bf16_flags() if flags is None else flags
    return CpuBf16("amx_bf16" in flags, frozenset(flags))


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
