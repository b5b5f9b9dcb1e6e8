"""inspect_vs_processor_speedup: header-only accounting vs running the real processor.

The data: a JSONL (sharegpt) dataset of N samples, each with 1-3 images of 100-900 px per side,
written once as realistic files (JPEG and PNG, a smooth photo-like picture plus sensor-like noise,
so that decoding costs what it costs on real photos) and cached between runs. A second, small
dataset has phone-photo sizes (JPEGs of 1500-4000 px per side) for context.

* vlmtune: `vlmtune.data.drivers.tally.account` on the JSONL file: read, validate (image headers only),
  render with the chat template, tokenize, grid arithmetic. The fastest of several whole calls.
* the processor: what LLaMA-Factory does to learn the grids: for every sample parse the record,
  render the chat template, open each image (`load_image`: decode + EXIF transpose + RGB), and run
  `processor(text=[...], images=[...], return_tensors="pt")`. Measured on the first samples only
  (it is slow), each sample's time the fastest of two passes.

The headline ratio compares CPU time per sample (`time.process_time`) with torch on one thread:
the work each side does, which the other jobs on a shared machine barely move. On a busy 2-core
machine torch's default two threads spin against the other jobs, and the processor's wall time
then swings 2-5x between runs; the wall-clock ratio with default threads is reported beside it,
for context only.

Both sides use the same checkpoint (the tiny qwen2_vl one: its real Qwen2-VL image processor and
chat template) with Qwen2-VL-2B-Instruct's shipped pixel bounds, min 56*56 and max 28*28*1280,
and the per-sample token counts of the two sides are checked to be equal.
"""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from _common import cached_dir, tiny_checkpoint

MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280
WORDS = (
    "the a red blue green picture image photo shows what is in this describe count how many left right top "
    "bottom of and cat dog car tree person table cup sky answer briefly detail there are two three"
).split()


def _photo(rng, noise, w: int, h: int):
    """A photo-like picture: a smooth random scene (bicubic from 8x6 colours) plus fine noise."""
    import numpy as np
    from PIL import Image

    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    y, x = rng.integers(0, noise.shape[0] - h), rng.integers(0, noise.shape[1] - w)
    arr = np.asarray(base, dtype=np.int16) + noise[y : y + h, x : x + w]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _write_dataset(root: Path, n: int, seed: int = 0, sides: tuple[int, int] = (100, 900), png_share: float = 0.3) -> None:
    import numpy as np

    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 5, (1024, 1024, 3)).astype(np.int16)
    if sides[1] >= 1024:
        reps = sides[1] // 1024 + 1
        noise = np.tile(noise.astype(np.int8), (reps, reps, 1))
    (root / "images").mkdir()
    with open(root / "data.jsonl", "w") as f:
        for i in range(n):
            images = []
            for j in range(rnd.randint(1, 3)):
                w, h = rnd.randint(*sides), rnd.randint(*sides)
                png = rnd.random() < png_share
                name = f"images/{i:05d}_{j}.{'png' if png else 'jpg'}"
                im = _photo(rng, noise, w, h)
                if png:
                    im.save(root / name, format="PNG")
                else:
                    im.save(root / name, format="JPEG", quality=90)
                images.append(name)
            question = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(4, 20)))
            answer = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(5, 60)))
            placeholders = "".join("<image>" for _ in images)
            messages = [{"role": "user", "content": placeholders + question}, {"role": "assistant", "content": answer}]
            if rnd.random() < 0.3:  # a follow-up turn
                messages += [
                    {"role": "user", "content": " ".join(rnd.choice(WORDS) for _ in range(8)) + "?"},
                    {"role": "assistant", "content": " ".join(rnd.choice(WORDS) for _ in range(20))},
                ]
            f.write(json.dumps({"id": f"s{i}", "messages": messages, "images": images}) + "\n")


def dataset(n: int) -> Path:
    return cached_dir(f"inspect-data-v1-n{n}", lambda d: _write_dataset(d, n))


def large_dataset(n: int) -> Path:
    """Phone-photo sizes: JPEGs of 1500-4000 px per side."""
    return cached_dir(f"inspect-data-large-v1-n{n}", lambda d: _write_dataset(d, n, sides=(1500, 4000), png_share=0.0))


def _hf_messages(record: dict) -> list[dict]:
    out = []
    for m in record["messages"]:
        parts = []
        for i, piece in enumerate(m["content"].split("<image>")):
            if i:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": m["role"], "content": parts})
    return out


