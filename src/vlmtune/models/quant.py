"""QLoRA: loading the base model in 4 or 8 bits with bitsandbytes, through transformers' BitsAndBytesConfig.

Only the language model's linear layers are quantized by default. The vision tower and projector stay in
16/32 bits: they are a small share of a Qwen-VL model's weights (0.68 B of 8.3 B for Qwen2.5-VL-7B) and their
rounding error reaches every image token the language model reads (quantize_vision_tower: true quantizes the
tower's blocks too; the projector never is). lm_head stays unquantized as well (transformers keeps the output
embeddings out of every quantization). A mixture-of-experts model's routers stay unquantized too (their
rounding would move tokens between experts), and its experts cannot be quantized: bitsandbytes replaces nn.Linear
layers, and transformers keeps each MoE layer's experts as fused 3-D tensors, not linear layers, so they load in
the run's dtype (`unquantized_experts` counts them; the doctor's memory model does too).

    qcfg = quantization_config(cfg.finetuning, compute_dtype=torch.bfloat16)   # None without quantization_bit
    model = AutoModelForImageTextToText.from_pretrained(path, quantization_config=qcfg, ...)
    prepare_kbit(model)                                             # once, before the adapters go on
"""

from __future__ import annotations

import logging
import os

from ..config import FinetuningArgs
from .families import FAMILIES

# Module-name patterns transformers' bitsandbytes integration leaves unquantized (its `llm_int8_skip_modules`,
# matched from the start of a full module name as a regex, or as a suffix). `(.*\.)?` covers both layouts
# (`model.visual...` in transformers 5, `visual...` at the top in transformers 4).
VISION_TOWER_SKIP = r"(.*\.)?visual"
PROJECTOR_SKIP = (r"(.*\.)?visual\.merger", r"(.*\.)?visual\.deepstack_merger_list")
OUTPUT_SKIP = "lm_head"
# Every MoE family's routers, as suffixes ("mlp.gate" does not match "mlp.gate_proj"): no dense family has them.
ROUTER_SKIP = tuple(sorted({f"{e.block}.{r}" for f in FAMILIES.values() if (e := f.experts) for r in e.routers}))


class _UnlessQuantizing(logging.Filter):
    """Drops bitsandbytes' import-time notice about an optional CPU kernel ("Failed to load CPU gemm_4bit_forward
    from kernels-community") unless a quantized load was asked for: peft imports bitsandbytes whenever it is
    installed, so every LoRA run, export and doctor printed it to users who asked for no quantization."""

    quantizing = False

    def filter(self, record: logging.LogRecord) -> bool:
        return self.quantizing or "gemm_4bit_forward" not in str(record.msg)


BITSANDBYTES_NOTICE = _UnlessQuantizing()


