"""The doctor's checks of the run against the model: whether it loads (and its parameters), which parts train
(vision: the LoRA targets against the freeze_* keys), the memory per device with the batch that fits, and
sharding (FSDP2 wrap classes, mixed modalities, memory per rank)."""

from __future__ import annotations

from collections import Counter
from typing import Callable

from ...errors import VlmtuneError
from .context import Context, family, world_size, worst_batch
from .memory import MemoryEstimate, estimate_memory, shard_stage
from .memory import zero_stage as _zero_stage
from .report import Check
from .report import gib as _gib
from .report import leaf_names as _leaf_names
from .report import names_text as _names
from .report import size_text as _size

# memory: ok up to this share of the device's memory (the estimate is good to about ±25%); above it warn;
# above all of it fail. Suggested batch sizes keep the estimate under MEMORY_OK_SHARE.
MEMORY_OK_SHARE = 0.80


def check_model(ctx: Context) -> Check:
    cfg = ctx.cfg
    if ctx.model_error:
        return Check("model", "fail", f"cannot load model_name_or_path={cfg.model_name_or_path!r}: "
                     f"{ctx.model_error}", "set model_name_or_path to a Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE) or "
                     "Qwen3.5(-MoE) checkpoint folder or hub id (the hub needs network access)")
    if ctx.facts is None:
        return Check("model", "ok", f"{family(ctx)} from {cfg.model_name_or_path}")
    f = ctx.facts
    parts = ", ".join(f"{c} {f.params[c]:,}" for c in f.params)
    trains = (f"; {f.trainable_params:,} train ({100 * f.trainable_params / f.total_params:.2f}%) with "
              f"finetuning_type={cfg.finetuning_type}" if cfg.do_train else "")
    return Check("model", "ok", f"{family(ctx)} from {cfg.model_name_or_path}: {f.total_params:,} parameters "
                 f"({parts}){trains}")


def check_predict(ctx: Context) -> Check:
    """do_train: false: what is predicted with, and that the adapter is there; the training checks (what trains,
    memory for a training step, sharding, data-loader workers, ranks) do not apply and are not run."""
    from ...errors import VlmtuneError
    from ...models.load import check_adapter

    cfg = ctx.cfg
    adapter = cfg.adapter_name_or_path
    if adapter:
        try:
            check_adapter(adapter)
        except VlmtuneError as e:
            return Check("predict", "fail", str(e), "set adapter_name_or_path to the folder a LoRA run saved "
                         "(adapter_config.json and adapter_model.safetensors), or null for model_name_or_path alone")
    with_ = f"{cfg.model_name_or_path} with the adapter {adapter}" if adapter else cfg.model_name_or_path
    return Check("predict", "ok", f"do_train: false: generates for eval_dataset={cfg.eval_dataset!r} with {with_}, "
                 f"{cfg.per_device_eval_batch_size} sample(s) at a time, at most {cfg.max_new_tokens} new tokens each; "
                 "the training checks (vision, memory, sharding, workers, distributed) do not apply")


