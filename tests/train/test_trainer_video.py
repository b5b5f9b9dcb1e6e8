"""VlmTrainer with video batches: DeepSpeed's cast of float inputs leaves Qwen2.5-VL's second_per_grid_ts alone."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from vlmtune.train.trainer import VlmTrainer


def _deepspeed_trainer(dtype):
    t = object.__new__(VlmTrainer)  # only what _prepare_input reads
    t.args = SimpleNamespace(device=torch.device("cpu"))
    t.is_deepspeed_enabled = True
    t.accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(
        hf_ds_config=SimpleNamespace(dtype=lambda: dtype))))
    return t


def test_second_per_grid_ts_stays_float32_under_deepspeed():
    t = _deepspeed_trainer(torch.bfloat16)
    seconds = torch.tensor([10 / 9, 1.0], dtype=torch.float32)
    batch = {"input_ids": torch.tensor([[1, 2]]), "pixel_values_videos": torch.ones(2, 3), "second_per_grid_ts": seconds}
    out = t._prepare_input(batch)
    assert out["pixel_values_videos"].dtype == torch.bfloat16  # the Trainer's cast still applies to pixels
    assert out["second_per_grid_ts"].dtype == torch.float32 and torch.equal(out["second_per_grid_ts"], seconds)
    # the cast it avoids changes Qwen2.5-VL's truncated time positions: arange(10) × 2 tokens/s × seconds
    t_pos = lambda s: (torch.arange(10) * 2 * s).long().tolist()  # noqa: E731
    assert t_pos(seconds[0]) != t_pos(seconds[0].to(torch.bfloat16).float())
