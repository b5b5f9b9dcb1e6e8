"""GPU benchmark: FSDP2 and DeepSpeed ZeRO-3 steps of `vlmtune train` on a real-size Qwen2-VL-2B (random weights),
with mixed batches (text-only, image, video, image + video rows), so that ranks hold different modalities.

    python bench/gpu_sharded_2b.py                   # on a CUDA machine with 2+ GPUs (a few minutes)
    python bench/gpu_sharded_2b.py --tiny --steps 2  # a dry run on 2 gloo CPU ranks with the tiny checkpoint

For each case (fsdp2: `fsdp: full_shard auto_wrap`; zero3: `deepspeed:` a ZeRO-3 JSON) it runs `torchrun
--nproc_per_node N -m vlmtune train`'s recipe with bf16 (GPU), full fine-tuning of the language model and the
projector, and prints per rank: seconds per optimizer step (median of the steps after the first), peak memory
(torch.cuda.max_memory_allocated on a GPU, VmHWM on the CPU), and MFU = achieved FLOP/s / the GPU's peak dense
bf16 FLOP/s, with a step's FLOPs counted as 6 · N_llm · tokens + 2 · N_vision · patches (the frozen tower runs
forward only; attention's quadratic terms left out, the usual convention). A case that does not finish in
--timeout seconds is reported as a hang. No weights are downloaded: the 2B architecture is built from its
published config; the tokenizer and processor are the tiny checkpoint's (vlmtune tiny-model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}

NODE = r"""
import json, os, statistics, sys, time
import torch
from transformers import TrainerCallback
from vlmtune.config import load_config
from vlmtune.train import recipe
from vlmtune.train.trainer import VlmTrainer

counts = {"tokens": 0, "patches": 0}
_loss = VlmTrainer.compute_loss
def compute_loss(self, model, inputs, *a, **k):
    counts["tokens"] += int(inputs["input_ids"].numel())
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            counts["patches"] += int(inputs[key].shape[0])
    return _loss(self, model, inputs, *a, **k)
VlmTrainer.compute_loss = compute_loss

class Steps(TrainerCallback):
    def __init__(self):
        self.times, self.t0 = [], None
    def on_step_begin(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.t0)

cfg = load_config(None, sys.argv[1:])
run = recipe.setup(cfg, progress=False)
steps = Steps()
run.trainer.add_callback(steps)
model = run.trainer.model
n_vis = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}")
n_llm = sum(p.numel() for n, p in model.named_parameters()) - n_vis
result = recipe.train(run)
recipe.cleanup(run)
if torch.cuda.is_available():
    peak = torch.cuda.max_memory_allocated()
else:
    with open("/proc/self/status") as f:
        peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
later = steps.times[1:] or steps.times
print("RESULT " + json.dumps({"rank": int(os.environ["RANK"]), "step_s": statistics.median(later),
      "steps": result.global_step, "peak": peak, "tokens": counts["tokens"], "patches": counts["patches"],
      "n_llm": n_llm, "n_vis": n_vis, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}),
      flush=True)
"""

ZERO3 = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "gradient_clipping": "auto", "zero_allow_untested_optimizer": True, "bf16": {"enabled": "auto"},
         "fp16": {"enabled": "auto"},
         "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                               "stage3_gather_16bit_weights_on_model_save": True}}


def checkpoint(tiny: bool, work: Path) -> Path:
    """The tiny checkpoint (--tiny), or a random Qwen2-VL-2B with the tiny checkpoint's tokenizer and processor."""
    from _common import tiny_checkpoint

    small = tiny_checkpoint("qwen2_vl")
    if tiny:
        return small
    import torch
    import transformers

    from gpu_qwen2vl_2b import qwen2vl_2b_config

    config = qwen2vl_2b_config(tiny=False)
    ids = json.loads((small / "config.json").read_text())
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        setattr(config, key, ids[key])  # the tiny tokenizer's ids for the vision tokens
    out = work / "qwen2vl-2b-random"
    torch.manual_seed(0)
    transformers.Qwen2VLForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(out)
    for f in small.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


