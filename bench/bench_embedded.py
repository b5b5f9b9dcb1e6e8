"""embedded_vs_files_inspect: `inspect` on Parquet with embedded image bytes vs the same data as files.

The data: N samples (0-3 images each, JPEG and PNG of 100-700 px per side, photo-like noise so the
files weigh what photos weigh), written once in two forms and cached between runs:

* files: a sharegpt JSONL with image paths next to it (the layout vlmtune always read);
* embedded: the TRL / llava-instruct-mix layout in two Parquet shards of a Hub-layout folder
  (`data/train-0000k-of-00002.parquet`), the images as `{"bytes", "path"}` structs.

Each side runs `vlmtune.data.drivers.tally.account` (read, validate with header-only sizes, encode), the
fastest of several whole calls; the headline is samples/s embedded over samples/s files measured by
CPU time (`time.process_time`: the work each side does, which other jobs on a shared machine
barely move), goal >= 0.8 (embedded bytes cost no decode). The per-sample token counts of the two
sides are checked to be equal. Then `prepare` runs on the embedded dataset in a fresh process and
its peak RSS (ru_maxrss) is reported beside the same for the files, with the dataset's size on disk
for scale.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from _common import cached_dir, tiny_checkpoint

WORDS = "the a red blue picture photo shows what is in this describe count how many cat dog car tree".split()


def _image(rng, w: int, h: int, fmt: str) -> bytes:
    import numpy as np
    from PIL import Image

    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    arr = np.clip(np.asarray(base, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _build(n: int):
    def build(root: Path) -> None:
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        rnd, rng = random.Random(0), np.random.default_rng(0)
        (root / "files" / "media").mkdir(parents=True)
        (root / "embedded" / "data").mkdir(parents=True)
        lines, rows = [], []
        for i in range(n):
            k = i % 4
            blobs = []
            for j in range(k):
                fmt = "JPEG" if rnd.random() < 0.7 else "PNG"
                blob = _image(rng, rnd.randint(100, 700), rnd.randint(100, 700), fmt)
                name = f"media/{i}_{j}.{'jpg' if fmt == 'JPEG' else 'png'}"
                (root / "files" / name).write_bytes(blob)
                blobs.append((name, blob))
            q = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(4, 30))) + "?"
            a = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(2, 20))) + "."
            lines.append(json.dumps({"id": f"s{i}", "messages": [{"role": "user", "content": "<image>" * k + q},
                                                                 {"role": "assistant", "content": a}],
                                     "images": [nm for nm, _ in blobs]}))
            rows.append({"id": f"s{i}", "messages": [
                {"role": "user", "content": [*({"type": "image", "text": None} for _ in blobs), {"type": "text", "text": q}]},
                {"role": "assistant", "content": [{"type": "text", "text": a}]}],
                "images": [{"bytes": b, "path": None} for _, b in blobs]})
        (root / "files" / "data.jsonl").write_text("\n".join(lines) + "\n")
        half = n // 2
        for s, part in enumerate((rows[:half], rows[half:])):
            pq.write_table(pa.Table.from_pylist(part), root / "embedded" / "data" / f"train-{s:05d}-of-00002.parquet",
                           row_group_size=256)

    return build


def _account(data: str, loaded):
    from vlmtune.data.drivers.tally import account

    return account(data, loaded, progress=False)


def _best_cpu(fn, repeats: int):
    fn()
    best_cpu = best_wall = float("inf")
    result = None
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        result = fn()
        best_cpu, best_wall = min(best_cpu, time.process_time() - c), min(best_wall, time.perf_counter() - w)
    return best_cpu, best_wall, result


_PREPARE = """
import sys
from vlmtune.config import load_config
from vlmtune.data.drivers.prepare import prepare
cfg = load_config(None, [f"model_name_or_path={sys.argv[1]}", f"dataset={sys.argv[2]}", f"output_dir={sys.argv[3]}",
                         "cutoff_len=4096", "overwrite_cache=true"])
p = prepare(cfg.for_data(), progress=False)
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report the parent's peak
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(p.rows, hwm)
"""


def run(quick: bool = False) -> dict:
    from vlmtune.config import FitArgs
    from vlmtune.models.load import load_spec

    n = 400 if quick else 4000
    root = cached_dir(f"embedded-v1-{n}", _build(n))
    ckpt = tiny_checkpoint("qwen2_vl")
    loaded = load_spec(str(ckpt), FitArgs(image_min_pixels=56 * 56, image_max_pixels=28 * 28 * 1280))
    repeats = 2 if quick else 3
    files_cpu, files_wall, acc_f = _best_cpu(lambda: _account(str(root / "files" / "data.jsonl"), loaded), repeats)
    emb_cpu, emb_wall, acc_e = _best_cpu(lambda: _account(str(root / "embedded"), loaded), repeats)
    assert [(s.tokens, s.image_tokens) for s in acc_f.stats] == [(s.tokens, s.image_tokens) for s in acc_e.stats]
    assert len(acc_e.stats) == n and not acc_e.problems

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [os.environ.get("PYTHONPATH"), *sys.path] if p)}

    def prepare_rss(data: str, out_dir: Path) -> tuple[int, int]:
        res = subprocess.run([sys.executable, "-c", _PREPARE, str(ckpt), data, str(out_dir)],
                             capture_output=True, text=True, env=env, check=True)
        rows, rss = (int(x) for x in res.stdout.split()[-2:])
        return rows, rss

    out_dir = root.parent / f"embedded-prepare-{os.getpid()}"
    rows, rss_kib = prepare_rss(str(root / "embedded"), out_dir)
    _, files_rss_kib = prepare_rss(str(root / "files" / "data.jsonl"), root.parent / f"files-prepare-{os.getpid()}")
    size = sum(f.stat().st_size for f in (root / "embedded" / "data").iterdir())
    prepared = sum(f.stat().st_size for f in (out_dir / "prepared").rglob("*") if f.is_file())
    return {
        "embedded_vs_files_inspect_samples_per_cpu_s": round(files_cpu / emb_cpu, 3),
        "embedded_vs_files_inspect_wall": round(files_wall / emb_wall, 3),
        "samples": n,
        "files_samples_per_cpu_s": round(n / files_cpu, 1),
        "embedded_samples_per_cpu_s": round(n / emb_cpu, 1),
        "prepare_peak_rss_mib": round(rss_kib / 1024, 1),
        "prepare_peak_rss_files_mib": round(files_rss_kib / 1024, 1),
        "parquet_mib": round(size / 2**20, 1),
        "prepared_mib": round(prepared / 2**20, 2),
        "prepared_rows": rows,
    }


if __name__ == "__main__":
    for k, v in run("--quick" in sys.argv).items():
        print(f"{k}: {v}")
