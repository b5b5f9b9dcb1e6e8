"""real_size: the doctor's peak-memory estimate against the measured peak RSS of training at Qwen2-VL-2B widths.

The checkpoint is random and built here: the Qwen2-VL-2B vision tower's widths (embed_dim 1280, MLP 5120, 16
heads, merger to 1536) with fewer blocks, the 2B language model's widths (hidden 1536, MLP 8960, 12 query / 2
key-value heads) with fewer decoder layers, and the real 151,936-token vocabulary (tied embeddings), saved in
bfloat16 like the real checkpoint. Depths are cut so that full fine-tuning stays well under 8 GB on this shared
machine. Each case runs in a fresh process: `vlmtune.train.recipe.build_model` (exactly what `vlmtune train`
does: from_pretrained in float32 on the CPU, finetuning, gradient checkpointing, frozen parts out of the
backward), then STEPS optimizer steps the way the Trainer takes them (AdamW, accumulation, clipping,
zero_grad(set_to_none=True); the first step with one micro-batch) on one synthetic row of SEQ tokens holding one image of IMAGE_TOKENS tokens.

Reported per case: peak RSS (VmHWM, the whole process, glibc's default malloc as a user runs it)
after loading and after training, the doctor's estimate (`estimate_memory` on `model_facts` of the same config)
and estimate / measured; and the seconds of the slowest forward+backward. `lora_frozen_legacy` is the setup
before issue 16 (transformers' input-embedding hooks on every sub-model, the frozen tower's forward with a
graph): the before/after of keeping the frozen tower out of the backward.

    python bench/bench_real_size.py [--cases lora_frozen,lora_tower] [--vision-depth 8] [--layers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

VOCAB = 151936  # Qwen2-VL-2B's embedding rows (151,643 BPE ranks + special tokens + padding)
SEQ, IMAGE_TOKENS = 640, 400  # one row: a 560×560 image (grid 1 × 40 × 40) and 240 text tokens
STEPS, GA = 2, 2
CASES = {
    "lora_frozen": {},
    "lora_frozen_legacy": {},
    "lora_tower": {"freeze_vision_tower": False},
    "full": {"finetuning_type": "full"},
}


def model_config(vision_depth: int, layers: int):
    import transformers

    text = dict(vocab_size=VOCAB, hidden_size=1536, intermediate_size=8960, num_hidden_layers=layers,
                num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    vision = dict(depth=vision_depth, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16, in_channels=3,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu")
    return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                                      image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                                      vision_end_token_id=151653)


def checkpoint(vision_depth: int, layers: int) -> Path:
    from _common import cached_dir

    def build(d: Path) -> None:
        import torch
        import transformers

        torch.manual_seed(0)
        config = model_config(vision_depth, layers)
        model = transformers.Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
        model.save_pretrained(d)

    return cached_dir(f"real-size-qwen2vl-v{vision_depth}-l{layers}", build)


def run_config(ckpt: Path, case: str):
    from vlmtune.config import load_config

    keys = {"model_name_or_path": str(ckpt), "dataset": "bench", "output_dir": "bench", "cutoff_len": SEQ,
            "per_device_train_batch_size": 1, "gradient_accumulation_steps": GA, **CASES[case]}
    return load_config(None, base=keys)


def make_batch(config) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151000, (1, SEQ), generator=g)
    ids[:, 1] = config.vision_start_token_id
    ids[:, 2: 2 + IMAGE_TOKENS] = config.image_token_id
    ids[:, 2 + IMAGE_TOKENS] = config.vision_end_token_id
    patches = 4 * IMAGE_TOKENS
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "mm_token_type_ids": (ids == config.image_token_id).to(torch.int32),
            "pixel_values": torch.randn(patches, 3 * 2 * 14 * 14, generator=g),
            "image_grid_thw": torch.tensor([[1, 40, 40]])}


def peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM, which starts afresh at exec (getrusage's ru_maxrss keeps the
    parent's peak across fork + exec, here the parent that built the checkpoint)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(ckpt: Path, case: str) -> dict:
    import warnings

    import torch

    from vlmtune.train.recipe import build_model

    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    start = peak_rss()
    cfg = run_config(ckpt, case)
    model = build_model(cfg)
    loaded = peak_rss()
    if case.endswith("_legacy"):  # what setup did before: hooks on every sub-model's input embeddings
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.enable_input_require_grads()
        visual = next(m for n, m in base.named_modules() if n.split(".")[-1] == "visual")
        del visual.forward
    batch = make_batch(model.config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    seconds = []
    for step in range(STEPS):
        # The first step takes one micro-batch (it only has to create the AdamW states); the peak is in the
        # last micro-batch of the second: states + the gradients accumulated so far + its activations.
        for _ in range(1 if step == 0 else GA):
            t = time.perf_counter()
            loss = model(**batch).loss / GA
            loss.backward()
            seconds.append(time.perf_counter() - t)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"import_rss": start, "load_peak": loaded, "peak": peak_rss(), "seconds": max(seconds),
            "first_seconds": seconds[0]}


def estimate(ckpt: Path, case: str):
    from transformers import AutoConfig

    from vlmtune.commands.doctor import estimate_memory, model_facts

    cfg = run_config(ckpt, case)
    facts = model_facts(AutoConfig.from_pretrained(ckpt), cfg)
    return estimate_memory(cfg, facts, "cpu", batch=1, seq_len=SEQ, image_tokens=IMAGE_TOKENS)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--vision-depth", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.ckpt), args.child)))
        return 0
    ckpt = checkpoint(args.vision_depth, args.layers)
    print(f"checkpoint: {ckpt} (vision depth {args.vision_depth}, {args.layers} decoder layers, vocab {VOCAB}, "
          f"bfloat16); one row of {SEQ} tokens, {IMAGE_TOKENS} image tokens; {STEPS} steps × GA {GA}", flush=True)
    worst = 1.0
    for case in args.cases.split(","):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", case, "--ckpt", str(ckpt)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"{case}: failed\n{proc.stderr[-3000:]}")
            return 1
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        est = estimate(ckpt, case)
        ratio = est.total / m["peak"]
        if not case.endswith("_legacy") and abs(ratio - 1) > abs(worst - 1):
            worst = ratio
        gib = 2**30
        parts = ", ".join(f"{k} {v / gib:.2f}" for k, v in est.parts.items() if v)
        print(f"{case}: measured peak {m['peak'] / gib:.2f} GiB (after load {m['load_peak'] / gib:.2f}, "
              f"imports {m['import_rss'] / gib:.2f}); estimate {est.total / gib:.2f} GiB ({parts}); "
              f"estimate/measured {ratio:.3f}; slowest forward+backward {m['seconds']:.1f} s "
              f"(first {m['first_seconds']:.1f} s)", flush=True)
    print(f"real_size_estimate_ratio_worst: {worst:.3f} ({'within' if abs(worst - 1) <= 0.25 else 'NOT within'} 25%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
