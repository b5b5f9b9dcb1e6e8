"""The memory model: peak training memory per device from a meta-device copy of the model and the worst batch.

weights + gradients + AdamW states + activations (or the optimizer step's temporaries), plus the CUDA or Python
runtime. Its activation terms were measured on CPU runs of tiny models (bench/bench_doctor_memory.py) and
recalibrated at the 2B's widths (bench/bench_real_size.py).
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass

from .quantization import dora_activation_bytes, optimizer_bytes, weight_bytes_saved
from .report import GiB

# Memory that is not tensors: CUDA context + cuBLAS workspaces + allocator fragmentation on a GPU; the Python,
# torch and transformers runtime on the CPU.
RUNTIME_BYTES = {"cuda": 1 * GiB, "cpu": 1 * GiB}

# On the CPU, glibc's malloc keeps freed activation buffers of the forward in its heap, so RSS runs above the
# live tensors: +50% of the activations, calibrated on bench/bench_real_size.py (Qwen2-VL-2B widths, LoRA with
# a frozen and a trainable tower; checked against full fine-tuning, which the calibration did not see).
CPU_ALLOCATOR_SLACK = 0.5


def meta_model(config, trust_remote_code: bool = False):
    """The *ForConditionalGeneration of `config` on the meta device: the module tree and shapes, no memory."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)


@dataclass(frozen=True)
class ModelFacts:
    """Sizes that decide training memory, read from a meta-device model with the run's adapters applied."""

    model_type: str
    params: dict[str, int]  # component -> parameters (adapters included)
    trainable: dict[str, int]
    lora_params: int  # adapter parameters (float32 whatever the model's dtype)
    linear_weights: int  # elements of linear weights outside the decoder layers and vision blocks (lm_head, merger)
    layer_linear_weights: int  # ... inside the decoder layers
    block_linear_weights: int  # ... inside the vision blocks
    hidden: int
    intermediate: int
    layers: int
    q_dim: int
    kv_dim: int
    vocab: int
    active_layers: int  # decoder layers that keep activations for the backward
    lora_per_layer: float
    vision_dim: int
    vision_intermediate: int
    vision_depth: int
    vision_gated: bool
    active_vision_blocks: int  # vision blocks that keep activations (0: the vision tower runs without a graph)
    lora_per_block: float
    projector_trains: bool
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    lora_out_per_layer: float = 0.0  # output features of the adapted decoder linears, per layer (DoRA's term)
    stored_bytes: int = 4  # bytes per weight in the checkpoint's files (config.json's dtype; 2 for the Qwen-VL ones)
    vision_heads: int = 16
    trainable_names: frozenset = frozenset()  # last parts of trainable parameter names ("embed_tokens", ...)
    # Mixture of experts (0 for a dense model). `intermediate` is then the MLP width one token runs through:
    # top-k × the experts' width + the shared expert's.
    experts: int = 0  # experts per MoE layer
    active_experts: int = 0  # experts each token is routed to (top-k)
    expert_weights: int = 0  # elements of every expert of every layer (fused 3-D tensors, not linear layers)
    router_weights: int = 0  # elements of the routers (experts × hidden per layer)
    adapted_expert_weights: int = 0  # elements of the fused expert tensors that carry LoRA adapters
    module_classes: frozenset = frozenset()  # class names of the model's modules (FSDP's wrap classes must be here)

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def trainable_params(self) -> int:
        return sum(self.trainable.values())


