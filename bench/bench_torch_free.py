"""torch_free (issue 26): what the torch-free data path buys at start-up, per worker and for the whole prepare.

Every figure comes from fresh processes, each against a baseline measured in the same run. Each child's own
wall time, CPU time (user + system) and peak RSS are read with os.wait4 (its rusage alone; the workers of a
prepare are the forkserver's children and are counted in that server's rusage, which the bench reads after the
server exits: `one` in bench_prepare_scale.py).

* startup: `vlmtune inspect` on the 6-sample example (examples/data, mllm_demo) against `python -c "import torch,
  transformers"`, interleaved, `repeats` each; the median of the per-pair ratios (wall and CPU) and the
  largest peak RSS. `inspect --trust-remote-code` takes transformers' processor (the path before issue 26), as
  context. Goals: wall <= 0.25 of the import; peak RSS <= 150 MB.
* prepare_whole: `vlmtune prepare` as a user runs it (a fresh process, config file, imports and all) on the
  inspect benchmark's first 2,000 samples, 1 worker; against LLaMA-Factory's ~45 samples/s on this data
  (docs/benchmarks.md: the reference figure from the issue, not re-measured here: no LLaMA-Factory environment
  on this machine), i.e. 2,000 / 45 = 44.4 s. Goal >= 10x.
* workers: bench_prepare_scale's 20,000-sample prepare at 1 and 2 workers (TOKENIZERS_PARALLELISM=false, so
  that one worker is one core), twice each. On a shared machine wall time measures the other jobs, so the
  ratio is computed from CPU time: with 2 idle cores, 1 worker takes its CPU time T1 and 2 workers at least
  max(main, workers / 2, (main + workers) / 2). Goal >= 1.6x; worker peak RSS <= 200 MB.
* inspect_200k: `account` + `summarize` on 200,000 records (bench_prepare_scale's data), peak RSS. Goal <= 500 MB.

    python bench/bench_torch_free.py [startup|prepare_whole|workers|inspect_200k ...]
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
ROOT = HERE.parent

LLAMAFACTORY_SAMPLES_PER_S = 45.0  # docs/benchmarks.md, "prepare": the LLaMA-Factory 0.9.5 figure


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)


def _descendants(root: int) -> list[int]:
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = [], [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def _sample(pid: int) -> tuple[float, float] | None:
    """(CPU s, VmHWM MB) of a live process: its own, read from /proc (not its rusage, which on Linux also
    carries the RSS of the process it was forked from, a bench that imported transformers)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, hwm / 1024


