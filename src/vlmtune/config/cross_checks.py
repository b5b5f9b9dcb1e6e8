"""Checks across keys: rules that involve several keys (pixel bounds, streaming, validation data, precision,
what is trainable, quantization with the LoRA variants, the preference keys against the stage, sharding), each
checked only when all its keys are valid on their own, every problem collected."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from .keys import default_of
from .sections import SECTIONS
from .values import INVALID, did_you_mean, shown, yaml_text

def check_together(v: dict[str, Any]) -> list[str]:
    """Rules that involve several keys, each checked only when all its keys are valid on their own."""
    problems = []
    for media in ("image", "video"):
        lo, hi = v[f"{media}_min_pixels"], v[f"{media}_max_pixels"]
        if _valid(lo, hi) and lo is not None and hi is not None and lo > hi:
            problems.append(
                f"{media}_min_pixels={lo} is larger than {media}_max_pixels={hi}; lower {media}_min_pixels or "
                f"raise {media}_max_pixels"
            )
    if v["streaming"] is True:  # as in LLaMA-Factory: an iterable dataset has no length to count epochs by
        if _valid(v["max_steps"]) and not (isinstance(v["max_steps"], int) and v["max_steps"] > 0):
            problems.append(f"streaming: true needs max_steps (got {v['max_steps']}); set max_steps such as 1000")
        if v["packing"] is True:
            problems.append("streaming: true cannot pack (packing plans over all rows); set packing: false")
        if _valid(v["val_size"]) and v["val_size"]:
            problems.append(f"streaming: true takes no val_size (got {v['val_size']}); set val_size: 0")
    if _valid(v["eval_dataset"], v["val_size"]) and v["eval_dataset"] and v["val_size"]:
        problems.append(f"eval_dataset={v['eval_dataset']!r} and val_size={v['val_size']} both name validation "
                        "data; set one of them (val_size: 0 to evaluate on eval_dataset)")
    if v["streaming"] is True and _valid(v["eval_dataset"]) and v["eval_dataset"]:
        problems.append("streaming: true takes no eval_dataset (it prepares nothing); set eval_dataset: null")
    if _valid(v["mix_strategy"], v["interleave_probs"]) and v["interleave_probs"] and v["mix_strategy"] == "concat":
        problems.append(f"interleave_probs={v['interleave_probs']!r} needs mix_strategy interleave_under or "
                        "interleave_over (concat reads every dataset whole); set mix_strategy or remove "
                        "interleave_probs")
    problems.extend(_check_probs(v))
    problems.extend(_check_predict(v))
    if v["bf16"] is True and v["fp16"] is True:
        problems.append("bf16 and fp16 are both true; set at most one of them (bf16 where the GPU supports it)")
    problems.extend(_check_trainable(v))
    problems.extend(_check_quant_variants(v))
    problems.extend(_check_preference(v))
    problems.extend(_check_sharding(v))
    return problems


# fsdp_config keys (without the fsdp_ prefix) that FSDP2 uses, and FSDP1-only ones that it has no use for.
FSDP_CONFIG_KEYS = ("version", "transformer_layer_cls_to_wrap", "reshard_after_forward", "state_dict_type",
                    "cpu_ram_efficient_loading", "activation_checkpointing", "offload_params", "cpu_offload",
                    "auto_wrap_policy", "min_num_params")
FSDP1_CONFIG_KEYS = ("sharding_strategy", "backward_prefetch", "forward_prefetch", "use_orig_params",
                     "sync_module_states", "limit_all_gathers")
FSDP_STATE_DICT_TYPES = ("FULL_STATE_DICT", "SHARDED_STATE_DICT")


def fsdp_settings(fsdp_config: dict | None) -> dict:
    """fsdp_config with the fsdp_ prefix taken off its keys (the Trainer accepts both spellings)."""
    return {(k[5:] if isinstance(k, str) and k.startswith("fsdp_") else k): val
            for k, val in (fsdp_config or {}).items()}


def _check_sharding(v: dict[str, Any]) -> list[str]:
    """fsdp / fsdp_config / deepspeed together: one sharding engine, FSDP2 only, every fsdp_config key known."""
    fsdp, conf, ds = v["fsdp"], v["fsdp_config"], v["deepspeed"]
    if not _valid(fsdp, conf, ds):
        return []
    problems = []
    if fsdp and ds:
        problems.append(f"fsdp={fsdp!r} and deepspeed={ds!r} are both set; they are two ways of sharding, so set "
                        "one of them to null")
    if conf and not fsdp:
        problems.append("fsdp_config is set but fsdp is not, so it would do nothing; set fsdp: full_shard auto_wrap "
                        "or remove fsdp_config")
    if fsdp and _valid(v["quantization_bit"]) and v["quantization_bit"] is not None:
        problems.append(f"quantization_bit={v['quantization_bit']} with fsdp={fsdp!r}: FSDP2 cannot shard the "
                        "packed 4/8-bit weights (each rank would keep them whole); remove fsdp (plain DDP keeps "
                        "one quantized copy per GPU, which is what QLoRA is for) or remove quantization_bit")
    settings = fsdp_settings(conf)
    for key in settings:
        if key not in FSDP_CONFIG_KEYS + FSDP1_CONFIG_KEYS:
            problems.append(f"fsdp_config key {key!r} is not an FSDP setting; "
                            f"{did_you_mean(str(key), FSDP_CONFIG_KEYS, 'see docs/config.md (fsdp_config)')}")
    if str(settings.get("version", 2)) != "2":
        problems.append(f"fsdp_config version={settings['version']!r}: vlmtune runs FSDP2 only (FSDP1 is "
                        "deprecated in transformers); set version: 2 or remove it")
    sdt = settings.get("state_dict_type", "FULL_STATE_DICT")
    if sdt not in FSDP_STATE_DICT_TYPES:
        problems.append(f"fsdp_config state_dict_type={sdt!r} is not one of {', '.join(FSDP_STATE_DICT_TYPES)}; "
                        "set FULL_STATE_DICT (one safetensors file, needed by export) or SHARDED_STATE_DICT")
    if str(settings.get("activation_checkpointing", False)).lower() == "true" and v["gradient_checkpointing"]:
        problems.append("fsdp_config activation_checkpointing=true and gradient_checkpointing=true both recompute "
                        "activations; set gradient_checkpointing: false (FSDP's own) or remove "
                        "activation_checkpointing from fsdp_config")
    return problems


# Preference keys are checked against the stages (and dpo losses) they mean something for: set elsewhere, each is
# an error, never ignored. These dpo losses use no reference model.
_REFERENCE_FREE = ("orpo", "simpo")
# Every key of the preference section but stage: with stage sft, each one set is an error (read from the
# declarations, so that a preference key added there is never silently ignored by an sft run).
_PREFERENCE_ONLY = tuple(f.name for f in fields(SECTIONS["preference"]) if f.name != "stage")


def _check_preference(v: dict[str, Any]) -> list[str]:
    """The preference keys against stage and pref_loss (docs/preference.md)."""
    stage, loss = v["stage"], v["pref_loss"]
    if not _valid(stage, loss):
        return []
    problems = []

    def unused(key: str, why: str, fix: str) -> None:
        if _valid(v[key]) and v[key] != default_of(key):
            problems.append(f"{key}={v[key]!r} {why}; {fix}")

    if stage == "sft":
        for key in _PREFERENCE_ONLY:
            unused(key, "applies to the preference stages only, but stage='sft'", f"set stage: dpo (or kto), or "
                   f"remove {key}")
        return problems
    unused("train_on_prompt", f"has no effect with stage={stage!r}: only the final answer is scored",
           "remove train_on_prompt")
    unused("moe_aux_loss_coef", f"is not added to the stage {stage!r} loss (the preference trainer computes its own "
           "loss from the logits and asks for no router logits)", "remove moe_aux_loss_coef, or train with stage: sft")
    if stage == "kto":
        for key in ("pref_loss", "simpo_gamma", "dpo_label_smoothing"):
            unused(key, "applies to stage dpo only, but stage='kto'", f"remove {key}")
    if stage == "dpo":
        for key in ("kto_chosen_weight", "kto_rejected_weight"):
            unused(key, "applies to stage kto only, but stage='dpo'", f"remove {key}")
        if loss != "simpo":
            unused("simpo_gamma", f"applies to pref_loss simpo only, but pref_loss={loss!r}", "remove simpo_gamma")
        if loss not in ("sigmoid", "robust"):
            unused("dpo_label_smoothing", f"applies to pref_loss sigmoid or robust only, but pref_loss={loss!r}",
                   "remove dpo_label_smoothing")
        if loss in _REFERENCE_FREE:
            for key in ("ref_model", "ref_model_adapters", "precompute_ref_log_probs"):
                unused(key, f"names a reference, but pref_loss={loss!r} uses none", f"remove {key}")
    if v["pissa_init"] is True and not v["ref_model"] and not (stage == "dpo" and loss in _REFERENCE_FREE):
        problems.append(f"pissa_init=true with stage={stage!r}: the reference (the base with the adapter disabled) "
                        "would be PiSSA's residual, not the starting model; set ref_model to the starting model, "
                        "or pissa_init: false")
    if _valid(v["ref_model_adapters"], v["ref_model"]) and v["ref_model_adapters"] and not v["ref_model"]:
        problems.append(f"ref_model_adapters={v['ref_model_adapters']!r} needs ref_model (the base the adapter "
                        "applies to); set ref_model, or remove ref_model_adapters")
    if v["packing"] is True:
        problems.append(f"packing: true with stage={stage!r}: a pair's chosen and rejected sides (and a KTO batch) "
                        "are scored as whole sequences, which packing would mix; set packing: false")
    if v["streaming"] is True:
        problems.append(f"streaming: true with stage={stage!r} is not supported (preference rows are prepared and "
                        "checked as pairs first); set streaming: false")
    return problems


def trains(v: dict[str, Any]) -> bool:
    """do_train's effective value: null is true unless do_predict: true comes without a dataset (LLaMA-Factory's
    predict configs name only eval_dataset)."""
    if isinstance(v["do_train"], bool):
        return v["do_train"]
    return not (v["do_predict"] is True and v["dataset"] is None)


def _check_predict(v: dict[str, Any]) -> list[str]:
    """do_predict generates over eval_dataset (or the val_size split of a training run), with
    predict_with_generate; do_train: false only predicts, so it needs do_predict and eval_dataset."""
    keys = ("do_train", "do_predict", "predict_with_generate", "eval_dataset", "val_size", "stage",
            "adapter_name_or_path")
    if not _valid(*(v[k] for k in keys)):
        return []
    problems, train = [], trains(v)
    if not train and not v["do_predict"]:
        problems.append("do_train=false with do_predict=false leaves nothing to do; set do_predict: true (with "
                        "eval_dataset) to only predict, or do_train: true")
    if v["do_predict"] and not v["eval_dataset"] and not (train and v["val_size"]):
        problems.append("do_predict=true has nothing to predict on: set eval_dataset (the datasets to generate "
                        "answers for)" + (", or val_size to hold out part of dataset" if train else
                                          " and val_size: 0 (do_train=false holds out nothing)" if v["val_size"]
                                          else ""))
    if v["adapter_name_or_path"] and train:
        problems.append(f"adapter_name_or_path={v['adapter_name_or_path']!r} with training: training on top of an "
                        "adapter is not supported (a run starts a new adapter; resume_from_checkpoint continues one); "
                        "remove adapter_name_or_path, or set do_train: false to predict with it")
    if v["do_predict"] and v["stage"] != "sft":
        problems.append(f"do_predict=true with stage={v['stage']!r}: predictions are generated for sft rows (a "
                        "prompt and its answer); set stage: sft (do_train: false) to predict")
    if v["do_predict"] != v["predict_with_generate"]:
        problems.append(f"do_predict={yaml_text(v['do_predict'])} with predict_with_generate="
                        f"{yaml_text(v['predict_with_generate'])}: vlmtune predicts by generating (eval_dataset "
                        "already reports eval_loss); set both to true, or both to false")
    return problems


def _check_probs(v: dict[str, Any]) -> list[str]:
    """interleave_probs: one probability per dataset, summing to 1."""
    probs, datasets = v["interleave_probs"], v["dataset"]
    if not _valid(probs, datasets) or not probs:
        return []
    n = len([d for d in str(datasets).split(",") if d.strip()])
    try:
        values = [float(p) for p in probs.split(",")]
    except ValueError:
        return [f"interleave_probs={probs!r} is not comma-separated numbers; set it such as 0.5,0.5"]
    if len(values) != n or any(not 0 <= p <= 1 for p in values) or abs(sum(values) - 1) > 1e-6:
        return [f"interleave_probs={probs!r} must give each of the {n} dataset(s) a probability in [0, 1], "
                "summing to 1; set it such as " + ",".join([f"{1 / n:.3g}"] * n)]
    return []


# Keys that only mean something with LoRA adapters (finetuning_type lora), with the value that leaves them off.
_LORA_ONLY = {"quantization_bit": None, "use_dora": False, "use_rslora": False, "pissa_init": False,
              "loraplus_lr_ratio": None}


def _check_quant_variants(v: dict[str, Any]) -> list[str]:
    """quantization_bit and the LoRA variants against finetuning_type and each other."""
    problems = []
    kind = v["finetuning_type"]
    if _valid(kind) and kind != "lora":
        for key, off in _LORA_ONLY.items():
            if _valid(v[key]) and v[key] != off:
                why = (" (the quantized weights cannot be trained; QLoRA trains adapters on top of them)"
                       if key == "quantization_bit" else "")
                problems.append(f"{key}={shown(v[key])} needs finetuning_type='lora', but finetuning_type={kind!r}{why}; "
                                f"set finetuning_type: lora or remove {key}")
    bits, pissa = v["quantization_bit"], v["pissa_init"]
    if _valid(bits, pissa) and bits is not None and pissa:
        problems.append(f"pissa_init=true with quantization_bit={bits}: PiSSA's SVD needs the full-precision "
                        "weights and rewrites them; remove quantization_bit, or set pissa_init: false")
    if _valid(bits, v["quantization_type"]) and bits == 8 and v["quantization_type"] != "nf4":
        problems.append(f"quantization_type={v['quantization_type']!r} applies to 4-bit only, but "
                        "quantization_bit=8; set quantization_bit: 4 or remove quantization_type")
    return problems


def _valid(*values: Any) -> bool:
    return all(x is not INVALID for x in values)


def _check_trainable(v: dict[str, Any]) -> list[str]:
    """A run that would train nothing fails here, not after the data is prepared."""
    kind = v["finetuning_type"]
    frozen = ("freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model")
    if not _valid(kind, v["additional_target"], *(v[k] for k in frozen)):
        return []
    if kind == "freeze" and v["freeze_language_model"] and not v["additional_target"]:
        return [
            "finetuning_type='freeze' trains decoder layers of the language model, but freeze_language_model is "
            "true; set freeze_language_model to false or set finetuning_type to lora or full"
        ]
    if kind != "freeze" and all(v[k] for k in frozen) and not v["additional_target"]:
        return [
            f"freeze_vision_tower, freeze_multi_modal_projector and freeze_language_model are all true, so "
            f"finetuning_type={kind!r} has nothing to train; set one of them to false"
        ]
    return []
