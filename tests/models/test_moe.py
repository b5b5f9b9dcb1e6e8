"""LoRA, routers and QLoRA on the mixture-of-experts families (Qwen3-VL-MoE, Qwen3.5-MoE), on tiny models built
from transformers' config classes: which weights get adapters or train, what is refused and why, and that the
adapters on the experts' fused tensors change the output and merge into exactly what they compute."""

from __future__ import annotations

import pytest
import torch

from vlmtune.errors import ConfigError
from vlmtune.models.load import (
    apply_finetuning,
    expert_parameters,
    lora_parameters,
    lora_targets,
    router_modules,
    trainable_summary,
)

from _moe import EXPERTS, LAYERS, cfg, moe_model

FAMILIES = ["qwen3_vl_moe", "qwen3_5_moe"]
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
FUSED = ("down_proj", "gate_up_proj")


def _leaves(names) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in names})


@pytest.mark.parametrize("kind", FAMILIES)
def test_all_targets_attention_and_experts_not_routers(kind):
    model = moe_model(kind)
    c = cfg(lora_target="all")
    params = lora_parameters(model, c.finetuning)
    assert len(params) == 2 * LAYERS[kind] and _leaves(params) == list(FUSED)
    targets = lora_targets(model, c.finetuning)
    assert not set(targets) & set(router_modules(model))
    routers = {"qwen3_vl_moe": ["gate"], "qwen3_5_moe": ["gate", "shared_expert_gate"]}[kind]
    assert _leaves(router_modules(model)) == routers and len(router_modules(model)) == len(routers) * LAYERS[kind]
    if kind == "qwen3_5_moe":  # the shared expert is a plain MLP: its linears are adapted like any other
        assert {"gate_proj", "up_proj", "down_proj"} <= set(_leaves(t for t in targets if ".shared_expert." in t))
    assert all(".visual." not in t for t in targets)  # the frozen vision tower gets none


@pytest.mark.parametrize("lora_target, expected", [
    ("q_proj,experts", ["gate_up_proj", "down_proj"]),  # the module that holds them
    ("down_proj", ["down_proj"]),
    ("experts.gate_up_proj", ["gate_up_proj"]),
    ("q_proj,v_proj", []),
])
def test_named_targets_reach_fused_tensors(lora_target, expected):
    model = moe_model("qwen3_5_moe")
    params = lora_parameters(model, cfg(lora_target=lora_target).finetuning)
    assert sorted(_leaves(params)) == sorted(expected) and len(params) == len(expected) * LAYERS["qwen3_5_moe"]
    if lora_target == "down_proj":  # a name applies wherever it matches: the shared expert's down_proj too
        assert len(lora_targets(model, cfg(lora_target="down_proj").finetuning)) == LAYERS["qwen3_5_moe"]


@pytest.mark.parametrize("kind", FAMILIES)
def test_lora_adapts_experts_and_freezes_routers(kind):
    model = apply_finetuning(moe_model(kind), cfg(lora_target="all").finetuning)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    expert_adapters = [n for n in trainable if ".mlp.experts." in n and ".lora_A." in n]
    assert len(expert_adapters) == 2 * LAYERS[kind]
    # one A of rank r per expert, stacked: PEFT's parameter LoRA adapts every expert separately
    a = dict(model.named_parameters())[expert_adapters[0]]
    assert a.shape[0] == 4 * EXPERTS


@pytest.mark.parametrize("kind", FAMILIES)
def test_freeze_router_false_trains_routers_in_full(kind):
    lora = apply_finetuning(moe_model(kind), cfg(lora_target="q_proj", freeze_router=False).finetuning)
    saved = {n for n, p in lora.named_parameters() if p.requires_grad and ".modules_to_save." in n}
    assert len(saved) == len(router_modules(moe_model(kind)))
    full = apply_finetuning(moe_model(kind), cfg(finetuning_type="full").finetuning)
    routers = {f"{r}." for r in router_modules(full)}
    frozen = {n for n, p in full.named_parameters() if not p.requires_grad and ".visual." not in n}
    assert frozen == {n for n, _ in full.named_parameters() if any(n.startswith(r) for r in routers)}
    trained = apply_finetuning(moe_model(kind), cfg(finetuning_type="full", freeze_router=False).finetuning)
    assert all(p.requires_grad for n, p in trained.named_parameters() if ".visual." not in n)


