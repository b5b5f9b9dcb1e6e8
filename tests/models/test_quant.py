"""QLoRA on the CPU: the tiny checkpoints load in 4 and 8 bits through bitsandbytes, train a few steps through the
`train` recipe, and only the adapters change (the quantized base is bit-identical before and after)."""

from __future__ import annotations


import pytest
import torch

from vlmtune.errors import ConfigError
from vlmtune.models import quant
from vlmtune.models.load import apply_finetuning, trainable_summary

from _adapters import base_model
from _adapters import config as shared_config

pytest.importorskip("bitsandbytes")


def config(ckpt, out, **keys):
    return shared_config(ckpt, out, **{"max_steps": 3, **keys})


def test_no_quantization_without_the_key(tiny_ckpt, tmp_path):
    cfg = config(tiny_ckpt(), tmp_path)
    assert quant.quantization_config(cfg.finetuning) is None and quant.load_kwargs(cfg.finetuning) == {}
    assert quant.quantized_bits(base_model(cfg)) is None


def test_4bit_config_follows_the_keys(tiny_ckpt, tmp_path):
    cfg = config(tiny_ckpt(), tmp_path, quantization_bit=4, quantization_type="fp4", double_quantization=False)
    q = quant.quantization_config(cfg.finetuning, compute_dtype=torch.bfloat16)
    assert (q.load_in_4bit, q.load_in_8bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant) == \
        (True, False, "fp4", False)
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert q.llm_int8_skip_modules == [quant.VISION_TOWER_SKIP, "lm_head", "mlp.gate", "mlp.shared_expert_gate"]
    assert quant.load_kwargs(cfg.finetuning)["device_map"] == {"": "cpu"}


@pytest.mark.parametrize("bits", [4, 8])
def test_only_the_language_model_is_quantized(bits, tiny_ckpt, tmp_path):
    model = base_model(config(tiny_ckpt(), tmp_path, quantization_bit=bits))
    names = quant.quantized_modules(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or n in names]
    lm = [n for n in linears if ".language_model.layers." in n]
    assert set(names) == set(lm) and len(lm) == 14  # 2 layers × (q, k, v, o, gate, up, down)
    assert set(names.values()) == {bits}
    assert quant.quantized_bits(model) == bits
    assert not any("visual" in n or n.endswith("lm_head") for n in names)


def test_quantize_vision_tower_keeps_the_projector(tiny_ckpt, tmp_path):
    model = base_model(config(tiny_ckpt(), tmp_path, quantization_bit=4, quantize_vision_tower=True))
    names = quant.quantized_modules(model)
    assert any(".visual.blocks." in n for n in names)
    assert not any(".merger." in n or n.endswith("lm_head") for n in names)


def test_4bit_counts_real_elements(tiny_ckpt, tmp_path):
    """Params4bit packs two weights per byte: the trainable summary still counts the model's parameters."""
    plain = trainable_summary(apply_finetuning(base_model(config(tiny_ckpt(), tmp_path)),
                                              config(tiny_ckpt(), tmp_path).finetuning))
    cfg4 = config(tiny_ckpt(), tmp_path, quantization_bit=4)
    four = trainable_summary(apply_finetuning(base_model(cfg4), cfg4.finetuning))
    assert four == plain


def test_prepare_kbit_freezes_every_base_weight(tiny_ckpt, tmp_path):
    cfg = config(tiny_ckpt(), tmp_path, quantization_bit=4)
    model = base_model(cfg)
    for p in model.parameters():
        if p.is_floating_point():
            p.requires_grad = True
    quant.prepare_kbit(model)
    assert not any(p.requires_grad for p in model.parameters())
    peft_model = apply_finetuning(model, cfg.finetuning)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_additional_target_on_quantized_weights_is_refused(tiny_ckpt, tmp_path):
    cfg = config(tiny_ckpt(), tmp_path, quantization_bit=4, additional_target="self_attn,embed_tokens")
    with pytest.raises(ConfigError) as e:
        apply_finetuning(base_model(cfg), cfg.finetuning)
    (problem,) = e.value.problems
    assert problem.startswith("additional_target=['self_attn'] names modules whose weights are quantized "
                              "(quantization_bit=4)")


def test_missing_bitsandbytes_is_a_config_error(monkeypatch, tiny_ckpt, tmp_path):
    monkeypatch.setattr(quant, "bitsandbytes_version", lambda: None)
    with pytest.raises(ConfigError) as e:
        quant.quantization_config(config(tiny_ckpt(), tmp_path, quantization_bit=8).finetuning)
    assert "bitsandbytes is not installed" in e.value.problems[0]


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_only_the_adapters(bits, tiny_ckpt, tmp_path):
    from peft import PeftModel

    from vlmtune.train import recipe

    cfg = config(tiny_ckpt(), tmp_path / "out", quantization_bit=bits)
    run = recipe.setup(cfg, progress=False)
    before = {k: v.detach().clone() for k, v in run.trainer.model.state_dict().items()}
    result = recipe.train(run)
    after = run.trainer.model.state_dict()
    assert result.global_step == 3
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapters = {k for k in before if ".lora_A." in k or ".lora_B." in k}
    assert len(adapters) == 8 and changed == adapters  # the quantized base, scales included, is untouched
    quantized = [k for k in before if k.endswith(".weight") and before[k].dtype in (torch.uint8, torch.int8)]
    assert len(quantized) == 14  # the 4/8-bit weights were compared too (with their quantization state)

    # The saved adapter reloads onto the quantized base and computes what the trained model computes.
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    trained = run.trainer.model.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(base_model(cfg), cfg.output_dir).eval()
        assert quant.quantized_bits(reloaded) == bits
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)
