"""The doctor's memory and time model on the mixture-of-experts families: every expert's weights are counted, a
token's compute goes through its top-k experts only, and LoRA on the fused experts costs the W + BA copies PEFT
builds. Sizes from tiny configs on the meta device, checked term by term."""

from __future__ import annotations

import pytest

from vlmtune.commands.doctor.memory import estimate_memory, model_facts, step_flops

from _moe import EXPERTS, LAYERS, TOP_K, cfg, moe_config

H, MOE_I, SHARED_I = 32, 16, 16
PER_LAYER = EXPERTS * (2 * MOE_I * H + H * MOE_I)  # gate_up_proj + down_proj of every expert


@pytest.mark.parametrize("kind", ["qwen3_vl_moe", "qwen3_5_moe"])
def test_every_expert_is_counted_and_top_k_run(kind):
    layers = LAYERS[kind]
    facts = model_facts(moe_config(kind), cfg(lora_target="all"))
    assert (facts.experts, facts.active_experts) == (EXPERTS, TOP_K)
    assert facts.expert_weights == layers * PER_LAYER == facts.adapted_expert_weights
    assert facts.router_weights == layers * (EXPERTS * H + (H if kind == "qwen3_5_moe" else 0))
    assert facts.intermediate == TOP_K * MOE_I + (SHARED_I if kind == "qwen3_5_moe" else 0)
    full = model_facts(moe_config(kind), cfg(finetuning_type="full"))
    assert full.adapted_expert_weights == 0
    # full fine-tuning trains every expert (their gradients and AdamW states), not the frozen routers
    assert full.trainable["language_model"] == full.params["language_model"] - full.router_weights


def test_lora_on_experts_adds_its_weight_copies():
    named = cfg(lora_target="q_proj,k_proj,v_proj,o_proj", gradient_checkpointing=False)
    experts = cfg(lora_target="q_proj,k_proj,v_proj,o_proj,experts", gradient_checkpointing=False)
    config = moe_config("qwen3_vl_moe")
    a, b = model_facts(config, named), model_facts(config, experts)
    ea = estimate_memory(named, a, "cpu", batch=1, seq_len=64, image_tokens=0)
    eb = estimate_memory(experts, b, "cpu", batch=1, seq_len=64, image_tokens=0)
    per_layer = PER_LAYER  # float32 on the CPU: 4 bytes per element, and glibc's slack (CPU_ALLOCATOR_SLACK)
    assert eb.parts["activations"] - ea.parts["activations"] == 4 * per_layer * (LAYERS["qwen3_vl_moe"] + 1) * 1.5
    ckpt = cfg(lora_target="q_proj,k_proj,v_proj,o_proj,experts")
    ec = estimate_memory(ckpt, model_facts(config, ckpt), "cpu", batch=1, seq_len=64, image_tokens=0)
    ed = estimate_memory(cfg(lora_target="q_proj,k_proj,v_proj,o_proj"),
                         model_facts(config, cfg(lora_target="q_proj,k_proj,v_proj,o_proj")), "cpu", batch=1,
                         seq_len=64, image_tokens=0)
    assert ec.parts["activations"] - ed.parts["activations"] == 4 * per_layer * 2 * 1.5  # one layer at a time


def test_compute_counts_the_routed_experts_only():
    c = cfg(finetuning_type="full", gradient_checkpointing=False, gradient_accumulation_steps=1)
    f = model_facts(moe_config("qwen3_vl_moe"), c)
    base = step_flops(c, f, batch=1, seq_len=100, image_tokens=0)
    more = step_flops(c, f.__class__(**{**f.__dict__, "experts": 2 * EXPERTS, "expert_weights": 2 * f.expert_weights}),
                      batch=1, seq_len=100, image_tokens=0)
    assert more == base  # twice the experts, same top-k: the same work per token
    dense = step_flops(c, f.__class__(**{**f.__dict__, "active_experts": EXPERTS}), batch=1, seq_len=100,
                       image_tokens=0)
    # every expert active: the extra is the unrouted half of the experts, forward + input grad + weight grad
    assert dense - base == pytest.approx(2 * 100 * f.expert_weights / 2 * 3)


# -- the checks on the tiny MoE checkpoints --------------------------------------------------------
@pytest.fixture(scope="module")
def moe_checks(tiny_ckpt, tmp_path_factory):
    """`moe_checks(arch, *overrides) -> {name: Check}` on a one-sample dataset, on a made-up CPU."""
    import json

    from vlmtune.commands.doctor import DeviceInfo, GiB, run_checks
    from vlmtune.config import load_config
    from vlmtune.models.load import load_spec

    root = tmp_path_factory.mktemp("moe-doctor")
    (root / "data.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": "hello"}]}) + "\n")
    cpu = DeviceInfo("cpu", "Test CPU", 64 * GiB, False, None, 4, 32 * GiB, cpu_flops=10e9)
    loaded = {}

    def run(arch, *overrides):
        ckpt = str(tiny_ckpt(arch))
        loaded.setdefault(arch, load_spec(ckpt))
        cfg = load_config(None, [f"model_name_or_path={ckpt}", f"dataset={root / 'data.jsonl'}",
                                 f"output_dir={root / 'out'}", *overrides])
        return {c.name: c for c in run_checks(cfg, device_info=cpu, loaded=loaded[arch], env={})}

    return run


@pytest.mark.parametrize("arch", ["qwen3_vl_moe", "qwen3_5_moe"])
def test_vision_check_counts_expert_tensors_and_routers(moe_checks, arch):
    from vlmtune.models.families import FAMILIES
    from vlmtune.models.tiny import HYBRID_LAYER_TYPES, TEXT_LAYERS

    layers = len(HYBRID_LAYER_TYPES) if arch == "qwen3_5_moe" else TEXT_LAYERS
    routers = layers * len(FAMILIES[arch].experts.routers)
    c = moe_checks(arch)["vision"]
    assert c.status == "ok"
    assert f" and {2 * layers} fused expert tensors); {routers} routers frozen (freeze_router: true)" in c.message
    c = moe_checks(arch, "lora_target=experts", "freeze_router=false")["vision"]
    assert c.message.startswith(f"LoRA adapters on the language_model ({2 * layers} fused expert tensors); "
                                f"{routers} routers trained in full (freeze_router: false)")
    c = moe_checks(arch, "finetuning_type=full")["vision"]
    assert f"in full; {routers} routers frozen (freeze_router: true)" in c.message


def test_quantization_check_says_the_experts_stay_unquantized(moe_checks):
    pytest.importorskip("bitsandbytes")
    checks = moe_checks("qwen3_vl_moe", "quantization_bit=4")
    c = checks["quantization"]
    assert c.status == "warn"
    assert " of the model) are not quantized by quantization_bit=4: bitsandbytes quantizes linear layers" in c.message
    assert c.fix.startswith("the memory check counts the experts at full size")
    assert checks["memory"].status == "ok"


def test_expert_lora_under_zero3_warns(moe_checks, tmp_path):
    import json

    z3 = tmp_path / "z3.json"
    z3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    c = moe_checks("qwen3_vl_moe", f"deepspeed={z3}")["vision"]
    assert c.status == "warn"
    assert "; LoRA on fused expert tensors under DeepSpeed ZeRO-3 (" in c.message
    assert c.fix.startswith("name lora_target without the experts")
    c = moe_checks("qwen3_vl_moe", f"deepspeed={z3}", "lora_target=q_proj,k_proj,v_proj,o_proj")["vision"]
    assert c.status == "ok"