def test_keys_peft_cannot_apply_to_fused_experts_are_refused():
    with pytest.raises(ConfigError) as e:
        apply_finetuning(moe_model("qwen3_vl_moe"), cfg(lora_target="all", lora_dropout=0.05, use_dora=True).finetuning)
    problems = e.value.problems
    assert len(problems) == 2
    assert problems[0].startswith("lora_dropout=0.05 cannot apply to LoRA on the experts' fused weights")
    assert "use_dora=True" in problems[1] and "set use_dora: false" in problems[1]
    # without the experts the same keys are fine
    model = apply_finetuning(moe_model("qwen3_vl_moe"), cfg(lora_target="q_proj", lora_dropout=0.05).finetuning)
    assert model.base_model.model.model.language_model.layers[0].self_attn.q_proj.lora_dropout["default"].p == 0.05


def test_moe_keys_on_a_dense_model_are_refused(tiny_ckpt):
    from transformers import AutoModelForImageTextToText

    dense = AutoModelForImageTextToText.from_pretrained(tiny_ckpt("qwen2_vl"))
    assert expert_parameters(dense) == {} and router_modules(dense) == []
    with pytest.raises(ConfigError) as e:
        apply_finetuning(dense, cfg(freeze_router=False, moe_aux_loss_coef=0.01).finetuning)
    assert [p.split(" but ")[0] for p in e.value.problems] == ["freeze_router=false", "moe_aux_loss_coef=0.01"]


@pytest.mark.parametrize("kind", FAMILIES)
def test_expert_adapters_change_the_output_and_merge_exactly(kind):
    from peft import PeftModel

    base = moe_model(kind).eval()
    with torch.no_grad():
        before = base(input_ids=IDS).logits
    model = apply_finetuning(moe_model(kind), cfg(lora_target="experts").finetuning)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:  # B starts at zero: give the adapters an effect
                p.normal_(0, 0.1)
        adapted = model.eval()(input_ids=IDS).logits
        assert (adapted - before).abs().max() > 1e-3
        merged = model.merge_and_unload()(input_ids=IDS).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert isinstance(model, PeftModel)


@pytest.mark.parametrize("kind", FAMILIES)
def test_trainable_summary_counts_every_expert(kind):
    model = moe_model(kind)
    total = sum(p.numel() for p in model.parameters())
    summary = trainable_summary(apply_finetuning(model, cfg(lora_target="all").finetuning))
    lora = summary["language_model"]["trainable"]
    assert sum(d["total"] for d in summary.values()) == total + lora


def test_qlora_quantizes_the_linear_layers_and_adapts_the_unquantized_experts(tmp_path):
    """bitsandbytes replaces nn.Linear layers: attention and the shared expert go to 4 bits, the routers are kept
    out, and the experts' fused tensors stay float32 (said in the train log), with LoRA on them all the same."""
    pytest.importorskip("bitsandbytes")
    import warnings

    from vlmtune.models import quant
    from vlmtune.models.load import load_model

    moe_model("qwen3_5_moe").save_pretrained(tmp_path / "ckpt")
    c = cfg(model_name_or_path=str(tmp_path / "ckpt"), quantization_bit=4, lora_target="all")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(c.model, c.finetuning, dtype=torch.float32)
    names = quant.quantized_modules(model)
    layer0 = {n.split("layers.0.", 1)[1] for n in names if ".language_model.layers.0." in n}
    assert {"mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj",
            "linear_attn.in_proj_qkv", "linear_attn.out_proj"} <= layer0
    assert not any(n.endswith(("mlp.gate", "mlp.shared_expert_gate")) for n in names)
    experts, total, dtype = quant.unquantized_experts(model)
    assert experts == LAYERS["qwen3_5_moe"] * EXPERTS * (2 * 16 * 32 + 32 * 16) and dtype == "float32"
    note = quant.experts_note(model)
    assert note.startswith(f"quantization_bit=4: the experts' fused weights ({experts:,} of {total:,} parameters")
    model = apply_finetuning(model, c.finetuning)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    expert_grads = [p.grad for n, p in model.named_parameters() if ".mlp.experts." in n and ".lora_" in n]
    assert len(expert_grads) == 4 * LAYERS["qwen3_5_moe"] and all(g is not None for g in expert_grads)
