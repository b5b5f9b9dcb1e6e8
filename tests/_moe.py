"""Tiny mixture-of-experts models built from transformers' own config classes (no processor, no files): what the
LoRA, router and quantization tests of the MoE families share."""

from __future__ import annotations

import warnings

import torch

from vlmtune.config import load_config

_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=16,
               spatial_merge_size=2, temporal_patch_size=2)
_TEXT = dict(vocab_size=300, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
LAYERS = {"qwen3_vl_moe": 2, "qwen3_5_moe": 4}
EXPERTS, TOP_K = 4, 2


def moe_config(model_type: str):
    from transformers import Qwen3_5MoeConfig, Qwen3VLMoeConfig

    if model_type == "qwen3_vl_moe":
        return Qwen3VLMoeConfig(
            text_config=dict(_TEXT, intermediate_size=64, num_hidden_layers=LAYERS[model_type],
                             rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]}),
            vision_config=dict(_VISION, deepstack_visual_indexes=[0]))
    return Qwen3_5MoeConfig(
        text_config=dict(_TEXT, num_hidden_layers=LAYERS[model_type], shared_expert_intermediate_size=16,
                         linear_num_value_heads=2, linear_num_key_heads=1, linear_key_head_dim=8,
                         linear_value_head_dim=8),
        vision_config=_VISION)


def moe_model(model_type: str, seed: int = 0):
    """A randomly initialised *ForConditionalGeneration of the family (routers random too, so tokens spread)."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForImageTextToText.from_config(moe_config(model_type)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):  # transformers initialises routers to zero: every expert ties
                p.normal_(0, 0.5)
    return model


def cfg(**keys):
    base = dict(model_name_or_path="m", dataset="d", output_dir="o", lora_rank=4)
    return load_config(None, base={**base, **keys})