def quiet_bitsandbytes() -> None:
    """Keep bitsandbytes' kernel notice out of a command's output until quantization is asked for (the CLI
    calls this first; `quantization_config`, which every quantized load goes through, lets it through again)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(BITSANDBYTES_NOTICE)  # added once


def skip_modules(ft: FinetuningArgs) -> list[str]:
    """The module patterns that stay unquantized for this run (see the module docstring for why)."""
    vision = list(PROJECTOR_SKIP) if ft.quantize_vision_tower else [VISION_TOWER_SKIP]
    return [*vision, OUTPUT_SKIP, *ROUTER_SKIP]


def quantization_config(ft: FinetuningArgs, compute_dtype=None):
    """transformers' BitsAndBytesConfig for quantization_bit (4 or 8), or None when it is null.

    compute_dtype: the dtype the dequantized 4-bit weights are multiplied in (the run's: bf16 on a GPU with
    bf16, else float32).
    """
    if ft.quantization_bit is None:
        return None
    BITSANDBYTES_NOTICE.quantizing = True
    require_bitsandbytes()
    import torch
    from transformers import BitsAndBytesConfig

    skip = skip_modules(ft)
    if ft.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=ft.quantization_type,
        bnb_4bit_use_double_quant=ft.double_quantization,
        bnb_4bit_compute_dtype=compute_dtype or torch.float32,
        llm_int8_skip_modules=skip,
    )


def load_kwargs(ft: FinetuningArgs, dtype=None) -> dict:
    """The from_pretrained arguments that quantize the model as the finetuning section says ({} without
    quantization_bit).

    A quantized model is placed on its device while it loads (bitsandbytes quantizes as the weights move there),
    on this process's GPU under torchrun, so the Trainer does not move it afterwards.
    """
    qcfg = quantization_config(ft, compute_dtype=dtype)
    if qcfg is None:
        return {}
    import torch

    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    return {"quantization_config": qcfg, "device_map": {"": device}}


def check_trainable_in_full(model, names: list[str]) -> None:
    """modules_to_save (additional_target, a trainable projector) must not hold quantized weights: PEFT would
    train a copy of 4/8-bit integers, which have no gradient."""
    from ..errors import ConfigError

    quantized = quantized_modules(model)
    bad = sorted({n for n in names for q in quantized if q == n or q.endswith("." + n) or f".{n}." in f".{q}."})
    if bad:
        raise ConfigError([f"additional_target={bad} names modules whose weights are quantized "
                           f"(quantization_bit={max(quantized.values())}), which cannot be trained in full; remove "
                           "them from additional_target (LoRA adapters train them), or remove quantization_bit"])


# The keys that decide how a base model is quantized, with their defaults (config/__init__.py declares them).
QUANT_KEYS = {"quantization_bit": None, "quantization_type": "nf4", "double_quantization": True,
              "quantize_vision_tower": False}


def trained_quantization(adapter) -> dict:
    """The quantization keys an adapter directory's training run used (from the vlmtune_config.yaml `train` saves
    next to it); the defaults, quantization_bit None, when there is no such file or it does not say."""
    import yaml

    path = os.path.join(os.fspath(adapter), "vlmtune_config.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            saved = yaml.safe_load(f) or {}
    except OSError:
        saved = {}
    if not isinstance(saved, dict):
        saved = {}
    return {k: saved.get(k, d) for k, d in QUANT_KEYS.items()}


def inference_kwargs(keys: dict, dtype=None) -> dict:
    """load_kwargs for chat: the from_pretrained arguments that quantize a base as `keys` (QUANT_KEYS) say."""
    return load_kwargs(FinetuningArgs(**{**QUANT_KEYS, **keys}), dtype)


def bitsandbytes_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bitsandbytes")
    except PackageNotFoundError:
        return None


def require_bitsandbytes() -> None:
    from ..errors import ConfigError

    if bitsandbytes_version() is None:
        raise ConfigError(["quantization_bit is set but bitsandbytes is not installed; pip install "
                           "'vlmtune[qlora]' (bitsandbytes>=0.45), or remove quantization_bit"])


_QUANTIZED_LINEAR = {"Linear4bit": 4, "Linear8bitLt": 8}  # bitsandbytes' layer classes


def quantized_modules(model) -> dict[str, int]:
    """Full module name -> bits, for every bitsandbytes 4/8-bit linear layer of `model` (PEFT wrappers included)."""
    return {n: _QUANTIZED_LINEAR[type(m).__name__] for n, m in model.named_modules()
            if type(m).__name__ in _QUANTIZED_LINEAR}


def quantized_bits(model) -> int | None:
    """4 or 8 for a model loaded through a BitsAndBytesConfig, else None."""
    bits = set(quantized_modules(model).values())
    return max(bits) if bits else None


def unquantized_experts(model) -> tuple[int, int, str]:
    """(elements of a quantized MoE's fused expert tensors, elements of all its weights, the experts' dtype): what
    bitsandbytes left in the run's dtype because it quantizes nn.Linear layers only. (0, total, "") when dense."""
    from .load import expert_parameters
    from .load import numel as _numel

    fused = set(expert_parameters(model))
    total = experts = 0
    dtype = ""
    for name, p in model.named_parameters():
        n = _numel(p)
        total += n
        if name in fused:
            experts += n
            dtype = str(p.dtype).removeprefix("torch.")
    return experts, total, dtype


def experts_note(model) -> str | None:
    """For a quantized MoE: a line saying that its experts are not quantized, and how much of it they are."""
    if not is_quantized(model):
        return None
    experts, total, dtype = unquantized_experts(model)
    if not experts:
        return None
    return (f"quantization_bit={quantized_bits(model)}: the experts' fused weights ({experts:,} of {total:,} "
            f"parameters, {100 * experts / total:.0f}%) stay in {dtype}: bitsandbytes "
            "quantizes nn.Linear layers, and transformers keeps each MoE layer's experts as one 3-D tensor; the "
            "attention, shared-expert and dense layers are quantized, and LoRA adapts the experts either way")


def is_quantized(model) -> bool:
    return quantized_bits(model) is not None


def prepare_kbit(model) -> None:
    """The k-bit preparation QLoRA needs before the adapters go on, done once: every base weight frozen.

    Hand-written instead of peft's prepare_model_for_kbit_training because that one also enables gradient
    checkpointing (the recipe does it once, as gradient_checkpointing says) and upcasts every 16-bit weight to
    float32, which would double the memory of the frozen vision tower and embeddings for no gain: frozen weights
    get no updates for float32 to protect, and autocast runs the layers in the run's precision.
    """
    for p in model.parameters():
        p.requires_grad = False
    # No input-grad hook: vlmtune's gradient checkpointing is non-reentrant, which needs none to reach the adapters.
