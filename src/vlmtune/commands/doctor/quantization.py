"""The doctor's view of QLoRA: the bitsandbytes check, and the memory terms of quantized weights and DoRA.

Memory (bytes per element of a quantized weight, bitsandbytes' layouts):
  4-bit: 0.5 (two weights per byte) + the block constants, one per 64 weights: a float32 (4/64) or, with
         double_quantization, a uint8 plus a float32 per 256 blocks (1/64 + 4/16384);
  8-bit: 1 + one float32 scale per output row (counted as 4 / in_features, taken as 4 / hidden).
Quantized weights take no 16-bit autocast copy (bitsandbytes dequantizes each layer itself, one layer at a time,
and the graph keeps the packed weight, not the dequantized one): one dequantized layer (the largest, the MLP's
hidden × intermediate) is held while it computes.
DoRA keeps, for each adapted layer, the base layer's output (s × out_features) for the magnitude's gradient, and
builds each adapted weight in full once per forward to take its norm (the largest layer's, transiently).
"""

from __future__ import annotations

from .report import Check

BNB_TESTED = "0.50"  # the bitsandbytes this release was tested with (major.minor)
BNB_MIN = "0.45"  # its first release with the 4/8-bit layers transformers 5 loads

# Optimizers that are bitsandbytes' (transformers' OptimizerNames): they need it installed too, and keep their two
# AdamW states in 1 byte (8bit) instead of 4.
BNB_OPTIMIZERS_8BIT = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "lion_8bit", "paged_lion_8bit",
                       "ademamix_8bit", "paged_ademamix_8bit", "rmsprop_bnb_8bit")
BNB_OPTIMIZERS = BNB_OPTIMIZERS_8BIT + ("paged_adamw_32bit", "lion_32bit", "paged_lion_32bit",
                                        "paged_ademamix_32bit", "rmsprop_bnb", "rmsprop_bnb_32bit")


def quantized_bytes_per_element(cfg, hidden: int) -> float:
    if cfg.quantization_bit == 8:
        return 1 + 4 / max(1, hidden)
    return 0.5 + ((1 / 64 + 4 / (64 * 256)) if cfg.double_quantization else 4 / 64)


def quantized_elements(cfg, f) -> int:
    """Weights that bitsandbytes holds in 4/8 bits: every linear layer of the decoder layers (and of the vision
    blocks with quantize_vision_tower); lm_head, the embeddings and the projector stay in the run's dtype."""
    if cfg.quantization_bit is None:
        return 0
    return f.layer_linear_weights + (f.block_linear_weights if cfg.quantize_vision_tower else 0)


def weight_bytes_saved(cfg, f, w: int, autocast: bool) -> float:
    """Bytes the quantized weights save against the estimate's `w` bytes per weight (and its autocast copies)."""
    q = quantized_elements(cfg, f)
    if not q:
        return 0
    saved = q * (w - quantized_bytes_per_element(cfg, f.hidden))
    if autocast and not cfg.gradient_checkpointing:
        saved += f.layer_linear_weights * f.active_layers / max(1, f.layers) * 2
        if cfg.quantize_vision_tower:
            saved += f.block_linear_weights * f.active_vision_blocks / max(1, f.vision_depth) * 2
    return saved - f.hidden * f.intermediate * w  # one dequantized layer at a time


def optimizer_bytes(cfg, f, states: float) -> float:
    """The AdamW states with an 8-bit bitsandbytes optimizer: 2 bytes per trainable parameter, not 2 × 4."""
    return 2 * f.trainable_params if cfg.optim in BNB_OPTIMIZERS_8BIT else states


def dora_activation_bytes(cfg, f, batch: int, seq_len: int, a: int, w: int) -> float:
    """DoRA's extra activations (see the module docstring); 0 without use_dora."""
    if not (cfg.finetuning_type == "lora" and cfg.use_dora):
        return 0
    s = batch * seq_len
    out = getattr(f, "lora_out_per_layer", 0.0)
    layers = 1 if cfg.gradient_checkpointing else f.active_layers
    return a * s * out * layers + f.hidden * f.intermediate * max(w, 4)


def probe_bitsandbytes(kind: str) -> str | None:
    """What fails when bitsandbytes quantizes and dequantizes a block on this machine's `kind` device; None: works."""
    try:
        import bitsandbytes.functional as bnbf
        import torch

        x = torch.linspace(-1, 1, 128, device="cuda" if kind == "cuda" else "cpu").reshape(2, 64)
        packed, state = bnbf.quantize_4bit(x, quant_type="nf4")
        back = bnbf.dequantize_4bit(packed, state)
        if (back - x).abs().max() > 0.2:
            return "4-bit round trip is wrong"
        return None
    except Exception as e:  # any failure means the backend is not usable here
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}".rstrip(": ")


