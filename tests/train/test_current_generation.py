"""The current Qwen generation trains: Qwen3.5 (hybrid linear attention), Qwen3.5-MoE and Qwen3-VL-MoE, on tiny
checkpoints, through the same recipe as every family."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vlmtune.train import recipe


def _two_image_data(tmp_path, make_image) -> str:
    """LLaMA-Factory 0.9.5's crash at step 1 on Qwen3.5 (two images, cutoff_len 256): two 512 x 512 images are
    2 x 256 image tokens here, beyond cutoff_len before any text; with them, a text sample and a one-image one."""
    folder = tmp_path / "data"
    folder.mkdir()
    make_image(folder / "a.png", 512, 512, (255, 0, 0))
    make_image(folder / "b.png", 480, 600, (0, 0, 255))
    make_image(folder / "c.png", 96, 64, (0, 200, 0))
    records = [
        {"messages": [{"role": "user", "content": "<image><image>Compare the two pictures."},
                      {"role": "assistant", "content": "The first is red and the second is blue."}],
         "images": ["a.png", "b.png"]},
        {"messages": [{"role": "user", "content": "Say something about the sky."},
                      {"role": "assistant", "content": "<think>\nIt is day.\n</think>\n\nThe sky is blue."}]},
        {"messages": [{"role": "user", "content": "<image>What colour is the shape?"},
                      {"role": "assistant", "content": "The shape is green."}], "images": ["c.png"]},
        {"messages": [{"role": "user", "content": "<image><image>Which one is red?"},
                      {"role": "assistant", "content": "The first one."}], "images": ["b.png", "a.png"]},
    ]
    path = folder / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def test_the_two_image_crash_case_trains_on_qwen3_5(make_config, tmp_path, make_image, out_dir):
    data = _two_image_data(tmp_path, make_image)
    cfg = make_config("qwen3_5", data, out_dir, cutoff_len=256, packing=True, max_steps=2, learning_rate=1e-3)
    result = recipe.run(cfg, progress=False)
    assert result.global_step == 2
    assert all(math.isfinite(h["loss"]) for h in result.log_history if "loss" in h)
    report = [json.loads(line) for line in open(result.prepared.report_path)]
    assert len(report) == 4 and result.prepared.records == 4  # every sample has its line
    fates = [line["fate"] for line in report]
    assert fates[0] == fates[3] == "shrunk" and fates[1] == fates[2] == "kept"
    assert all(line["tokens_after"] <= 256 for line in report)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe", "qwen3_vl_moe"])
@pytest.mark.parametrize("keys", [dict(finetuning_type="lora"), dict(finetuning_type="full"),
                                  dict(finetuning_type="lora", quantization_bit=4)], ids=["lora", "full", "qlora"])
def test_each_family_trains_with_each_finetuning_type(arch, keys, make_config, write_dataset, out_dir):
    if "quantization_bit" in keys:
        pytest.importorskip("bitsandbytes")
    data = write_dataset(["one", "text", "two", "one_big"])
    cfg = make_config(arch, data, out_dir, cutoff_len=400, max_steps=2, learning_rate=1e-3, **keys)
    run = recipe.setup(cfg, progress=False)
    before = {k: v.detach().clone() for k, v in run.trainer.model.named_parameters() if v.requires_grad}
    result = recipe.train(run)
    assert result.global_step == 2
    after = dict(run.trainer.model.named_parameters())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it learned something
