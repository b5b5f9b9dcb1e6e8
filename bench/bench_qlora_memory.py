"""qlora_memory_ratio: the doctor's peak-memory estimate of a 4-bit (and 8-bit) QLoRA run vs the measured peak RSS of
a few CPU training steps, next to the same model trained unquantized (the baseline, measured in the same run).

The model is weight-dominated on purpose (hidden 1024, MLP 4096, 8 decoder layers, 256-token rows), so that the
quantized-weight term decides the estimate: in float32 its decoder linears take 464 MiB, in 4 bits 60 MiB.
It is built in code (bench_doctor_memory.model_config), saved once as a safetensors checkpoint, and each case
runs in a fresh process that loads it the way `vlmtune train` does (vlmtune.models.load.load_model: the
BitsAndBytesConfig of models/quant.py) and applies the run's finetuning (apply_finetuning: k-bit preparation,
LoRA on every linear layer), then takes optimizer steps as the Trainer does (AdamW, clipping, zero_grad).

Measured: the peak anonymous resident set (RssAnon, sampled every 2 ms by a thread) while training, minus the one
after the imports (the estimate's fixed `runtime` allowance stands for the latter, so it is left out of the
estimate too). Anonymous memory, because from_pretrained leaves the checkpoint file mapped (page cache, not what
the doctor estimates and reclaimable); the weights it left as views of that mapping are copied into anonymous
memory first, so every tensor is counted. As in bench_doctor_memory, glibc's mmap threshold is fixed so RSS
follows the tensors. Reported per case: `ratio` = (estimate - runtime) / measured; the doctor promises ±25%.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import proc_status
from bench_doctor_memory import FIXED_MALLOC, make_batch, model_config  # noqa: E402

MODEL = dict(arch="qwen2_vl", hidden=1024, intermediate=4096, layers=8, heads=8, kv_heads=2, vision_dim=256,
             vision_depth=2, batch=1, seq=256, image_tokens=64)
CASES = {
    "unquantized_fp32": {},
    "qlora_4bit": {"quantization_bit": 4},
    "qlora_8bit": {"quantization_bit": 8},
}
QUICK = ("unquantized_fp32", "qlora_4bit")
STEPS = 2


def checkpoint() -> Path:
    from _common import cached_dir

    def build(out: Path) -> None:
        import torch
        import transformers

        torch.manual_seed(0)
        model = transformers.AutoModelForImageTextToText.from_config(model_config(MODEL)).to(torch.float32)
        model.save_pretrained(out)

    return cached_dir("qlora-memory-ckpt-v1", build)


def run_config(keys: dict, ckpt: str):
    from vlmtune.config import load_config

    return load_config(None, base={"model_name_or_path": ckpt, "dataset": "bench", "output_dir": "bench",
                                   "cutoff_len": MODEL["seq"], "per_device_train_batch_size": MODEL["batch"],
                                   "gradient_accumulation_steps": 1, "gradient_checkpointing": False,
                                   "lora_target": "all", **keys})


def child(name: str, ckpt: str) -> dict:
    import warnings

    import torch
    import transformers

    import vlmtune.models.quant  # noqa: F401
    from vlmtune.models.load import apply_finetuning, load_model

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    if CASES[name].get("quantization_bit"):
        import bitsandbytes  # noqa: F401
    start = proc_status("RssAnon")
    cfg = run_config(CASES[name], ckpt)
    model = apply_finetuning(load_model(cfg.model, cfg.finetuning, dtype=torch.float32), cfg.finetuning)
    # from_pretrained may leave unquantized weights as views of the mmap-ed checkpoint (file pages, not anonymous
    # memory); copy them so that the anonymous resident set counts every tensor, whatever the loader did.
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if type(t).__name__ not in ("Params4bit", "Int8Params"):
                t.data = t.data.clone()
    gc.collect()
    mapped = sum(1 for line in open("/proc/self/maps", encoding="ascii", errors="replace") if "safetensors" in line)
    after_load = {k: proc_status(k) for k in ("RssAnon", "RssFile")}
    batch = make_batch(MODEL, model.config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc_status("RssAnon"))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(STEPS):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    stop.set()
    sampler.join()
    return {"start": start, "after_load": after_load, "mapped": mapped, "train_peak": peak[0], "loss": float(loss)}


def estimate(name: str, ckpt: str):
    from vlmtune.commands.doctor import estimate_memory, model_facts

    cfg = run_config(CASES[name], ckpt)
    facts = model_facts(model_config(MODEL), cfg)
    return estimate_memory(cfg, facts, "cpu", batch=MODEL["batch"], seq_len=MODEL["seq"],
                           image_tokens=MODEL["batch"] * MODEL["image_tokens"])


def run(quick: bool = False) -> dict:
    ckpt = str(checkpoint())
    results, worst = {}, 1.0
    for name in QUICK if quick else tuple(CASES):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name, "--ckpt", ckpt],
                              capture_output=True, text=True, check=False, env={**os.environ, **FIXED_MALLOC})
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        measured = m["train_peak"] - m["start"]
        est = estimate(name, ckpt)
        p = est.parts
        ratio = (est.total - p["runtime"]) / measured
        if name != "unquantized_fp32" and abs(ratio - 1) > abs(worst - 1):
            worst = ratio
        results[f"{name}.ratio"] = round(ratio, 3)
        results[f"{name}.measured_mib"] = round(measured / 2**20, 1)
        results[f"{name}.estimate_mib"] = round((est.total - p["runtime"]) / 2**20, 1)
        results[f"{name}.after_load_mib"] = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in m["after_load"].items())
        results[f"{name}.checkpoint_mappings_left"] = m["mapped"]
        results[f"{name}.parts_mib"] = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in p.items() if k != "runtime")
    return {"qlora_memory_ratio_worst": round(worst, 3), **results,
            "within_25_percent": "yes" if abs(worst - 1) <= 0.25 else "NO"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=sorted(CASES), help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.ckpt)))
        return 0
    for k, v in run(args.quick).items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
