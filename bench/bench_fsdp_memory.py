"""fsdp_memory: peak RSS per rank of full fine-tuning on 2 gloo CPU ranks, FSDP2 (fsdp: full_shard auto_wrap)
against DDP, measured in the same run on the same data and seed.

The checkpoint is random and built here: the tiny Qwen2-VL's processor and vision tower with a mid-size
language model (hidden 1024, MLP 2816, 16 query / 4 key-value heads, LAYERS decoder layers: about 100 M
parameters, 0.4 GB in float32), so that the model states (weights, gradients, AdamW's two moments) dominate
each rank's memory as they do at real sizes. Each case is `vlmtune train` (the recipe, as `torchrun -m vlmtune
train` runs it) under torchrun with 2 processes, STEPS optimizer steps on the shipped mllm_demo data. Each rank
reports its VmHWM (peak resident set, the whole process) once training ends. The goal is FSDP2 <= 0.6x DDP.

    python bench/bench_fsdp_memory.py [--layers 12] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
NODE = """
import json, os, sys
from vlmtune.config import load_config
from vlmtune.train import recipe

def vmhwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

def reset():  # Linux: writing 5 to clear_refs starts VmHWM afresh from the current RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

peaks = {}
run = recipe.setup(load_config(None, sys.argv[1:]), progress=False)
peaks["load"] = vmhwm()
reset()
run.trainer.train()
peaks["train"] = vmhwm()
reset()
run.trainer.save_model(run.cfg.output_dir)
peaks["save"] = vmhwm()
recipe.cleanup(run)
losses = [h["loss"] for h in run.trainer.state.log_history if "loss" in h]
print("RESULT " + json.dumps({"rank": int(os.environ["RANK"]), "peaks": peaks, "peak": max(peaks.values()),
                              "losses": losses, "step": run.trainer.state.global_step}), flush=True)
"""

def checkpoint(layers: int) -> Path:
    from _common import cached_dir, tiny_checkpoint

    tiny = tiny_checkpoint("qwen2_vl")

    def build(d: Path) -> None:
        import torch
        import transformers

        config = transformers.AutoConfig.from_pretrained(tiny)
        t = config.text_config
        t.hidden_size, t.intermediate_size, t.num_hidden_layers = 1024, 2816, layers
        t.num_attention_heads, t.num_key_value_heads, t.head_dim = 16, 4, 64
        t.rope_parameters = {**t.rope_parameters, "mrope_section": [8, 12, 12]}  # sums to head_dim / 2
        if getattr(t, "layer_types", None):
            t.layer_types = [t.layer_types[0]] * layers
        config.vision_config.out_hidden_size = 1024  # the merger projects into the language model's width
        if hasattr(config.vision_config, "hidden_size") and config.model_type == "qwen2_vl":
            config.vision_config.hidden_size = 1024
        torch.manual_seed(0)
        transformers.Qwen2VLForConditionalGeneration(config).save_pretrained(d)
        for f in tiny.iterdir():  # the processor, tokenizer and chat template
            if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
                shutil.copy(f, d / f.name)

    return cached_dir(f"fsdp-memory-qwen2vl-l{layers}", build)


def run(case: str, ckpt: Path, steps: int, work: Path) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = work / "node.py"
    script.write_text(NODE)
    keys = {"model_name_or_path": str(ckpt), "dataset": "mllm_demo", "dataset_dir": str(ROOT / "examples" / "data"),
            "output_dir": str(work / case), "cutoff_len": 256, "finetuning_type": "full", "max_steps": steps,
            "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "logging_steps": 1,
            "save_steps": 10_000, "report_to": "none", "seed": 0, "run_doctor": "false",
            "worst_case_first": "false", "ddp_timeout": 600}
    if case == "fsdp2":
        keys["fsdp"] = "full_shard auto_wrap"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(script), *(f"{k}={v}" for k, v in keys.items())]
    out = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=1200)
    results = {r["rank"]: r for r in (json.loads(line[7:]) for line in out.stdout.splitlines()
                                      if line.startswith("RESULT "))}
    if out.returncode or sorted(results) != [0, 1]:
        raise SystemExit(f"{case} failed:\n{(out.stdout + out.stderr)[-4000:]}")
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()
    ckpt = checkpoint(a.layers)
    import json as _json

    cfg = _json.loads((ckpt / "config.json").read_text())
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        params = sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel")
                     else _prod(f.get_slice(k).get_shape()) for k in f.keys())
    print(f"model: {params / 1e6:.1f} M parameters ({cfg['text_config']['num_hidden_layers']} decoder layers of "
          f"width {cfg['text_config']['hidden_size']}), full fine-tuning, AdamW, 2 gloo CPU ranks, {a.steps} steps")
    with tempfile.TemporaryDirectory() as tmp:
        res = {case: run(case, ckpt, a.steps, Path(tmp)) for case in ("ddp", "fsdp2")}
    gib = 1024**3
    print("peak RSS per rank (GiB), by phase: load = set-up (data, model load, sharding), train = the optimizer "
          "steps, save = the final save (FSDP2 gathers the full state dict on rank 0); VmHWM reset between phases")
    print(f"{'case':7} {'rank':>4} {'load':>6} {'train':>6} {'save':>6} {'overall':>8} {'first loss':>11}")
    for case, r in res.items():
        for k in (0, 1):
            p = r[k]["peaks"]
            print(f"{case:7} {k:4d} {p['load'] / gib:6.2f} {p['train'] / gib:6.2f} {p['save'] / gib:6.2f} "
                  f"{r[k]['peak'] / gib:8.2f} {r[k]['losses'][0]:11.5f}")
    for phase in ("train", "overall"):
        key = (lambda x: x["peaks"]["train"]) if phase == "train" else (lambda x: x["peak"])
        ratios = [key(res["fsdp2"][k]) / key(res["ddp"][k]) for k in (0, 1)]
        print(f"fsdp2 / ddp peak RSS per rank, {phase}: rank 0 {ratios[0]:.2f}x, rank 1 {ratios[1]:.2f}x "
              f"(goal <= 0.6x: {'met' if max(ratios) <= 0.6 else 'NOT met'})")


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    main()