def model_facts(config, cfg, trust_remote_code: bool = False) -> ModelFacts:
    """Build `config`'s model on the meta device, apply the run's finetuning to it and read the sizes."""
    import torch.nn as nn

    from ...models.load import apply_finetuning, component_of, expert_parameters, router_modules, trainable_summary

    with warnings.catch_warnings():  # peft calls a transformers method deprecated in 5.x
        warnings.simplefilter("ignore", FutureWarning)
        model = apply_finetuning(meta_model(config, trust_remote_code), cfg.finetuning)
    summary = trainable_summary(model)
    tc, vc = config.text_config, config.vision_config
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    names = [(n, p) for n, p in model.named_parameters()]
    fused = expert_parameters(model)
    # adapters on a fused expert tensor change its weight, not an activation: they are not per-token LoRA layers
    lora = [n for n, _ in names if ".lora_A." in n and not _on_fused(n, fused)]
    linears = Counter()
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and "lora_" not in n:
            where = "layer" if ".language_model.layers." in n else "block" if ".visual.blocks." in n else "other"
            linears[where] += m.weight.numel()
    vision_dim = getattr(vc, "embed_dim", None) or vc.hidden_size
    vision_inter = getattr(vc, "intermediate_size", None) or int(vision_dim * getattr(vc, "mlp_ratio", 4))
    layer_re, block_re = re.compile(r"language_model\.layers\.(\d+)\."), re.compile(r"visual\.blocks\.(\d+)\.")
    pre_lm = any(p.requires_grad and (component_of(n) != "language_model" or "embed_tokens" in n) for n, p in names)
    pre_vision = any(p.requires_grad and "patch_embed" in n for n, p in names)
    sizes = dict(names)
    modules = dict(model.named_modules())
    experts = int(getattr(tc, "num_experts", 0) or 0) if fused else 0
    top_k = int(getattr(tc, "num_experts_per_tok", 0) or 0) if fused else 0
    return ModelFacts(
        model_type=config.model_type,
        params={c: d["total"] for c, d in summary.items()},
        trainable={c: d["trainable"] for c, d in summary.items()},
        lora_params=sum(p.numel() for n, p in names if "lora_" in n),
        linear_weights=linears["other"],
        layer_linear_weights=linears["layer"],
        block_linear_weights=linears["block"],
        hidden=tc.hidden_size,
        intermediate=_token_mlp_width(tc, top_k),
        layers=tc.num_hidden_layers,
        q_dim=heads * head_dim,
        kv_dim=tc.num_key_value_heads * head_dim,
        vocab=tc.vocab_size,
        active_layers=_active(names, layer_re, tc.num_hidden_layers, pre_lm or cfg.gradient_checkpointing),
        lora_per_layer=sum(1 for n in lora if component_of(n) == "language_model") / tc.num_hidden_layers,
        vision_dim=vision_dim,
        vision_intermediate=vision_inter,
        vision_depth=vc.depth,
        vision_gated=any(n.endswith("mlp.gate_proj.weight") or ".mlp.gate_proj.base_layer." in n
                         for n, _ in names if component_of(n) == "vision_tower"),
        active_vision_blocks=_active(names, block_re, vc.depth, pre_vision),
        lora_per_block=sum(1 for n in lora if component_of(n) == "vision_tower") / max(1, vc.depth),
        projector_trains=summary["projector"]["trainable"] > 0,
        patch_size=vc.patch_size,
        temporal_patch_size=vc.temporal_patch_size,
        merge_size=vc.spatial_merge_size,
        lora_out_per_layer=sum(p.shape[0] for n, p in names if ".lora_B." in n and not _on_fused(n, fused)
                               and component_of(n) == "language_model") / tc.num_hidden_layers,
        stored_bytes=_stored_bytes(config),
        vision_heads=getattr(vc, "num_heads", None) or getattr(vc, "num_attention_heads", None) or 16,
        trainable_names=frozenset(part for n, p in names if p.requires_grad for part in n.split(".")),
        experts=experts,
        active_experts=top_k,
        expert_weights=sum(sizes[n].numel() for n in fused),
        router_weights=sum(p.numel() for r in router_modules(model) for pn, p in modules[r].named_parameters()
                           if "original_module" not in pn),  # a router trained beside LoRA: its copy once
        adapted_expert_weights=sum(m.get_param().numel() for m in modules.values()
                                   if type(m).__name__ == "ParamWrapper"),
        module_classes=frozenset(type(m).__name__ for m in model.modules()),
    )


def _on_fused(name: str, fused: dict) -> bool:
    """An adapter parameter of a fused expert tensor (PEFT's ParamWrapper lives on the experts module)."""
    owner = name.split(".lora_", 1)[0].replace(".base_layer", "")
    return any(f.replace(".base_layer", "").rsplit(".", 1)[0] == owner for f in fused)