def processor_lengths(processor, data: Path, limit: int, passes: int = 1):
    """len(input_ids) per sample the way a trainer learns it (decode every image, run the processor),
    and the time each sample took: the fastest of `passes` passes, wall clock and CPU."""
    from transformers.image_utils import load_image

    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    root = data.parent
    with open(data) as f:
        records = [json.loads(line) for _, line in zip(range(limit), f)]
    lengths: dict[str, int] = {}
    wall = [float("inf")] * len(records)
    cpu = [float("inf")] * len(records)
    for _ in range(passes):
        for i, record in enumerate(records):
            t, c = time.perf_counter(), time.process_time()
            text = processor.apply_chat_template(_hf_messages(record), tokenize=False)
            images = [load_image(os.path.join(root, p)) for p in record["images"]]
            enc = processor(text=[text], images=images, size=size, return_tensors="pt")
            lengths[record["id"]] = int(enc["input_ids"].shape[1])
            wall[i] = min(wall[i], time.perf_counter() - t)
            cpu[i] = min(cpu[i], time.process_time() - c)
    return lengths, sum(wall), sum(cpu)


class torch_threads:
    """torch.set_num_threads(n) inside the block, the previous count restored afterwards."""

    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self):
        import torch

        self.before = torch.get_num_threads()
        if self.n is not None:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.before)
        return False


def _timed_account(data: str, loaded):
    from vlmtune.models.grid import grid_for
    from vlmtune.data.drivers.tally import account

    grid_for.cache_clear()  # every timed run starts as cold as a fresh `vlmtune inspect`
    t, c = time.perf_counter(), time.process_time()
    acc = account(data, loaded, progress=False)
    return acc, time.perf_counter() - t, time.process_time() - c


def _inspect_times(data: Path, loaded, repeats: int):
    """(accounting, wall s, CPU s) of the fastest of `repeats` whole `account` calls, after a warm-up."""
    _timed_account(str(data), loaded)
    runs = [_timed_account(str(data), loaded) for _ in range(repeats)]
    return runs[-1][0], min(r[1] for r in runs), min(r[2] for r in runs)


def _check_equal(acc, theirs: dict[str, int]) -> dict[str, int]:
    assert not acc.problems, acc.problems[:3]
    ours = {e.id: e.tokens for e in acc.stats}
    mismatched = [k for k, v in theirs.items() if ours[k] != v]
    assert not mismatched, f"token counts differ from the processor for {mismatched[:5]}"
    return ours


def run(quick: bool) -> dict[str, float | str]:
    import torch

    from vlmtune.config import FitArgs
    from vlmtune.models.load import load_spec

    n = 200 if quick else 1000
    n_processor = 20 if quick else 100
    data = dataset(n) / "data.jsonl"
    loaded = load_spec(str(tiny_checkpoint("qwen2_vl")), FitArgs(image_min_pixels=MIN_PIXELS, image_max_pixels=MAX_PIXELS))
    assert (loaded.spec.min_pixels, loaded.spec.max_pixels) == (MIN_PIXELS, MAX_PIXELS)
    proc = loaded.processor
    default_threads = torch.get_num_threads()

    acc, t_inspect, c_inspect = _inspect_times(data, loaded, repeats=3 if quick else 5)
    assert len(acc.stats) == n
    processor_lengths(proc, data, 2)  # warm-up (lazy imports, first-call costs)
    with torch_threads(1):
        theirs, t_proc1, c_proc1 = processor_lengths(proc, data, n_processor, passes=2)
    ours = _check_equal(acc, theirs)
    theirs, t_proc, c_proc = processor_lengths(proc, data, n_processor, passes=2)  # default threads
    _check_equal(acc, theirs)

    out: dict[str, float | str] = {
        "inspect_vs_processor_speedup": round((c_proc1 / n_processor) / (c_inspect / n), 1),
        "inspect_cpu_ms_per_sample": round(1000 * c_inspect / n, 3),
        "processor_cpu_ms_per_sample_1_thread": round(1000 * c_proc1 / n_processor, 2),
        "inspect_samples_per_s": round(n / t_inspect, 1),
        "processor_samples_per_s_1_thread": round(n_processor / t_proc1, 2),
        f"processor_samples_per_s_{default_threads}_threads": round(n_processor / t_proc, 2),
        f"inspect_vs_processor_speedup_wall_{default_threads}_threads": round((t_proc / n_processor) / (t_inspect / n), 1),
        "samples": n,
        "processor_samples_timed": n_processor,
        "images_per_sample": round(sum(e.images for e in acc.stats) / n, 2),
        "tokens_per_sample": round(sum(ours.values()) / n, 1),
        "token_counts_equal": f"yes ({len(theirs)} samples compared)",
    }

    # Context: phone-photo sizes, where decoding and resizing dominate the processor's time.
    n_large, n_large_processor = (20, 4) if quick else (100, 10)
    large = large_dataset(n_large) / "data.jsonl"
    acc, _, c_inspect = _inspect_times(large, loaded, repeats=3)
    with torch_threads(1):
        theirs, _, c_proc1 = processor_lengths(proc, large, n_large_processor, passes=2)
    _check_equal(acc, theirs)
    out["inspect_vs_processor_speedup_1500_4000px"] = round((c_proc1 / n_large_processor) / (c_inspect / n_large), 1)
    out["processor_cpu_ms_per_sample_1500_4000px_1_thread"] = round(1000 * c_proc1 / n_large_processor, 1)
    return out
