"""The mixture-of-experts families through `vlmtune train` and `vlmtune export`, on their tiny checkpoints:
LoRA on attention and on every expert (the routers trained too, freeze_router: false, and the router's
auxiliary loss logged), the export merges the expert adapters and reloads computing base + adapter; full
fine-tuning trains the experts and leaves the frozen routers bit-identical; QLoRA trains with the experts
unquantized."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmtune.commands.cli import main

FAMILIES = ["qwen3_vl_moe", "qwen3_5_moe"]


def _train(tmp_path, base_cfg, write_dataset, arch, **keys):
    data = write_dataset(["one", "two", "text"])
    cfg = base_cfg(arch, data, tmp_path / "out", max_steps=2, learning_rate=5e-2, **keys)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    return tmp_path / "out"


def _batch(ckpt, make_image, tmp_path):
    processor = AutoProcessor.from_pretrained(ckpt)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = make_image(tmp_path / "probe.png", 96, 64, (0, 90, 200))
    from PIL import Image

    return processor(text=[text], images=[Image.open(image).convert("RGB")], return_tensors="pt")


@torch.inference_mode()
def _logits(model, batch):
    return model.eval()(**batch).logits


def _routers(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.endswith(("mlp.gate.weight", "mlp.shared_expert_gate.weight"))}


@pytest.mark.parametrize("arch", FAMILIES)
def test_lora_on_experts_trains_exports_and_reloads_as_base_plus_adapter(arch, tiny_ckpt, base_cfg, write_dataset,
                                                                          make_image, tmp_path, capsys):
    ckpt = tiny_ckpt(arch)
    out = _train(tmp_path, base_cfg, write_dataset, arch, lora_target="all", freeze_router=False,
                 moe_aux_loss_coef=0.01)
    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [e for e in log if "loss" in e]
    assert len(steps) == 2 and all(e["aux_loss"] > 0 for e in steps)  # logged beside the loss, every step
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    fused = adapter_cfg["target_parameters"]
    assert fused and {t.rsplit(".", 1)[-1] for t in fused} == {"gate_up_proj", "down_proj"}
    assert all(t.endswith("mlp.gate") or t.endswith("shared_expert_gate") for t in adapter_cfg["modules_to_save"])

    batch = _batch(ckpt, make_image, tmp_path)
    base = AutoModelForImageTextToText.from_pretrained(ckpt)
    before = _logits(base, batch)
    expected = _logits(PeftModel.from_pretrained(base, str(out)), batch)
    assert (expected - before).abs().max() > 1e-3  # the trained adapters (experts, routers) change the model

    capsys.readouterr()
    assert main(["export", "--model", str(ckpt), "--adapter", str(out), "--out", str(tmp_path / "merged")]) == 0
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "lora" in k or "base_layer" in k or "modules_to_save" in k]
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(merged, batch), expected, atol=1e-5, rtol=0)
    # the trained routers are in the export; the base's are not
    trained, original = _routers(merged.state_dict()), _routers(AutoModelForImageTextToText.from_pretrained(ckpt)
                                                                .state_dict())
    assert trained.keys() == original.keys() and trained
    assert any(not torch.equal(trained[k], original[k]) for k in trained)


@pytest.mark.parametrize("arch", FAMILIES)
def test_full_fine_tuning_trains_the_experts_not_the_routers(arch, tiny_ckpt, base_cfg, write_dataset, make_image,
                                                             tmp_path):
    ckpt = tiny_ckpt(arch)
    out = _train(tmp_path, base_cfg, write_dataset, arch, finetuning_type="full", run_doctor=False)
    base = AutoModelForImageTextToText.from_pretrained(ckpt).state_dict()
    trained_model = AutoModelForImageTextToText.from_pretrained(out)
    trained = trained_model.state_dict()
    experts = [k for k in base if ".mlp.experts." in k]
    assert experts and all(not torch.equal(base[k], trained[k]) for k in experts)
    routers = _routers(base)
    assert routers and all(torch.equal(v, trained[k]) for k, v in routers.items())  # freeze_router: true
    batch = _batch(ckpt, make_image, tmp_path)
    assert torch.isfinite(_logits(trained_model, batch)).all()


def test_qlora_trains_and_exports_into_the_unquantized_base(tiny_ckpt, base_cfg, write_dataset, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    ckpt = tiny_ckpt("qwen3_vl_moe")
    out = _train(tmp_path, base_cfg, write_dataset, "qwen3_vl_moe", quantization_bit=4, run_doctor=False)
    said = capsys.readouterr().out
    assert "quantization_bit=4: the experts' fused weights (" in said and "stay in float32" in said
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    expected = _logits(PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(ckpt), str(out)),
                       {"input_ids": ids})
    assert main(["export", "--model", str(ckpt), "--adapter", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(merged, {"input_ids": ids}), expected, atol=1e-5, rtol=0)