def _token_mlp_width(tc, top_k: int) -> int:
    """The MLP width one token's activations go through: the dense MLP's, or for a MoE the top-k experts' plus
    the shared expert's."""
    if not top_k:
        return tc.intermediate_size
    return top_k * tc.moe_intermediate_size + int(getattr(tc, "shared_expert_intermediate_size", 0) or 0)


def _stored_bytes(config) -> int:
    d = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    return 2 if d.removeprefix("torch.") in ("bfloat16", "float16") else 4


def _active(names, pattern, depth: int, all_when: bool) -> int:
    """Layers from the first one with a trainable parameter to the last: the backward runs through them."""
    first = min((int(m.group(1)) for n, p in names if p.requires_grad and (m := pattern.search(n))), default=None)
    if first is None:
        return depth if all_when else 0
    return depth if all_when else depth - first


@dataclass(frozen=True)
class MemoryEstimate:
    total: int
    parts: dict[str, int]  # weights, gradients, optimizer, activations, step, batch, runtime
    batch: int
    seq_len: int
    image_tokens: int
    # Loading: weights in the training dtype + the checkpoint's tensors in the file's dtype while they are
    # converted (safetensors maps the file; every page read stays resident until loading ends) + runtime. 0 where
    # no conversion happens. The peak (`total`) is the larger of loading and training.
    load_peak: int = 0
    train_peak: int = 0