def run_child(argv: list[str], period: float = 0.02, **env) -> dict:
    """Wall s, CPU s and peak RSS MB of one fresh process and, apart, of its descendants (worker processes),
    sampled from /proc every `period` s until it exits (VmHWM only grows, so the last sample is the peak but
    for what the last `period` adds; the CPU of the main process comes from wait4)."""
    t = time.perf_counter()
    p = subprocess.Popen(argv, env=_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    main_hwm, kids = 0.0, {}
    while p.poll() is None:
        s = _sample(p.pid)
        if s is not None:
            main_hwm = max(main_hwm, s[1])
        for k in _descendants(p.pid):
            s = _sample(k)
            if s is not None:
                kids[k] = s
        time.sleep(period)
    wall = time.perf_counter() - t
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    if p.returncode != 0:
        raise RuntimeError(f"{argv} failed ({p.returncode}): {err[-2000:]}")
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # cumulative: the difference is this child's
    cpu = ru.ru_utime + ru.ru_stime - run_child.cpu_seen
    run_child.cpu_seen += cpu
    return {"wall": wall, "cpu": cpu, "rss": main_hwm, "stderr": err,
            "workers_cpu": sum(c for c, _ in kids.values()), "workers_rss": max((r for _, r in kids.values()), default=0.0),
            "workers": len(kids)}


run_child.cpu_seen = sum(getattr(resource.getrusage(resource.RUSAGE_CHILDREN), k) for k in ("ru_utime", "ru_stime"))


def startup(repeats: int = 7) -> dict:
    from _common import tiny_checkpoint

    model = str(tiny_checkpoint("qwen2_vl"))
    inspect = [sys.executable, "-m", "vlmtune", "inspect", "--model", model, "--data", "mllm_demo",
               "--dataset-dir", str(ROOT / "examples" / "data")]
    baseline = [sys.executable, "-c", "import torch, transformers"]
    runs: dict[str, list[dict]] = {"inspect": [], "import": [], "old": []}
    run_child(baseline), run_child(inspect)  # warm the page cache
    for _ in range(repeats):
        runs["import"].append(run_child(baseline))
        runs["inspect"].append(run_child(inspect))
        runs["old"].append(run_child(inspect + ["--trust-remote-code"]))
    noise = [r["stderr"] for r in runs["inspect"] if r["stderr"].strip()]

    def ratio(key: str, a: str = "inspect") -> float:
        return round(statistics.median(x[key] / y[key] for x, y in zip(runs[a], runs["import"])), 3)

    def med(a: str, key: str) -> float:
        return round(statistics.median(r[key] for r in runs[a]), 3)

    return {
        "inspect_wall_vs_import_torch_transformers": ratio("wall"),
        "inspect_cpu_vs_import_torch_transformers": ratio("cpu"),
        "inspect_peak_rss_mb": round(max(r["rss"] for r in runs["inspect"]), 1),
        "import_torch_transformers_peak_rss_mb": round(max(r["rss"] for r in runs["import"]), 1),
        "inspect_wall_s / cpu_s (median)": f"{med('inspect', 'wall')} / {med('inspect', 'cpu')}",
        "import_torch_transformers_wall_s / cpu_s (median)": f"{med('import', 'wall')} / {med('import', 'cpu')}",
        "inspect_through_transformers_processor (before): wall ratio, peak RSS MB":
            f"{ratio('wall', 'old')}, {round(max(r['rss'] for r in runs['old']), 1)}",
        "inspect_stderr_lines": sum(len(s.splitlines()) for s in noise),
        "startup_repeats": repeats,
    }


def prepare_whole(n: int = 2000, repeats: int = 3) -> dict:
    from _common import tiny_checkpoint
    from bench_inspect import MAX_PIXELS, MIN_PIXELS, dataset

    model = tiny_checkpoint("qwen2_vl")
    data = dataset(n) / "data.jsonl"
    runs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="vlmtune-bench-whole-") as out:
            cfg = Path(out) / "c.yaml"
            cfg.write_text(f"model_name_or_path: {model}\ndataset: {data}\noutput_dir: {out}/run\ncutoff_len: 4096\n"
                           f"image_max_pixels: {MAX_PIXELS}\nimage_min_pixels: {MIN_PIXELS}\n"
                           "preprocessing_num_workers: 1\noverwrite_cache: true\n")
            runs.append(run_child([sys.executable, "-m", "vlmtune", "prepare", str(cfg)]))
    lf = n / LLAMAFACTORY_SAMPLES_PER_S
    best = min(r["wall"] for r in runs)
    return {
        "prepare_whole_process_vs_llamafactory": round(lf / best, 1),
        "prepare_whole_process_vs_llamafactory (median wall)": round(lf / statistics.median(r["wall"] for r in runs), 1),
        "prepare_whole_process_vs_llamafactory (CPU s)": round(lf / min(r["cpu"] for r in runs), 1),
        "prepare_whole_wall_s (best, median)": f"{round(best, 2)}, {round(statistics.median(r['wall'] for r in runs), 2)}",
        "prepare_whole_cpu_s (best)": round(min(r["cpu"] for r in runs), 2),
        "prepare_whole_peak_rss_mb": round(max(r["rss"] for r in runs), 1),
        "llamafactory_reference_s": f"{round(lf, 1)} ({n} samples at {LLAMAFACTORY_SAMPLES_PER_S}/s, not re-measured)",
    }


