"""doctor_memory_ratio: the doctor's peak-memory estimate vs the measured peak of a few CPU training steps.

Each case is a Qwen-VL model built in code from the transformers config classes, scaled up from the tiny test
checkpoints (hidden 512, 4 decoder layers, a 2-block vision tower, vocab 8192) so that weights, optimizer
states and activations dominate over fixed overheads, and a synthetic batch (each row: one image of a given
number of image tokens, then text). Two fresh processes run per case:

* baseline: imports torch / transformers / vlmtune, builds the model, applies the run's finetuning
  (vlmtune.models.load.apply_finetuning, as `vlmtune train` does) and builds the batch;
* train: the same, then a few optimizer steps the way the transformers Trainer takes them
  (torch AdamW, gradient accumulation, gradient clipping, zero_grad(set_to_none=True)).

The peak RSS (getrusage ru_maxrss) of train minus that of baseline is what training adds: gradients, AdamW
states, activations, temporaries. Weights and the batch are in both processes; they are exact in the estimate
(numel × bytes). Reported per case:

* `training_ratio` = estimate of what training adds (gradients, states, activations / step temporaries) /
  measured delta; the headline is the worst over the cases (the furthest from 1);
* `total_ratio` = (estimate - runtime) / (measured delta + weights + batch): the whole estimate without its fixed
  runtime allowance.

The doctor promises ±25%, so every ratio must be in [0.75, 1.25].
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 8192
BASE = dict(arch="qwen2_vl", hidden=512, intermediate=1024, layers=4, heads=8, kv_heads=2, vision_dim=256,
            vision_depth=2, batch=2, seq=1024, image_tokens=256, finetuning_type="lora", freeze_vision_tower=True,
            freeze_multi_modal_projector=True, gradient_checkpointing=False, gradient_accumulation_steps=2,
            lora_target="all")
CASES = {
    "lora_frozen_vision": dict(BASE),
    "full_vision_trains": dict(BASE, finetuning_type="full", freeze_vision_tower=False, batch=1,
                               gradient_accumulation_steps=1),
    "lora_vision_checkpointing": dict(BASE, freeze_vision_tower=False, freeze_multi_modal_projector=False,
                                      gradient_checkpointing=True, batch=2, seq=768),
    "qwen2_5_vl_lora_long": dict(BASE, arch="qwen2_5_vl", batch=1, seq=2048, image_tokens=512),
    "full_checkpointing_accumulate": dict(BASE, finetuning_type="full", gradient_checkpointing=True, batch=2),
}
QUICK = ("lora_frozen_vision", "full_vision_trains")
STEPS = 2  # the second step's micro-batches are the steady state: AdamW states exist, gradients accumulate
# glibc's malloc raises its mmap threshold (up to 32 MiB) after each large free, so freed tensor buffers stay
# in the heap and RSS counts the allocator's cache, not tensors (1.3-2.8x the live peak in these cases). A fixed
# threshold makes RSS follow the tensors, which is what the estimate models (and what torch's caching allocator
# reuses on a GPU); the default allocator's delta is reported beside it.
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def model_config(case: dict):
    """A Qwen2-VL / Qwen2.5-VL config of the case's sizes (the vocab's last 4 ids are the vision tokens)."""
    import transformers

    h, heads = case["hidden"], case["heads"]
    head_dim = h // heads
    third = 3 * head_dim // 16  # M-RoPE sections t/h/w over head_dim / 2 frequencies, as in the real [16, 24, 24]
    text = dict(vocab_size=VOCAB, hidden_size=h, intermediate_size=case["intermediate"],
                num_hidden_layers=case["layers"], num_attention_heads=heads, num_key_value_heads=case["kv_heads"],
                max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [head_dim // 2 - 2 * third, third, third]})
    tokens = dict(image_token_id=VOCAB - 4, video_token_id=VOCAB - 3, vision_start_token_id=VOCAB - 2,
                  vision_end_token_id=VOCAB - 1)
    common = dict(depth=case["vision_depth"], num_heads=4, in_channels=3, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    d = case["vision_dim"]
    if case["arch"] == "qwen2_vl":
        vision = dict(common, embed_dim=d, hidden_size=h, mlp_ratio=4, hidden_act="quick_gelu")
        return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **tokens)
    vision = dict(common, hidden_size=d, intermediate_size=2 * d, out_hidden_size=h, hidden_act="silu",
                  window_size=112, fullatt_block_indexes=[case["vision_depth"] - 1], tokens_per_second=2)
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **tokens)


def run_config(case: dict):
    """The vlmtune Config of the case (CPU: no bf16/fp16)."""
    from vlmtune.config import load_config

    keys = ("finetuning_type", "freeze_vision_tower", "freeze_multi_modal_projector", "gradient_checkpointing",
            "gradient_accumulation_steps", "lora_target")
    return load_config(None, [f"{k}={case[k]}" for k in keys] + [
        "model_name_or_path=bench", "dataset=bench", "output_dir=bench", f"cutoff_len={case['seq']}",
        f"per_device_train_batch_size={case['batch']}"])


def make_batch(case: dict, config) -> dict:
    """`batch` rows of `seq` tokens, each with one image of `image_tokens` tokens (grid 1 × 2 × 2·tokens)."""
    import torch

    g = torch.Generator().manual_seed(0)
    b, s, n = case["batch"], case["seq"], case["image_tokens"]
    ids = torch.randint(2, VOCAB - 8, (b, s), generator=g)
    ids[:, 1] = config.vision_start_token_id
    ids[:, 2 : 2 + n] = config.image_token_id
    ids[:, 2 + n] = config.vision_end_token_id
    patches = 4 * n
    v = config.vision_config  # one flattened patch: channels x frames x patch x patch
    patch_dim = getattr(v, "in_channels", 3) * v.temporal_patch_size * v.patch_size ** 2
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.clone(),
        "mm_token_type_ids": (ids == config.image_token_id).to(torch.int32),
        "pixel_values": torch.randn(b * patches, patch_dim, generator=g),
        "image_grid_thw": torch.tensor([[1, 2, 2 * n]] * b),
    }


def child(case: dict, train: bool) -> dict:
    """In a fresh process: build (and, when `train`, train) and report the peak RSS in bytes."""
    import warnings

    import torch
    import transformers  # noqa: F401

    from vlmtune.models.load import apply_finetuning

    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = run_config(case)
    config = model_config(case)
    model = transformers.AutoModelForImageTextToText.from_config(config).to(torch.float32)
    if cfg.gradient_checkpointing:  # as vlmtune.train.recipe.setup does
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = apply_finetuning(model, cfg.finetuning)
    batch = make_batch(case, config)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    if train:
        model.train()
        opt = torch.optim.AdamW(params, lr=1e-4)
        ga = cfg.gradient_accumulation_steps
        for _ in range(STEPS):
            for _ in range(ga):
                loss = model(**batch).loss / ga
                loss.backward()
                losses.append(float(loss))
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"peak_rss": peak, "losses": losses}


def measure(name: str, malloc_env: dict) -> int:
    """Peak RSS of train minus that of baseline, each in a fresh process."""
    out = {}
    env = {**os.environ, **malloc_env}
    for mode in ("baseline", "train"):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name, "--mode", mode],
                              capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} {mode} failed:\n{proc.stderr[-3000:]}")
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss"]
    return out["train"] - out["baseline"]


def estimate(case: dict):
    from vlmtune.commands.doctor import estimate_memory, model_facts

    cfg = run_config(case)
    facts = model_facts(model_config(case), cfg)
    return estimate_memory(cfg, facts, "cpu", batch=case["batch"], seq_len=case["seq"],
                           image_tokens=case["batch"] * case["image_tokens"])


def run(quick: bool = False) -> dict:
    names = QUICK if quick else tuple(CASES)
    results, worst = {}, 1.0
    for name in names:
        case = CASES[name]
        delta = measure(name, FIXED_MALLOC)
        default_delta = measure(name, {}) if not quick else None
        est = estimate(case)
        p = est.parts
        training_est = est.total - p["weights"] - p["batch"] - p["runtime"]
        training_ratio = training_est / delta
        total_ratio = (est.total - p["runtime"]) / (delta + p["weights"] + p["batch"])
        for r in (training_ratio, total_ratio):
            if abs(r - 1) > abs(worst - 1):
                worst = r
        results[f"{name}.training_ratio"] = round(training_ratio, 3)
        results[f"{name}.total_ratio"] = round(total_ratio, 3)
        results[f"{name}.measured_delta_mib"] = round(delta / 2**20, 1)
        results[f"{name}.estimate_mib"] = round((est.total - p["runtime"]) / 2**20, 1)
        results[f"{name}.parts_mib"] = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in p.items() if k != "runtime")
        if default_delta is not None:
            results[f"{name}.default_malloc_delta_mib"] = round(default_delta / 2**20, 1)
    return {"doctor_memory_ratio_worst": round(worst, 3), **results,
            "within_25_percent": "yes" if abs(worst - 1) <= 0.25 else "NO"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=sorted(CASES), help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("baseline", "train"), help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(CASES[args.child], args.mode == "train")))
        return 0
    for k, v in run(args.quick).items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
