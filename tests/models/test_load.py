"""PEFT's LoRA variants through `apply_finetuning` and the `train` recipe: DoRA, rsLoRA, PiSSA, LoRA+, dropout and
additional_target each train on a tiny checkpoint, and the saved adapter reloads onto the original base model
computing what the trained model computes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmtune.config import load_config
from vlmtune.models.load import apply_finetuning, lora_variant_kwargs

from _adapters import base_model, config

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])


@given(st.booleans(), st.booleans(), st.booleans(), st.sampled_from([-1, 1, 16]))
@settings(max_examples=30, deadline=None)
def test_variant_kwargs(dora, rslora, pissa, iters):
    cfg = load_config(None, base=dict(model_name_or_path="m", dataset="d", output_dir="o", use_dora=dora,
                                      use_rslora=rslora, pissa_init=pissa, pissa_iter=iters))
    kwargs = lora_variant_kwargs(cfg.finetuning)
    assert kwargs["use_dora"] is dora and kwargs["use_rslora"] is rslora
    if pissa:
        assert kwargs["init_lora_weights"] == ("pissa" if iters == -1 else f"pissa_niter_{iters}")
    else:
        assert "init_lora_weights" not in kwargs


def test_dora_and_rslora_reach_peft(tiny_ckpt, tmp_path):
    cfg = config(tiny_ckpt(), tmp_path, use_dora=True, use_rslora=True, lora_rank=4, lora_alpha=8, lora_dropout=0.1)
    model = apply_finetuning(base_model(cfg), cfg.finetuning)
    layer = model.base_model.model.model.language_model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r)
    assert layer.lora_magnitude_vector["default"].weight.shape == (layer.out_features,)  # DoRA's magnitude
    assert layer.lora_dropout["default"].p == 0.1
    trainable = sorted({n.split(".default")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters()
                        if p.requires_grad})
    assert trainable == ["lora_A", "lora_B", "lora_magnitude_vector"]


def train_and_reload(cfg):
    """Train through the recipe; (trained model's logits, logits of the saved adapter on a fresh original base)."""
    from peft import PeftModel

    from vlmtune.train import recipe

    run = recipe.setup(cfg, progress=False)
    result = recipe.train(run)
    assert result.global_step == cfg.max_steps
    with torch.no_grad():
        trained = run.trainer.model.eval()(input_ids=IDS).logits
        reloaded = PeftModel.from_pretrained(base_model(cfg), cfg.output_dir).eval()(input_ids=IDS).logits
        original = base_model(cfg).eval()(input_ids=IDS).logits
    return run, trained, reloaded, original


@pytest.mark.parametrize("keys", [
    {"use_dora": True},
    {"use_rslora": True},
    {"lora_dropout": 0.2},
    {"additional_target": "embed_tokens"},
    {"use_dora": True, "quantization_bit": 4},
], ids=["dora", "rslora", "dropout", "additional_target", "qdora"])
def test_variant_trains_and_reloads(keys, tiny_ckpt, tmp_path):
    cfg = config(tiny_ckpt(), tmp_path / "out", **keys)
    run, trained, reloaded, original = train_and_reload(cfg)
    if cfg.quantization_bit:  # reloaded onto the 4-bit base: the same computation
        assert torch.allclose(reloaded, trained, atol=1e-5)
    else:
        assert torch.allclose(reloaded, trained, atol=1e-5)
        assert (trained - original).abs().max() > 1e-4  # the adapter really changed the model
    if cfg.additional_target:
        saved = json.loads((Path(cfg.output_dir) / "adapter_config.json").read_text())
        assert saved["modules_to_save"] == ["embed_tokens"]


def test_pissa_adapter_applies_to_the_original_base(tiny_ckpt, tmp_path):
    """PiSSA rewrites the base weights to the residual; the saved adapter is converted (rank 2r) so that on the
    untouched base it computes what the trained residual model computes."""
    cfg = config(tiny_ckpt(), tmp_path / "out", pissa_init=True, pissa_iter=-1, lora_rank=4)
    run, trained, reloaded, original = train_and_reload(cfg)
    saved = json.loads((Path(cfg.output_dir) / "adapter_config.json").read_text())
    assert (saved["r"], saved["init_lora_weights"]) == (8, True)
    assert (Path(cfg.output_dir) / "pissa_init" / "adapter_model.safetensors").is_file()
    assert torch.allclose(reloaded, trained, atol=1e-4)
    assert (trained - original).abs().max() > 1e-4


def test_loraplus_gives_lora_b_its_own_learning_rate(tiny_ckpt, tmp_path):
    from vlmtune.train import recipe

    cfg = config(tiny_ckpt(), tmp_path / "out", loraplus_lr_ratio=16, weight_decay=0.01, max_steps=1,
                 lr_scheduler_type="constant")
    run = recipe.setup(cfg, progress=False)
    recipe.train(run)
    names = {id(p): n for n, p in run.trainer.model.named_parameters()}
    lr_of = {}
    for g in run.trainer.optimizer.param_groups:
        for p in g["params"]:
            lr_of.setdefault(names[id(p)].split(".default")[0].rsplit(".", 1)[-1], set()).add(g["lr"])
    assert set(lr_of) == {"lora_A", "lora_B"}
    assert lr_of["lora_A"] == {1e-2} and len(lr_of["lora_B"]) == 1
    assert lr_of["lora_B"].pop() == pytest.approx(1e-2 * 16)
    decays = {g["weight_decay"] for g in run.trainer.optimizer.param_groups if g["params"]}
    assert decays == {0.01}
