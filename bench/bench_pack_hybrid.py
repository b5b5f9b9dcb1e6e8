"""packed_vs_padded_tokens_per_s on the hybrid Qwen3.5 (gated-delta linear attention + full attention), with
packing made exact (models/hybrid.py: each linear-attention layer runs once per packed sample on the CPU).

The rows are bench_pack's skewed mix (85% short samples, half with a small image; 15% long ones with 1-2 larger
images), encoded by the real encoder on the tiny qwen3_5 checkpoint (its thinking blocks included), cutoff_len
1024. The model is the tiny Qwen3.5 widened to hidden 256 (three linear-attention layers and one full-attention
layer, as the real 3:1 pattern), vision tower and projector frozen (vlmtune's defaults).

* packed_vs_padded_tokens_per_s (headline): real tokens per CPU second (torch on one thread) of
  forward + backward + AdamW over the same rows: padded batches of 8 vs best-fit packed rows, exact.
* packed_exact_vs_boundary_blind: the exact packed path vs the same packed rows run boundary-blind (what
  transformers does without the kernels: state leaks between samples): the price of exactness on the CPU.
"""

from __future__ import annotations

import random
import time

from bench_pack import BATCH, CUTOFF, _rows, train_like_vlmtune, train_seconds

ARCH = "qwen3_5"


def _medium_model(path):
    """The tiny Qwen3.5 widened (hidden 256, head_dim 64, linear-attention heads of 32) so that the compute padding
    wastes outweighs the per-batch overheads, as at real scale."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    cfg = AutoConfig.from_pretrained(str(path))
    t = cfg.text_config
    t.hidden_size, t.intermediate_size = 256, 768
    t.num_attention_heads, t.num_key_value_heads, t.head_dim = 4, 2, 64
    t.linear_num_key_heads, t.linear_num_value_heads = 4, 8
    t.linear_key_head_dim = t.linear_value_head_dim = 32
    t.rope_parameters = {**t.rope_parameters, "mrope_section": [3, 3, 2]}  # 16 rotary dims of 64
    cfg.vision_config.out_hidden_size = 256
    return AutoModelForImageTextToText.from_config(cfg)


def run(quick: bool) -> dict[str, float | str]:
    import torch

    from vlmtune.data.stages.collate import Collator
    from vlmtune.data.stages.pack import pack_rows
    from vlmtune.models.hybrid import keep_packed_samples_apart

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model_path, loaded, rows = _rows(400 if quick else 1200, arch=ARCH)
    order = rows[:]
    random.Random(1).shuffle(order)
    subset = order[: 48 if quick else 160]
    padded = [subset[i : i + BATCH] for i in range(0, len(subset), BATCH)]
    packed = [[p] for p in pack_rows(subset, CUTOFF)]
    collate = Collator(loaded.processor, loaded.spec, cutoff_len=CUTOFF)

    def model_for(exact: bool):
        torch.manual_seed(0)
        model = train_like_vlmtune(_medium_model(model_path))
        if exact:
            keep_packed_samples_apart(model)
        return model

    tokens = sum(len(r["input_ids"]) for r in subset)
    exact = model_for(True)
    train_seconds(exact, padded[:1], collate, time.process_time)  # warm-up
    tps_padded = tokens / train_seconds(exact, padded, collate, time.process_time)
    tps_packed = tokens / train_seconds(exact, packed, collate, time.process_time)
    blind = model_for(False)
    tps_blind = tokens / train_seconds(blind, packed, collate, time.process_time)
    return {
        "packed_vs_padded_tokens_per_s": round(tps_packed / tps_padded, 2),
        "packed_exact_vs_boundary_blind": round(tps_packed / tps_blind, 2),
        "tokens_per_cpu_s_packed_exact": round(tps_packed, 1),
        "tokens_per_cpu_s_padded": round(tps_padded, 1),
        "tokens_per_cpu_s_packed_boundary_blind": round(tps_blind, 1),
        "rows": f"{len(subset)} rows ({tokens} tokens) -> {len(packed)} packed rows of <= {CUTOFF} tokens "
                f"({sum(len(b[0]['segments']) for b in packed) / len(packed):.1f} samples each); "
                f"{len(padded)} padded batches of {BATCH}",
    }