def estimate_memory(cfg, facts: ModelFacts, device_kind: str, *, batch: int, seq_len: int, image_tokens: int,
                    world_size: int = 1, zero_stage: int = 0) -> MemoryEstimate:
    """Peak memory of one device training on `batch` rows of `seq_len` tokens holding `image_tokens` image tokens.

    Bytes per element: weights 2 (bf16 on a GPU) or 4 (float32: the CPU, fp16 autocast, no mixed precision);
    LoRA adapters 4 (peft keeps them in float32); activations a = 2 under bf16/fp16, else 4.
    Trainable parameters: gradient + 2 AdamW states, each in the parameter's dtype.
    Activations (elements × a unless stated), with s = seq_len × batch, P = image patches = image_tokens × merge²,
    h/i/q/kv the decoder's hidden/MLP/query/key-value widths, V the vocabulary, d/i_v the vision widths:
      each decoder layer the backward runs through (active_layers) keeps s × layer, where layer =
        7h + 2q + 2kv + 4i                    full / freeze (every linear keeps its input)
        4h + 2q + 2kv + 4i + r × LoRA layers  LoRA (frozen weights keep no input; adapters keep r)
      each vision block that trains (active_vision_blocks) keeps P × block, block = 10d + 3i_v (4i_v for a
      gated MLP) + r × LoRA layers; a frozen vision tower runs without a graph and keeps nothing;
      + s × 4h (embeddings, image-feature scatter, final norm) + P × 3d when the vision side trains (merger);
      the logits: s × V × 12 bytes (their float32 log-softmax, its gradient and the logits' gradient at the start
      of the backward) + s × V × a when a is 2 (the 16-bit logits before the upcast).
      With gradient checkpointing a layer keeps only its input (s × h, P × d per vision block) and the backward
      recomputes one layer at a time after the logits are freed: kept inputs + max(logits, one layer, one block).
    Autocast (fp16 on a GPU, bf16 on the CPU) casts float32 weights to 16 bits for each linear layer, and the
    graph keeps those copies for the backward (2 bytes per weight of the layers the backward runs through, except
    in checkpointed layers).
    Peak = weights + AdamW states + max(gradients + activations, gradients + step temporaries) + batch + runtime:
    with gradient_accumulation_steps > 1 the gradients of the previous micro-batches are held while the next
    one's activations build up; with 1, gradients appear as activations are freed, so max(gradients,
    activations) replaces their sum. The AdamW step (foreach, on a GPU) makes one temporary copy of the
    trainable parameters. ZeRO stage 1/2/3 divides the states / gradients / weights by world_size.
    quantization_bit (4/8-bit weights), 8-bit bitsandbytes optimizers and DoRA: the terms of quantization.py.
    Mixture of experts: the weights, gradients and states count every expert (they are parameters like any
    other); a token's activations go through its top-k experts only, so i is top-k × the experts' width + the
    shared expert's, and each MoE layer keeps 2kh + 2E more per token (the routed copies of its input and output,
    the router's logits and probabilities). LoRA on the fused expert tensors (PEFT's parameter LoRA) builds each
    adapted tensor whole, W + BA, once per forward, and the graph keeps it for the backward: w bytes × the adapted
    expert weights of every layer the backward runs through (of one layer under gradient checkpointing), plus
    one layer's worth for its gradient in the backward.
    Preference stages: dpo runs 2 × batch sequences (both sides of each pair, with their images), and a reference
    adds its weights and logits (reference_bytes).
    On the CPU, loading a 16-bit checkpoint into float32 holds both copies for a moment (load_peak); the
    estimate is the larger of that and the training peak. Also on the CPU, activations get CPU_ALLOCATOR_SLACK
    (glibc keeps freed buffers). A trainable vision tower adds its attention probabilities and their gradients
    (12 bytes × heads × n² per image); full fine-tuning of a (tied) embedding adds its dense vocab × hidden
    gradient. Measured at Qwen2-VL-2B widths by bench/bench_real_size.py (docs/benchmarks.md).
    """
    f = facts
    rows = batch
    batch, image_tokens = batch * pair_factor(cfg), image_tokens * pair_factor(cfg)  # dpo: both sides of each pair
    gpu = device_kind == "cuda"
    half = cfg.bf16 or cfg.fp16
    w = 2 if gpu and cfg.bf16 else 4
    a = 2 if half else 4
    lora = f.lora_params
    base_trainable = f.trainable_params - lora
    weights = (f.total_params - lora) * w + lora * 4
    if half and not (gpu and cfg.bf16):
        weights += _autocast_copies(cfg, f) * 2
    weights -= weight_bytes_saved(cfg, f, w, half and not (gpu and cfg.bf16))  # quantization_bit: quantization.py
    trainable_bytes = base_trainable * w + lora * 4
    grads, states = trainable_bytes, optimizer_bytes(cfg, f, 2 * trainable_bytes)  # 8-bit optimizers: quantization.py
    step = trainable_bytes if gpu else 0
    if zero_stage >= 1:
        states //= world_size
    if zero_stage >= 2:
        grads //= world_size
    if zero_stage >= 3:
        weights //= world_size
    acts = _activations(cfg, f, batch, seq_len, image_tokens, a)
    acts += dora_activation_bytes(cfg, f, batch, seq_len, a, w)
    acts += _expert_copies(cfg, f, w)
    if not gpu:
        acts *= 1 + CPU_ALLOCATOR_SLACK
    if batch > 1:  # padded batches carry a boolean attention mask of s² per row
        acts += batch * seq_len**2
    if f.trainable["language_model"] and cfg.finetuning_type != "lora" and "embed_tokens" in f.trainable_names:
        # The embedding matrix's gradient arrives as a new dense tensor (tied: from lm_head and from the
        # embedding, summed) before autograd adds it to .grad: one more vocab × hidden in the backward.
        acts += f.vocab * f.hidden * w
    reference, ref_acts = reference_bytes(cfg, f, batch * seq_len, w, a)
    weights += reference
    acts += ref_acts
    if cfg.gradient_accumulation_steps > 1:
        live = max(grads + acts, grads + step)
    else:
        live = max(grads, acts, grads + step)
    pixels = image_tokens * f.merge_size**2 * 3 * f.temporal_patch_size * f.patch_size**2 * 4
    batch_bytes = 4 * batch * seq_len * 8 + pixels
    runtime = RUNTIME_BYTES["cuda" if gpu else "cpu"]
    parts = {"weights": weights, "gradients": grads, "optimizer": states, "activations": acts, "step": step,
             "batch": batch_bytes, "runtime": runtime, "reference": reference}
    train_peak = weights + states + live + batch_bytes + runtime
    load_peak = 0
    if not gpu and f.stored_bytes != w:  # on a GPU the converting copy is in host RAM, not device memory
        load_peak = (f.total_params - lora) * w + (f.total_params - lora) * f.stored_bytes + runtime
    total = max(train_peak, load_peak)
    return MemoryEstimate(int(total), {k: int(v) for k, v in parts.items()}, rows, seq_len,
                          image_tokens // pair_factor(cfg), int(load_peak), int(train_peak))


def pair_factor(cfg) -> int:
    """Sequences per row: 2 for stage dpo (a pair's chosen and rejected sides go through one forward)."""
    return 2 if getattr(cfg, "stage", "sft") == "dpo" else 1


def reference_bytes(cfg, f: ModelFacts, s: int, w: int, a: int) -> tuple[float, float]:
    """(weights, activations) the preference stages' reference adds (train/preference.py): a frozen copy of the
    model for full / freeze fine-tuning, or `ref_model` (counted at the model's size); none for LoRA (the adapter is
    disabled), precomputed log-probabilities, orpo and simpo. Its forward runs without a graph while the policy's
    activations are held, so its logits (s × V, and their float32 log-softmax) add to the peak."""
    stage = getattr(cfg, "stage", "sft")
    if stage == "sft" or (stage == "dpo" and cfg.pref_loss in ("orpo", "simpo")) or cfg.precompute_ref_log_probs:
        return 0.0, 0.0
    copy = cfg.ref_model is not None or cfg.finetuning_type != "lora"
    weights = (f.total_params - f.lora_params) * w if copy else 0.0
    return float(weights), float(s * f.vocab * (a + 4))


def _expert_copies(cfg, f: ModelFacts, w: int) -> float:
    """Bytes of the W + BA tensors PEFT builds for LoRA on fused experts, kept for the backward (see
    estimate_memory), and one layer's gradient of them."""
    if not f.adapted_expert_weights:
        return 0
    per_layer = f.adapted_expert_weights / max(1, f.layers)
    kept = per_layer if cfg.gradient_checkpointing else per_layer * f.active_layers
    return (kept + per_layer) * w


def _autocast_copies(cfg, f: ModelFacts) -> float:
    """Elements of the 16-bit weight copies autocast makes and the graph keeps for the backward: those of every
    linear layer the backward runs through, outside checkpointed layers (those are cast again when recomputed)."""
    held = f.linear_weights
    if not cfg.gradient_checkpointing:
        held += f.layer_linear_weights * f.active_layers / max(1, f.layers)
        held += f.block_linear_weights * f.active_vision_blocks / max(1, f.vision_depth)
    return held


def _activations(cfg, f: ModelFacts, batch: int, seq_len: int, image_tokens: int, a: int) -> float:
    """Peak activation bytes (see estimate_memory)."""
    s = seq_len * batch
    h, i, q, kv = f.hidden, f.intermediate, f.q_dim, f.kv_dim
    rank = cfg.lora_rank
    if cfg.finetuning_type == "lora":
        layer = 4 * h + 2 * q + 2 * kv + 4 * i + rank * f.lora_per_layer
    else:
        layer = 7 * h + 2 * q + 2 * kv + 4 * i
    if f.experts:  # routed copies of each token's input and output, the router's logits and probabilities
        layer += 2 * f.active_experts * h + 2 * f.experts
    patches = image_tokens * f.merge_size**2
    d, iv = f.vision_dim, f.vision_intermediate
    block = 10 * d + (4 if f.vision_gated else 3) * iv + rank * f.lora_per_block
    logits = s * f.vocab * (12 + (a if a != 4 else 0))  # bytes, not elements
    kept = s * 4 * h + (patches * 3 * d if f.active_vision_blocks or f.projector_trains else 0)
    # A vision block that trains keeps its attention probabilities, and its backward makes their gradient and
    # the scores' (heads × n² per image of n patches; Σn² ≤ the largest image's patches × all patches). Measured
    # at 2B widths, this adds to the logits' peak rather than overlapping it.
    attention = 0
    if f.active_vision_blocks:
        largest_image = patches
        if cfg.image_max_pixels:
            largest_image = min(patches, cfg.image_max_pixels // (f.patch_size**2))
        attention = 3 * 4 * f.vision_heads * largest_image * patches
    if cfg.gradient_checkpointing:
        # Layer inputs are kept; the backward recomputes one layer (or vision block) at a time, after the logits
        # and their gradients are freed, so only the largest of the three counts.
        kept += s * h * f.active_layers + patches * d * f.active_vision_blocks
        largest = max(logits, a * s * layer * min(1, f.active_layers), a * patches * block * min(1, f.active_vision_blocks))
        return a * kept + largest + attention
    kept += s * layer * f.active_layers + patches * block * f.active_vision_blocks
    return a * kept + logits + attention * f.active_vision_blocks


def shard_stage(cfg, environ=None) -> int:
    """What estimate_memory divides by the shard count: DeepSpeed's ZeRO stage, or the stage FSDP2's memory
    matches: full_shard (weights, gradients and optimizer states sharded) 3, shard_grad_op 2."""
    import os

    from ...train.sharding import fsdp_reshards

    fsdp = fsdp_reshards(cfg, os.environ if environ is None else environ)
    if fsdp is not None:
        return 3 if fsdp else 2
    return zero_stage(cfg)[0]


def zero_stage(cfg) -> tuple[int, str | None]:
    """(ZeRO stage of the DeepSpeed config, a problem reading it)."""
    if not cfg.deepspeed:
        return 0, None
    try:
        with open(cfg.deepspeed, encoding="utf-8") as fh:
            ds = json.load(fh)
    except (OSError, ValueError) as e:
        return 0, f"cannot read deepspeed={cfg.deepspeed!r}: {e}"
    stage = (ds.get("zero_optimization") or {}).get("stage", 0) if isinstance(ds, dict) else 0
    return (stage if isinstance(stage, int) else 0), None


def step_flops(cfg, f: ModelFacts, *, batch: int, seq_len: int, image_tokens: int) -> float:
    """Rough matmul FLOPs of one optimizer step (gradient_accumulation_steps micro-batches of this size).

    Per micro-batch, with N the linear weights a part runs through and T its tokens (decoder: batch × seq_len;
    vision: image patches): forward 2·N·T; the backward's input gradients 2·N·T where the backward runs through
    (all of the decoder and lm_head; the vision tower when it trains); weight gradients 2·N·T for weights trained
    in full; checkpointed layers run their forward twice. Attention's T² terms and the merger are left out.
    A MoE layer's N is its linear layers, its router and the top-k of its experts a token is routed to (k / E of
    the expert weights); LoRA on fused experts adds 2 · rank · the adapted expert weights per forward (building
    W + BA), twice that in the backward, whatever the tokens."""
    s = batch * seq_len * pair_factor(cfg)
    patches = image_tokens * f.merge_size**2 * pair_factor(cfg)
    full = cfg.finetuning_type != "lora"
    routed = f.expert_weights * f.active_experts / f.experts if f.experts else 0
    lm = (f.layer_linear_weights + f.router_weights + routed) * f.active_layers / max(1, f.layers)
    head = f.vocab * f.hidden
    recompute = 1 if cfg.gradient_checkpointing else 0
    lm_flops = 2 * s * (head * 2 + lm * (2 + recompute) + (lm + head) * (1 if full else 0))
    lm_flops += 2 * s * (f.layer_linear_weights + f.router_weights + routed) * \
        (1 - f.active_layers / max(1, f.layers))  # forward only
    lm_flops += 2 * cfg.lora_rank * f.adapted_expert_weights * (3 + recompute)  # W + BA: forward, its backward
    vision = f.block_linear_weights
    trains = f.active_vision_blocks > 0
    v_flops = 2 * patches * vision * (1 + (1 + recompute) * trains + (1 if full and trains else 0))
    return float(cfg.gradient_accumulation_steps * (lm_flops + v_flops))
