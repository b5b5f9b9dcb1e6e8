"""prepare_scale: peak memory of `prepare` against the dataset size, worker scaling, inspect's memory.

The data: JSONL (sharegpt) of N samples with 1-3 images each, taken from a pool of 48 photo-like files
(JPEG and PNG, 100-900 px per side, so each sample's image tokens vary), and ~500 words of text: about
1,000 tokens per sample with the tiny qwen2_vl checkpoint and Qwen2-VL-2B-Instruct's pixel bounds.
Every measurement runs in a fresh subprocess (`python bench/bench_prepare_scale.py one ...`) so that
its peak RSS is its own: ru_maxrss of the process (reading, writing, and the worker when there is one),
and of its largest child (a worker process) when workers > 1.

* prepare_rss_ratio_200k_vs_20k (headline): peak RSS at 200,000 samples / at 20,000 (goal <= 1.3).
* prepare_2_vs_1_worker_ratio: samples/s (wall) at 2 workers / at 1 worker on 20,000 samples (goal >= 1.6
  on 2 idle cores; the machine these figures come from is shared, so CPU time is reported beside it).
* inspect_peak_rss_mb_200k: `vlmtune inspect` (account + summarize) on the 200,000 records (goal <= 500 MB).
* `--million`: 1,000,000 samples of short text and one reused image, prepared once: time and peak RSS.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from _common import cached_dir, tiny_checkpoint  # noqa: E402
from bench_inspect import MAX_PIXELS, MIN_PIXELS, WORDS, _photo  # noqa: E402


def _pool(root: Path, k: int = 48, seed: int = 0) -> list[str]:
    import numpy as np

    rnd, rng = random.Random(seed), np.random.default_rng(seed)
    noise = rng.normal(0, 5, (1024, 1024, 3)).astype(np.int16)
    (root / "images").mkdir(exist_ok=True)
    names = []
    for j in range(k):
        w, h = rnd.randint(100, 900), rnd.randint(100, 900)
        name = f"images/{j:03d}.{'png' if j % 3 == 0 else 'jpg'}"
        _photo(rng, noise, w, h).save(root / name)
        names.append(name)
    return names


def _write(root: Path, n: int, short: bool) -> None:
    names = _pool(root)
    rnd = random.Random(n)
    words = len(WORDS)
    with open(root / "data.jsonl", "w") as f:
        for i in range(n):
            k = 1 if short else rnd.randint(1, 3)
            images = [names[rnd.randrange(len(names))] for _ in range(k)]
            q = " ".join(WORDS[rnd.randrange(words)] for _ in range(rnd.randint(4, 12) if short else rnd.randint(100, 300)))
            a = " ".join(WORDS[rnd.randrange(words)] for _ in range(rnd.randint(4, 12) if short else rnd.randint(100, 400)))
            msgs = [{"role": "user", "content": "<image>" * k + q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"id": f"s{i}", "messages": msgs, "images": images}) + "\n")


def data(n: int, short: bool = False) -> Path:
    return cached_dir(f"prepare-scale-v1-n{n}{'-short' if short else ''}", lambda d: _write(d, n, short)) / "data.jsonl"


def one(what: str, data_path: str, n: int, workers: int, short: bool) -> dict:
    """One measurement in this (fresh) process."""
    model = tiny_checkpoint("qwen2_vl")
    t, c = time.perf_counter(), time.process_time()
    if what == "prepare":
        from vlmtune.config import load_config
        from vlmtune.data.drivers.prepare import prepare

        out = tempfile.mkdtemp(prefix="vlmtune-bench-scale-")
        cfg = load_config(None, [
            f"model_name_or_path={model}", f"dataset={data_path}", f"output_dir={out}",
            f"cutoff_len={512 if short else 4096}", f"image_max_pixels={MAX_PIXELS // (16 if short else 1)}",
            f"image_min_pixels={MIN_PIXELS}", f"preprocessing_num_workers={workers}", "overwrite_cache=true",
        ])
        prep = prepare(cfg.for_data(), progress=False)
        result = {"rows": prep.rows, "records": prep.records, "fates": prep.fates}
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    else:
        from vlmtune.data.drivers.tally import account, summarize
        from vlmtune.config import FitArgs
        from vlmtune.models.load import load_spec

        loaded = load_spec(str(model), FitArgs(image_min_pixels=MIN_PIXELS, image_max_pixels=MAX_PIXELS))
        s = summarize(account(data_path, loaded, progress=False, workers=workers))
        result = {"samples": s["samples"], "tokens": s["tokens"], "records": s["records"]}
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    # workers are the forkserver's children (data/drivers/pipeline.worker_pool): stop it so that its usage and its
    # reaped workers' are counted in this process's RUSAGE_CHILDREN
    from multiprocessing import forkserver

    forkserver._forkserver._stop()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {**result, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "cpu_children_s": round(kids.ru_utime + kids.ru_stime, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_rss_child_mb": round(kids.ru_maxrss / 1024, 1)}


def measure(what: str, n: int, workers: int = 1, short: bool = False) -> dict:
    path = data(n, short)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, __file__, "one", what, str(path), str(n), str(workers), str(int(short))],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool) -> dict[str, float | str]:
    small, big = (2000, 20000) if quick else (20000, 200000)
    r_small = measure("prepare", small)
    r_big = measure("prepare", big)
    w1 = r_small
    w2 = measure("prepare", small, workers=2)
    ins = measure("inspect", big)
    return {
        "prepare_rss_ratio_200k_vs_20k": round(r_big["peak_rss_mb"] / r_small["peak_rss_mb"], 2),
        "prepare_peak_rss_mb": f"{r_small['peak_rss_mb']} at {small}, {r_big['peak_rss_mb']} at {big}",
        "prepare_samples_per_s": f"{small / w1['wall_s']:.0f} (1 worker), {small / w2['wall_s']:.0f} (2 workers)",
        "prepare_2_vs_1_worker_ratio": round(w1["wall_s"] / w2["wall_s"], 2),
        "prepare_cpu_s": f"1 worker: {w1['cpu_s']} main; 2 workers: {w2['cpu_s']} main + {w2['cpu_children_s']} "
                         f"workers (peak {w2['peak_rss_mb']} / {w2['peak_rss_child_mb']} MB)",
        "inspect_peak_rss_mb_200k": ins["peak_rss_mb"],
        "inspect_wall_s_200k": ins["wall_s"],
        "rows": f"{r_small['rows']} / {r_big['rows']}",
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["one"]:
        what, path, n, workers, short = sys.argv[2:7]
        print(json.dumps(one(what, path, int(n), int(workers), bool(int(short)))))
    elif sys.argv[1:2] == ["--million"]:
        print(json.dumps(measure("prepare", 1_000_000, int(sys.argv[2]) if len(sys.argv) > 2 else 1, short=True)))
    elif sys.argv[1:2] == ["--measure"]:  # --measure prepare|inspect N WORKERS
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    else:
        for k, v in run("--quick" in sys.argv).items():
            print(f"{k}: {v}")