def mixed_data(folder: Path, rows: int) -> str:
    """Sharegpt JSONL cycling text-only, image, video, image + video rows (448 px images, 8-frame clips)."""
    import av
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for k in range(rows):
        kind = ("t", "i", "v", "iv")[k % 4]
        rec = {"messages": [{"role": "user", "content": "Describe it in one long sentence, please."},
                            {"role": "assistant", "content": f"Row {k}: " + "a detailed answer " * 40}]}
        prefix = ""
        if "i" in kind:
            Image.fromarray(np.full((448, 448, 3), (k * 37) % 255, np.uint8)).save(folder / f"{k}.png")
            rec["images"], prefix = [f"{k}.png"], "<image>"
        if "v" in kind:
            out = av.open(str(folder / f"{k}.mp4"), "w")
            s = out.add_stream("mpeg4", rate=Fraction(4))
            s.width = s.height = 224
            s.pix_fmt = "yuv420p"
            for i in range(8):
                frame = av.VideoFrame.from_ndarray(np.full((224, 224, 3), (i * 30) % 255, np.uint8), format="rgb24")
                for p in s.encode(frame):
                    out.mux(p)
            for p in s.encode():
                out.mux(p)
            out.close()
            rec["videos"], prefix = [f"{k}.mp4"], prefix + "<video>"
        rec["messages"][0]["content"] = prefix + rec["messages"][0]["content"]
        lines.append(json.dumps(rec))
    path = folder / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run_case(case: str, ckpt: Path, data: str, work: Path, a) -> dict:
    import socket

    import torch

    gpu = torch.cuda.is_available()
    nproc = a.nproc or (torch.cuda.device_count() if gpu else 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (work / "node.py").write_text(NODE)
    keys = {"model_name_or_path": str(ckpt), "dataset": data, "output_dir": str(work / case),
            "cutoff_len": 1024, "finetuning_type": "full", "max_steps": a.steps, "per_device_train_batch_size": 1,
            "gradient_accumulation_steps": 1, "logging_steps": 1, "save_steps": 100_000, "report_to": "none",
            "seed": 0, "run_doctor": "false", "bf16": str(gpu).lower(), "ddp_timeout": a.timeout,
            "image_max_pixels": 448 * 448, "video_max_pixels": 224 * 224, "video_fps": 2.0}
    if case == "fsdp2":
        keys["fsdp"] = "full_shard auto_wrap"
    else:
        ds = work / "ds_z3.json"
        ds.write_text(json.dumps(ZERO3))
        keys["deepspeed"] = str(ds)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
    if not gpu:
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), str(work / "node.py"), *(f"{k}={v}" for k, v in keys.items())]
    try:
        out = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result in {a.timeout} s: a hang or too slow"}
    res = {r["rank"]: r for r in (json.loads(x[7:]) for x in out.stdout.splitlines() if x.startswith("RESULT "))}
    if out.returncode or len(res) != nproc:
        return {"error": (out.stdout + out.stderr)[-3000:]}
    return res


def report(case: str, res: dict) -> None:
    if "error" in res:
        print(f"{case}: FAILED: {res['error']}")
        return
    for rank, r in sorted(res.items()):
        peak_flops = next((v for k, v in PEAK_BF16.items() if k in r["device"]), None)
        flops = (6 * r["n_llm"] * r["tokens"] + 2 * r["n_vis"] * r["patches"]) / max(1, r["steps"])
        mfu = f"{flops / r['step_s'] / peak_flops:.1%}" if peak_flops else "n/a (not a GPU in the table)"
        print(f"{case} rank {rank}: step_time_s: {r['step_s']:.3f}  peak_memory_gib: {r['peak'] / 1024**3:.2f}  "
              f"mfu: {mfu}  steps: {r['steps']}  device: {r['device']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny checkpoint on 2 gloo CPU ranks (a dry run)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--nproc", type=int, default=0, help="ranks (default: every GPU, or 2 CPU ranks)")
    p.add_argument("--cases", default="fsdp2,zero3")
    p.add_argument("--timeout", type=int, default=420, help="seconds per case before it counts as a hang")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = checkpoint(a.tiny, work)
        data = mixed_data(work / "data", rows=4 * 4 * a.steps)
        for case in a.cases.split(","):
            report(case, run_case(case, ckpt, data, work, a))


if __name__ == "__main__":
    main()