def _unquantized_experts(cfg, facts) -> str | None:
    """quantization_bit on a mixture-of-experts model: its fused experts are not linear layers, so bitsandbytes
    leaves them (most of the weights) in the run's dtype."""
    if cfg.quantization_bit is None or facts is None or not facts.expert_weights:
        return None
    share = facts.expert_weights / max(1, facts.total_params - facts.lora_params)
    return (f"the experts' fused weights ({facts.expert_weights:,} parameters, {share:.0%} of the model) are not "
            f"quantized by quantization_bit={cfg.quantization_bit}: bitsandbytes quantizes linear layers, and "
            "transformers keeps each MoE layer's experts as one 3-D tensor, so they stay in the run's dtype "
            "(LoRA still adapts them)")


def check_quantization(ctx, *, version: str | None, zero_stage: int, probe_here: bool = True) -> Check:
    """bitsandbytes for quantization_bit (and its optimizers): installed, version, backend on this device; ZeRO-3
    refused. `probe_here`: the device is this machine's (a made-up device cannot be probed)."""
    from packaging.version import Version

    cfg, dev = ctx.cfg, ctx.device
    needs = []
    if cfg.quantization_bit is not None:
        needs.append(f"quantization_bit={cfg.quantization_bit}")
    if cfg.optim in BNB_OPTIMIZERS:
        needs.append(f"optim={cfg.optim}")
    if not needs:
        return Check("quantization", "ok", "no quantization (quantization_bit: null) and no bitsandbytes optimizer; "
                     f"bitsandbytes {version or 'not installed'}")
    what = " and ".join(needs)
    if version is None:
        return Check("quantization", "fail", f"{what} needs bitsandbytes, which is not installed",
                     f"pip install 'vlmtune[qlora]' (bitsandbytes {BNB_TESTED}), or remove {needs[0].split('=')[0]}")
    fails, warns, notes = [], [], []
    v = Version(version)
    if v < Version(BNB_MIN):
        fails.append(f"bitsandbytes {version} is older than {BNB_MIN}")
    elif Version(f"{v.major}.{v.minor}") != Version(BNB_TESTED):
        warns.append(f"bitsandbytes {version} is {'older' if v < Version(BNB_TESTED) else 'newer'} than the "
                     f"tested {BNB_TESTED}")
    else:
        notes.append(f"bitsandbytes {version}")
    if cfg.quantization_bit is not None and zero_stage == 3:
        fails.append(f"quantization_bit={cfg.quantization_bit} with DeepSpeed ZeRO-3 ({cfg.deepspeed}): ZeRO-3 "
                     "partitions every weight across the GPUs and gathers it for each forward, which bitsandbytes' "
                     "packed 4/8-bit weights and their quantization state do not survive")
    if probe_here and not fails:
        problem = probe_bitsandbytes(dev.kind)
        if problem:
            fails.append(f"bitsandbytes does not work on this {dev.kind} ({dev.name}): {problem}")
        else:
            notes.append(f"its {'CUDA' if dev.kind == 'cuda' else 'CPU'} backend works on {dev.name}")
    elif not probe_here:
        notes.append(f"backend not probed: {dev.name} is not this machine's device")
    if cfg.quantization_bit is not None:
        kind = "8-bit (LLM.int8)" if cfg.quantization_bit == 8 else \
            f"4-bit {cfg.quantization_type}{' with double quantization' if cfg.double_quantization else ''}"
        parts = "the language model's and the vision tower's" if cfg.quantize_vision_tower else \
            "the language model's"
        kept = "the projector" if cfg.quantize_vision_tower else "the vision tower and projector"
        notes.append(f"{kind}: {parts} linear layers are quantized; {kept}, embeddings and lm_head stay in "
                     f"{'bf16' if dev.kind == 'cuda' and cfg.bf16 else 'float32'}")
    experts = _unquantized_experts(cfg, getattr(ctx, "facts", None))
    if experts:
        warns.append(experts)
    message = "; ".join(fails + warns + notes)
    if fails:
        fix = []
        if any("ZeRO-3" in f for f in fails):
            fix.append("use DeepSpeed ZeRO-2 (examples/deepspeed/ds_z2.json) or plain DDP, which keep a whole "
                       "quantized copy on each GPU, or remove quantization_bit")
        if any(f.startswith("bitsandbytes") for f in fails):
            fix.append(f"pip install bitsandbytes=={BNB_TESTED}.* (a build for this device), or remove "
                       f"{needs[0].split('=')[0]}")
        return Check("quantization", "fail", message, "; ".join(fix))
    if warns:
        fix = [] if not experts else ["the memory check counts the experts at full size: read its estimate, and "
                                      "compare LoRA without quantization_bit, which costs little more here"]
        if any(w.startswith("bitsandbytes") for w in warns):
            fix.append(f"if something breaks, pip install bitsandbytes=={BNB_TESTED}.*")
        return Check("quantization", "warn", message, "; ".join(fix))
    return Check("quantization", "ok", message)
