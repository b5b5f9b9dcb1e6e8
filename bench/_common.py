"""Helpers shared by the benchmark modules: tiny checkpoints, cached data folders, timers."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CACHE_ROOT = Path(os.environ.get("VLMTUNE_BENCH_CACHE", Path(tempfile.gettempdir()) / "vlmtune-bench"))


def cached_dir(name: str, build: Callable[[Path], None]) -> Path:
    """`CACHE_ROOT/name`, built once by `build(dir)` (atomically: a half-built folder is never used)."""
    out = CACHE_ROOT / name
    if (out / ".complete").exists():
        return out
    tmp = CACHE_ROOT / f".{name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / ".complete").write_text("")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def tiny_checkpoint(arch: str = "qwen2_vl", seed: int = 0) -> Path:
    """A tiny random checkpoint of `arch` (see vlmtune.models.tiny), built once per builder version."""
    import hashlib

    import transformers

    from vlmtune.models import tiny, tiny_tokenizer

    builder = b"".join(Path(m.__file__).read_bytes() for m in (tiny, tiny_tokenizer))
    key = hashlib.sha256(builder + transformers.__version__.encode()).hexdigest()[:10]
    return cached_dir(f"tiny-{arch}-seed{seed}-{key}", lambda d: tiny.build_tiny_checkpoint(d, arch=arch, seed=seed))


def best_of(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, object]:
    """(the fastest of `repeats` timed calls in seconds, the last result), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


def proc_status(field: str) -> int:
    """This process's `field` of /proc/self/status (VmRSS, VmHWM, RssAnon, ...) in bytes (Linux)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")