def check_vision(ctx: Context) -> Check:
    """Which parts train, and whether that is what the freeze_* keys say.

    With LoRA only the lora_target layers train (plus a trainable projector, in full). `all` follows the
    freeze_* keys; named targets match module names wherever they are (models/load.py `lora_targets`), so:
    - freeze_vision_tower: false while no target is in the vision tower -> fail: the tower would stay frozen
      although the user asked to train it, with nothing in the logs to say so;
    - a target that is also a layer name of a frozen part (qkv, or gate_proj of the Qwen2.5-VL vision MLP)
      -> warn: adapters go there although that part is "frozen". The run is valid and trains exactly what
      lora_target names, and naming layers is the one way to adapt only some of a part, so this does not stop
      training; but it is rarely meant (LLaMA-Factory keeps a frozen vision tower free of adapters).
    """
    cfg = ctx.cfg
    if ctx.model is None:
        return Check("vision", "warn", "not checked: the model could not be loaded (see the model check)",
                     "fix the model check first")
    from ...models.load import expert_parameters, frozen_components, linear_modules, lora_parameters, lora_targets

    linears = linear_modules(ctx.model)
    frozen = frozen_components(cfg.finetuning)
    vision_names = _leaf_names(n for n, c in linears.items() if c == "vision_tower")
    if cfg.finetuning_type != "lora":
        return _vision_without_lora(ctx, frozen)
    targets = lora_targets(ctx.model, cfg.finetuning)
    fused = lora_parameters(ctx.model, cfg.finetuning)  # a MoE's experts: fused tensors, adapted through target_parameters
    if not targets and not fused:
        experts = _leaf_names(expert_parameters(ctx.model))
        also = f", its experts' fused weights {_names(experts)} (or experts for both)" if experts else ""
        return Check("vision", "fail", f"lora_target={_names(cfg.lora_target)} matches no linear layer of the "
                     f"model; its linear layers are named {_names(_leaf_names(linears))}{also}",
                     "set lora_target: all, or to names from that list")
    by_part = Counter(linears[t] for t in targets)
    if "vision_tower" not in frozen and not by_part["vision_tower"]:
        wanted = list(dict.fromkeys([*cfg.lora_target, *vision_names]))
        return Check("vision", "fail", f"freeze_vision_tower=false but lora_target={_names(cfg.lora_target)} "
                     "matches no linear layer of the vision tower, so the vision tower would stay frozen; its "
                     f"linear layers are named {_names(vision_names)}",
                     f"set lora_target: all (adapters on every linear layer of the parts not frozen), or add "
                     f"the vision tower's layers: lora_target: {','.join(wanted)}")
    against = sorted(c for c in by_part if c in frozen)
    summary = _adapter_summary(ctx, by_part, frozen, len(fused))
    if against and cfg.lora_target != ["all"]:
        hits = {c: _leaf_names(t for t in targets if linears[t] == c) for c in against}
        what = "; ".join(f"{by_part[c]} layers of the {c} ({', '.join(hits[c])}) although freeze_{_flag(c)} is "
                         f"true" for c in against)
        return Check("vision", "warn", f"lora_target={_names(cfg.lora_target)} puts adapters on {what}: named "
                     f"targets apply wherever the name matches, whatever the freeze_* keys say ({summary})",
                     "to keep those parts frozen set lora_target: all (it follows the freeze_* keys) or name only "
                     "layers of the parts that train; to train them on purpose set " +
                     " and ".join(f"freeze_{_flag(c)}: false" for c in against))
    if fused and shard_stage(cfg, ctx.env) == 3:  # FSDP2 full_shard gathers per unit as ZeRO-3 does
        engine = f"DeepSpeed ZeRO-3 ({cfg.deepspeed})" if cfg.deepspeed else "FSDP2 full_shard (fsdp)"
        return Check("vision", "warn", f"{summary}; LoRA on fused expert tensors under {engine} is not verified: "
                     "PEFT's parameter LoRA re-parametrizes each expert tensor around the forward, which "
                     f"{'ZeRO-3' if cfg.deepspeed else 'FSDP2'} partitions and gathers per module (PEFT issue #2916)",
                     "name lora_target without the experts (such as q_proj,k_proj,v_proj,o_proj), or use ZeRO-2 "
                     "(examples/deepspeed/ds_z2.json) if every GPU can hold the whole model")
    return Check("vision", "ok", summary)


def _flag(component: str) -> str:
    return {"vision_tower": "vision_tower", "projector": "multi_modal_projector",
            "language_model": "language_model"}[component]


