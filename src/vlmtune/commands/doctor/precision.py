"""The doctor's precision check: bf16 / fp16 against the device (on a CPU, decided as `vlmtune train` decides it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .device import DeviceInfo
from .report import Check

if TYPE_CHECKING:  # the Context, for annotations only
    from .context import Context


def check_precision(ctx: Context) -> Check:
    cfg, dev = ctx.cfg, ctx.device
    cc = f"compute capability {dev.compute_capability[0]}.{dev.compute_capability[1]}" \
        if dev.compute_capability else "compute capability unknown"
    if dev.kind == "cpu":
        if cfg.fp16:
            return Check("precision", "fail", f"fp16=true but there is no GPU ({dev.name}): float16 mixed "
                         "precision needs CUDA", "set fp16: false (float32), or bf16: true on a CPU with bfloat16")
        if cfg.bf16:
            return _cpu_bf16(cfg, dev)
        return Check("precision", "ok", f"float32 on the CPU ({dev.name}); no GPU found")
    if cfg.bf16 and not dev.bf16:
        return Check("precision", "fail", f"bf16=true but {dev.name} ({cc}) has no bfloat16 support (it needs "
                     "8.0 or newer: Ampere, Ada, Hopper)", "set bf16: false and fp16: true")
    if cfg.bf16:
        return Check("precision", "ok", f"bf16 on {dev.name} ({cc}): bfloat16 weights and activations")
    if cfg.fp16:
        better = "; bf16 has float32's range and needs no loss scaling on this GPU" if dev.bf16 else ""
        return Check("precision", "ok", f"fp16 mixed precision on {dev.name} ({cc}){better}")
    if dev.bf16:
        return Check("precision", "warn", f"neither bf16 nor fp16 is set: float32 on {dev.name} ({cc}), which "
                     "supports bfloat16: twice the weight and activation memory, and slower", "set bf16: true")
    return Check("precision", "warn", f"neither bf16 nor fp16 is set: float32 on {dev.name} ({cc}): twice the "
                 "weight and activation memory of fp16, and slower", "set fp16: true")


def _cpu_bf16(cfg, dev: DeviceInfo) -> Check:
    """bf16 on the CPU: decided as `vlmtune train` decides it (train.speed.cpu_bf16, from the CPU's bf16
    instructions); the measured slowdown is shown as advice only."""
    from ...train.speed import BF16_SLOWDOWN_FALLBACK, cpu_bf16, cpu_bf16_slowdown

    flags = dev.bf16_flags if dev.bf16_flags is not None else frozenset({"amx_bf16"} if dev.bf16 else ())
    decision = cpu_bf16(flags)
    factor = dev.bf16_slowdown if dev.bf16_slowdown is not None else cpu_bf16_slowdown()
    measured = (f"bf16 autocast measured {factor:.1f}x the float32 time of a decoder-like block on {dev.name} "
                "(advice only: the choice follows the CPU's instructions); no GPU found")
    slower = factor > BF16_SLOWDOWN_FALLBACK
    if decision.keep:
        if slower and not cfg.force_cpu_bf16:
            return Check("precision", "warn", f"bf16=true: kept, since {decision.why}, but {measured}",
                         "set bf16: false if float32 is faster in your runs")
        return Check("precision", "ok", f"bf16=true: kept, since {decision.why}; {measured}")
    if cfg.force_cpu_bf16:
        return Check("precision", "warn", f"bf16=true and force_cpu_bf16=true: training keeps bfloat16 autocast "
                     f"although {decision.why}: {measured}",
                     "set bf16: false and force_cpu_bf16: false (float32 is faster on such CPUs)")
    return Check("precision", "warn", f"bf16=true but {decision.why}, so `vlmtune train` will train in float32 "
                 f"instead: {measured}", "set bf16: false (or force_cpu_bf16: true to keep bf16 anyway)")
