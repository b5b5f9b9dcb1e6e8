"""GPU benchmark: a real-size, randomly initialised Qwen2-VL-2B, LoRA, bf16, packing on and off.

    python bench/gpu_qwen2vl_2b.py                 # on a CUDA machine (about 5 minutes on one H100)
    python bench/gpu_qwen2vl_2b.py --tiny --steps 2   # a smoke run on the CPU with a tiny config

Prints `name: value` lines: tokens/s (real tokens, pads excluded), MFU and peak GPU memory for
padded batches and for packed rows, and the packed/padded ratio measured in the same run.

MFU = achieved FLOP/s / the device's peak dense bf16 FLOP/s, with the FLOPs of a step counted as
6 · N_llm · tokens for the language model (forward + backward) plus 6 · N_vision · patches for the
vision encoder (its weights are frozen, but its forward runs and, with LoRA on the LLM, no backward
is needed through it: counted as 2 · N_vision · patches), attention FLOPs excluded — the usual
convention, so the figure is comparable to published ones.

The data is synthetic but shaped like SFT data: a skewed mix of samples (85% short, 15% long),
each with 0-2 images of 200-900 px, encoded with the real arithmetic (runs of t·h·w/4 pads).
No weights are downloaded: the 2B architecture is built from its config with random weights.
"""

from __future__ import annotations

import argparse
import random
import time

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def qwen2vl_2b_config(tiny: bool):
    from transformers import Qwen2VLConfig

    if tiny:
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=151936, rope_parameters={"rope_type": "default",
                    "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    else:
        # Qwen2-VL-2B-Instruct's published architecture
        text = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                    num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
        vision = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                         vision_start_token_id=151652, vision_end_token_id=151653)


def qwen2vl_spec():
    """The ModelSpec of Qwen2-VL-2B-Instruct's processor (its token ids and pixel bounds), built without a checkpoint."""
    from vlmtune.models.spec import ModelSpec

    return ModelSpec("qwen2_vl", "<|image_pad|>", 151655, "<|video_pad|>", 151656, "<|vision_start|>", 151652,
                     "<|vision_end|>", 151653, "<|im_start|>", 151644, "<|im_end|>", 151645, 151643, 151645,
                     14, 2, 2, 56 * 56, 28 * 28 * 1280, 151936)


def synthetic_rows(n: int, cutoff: int, seed: int = 0) -> list[dict]:
    from vlmtune.models.grid import grid_for

    rnd = random.Random(seed)
    rows = []
    while len(rows) < n:
        long = rnd.random() < 0.15
        ids = [151644] + [rnd.randint(100, 150000) for _ in range(rnd.randint(600, 2000) if long else rnd.randint(20, 200))]
        grids = []
        for _ in range(rnd.randint(0, 2)):
            g = grid_for(rnd.randint(200, 900), rnd.randint(200, 900), 14, 2, 56 * 56, 28 * 28 * 1280)
            ids += [151652] + [151655] * g.tokens + [151653]
            grids.append(g.thw)
        ids += [rnd.randint(100, 150000) for _ in range(rnd.randint(5, 100))] + [151645]
        if len(ids) <= cutoff:
            labels = [-100] * (len(ids) // 2) + ids[len(ids) // 2 :]
            labels = [x if x not in (151652, 151653, 151655) else -100 for x in labels]
            rows.append({"input_ids": ids, "labels": labels, "image_grid_thw": grids})
    return rows


def batch_of(rows: list[dict], packed: bool, device):
    import torch

    from vlmtune.data.stages.pack import packed_position_ids

    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), 151643, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
        mask[i, : len(r["input_ids"])] = 1
    grids = [g for r in rows for g in r["image_grid_thw"]]
    batch = {"input_ids": ids, "labels": labels, "mm_token_type_ids": (ids == 151655).int()}
    if packed:
        import numpy as np

        spec = qwen2vl_spec()
        pos = [packed_position_ids(r, spec, length) for r in rows]
        batch["position_ids"] = torch.from_numpy(np.stack(pos, axis=1))
        batch["use_cache"] = False
    else:
        batch["attention_mask"] = mask
    if grids:
        patches = sum(g[0] * g[1] * g[2] for g in grids)
        batch["pixel_values"] = torch.randn(patches, 3 * 2 * 14 * 14, dtype=torch.bfloat16)
        batch["image_grid_thw"] = torch.tensor(grids)
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}


def measure(model, batches, steps: int, device) -> tuple[float, int, int, float]:
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    tokens = patches = 0
    for k, rows in enumerate(batches[: steps + 2]):
        if k == 2:  # two warm-up steps
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            tokens = patches = 0
        batch = batch_of(rows, "position_ids" in rows[0] or rows[0].get("packed", False), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += sum(len(r["input_ids"]) for r in rows)
        patches += sum(g[0] * g[1] * g[2] for r in rows for g in r["image_grid_thw"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return seconds, tokens, patches, peak


def main(argv=None) -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLForConditionalGeneration

    from vlmtune.data.stages.pack import pack_rows
    from vlmtune.models.load import component_of, linear_modules

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny config on the CPU (smoke test)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cutoff", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4, help="padded batch size (packed: one cutoff_len row per sample slot / 4)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch.manual_seed(0)
    config = qwen2vl_2b_config(args.tiny)
    model = Qwen2VLForConditionalGeneration(config).to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    n_llm = sum(p.numel() for n, p in model.named_parameters() if component_of(n) == "language_model")
    n_vis = sum(p.numel() for n, p in model.named_parameters() if component_of(n) != "language_model")
    targets = [n for n, c in linear_modules(model).items() if c == "language_model"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    rows = synthetic_rows(args.batch * (args.steps + 2) * 2, args.cutoff)
    padded = [rows[i : i + args.batch] for i in range(0, len(rows), args.batch)]
    packs = pack_rows([{**r, "id": str(k), "source": "s", "images": [""] * len(r["image_grid_thw"]),
                        "image_min_pixels": [0] * len(r["image_grid_thw"]),
                        "image_max_pixels": [0] * len(r["image_grid_thw"])} for k, r in enumerate(rows)], args.cutoff)
    packed = [[{**pk, "packed": True}] for pk in packs]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    out = {}
    for label, batches in (("padded", padded), ("packed", packed)):
        seconds, tokens, patches, mem = measure(model, batches, args.steps, device)
        flops = 6 * n_llm * tokens + 2 * n_vis * patches
        out[f"{label}_tokens_per_s"] = tokens / seconds
        out[f"{label}_mfu"] = flops / seconds / peak if peak else float("nan")
        out[f"{label}_peak_gpu_gib"] = mem
    out["packed_vs_padded_tokens_per_s"] = out["packed_tokens_per_s"] / out["padded_tokens_per_s"]
    print(f"device: {name}")
    print(f"params_llm: {n_llm}\nparams_vision: {n_vis}")
    for k, v in out.items():
        print(f"{k}: {v:.4g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
