"""What test_load and test_quant share: a short LoRA run's config on the demo data, and a quiet model load."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from vlmtune.config import load_config
from vlmtune.models.load import load_model

DATA = Path(__file__).parent.parent.parent / "examples" / "data"


def config(ckpt, out, **keys):
    base = dict(model_name_or_path=str(ckpt), dataset="mllm_demo", dataset_dir=str(DATA), output_dir=str(out),
                cutoff_len=256, max_steps=2, logging_steps=1, gradient_accumulation_steps=1,
                per_device_train_batch_size=1, learning_rate=1e-2, worst_case_first=False, save_steps=1000,
                lora_target="q_proj,v_proj", seed=0)
    return load_config(None, base={**base, **keys})


def base_model(cfg):
    """The run's base model in float32 (quantized as the config says), without PEFT/transformers' warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(cfg.model, cfg.finetuning, dtype=torch.float32)
