"""Training on videos through the recipe: prepared and packed, and streamed (fitted on the fly)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmtune.train import recipe

DATA = Path(__file__).parent.parent.parent / "examples" / "data"


def _run(cfg):
    run = recipe.setup(cfg, progress=False)
    try:
        return recipe.train(run)
    finally:
        recipe.cleanup(run)


@pytest.mark.parametrize("keys", [{"packing": True, "cutoff_len": 256}, {"streaming": True}],
                         ids=["prepared+packed", "streaming"])
def test_the_shipped_video_dataset_trains(make_config, tmp_path, keys):
    """mllm_video_demo (three clips, one with an image) on the tiny Qwen2.5-VL (second_per_grid_ts, M-RoPE time)."""
    cfg = make_config("qwen2_5_vl", "mllm_video_demo", tmp_path / "o", dataset_dir=str(DATA), max_steps=2,
                      per_device_train_batch_size=2, gradient_accumulation_steps=1, **keys)
    result = _run(cfg)
    assert result.global_step == 2
    report = [json.loads(line) for line in open(tmp_path / "o" / "fit_report.jsonl", encoding="utf-8")]
    assert [r["fate"] for r in report] == ["kept", "kept", "kept"]
