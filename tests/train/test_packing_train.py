"""Packing in the real training loop: packed rows train, and a resumed packed run matches."""

from __future__ import annotations

import os
import shutil

from test_recipe import losses, train_tracked

from vlmtune.train.checkpoints import resolve_resume


def test_packed_training_resumes_with_the_same_losses(make_config, write_dataset, out_dir):
    data = write_dataset(["one", "text", "two", "one_big", "text", "one", "two", "text"])
    cfg = make_config("qwen2_vl", data, out_dir, packing=True, cutoff_len=400, max_steps=4, save_steps=2,
                      learning_rate=1e-3, lora_dropout=0.1)
    run, full, _, _ = train_tracked(cfg)
    packed = run.trainer.train_dataset
    assert len(packed) < 8 and all(sum(r["segments"]) == r["length"] <= 400 for r in packed)
    assert sum(len(r["segments"]) for r in packed) == 8  # every sample is in exactly one packed row
    reference = losses(full.log_history)
    assert sorted(reference) == [1, 2, 3, 4]

    shutil.rmtree(out_dir / "checkpoint-4")
    for name in os.listdir(out_dir):
        if os.path.isfile(out_dir / name) and name != "fit_report.jsonl":
            os.remove(out_dir / name)
    assert resolve_resume(True, str(out_dir)) == str(out_dir / "checkpoint-2")
    _, resumed, _, _ = train_tracked(cfg.replace(resume_from_checkpoint=True))
    again = losses(resumed.log_history)
    assert again[3] == reference[3] and again[4] == reference[4]
