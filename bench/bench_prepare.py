"""prepare_samples_per_s: marginal throughput of `vlmtune prepare`, at 1 and 2 workers.

The data is the inspect benchmark's: samples of 1-3 images of 100-900 px (JPEG and PNG files),
here with cutoff_len 4096 and Qwen2-VL-2B-Instruct's pixel bounds. Marginal throughput is
(N_big - N_small) / (t(N_big) - t(N_small)), so start-up (imports, processor loading, worker
start) is excluded. Nothing is cached between runs (overwrite_cache=true). The reference point
from the issue: LLaMA-Factory 0.9.5 preprocesses this kind of data at about 45 samples/s with one
worker on this machine class; the goal is >= 900 samples/s per worker.

prepare_pixel_check_cost (issue 21): prepare decodes every image (JPEG at 1/8 scale, other formats fully) so
that pixels that cannot be decoded are a skippable bad sample instead of a crash mid-training. Its cost is the
1-worker throughput without that decode (validate.check_decodes replaced by a no-op, in this same run) over the
throughput with it.
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import tempfile
import time

from _common import tiny_checkpoint
from bench_inspect import MAX_PIXELS, MIN_PIXELS, dataset


def _time_prepare(model, data, n: int, workers: int) -> float:
    from vlmtune.config import load_config
    from vlmtune.data.drivers.prepare import prepare

    out = tempfile.mkdtemp(prefix="vlmtune-bench-prepare-")
    try:
        cfg = load_config(None, [
            f"model_name_or_path={model}", f"dataset={data}", f"output_dir={out}", "cutoff_len=4096",
            f"image_max_pixels={MAX_PIXELS}", f"image_min_pixels={MIN_PIXELS}", f"max_samples={n}",
            f"preprocessing_num_workers={workers}", "overwrite_cache=true",
        ])
        t = time.perf_counter()
        prep = prepare(cfg.for_data(), progress=False)
        elapsed = time.perf_counter() - t
        assert prep.rows == n, (prep.rows, n)
        return elapsed
    finally:
        shutil.rmtree(out, ignore_errors=True)


@contextlib.contextmanager
def _no_pixel_decode():
    """The baseline of prepare_pixel_check_cost: validation without decoding the pixels (1 worker: in-process)."""
    from vlmtune.data.stages import validate

    real = validate.check_decodes
    validate.check_decodes = lambda source: None
    try:
        yield
    finally:
        validate.check_decodes = real


def _rate(model, data, small: int, big: int, workers: int) -> float:
    _time_prepare(model, data, small, workers)  # warm the page cache and imports
    t_small = min(_time_prepare(model, data, small, workers) for _ in range(2))
    t_big = min(_time_prepare(model, data, big, workers) for _ in range(2))
    return (big - small) / (t_big - t_small)


def run(quick: bool) -> dict[str, float | str]:
    big, small = (600, 60) if quick else (2000, 200)
    model = tiny_checkpoint("qwen2_vl")
    data = dataset(big) / "data.jsonl"
    results: dict[str, float | str] = {}
    rates = {workers: _rate(model, data, small, big, workers) for workers in (1, 2)}
    with _no_pixel_decode():
        header_only = _rate(model, data, small, big, 1)
    results["prepare_samples_per_s_1_worker"] = round(rates[1], 1)
    results["prepare_pixel_check_cost"] = round(header_only / rates[1], 2)
    results["prepare_samples_per_s_1_worker_header_only"] = round(header_only, 1)
    results["prepare_samples_per_s_2_workers"] = round(rates[2], 1)
    results["prepare_2_vs_1_worker_ratio"] = round(rates[2] / rates[1], 2)
    results["prepare_vs_llamafactory_45_per_s"] = round(rates[1] / 45.0, 1)
    results["prepare_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    results["prepare_samples"] = f"{small} and {big} samples of 1-3 images, cutoff_len 4096"
    return results