def _prepare_cmd(out: str, data: Path, n: int, worker_count: int) -> list[str]:
    from _common import tiny_checkpoint
    from bench_prepare_scale import MAX_PIXELS, MIN_PIXELS

    cfg = Path(out) / "c.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_checkpoint('qwen2_vl')}\ndataset: {data}\noutput_dir: {out}/run\n"
                   f"cutoff_len: 4096\nimage_max_pixels: {MAX_PIXELS}\nimage_min_pixels: {MIN_PIXELS}\n"
                   f"preprocessing_num_workers: {worker_count}\noverwrite_cache: true\nmax_samples: {n}\n")
    return [sys.executable, "-m", "vlmtune", "prepare", str(cfg)]


def workers(n: int = 20000, repeats: int = 2) -> dict:
    import bench_prepare_scale as scale

    data = scale.data(n)
    one, two = [], []
    for _ in range(repeats):
        for runs, w in ((one, 1), (two, 2)):
            with tempfile.TemporaryDirectory(prefix="vlmtune-bench-workers-") as out:
                # one worker is one core: the main process's Rust tokenizer would otherwise use a second
                runs.append(run_child(_prepare_cmd(out, data, n, w), period=0.1, TOKENIZERS_PARALLELISM="false"))
    t1 = min(r["cpu"] for r in one)
    bounds = [max(r["cpu"], r["workers_cpu"] / 2, (r["cpu"] + r["workers_cpu"]) / 2) for r in two]
    return {
        "prepare_2_vs_1_worker_cpu_bound": round(t1 / min(bounds), 2),
        "prepare_worker_peak_rss_mb": round(max(r["workers_rss"] for r in two), 1),
        "prepare_main_peak_rss_mb (1 worker, 2 workers)": f"{round(max(r['rss'] for r in one), 1)}, "
                                                          f"{round(max(r['rss'] for r in two), 1)}",
        "one_worker_cpu_s": [round(r["cpu"], 1) for r in one],
        "two_workers_cpu_s main + workers (incl. the forkserver)":
            [f"{round(r['cpu'], 1)} + {round(r['workers_cpu'], 1)}" for r in two],
        "wall_s 1 worker / 2 workers (context: shared machine)":
            f"{[round(r['wall'], 1) for r in one]} / {[round(r['wall'], 1) for r in two]}",
        "samples": n,
    }


def inspect_200k(n: int = 200000, worker_count: int = 1) -> dict:
    import bench_prepare_scale as scale
    from _common import tiny_checkpoint

    data = scale.data(n)
    r = run_child([sys.executable, "-m", "vlmtune", "inspect", "--model", str(tiny_checkpoint("qwen2_vl")),
                   "--data", str(data), "--image-max-pixels", str(scale.MAX_PIXELS), "--image-min-pixels",
                   str(scale.MIN_PIXELS), "--json", "--preprocessing-num-workers", str(worker_count)], period=0.2)
    return {"inspect_peak_rss_mb_200k": round(r["rss"], 1),
            "inspect_200k_wall_s / cpu_s": f"{round(r['wall'], 1)} / {round(r['cpu'], 1)} (+ workers "
                                           f"{round(r['workers_cpu'], 1)}, peak {round(r['workers_rss'], 1)} MB)",
            "samples": n, "workers": worker_count}


PARTS = {"startup": startup, "prepare_whole": prepare_whole, "workers": workers, "inspect_200k": inspect_200k}


def run(quick: bool) -> dict[str, float | str]:
    out: dict = {}
    out.update(startup(3 if quick else 7))
    out.update(prepare_whole(2000, 1 if quick else 3))
    out.update(workers(2000 if quick else 20000, 1 if quick else 2))
    if not quick:
        out.update(inspect_200k())
    return out


if __name__ == "__main__":
    for part in sys.argv[1:] or list(PARTS):
        name, _, arg = part.partition("=")
        result = PARTS[name](*map(int, arg.split(","))) if arg else PARTS[name]()
        for k, v in result.items():
            print(f"{k}: {v}", flush=True)
