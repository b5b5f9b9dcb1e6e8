"""`vlmtune doctor`: checks a run's configuration against the machine, the model and the data before it starts.

Each check returns a `Check(name, status, message, fix)`: status ok / warn / fail, a message that shows the
numbers it used and, unless ok, the fix. `vlmtune train` runs them first (`run_doctor: true`, the default) and
stops on any fail.

    checks = run_checks(cfg)                          # this machine, the model's config, the data
    checks = run_checks(cfg, device_info=DeviceInfo(kind="cuda", name="Tesla T4", ...))   # another machine

The checks, in order: versions, precision, workers, model, quantization, linear_attention, vision, data, video,
memory, distributed (with do_train: false: versions, precision, model, quantization, linear_attention, predict, and
data and video on eval_dataset). Everything that
needs the model's module tree uses a copy built on the meta device from its config, so no weight is loaded;
everything about the data uses the header-only accounting of `inspect` and the real fitting policies.
All facts about the hardware come from `probe_device()`, so each check can be tested with a made-up device.

The memory estimate (see `estimate_memory`) is per device, for the worst-case batch of the fitted data:
weights + gradients + AdamW states + activations (or the optimizer step's temporaries), plus the CUDA or Python
runtime. Its activation terms were measured on CPU runs of tiny models (bench/bench_doctor_memory.py).
"""

from __future__ import annotations

import os
from typing import Callable

from ...data.drivers.cache import check_folders
from .context import Context, load_context
from .environment import check_distributed, check_linear_attention, check_quantization, check_versions, check_workers
from .model import check_memory, check_model, check_predict, check_sharding, check_vision, suggest_batch
from .data import check_data, check_video, data_sections, read_data
from .precision import check_precision
from .device import DeviceInfo, probe_device
from .memory import MemoryEstimate, ModelFacts, estimate_memory, model_facts
from .report import Check, DoctorError, GiB, failures, format_checks, to_json


def run_checks(cfg, *, device_info: DeviceInfo | None = None, loaded=None, model=None,
               env: dict | None = None, progress: bool = False) -> list[Check]:
    """Every check of a config. `loaded`: the processor/config/spec (default: loaded from model_name_or_path);
    `model`: the *ForConditionalGeneration, on any device, read only (default: built on the meta device);
    `env`: the environment variables to read (WORLD_SIZE, LOCAL_RANK, ...; default: os.environ)."""
    check_folders(data_sections(cfg))  # overlapping output / prepared / data folders: refused before any work
    ctx = Context(cfg, device_info or probe_device(), env=dict(os.environ if env is None else env))
    load_context(ctx, loaded, model)
    read_data(ctx, progress)
    if not cfg.do_train:  # only predicting: the data read is eval_dataset, and no training check applies
        return [check_versions(ctx), check_precision(ctx), check_model(ctx), check_quantization(ctx),
                check_linear_attention(ctx), check_predict(ctx), check_data(ctx), check_video(ctx)]
    return [
        check_versions(ctx),
        check_precision(ctx),
        check_workers(ctx),
        check_model(ctx),
        check_quantization(ctx),
        check_linear_attention(ctx),
        check_vision(ctx),
        check_data(ctx),
        check_video(ctx),
        check_memory(ctx),
        check_distributed(ctx),
        check_sharding(ctx),
    ]


def check_or_raise(cfg, *, log: Callable[[str], None] = print, **kwargs) -> list[Check]:
    """What `vlmtune train` runs first: logs the warnings, raises DoctorError listing every failed check."""
    checks = run_checks(cfg, **kwargs)
    for c in checks:
        if c.status == "warn":
            log(f"doctor: warning: {c.name}: {c.message}; {c.fix}")
    failed = failures(checks)
    if failed:
        raise DoctorError(failed)
    return checks


__all__ = [
    "GiB", "Check", "DeviceInfo", "DoctorError", "MemoryEstimate", "ModelFacts", "check_or_raise", "estimate_memory",
    "failures", "format_checks", "model_facts", "probe_device", "run_checks", "suggest_batch", "to_json",
]
