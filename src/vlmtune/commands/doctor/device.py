"""Facts about this machine's hardware, read once by `probe_device()`; tests make up a `DeviceInfo` instead."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceInfo:
    """What the checks know about the hardware; `probe_device()` reads it, tests make it up.

    total_memory is the GPU's memory on "cuda" and the machine's RAM on "cpu"; bf16 is whether the device
    computes in bfloat16 natively at speed (Ampere+ GPUs; CPUs that train.speed.cpu_bf16 keeps bf16 on: AMX-BF16).
    """

    kind: str  # "cuda" | "cpu"
    name: str
    total_memory: int
    bf16: bool
    compute_capability: tuple[int, int] | None
    cpu_count: int
    free_ram: int
    # CPU only: bf16-autocast time / float32 time of a decoder-like block (train/speed.py), measured by the
    # precision check when bf16 is set; None: not measured yet. Tests set it.
    bf16_slowdown: float | None = None
    cpu_flops: float | None = None  # CPU only: measured float32 FLOP/s (train/speed.py) for the time per step
    # CPU only: its bf16 instruction sets (train.speed.cpu_bf16_flags); None: {"amx_bf16"} if bf16 else none.
    bf16_flags: frozenset[str] | None = None


def probe_device() -> DeviceInfo:
    """This process's device: the current GPU when CUDA is available, else the CPU."""
    import torch

    cpus, free_ram, total_ram = _cpu_count(), *_ram()
    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(i)
        cc = (props.major, props.minor)
        return DeviceInfo("cuda", props.name, int(props.total_memory), bool(torch.cuda.is_bf16_supported()), cc,
                          cpus, free_ram)
    from ...train.speed import cpu_bf16, cpu_bf16_flags

    flags = cpu_bf16_flags()
    return DeviceInfo("cpu", _cpu_name(), total_ram, cpu_bf16(flags).keep, None, cpus, free_ram, bf16_flags=flags)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may use (cgroups, taskset)
    except AttributeError:
        return os.cpu_count() or 1


def _ram() -> tuple[int, int]:
    """(available, total) RAM in bytes."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)
    except ImportError:
        info = {}
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
        return info.get("MemAvailable", info.get("MemFree", 0)), info.get("MemTotal", 0)


def _cpu_info() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read(200_000)
    except OSError:
        return ""


def _cpu_name() -> str:
    m = re.search(r"^model name\s*:\s*(.+)$", _cpu_info(), re.M)
    import platform

    return m.group(1).strip() if m else (platform.processor() or "CPU")