def _adapter_summary(ctx: Context, by_part: Counter, frozen: set[str], fused: int = 0) -> str:
    order = ("language_model", "vision_tower", "projector")
    counts = {c: [f"{by_part[c]} linear layers"] if by_part[c] else [] for c in order}
    if fused:  # a MoE's experts are in the language model
        counts["language_model"].append(f"{fused} fused expert tensors")
    parts = [f"{c} ({' and '.join(counts[c])})" for c in order if counts[c]]
    text = "LoRA adapters on the " + " and the ".join(parts) + _router_text(ctx)
    if "projector" not in frozen:
        text += "; the projector trains in full"
    idle = [c for c in order if not by_part[c] and c in frozen]
    if idle:
        text += "; frozen: " + ", ".join(idle)
    missing = [c for c in order if not by_part[c] and c not in frozen and c != "projector"
               and not (c == "language_model" and fused)]
    if missing:
        text += "; no adapters on the " + " and the ".join(missing) + " (lora_target names none of its layers)"
    return text + _trainable_text(ctx)


def _router_text(ctx: Context) -> str:
    """A MoE's routers: frozen (the default) or trained in full."""
    from ...models.load import router_modules

    routers = router_modules(ctx.model)
    if not routers:
        return ""
    how = "frozen (freeze_router: true)" if ctx.cfg.freeze_router else "trained in full (freeze_router: false)"
    return f"; {len(routers)} routers {how}"


def _trainable_text(ctx: Context) -> str:
    f = ctx.facts
    if f is None:
        return ""
    return f"; {f.trainable_params:,} of {f.total_params:,} parameters train"


def _vision_without_lora(ctx: Context, frozen: set[str]) -> Check:
    cfg = ctx.cfg
    order = ("language_model", "vision_tower", "projector")
    trains = [c for c in order if c not in frozen]
    how = "in full" if cfg.finetuning_type == "full" else \
        f"(of the language_model only freeze_trainable_layers={cfg.freeze_trainable_layers} decoder layers)"
    text = f"finetuning_type={cfg.finetuning_type} trains the {' and the '.join(trains)} {how}"
    if "language_model" in trains:
        text += _router_text(ctx)
    if frozen:
        text += "; frozen: " + ", ".join(c for c in order if c in frozen)
    return Check("vision", "ok", text + _trainable_text(ctx))


def _vision_tokens(ctx: Context) -> str:
    """What the memory check calls the rows' vision tokens: image + video pads when the data has videos."""
    return "vision tokens (image and video)" if ctx.data is not None and ctx.data.summary.get("videos") else \
        "image tokens"


def check_memory(ctx: Context) -> Check:
    cfg, dev = ctx.cfg, ctx.device
    if ctx.facts is None:
        why = ctx.facts_error or "the model could not be loaded (see the model check)"
        return Check("memory", "warn", f"not estimated: {why}", "fix the model and vision checks first")
    b, ga = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    stage = shard_stage(cfg, ctx.env)
    world = world_size(ctx)

    def estimate(batch: int) -> MemoryEstimate:
        seq, images, _ = worst_batch(ctx, batch)
        return estimate_memory(cfg, ctx.facts, dev.kind, batch=batch, seq_len=seq, image_tokens=images,
                               world_size=world, zero_stage=stage)

    est = estimate(b)
    budget = dev.total_memory if dev.kind == "cuda" else dev.free_ram
    where = f"{dev.name}'s {_gib(budget)}" if dev.kind == "cuda" else \
        f"{_gib(budget)} of free RAM (no GPU: training runs on the CPU)"
    source = worst_batch(ctx, b)[2]
    parts = ", ".join(f"{k} {_size(v)}" for k, v in est.parts.items() if v)
    if getattr(cfg, "stage", "sft") == "dpo":
        parts += "; stage dpo: both sides of each pair in one forward (2 sequences per row)"
    if est.parts.get("reference"):
        parts += "; the reference model (a frozen copy, or ref_model) is counted in weights: LoRA needs none"
    if dev.kind == "cpu":
        parts += "; " + _cpu_step_time(ctx, est)
    if est.load_peak > est.train_peak:
        parts += (f"; loading peaks higher, at {_gib(est.load_peak)} (training {_gib(est.train_peak)}): float32 "
                  "weights while the 16-bit checkpoint they are converted from is mapped")
    message = (f"estimated peak {_gib(est.total)} of {where} ({100 * est.total / budget:.0f}%) for "
               f"per_device_train_batch_size={b} × {est.seq_len} tokens with {est.image_tokens} {_vision_tokens(ctx)} "
               f"({source}): {parts}; estimates are good to about ±25%, so above {MEMORY_OK_SHARE:.0%} warns")
    if est.total <= MEMORY_OK_SHARE * budget:
        return Check("memory", "ok", message)
    status = "fail" if est.total > budget else "warn"
    largest = _largest_batch(lambda k: estimate(k).total <= MEMORY_OK_SHARE * budget, b - 1)
    if largest:
        per_device, steps = suggest_batch(b, ga, largest)
        fix = (f"set per_device_train_batch_size: {per_device} and gradient_accumulation_steps: {steps} "
               f"({per_device} × {steps} = {per_device * steps} keeps the global batch of {b} × {ga}; "
               f"{largest} is the largest per-device batch that fits)")
    else:
        what = "per_device_train_batch_size is already 1" if b == 1 else \
            f"even per_device_train_batch_size: 1 is above {MEMORY_OK_SHARE:.0%}"
        fix = f"{what}: " + _memory_levers(ctx)
    return Check("memory", status, message, fix)


