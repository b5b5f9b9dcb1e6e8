"""Run vlmtune's benchmarks on tiny checkpoints on the CPU and print `name: value` lines.

    python bench/run.py                  # every benchmark
    python bench/run.py --only inspect   # one benchmark (its name in BENCHMARKS)
    python bench/run.py --quick          # smaller data, fewer repeats (a smoke run)

Each benchmark is a module in this folder exporting `run(quick: bool) -> dict[str, float | str]`
whose first entry is its headline figure (usually a ratio against a baseline measured in the
same run); the other entries are absolute figures for context. To add one, write
`bench/bench_<name>.py` and add `("<name>", "bench_<name>")` to BENCHMARKS. Record results in
docs/benchmarks.md. Data and tiny checkpoints are cached under $VLMTUNE_BENCH_CACHE (default:
<tmp>/vlmtune-bench).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

# (name, module): module.run(quick) -> {metric: value}.
BENCHMARKS: list[tuple[str, str]] = [
    ("inspect", "bench_inspect"),
    ("prepare", "bench_prepare"),
    ("pack", "bench_pack"),
    ("pack_hybrid", "bench_pack_hybrid"),
    ("doctor_memory", "bench_doctor_memory"),
    ("config_import", "bench_config_import"),
    ("video_facts", "bench_video_facts"),
    ("qlora_memory", "bench_qlora_memory"),
    ("embedded", "bench_embedded"),
    ("moe_memory", "bench_moe_memory"),
    ("torch_free", "bench_torch_free"),
    ("predict", "bench_predict"),
]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", metavar="NAME", help="run only this benchmark (repeatable)")
    p.add_argument("--quick", action="store_true", help="smaller data and fewer repeats")
    args = p.parse_args(argv)
    names = [n for n, _ in BENCHMARKS]
    selected = [(n, m) for n, m in BENCHMARKS if not args.only or n in args.only]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(names)}")
    failed = 0
    for name, module in selected:
        t = time.perf_counter()
        try:
            results = importlib.import_module(module).run(quick=args.quick)
        except Exception as e:  # one broken benchmark must not hide the others
            failed += 1
            print(f"{name}: FAILED ({type(e).__name__}: {e})", flush=True)
            continue
        for key, value in results.items():
            print(f"{key}: {_fmt(value)}", flush=True)
        print(f"{name}.wall_s: {time.perf_counter() - t:.1f}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