def _cpu_step_time(ctx: Context, est: MemoryEstimate) -> str:
    """A rough time per optimizer step on this CPU: the step's matmul FLOPs over a measured FLOP/s."""
    from ...train.speed import cpu_flops
    from .memory import step_flops

    rate = ctx.device.cpu_flops if ctx.device.cpu_flops is not None else cpu_flops()
    flops = step_flops(ctx.cfg, ctx.facts, batch=est.batch, seq_len=est.seq_len, image_tokens=est.image_tokens)
    amount = f"{flops / 1e12:.2f} TFLOP" if flops >= 1e12 else f"{flops / 1e9:.2f} GFLOP"
    return (f"rough time per optimizer step: {_duration(flops / rate)} ({amount} of matmuls at a measured "
            f"{rate / 1e9:.1f} GFLOP/s float32 on this CPU)")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _largest_batch(fits: Callable[[int], bool], upper: int) -> int:
    """The largest k in [1, upper] with fits(k) (memory grows with k), or 0: a binary search."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def suggest_batch(batch: int, accumulation: int, largest: int) -> tuple[int, int]:
    """(per-device batch ≤ largest, accumulation steps) whose product is exactly batch × accumulation:
    the largest divisor of the global batch that fits (1 always does)."""
    total = batch * accumulation
    per_device = max(d for d in range(1, largest + 1) if total % d == 0)
    return per_device, total // per_device


def _memory_levers(ctx: Context) -> str:
    """What else lowers memory, beyond the batch size."""
    cfg, dev = ctx.cfg, ctx.device
    levers = [] if cfg.gradient_checkpointing else ["gradient_checkpointing: true"]
    if dev.kind == "cuda" and not cfg.bf16 and not cfg.fp16:
        levers.append("bf16: true" if dev.bf16 else "fp16: true")
    if cfg.finetuning_type != "lora":
        levers.append("finetuning_type: lora")
    levers += ["a lower cutoff_len or image_max_pixels", "DeepSpeed ZeRO-3 across several GPUs (deepspeed)"]
    return "try " + ", ".join(levers)


def check_sharding(ctx: Context) -> Check:
    """FSDP2 / DeepSpeed: the wrap classes exist in the loaded model, batches without a modality are safe, and
    the memory per rank (weights, gradients, optimizer states divided by the shard count)."""
    from ...train.sharding import fsdp_reshards, fsdp_wrap_classes, one_process_fsdp, sharding_of

    cfg = ctx.cfg
    how = sharding_of(cfg) if not ctx.env.get("ACCELERATE_USE_FSDP") else "fsdp"
    if how is None:
        return Check("sharding", "ok", "no fsdp or deepspeed: each rank holds the whole model (DDP)")
    fails, notes = [], []
    if how == "fsdp":
        full = fsdp_reshards(cfg, ctx.env)
        notes.append(f"FSDP2 {'full_shard (ZeRO-3-like)' if full else 'shard_grad_op (ZeRO-2-like)'}"
                     + ("" if cfg.fsdp else " from accelerate launch"))
        problem, note = _wrap_classes_found(ctx, fsdp_wrap_classes)
        fails += [problem] if problem else []
        notes += [note] if note else []
    else:
        notes.append(f"DeepSpeed ZeRO stage {_zero_stage(cfg)[0]}")
    notes.append(_modality_note(ctx))
    notes.append(_per_rank_memory(ctx))
    message = "; ".join(fails + notes)
    if fails:
        return Check("sharding", "fail", message, "set fsdp_config transformer_layer_cls_to_wrap to classes the "
                     "model has (or leave it out for the family's decoder layer and vision block)")
    alone = one_process_fsdp(cfg, ctx.env)
    if alone:  # a plan checked without torchrun is fine; `vlmtune train` on one process refuses it
        return Check("sharding", "warn", f"{message}; {alone}")
    return Check("sharding", "ok", message)


def _wrap_classes_found(ctx: Context, wrap_classes) -> tuple[str | None, str | None]:
    """(a problem, a note): whether the FSDP wrap classes are modules of the loaded model."""
    if ctx.facts is None:
        return f"wrap classes not checked: {ctx.facts_error or 'the model could not be loaded'}", None
    try:
        wanted = wrap_classes(ctx.cfg, ctx.facts.model_type, ctx.env)
    except VlmtuneError as e:
        return str(e), None
    missing = [c for c in wanted if c not in ctx.facts.module_classes]
    if missing:
        layers = sorted(c for c in ctx.facts.module_classes if c.endswith(("Layer", "Block")))
        return (f"wrap class(es) {', '.join(missing)} are not modules of this {ctx.facts.model_type} model (its "
                f"layer and block classes: {', '.join(layers) or 'none'}), so they would not be sharded"), None
    return None, f"shards each {' and each '.join(wanted)} as one unit (all present in the loaded model)"


def _modality_note(ctx: Context) -> str:
    summary = ctx.data.summary if ctx.data is not None else {}
    held = [m for m, key in (("image", "images"), ("video", "videos")) if summary.get(key)]
    if ctx.data is None:
        return ("mixed modalities: not checked (the data could not be read); a micro-batch without images or "
                "videos runs the vision tower on a zero-weight dummy input once per modality")
    if not held:
        return "mixed modalities: the data holds no image or video, so no rank runs the vision tower"
    return (f"mixed modalities safe: the data holds {' and '.join(m + 's' for m in held)}; a micro-batch without "
            f"one runs the vision tower on a zero-weight dummy input once per missing modality, before the "
            f"language model, so every rank gathers the same blocks in the same order")


def _per_rank_memory(ctx: Context) -> str:
    if ctx.facts is None:
        return "memory per rank: not estimated (no model facts)"
    cfg, world = ctx.cfg, world_size(ctx)
    seq, images, _ = worst_batch(ctx, cfg.per_device_train_batch_size)
    est = estimate_memory(cfg, ctx.facts, ctx.device.kind, batch=cfg.per_device_train_batch_size, seq_len=seq,
                          image_tokens=images, world_size=world, zero_stage=shard_stage(cfg, ctx.env))
    parts = ", ".join(f"{k} {_size(est.parts[k])}" for k in ("weights", "gradients", "optimizer"))
    how = (f"divided by the {world} ranks (WORLD_SIZE)" if world > 1 else
           "for 1 rank: set WORLD_SIZE (e.g. WORLD_SIZE=8 vlmtune doctor ...) to see them divided by the shard count")
    return f"memory per rank: {parts} ({how}); estimated peak {_gib(est.total)}"
