"""LLaMA-Factory's keys: each one vlmtune does not declare itself is classified here, so that a config moves over
unchanged and nothing in it is ignored without a word.

The keys, with LLaMA-Factory's defaults, are data (`llamafactory_keys.tsv`); tests/config/test_compat.py fails
when one is not classified. Kinds:

- `noop`: accepted for any value, with a note: it has no effect in vlmtune (said why);
- `default`: accepted at LLaMA-Factory's default (or one of `also`), with a note; any other value asks for
  behaviour vlmtune lacks and is refused, with the reason;
- `alias`: vlmtune has the behaviour under another key; the value is carried over (`to`, `convert`), with a note;
- `command`: read by another vlmtune command (`vlmtune export`), a note in a training config.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Compat:
    kind: str  # noop | default | alias | command
    why: str
    also: tuple = ()  # default: the values accepted (they ask for nothing vlmtune lacks); () means LLaMA-Factory's
    # default only
    to: str | None = None  # alias: the vlmtune key
    convert: Callable[[Any], Any] | None = None  # alias: the value for `to`


def _load_keys() -> dict[str, Any]:
    """LLaMA-Factory's keys -> their defaults, from llamafactory_keys.tsv."""
    out: dict[str, Any] = {}
    with open(os.path.join(os.path.dirname(__file__), "llamafactory_keys.tsv"), encoding="utf-8") as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                _, key, default = line.rstrip("\n").split("\t")
                out[key] = json.loads(default)
    return out


LLAMA_FACTORY_KEYS: dict[str, Any] = _load_keys()


def _group(kind: str, why: str, keys: str, **kw) -> dict[str, Compat]:
    return {k: Compat(kind, why, **kw) for k in keys.split()}


_SDPA = "the model loads with transformers' default attention (SDPA) and stock kernels"
_OPT = "vlmtune's optimizers are the transformers Trainer's `optim` choices and LoRA+"
_RL = "is a preference / RL setting vlmtune lacks (its stages are sft, dpo and kto: docs/preference.md)"
_INFER = "vlmtune generates with transformers (`vlmtune chat`), not an inference engine"
_EXPORT = "is read by `vlmtune export CONFIG.yaml`, not by training"
_HUB = "vlmtune never uploads; push the output folder with huggingface-cli"
_LOG = "vlmtune logs through the Trainer with report_to; this setting has no vlmtune counterpart"

CLASSIFIED: dict[str, Compat] = {
    # -- accepted for any value: no effect in vlmtune ------------------------------------------------------
    **_group("noop", "vlmtune evaluates whenever val_size > 0", "do_eval"),
    **_group("noop", "vlmtune evaluates every eval_steps steps, or at each epoch's end, when val_size > 0",
             "eval_strategy evaluation_strategy"),
    **_group("noop", "Qwen-VL models always read their images", "visual_inputs"),
    **_group("noop", "vlmtune saves every `save_steps` steps", "save_strategy"),
    **_group("noop", "vlmtune logs every `logging_steps` steps", "logging_strategy"),
    **_group("noop", "TensorBoard logs go to output_dir/runs (report_to: tensorboard)", "logging_dir"),
    **_group("noop", "the run is named by output_dir", "run_name project"),
    **_group("noop", "the data is read, validated and fitted in chunks of vlmtune's own size",
             "preprocessing_batch_size buffer_size data_shared_file_system"),
    **_group("noop", "vlmtune always writes safetensors", "save_safetensors"),
    **_group("noop", "labels are always masked where they are not trained", "ignore_pad_token_for_loss"),
    **_group("noop", "the data is always padded and collated by vlmtune's collator",
             "remove_unused_columns label_names length_column_name"),
    **_group("noop", "distributed settings come from torchrun / accelerate launch", "local_rank master_addr master_port"),
    **_group("noop", "`vlmtune chat` picks its device and dtype", "infer_dtype use_kv_cache offload_folder"),
    **_group("noop", "vlmtune prints the trainable parameters per component at every run", "print_param_status"),
    **_group("noop", "the Trainer's tqdm bar and logging levels are vlmtune's", "disable_tqdm log_level "
             "log_level_replica log_on_each_node logging_first_step logging_nan_inf_filter skip_memory_metrics"),
    **_group("noop", "the data loader is vlmtune's (pinned memory, in order)", "dataloader_pin_memory "
             "dataloader_in_order dataloader_persistent_workers dataloader_prefetch_factor"),
    **_group("noop", "mixed precision follows bf16 / fp16", "bf16_full_eval fp16_full_eval tf32"),
    # -- carried over to vlmtune's own key -----------------------------------------------------------------
    "disable_gradient_checkpointing": Compat("alias", "vlmtune's key has the opposite sense",
                                             to="gradient_checkpointing", convert=lambda v: not v),
    "neat_packing": Compat("alias", "vlmtune's packing always keeps packed samples apart (neat)", to="packing",
                           convert=lambda v: True if v else None),
    "tokenized_path": Compat("alias", "vlmtune keeps its prepared (tokenized and fitted) data there", to="prepared_dir"),
    # -- read by another command ---------------------------------------------------------------------------
    **_group("command", _EXPORT, "export_dir export_size export_device export_legacy_format"),
}

# Accepted at LLaMA-Factory's default (or `also`), refused for another value: the behaviour is not in vlmtune.
_DEFAULT_ONLY: list[tuple[str, str, tuple]] = [
    ("the chat template comes from the model's processor", "template",
     ("qwen2_vl", "qwen3_vl", "qwen3_vl_nothink", "qwen3_5", "qwen3_5_nothink")),
    ("vlmtune saves full checkpoints so that a run can resume", "save_only_model", ()),
    (_SDPA, "flash_attn", ("auto", "sdpa", "disabled", "eager")),
    (_SDPA, "shift_attn use_unsloth use_unsloth_gc enable_liger_kernel use_liger_kernel liger_kernel_config "
            "use_v1_kernels torch_compile torch_compile_backend torch_compile_mode use_reentrant_gc "
            "upcast_layernorm upcast_lmhead_output mixture_of_depths rope_scaling block_diag_attn", ()),
    ("vlmtune fine-tunes a pretrained checkpoint as is (no new tokens, no resized vocabulary)",
     "resize_vocab split_special_tokens add_tokens add_special_tokens new_special_tokens_config init_special_tokens "
     "train_from_scratch use_fast_tokenizer model_revision low_cpu_mem_usage adapter_folder", ()),
    ("vlmtune quantizes with bitsandbytes only (quantization_bit)", "quantization_method quantization_device_map",
     ()),
    ("the processor's own image and video handling is used", "image_do_pan_and_scan crop_to_patches", ()),
    ("audio is not supported", "use_audio_in_video audio_sampling_rate", ()),
    ("vlmtune exports merged checkpoints only (`vlmtune export`)", "export_quantization_bit "
     "export_quantization_dataset export_quantization_nsamples export_quantization_maxlen export_hub_model_id", ()),
    (_INFER, "infer_backend vllm_maxlen vllm_gpu_util vllm_enforce_eager vllm_max_lora_rank vllm_config "
             "sglang_maxlen sglang_mem_fraction sglang_tp_size sglang_config sglang_lora_backend", ()),
    ("KTransformers is not supported", "use_kt kt_cpu_activation kt_weight_path kt_non_expert_weight_path "
     "kt_expert_checkpoint_path kt_use_lora_experts kt_lora_expert_num kt_lora_expert_intermediate_size", ()),
    ("Hub tokens are read from the environment (HF_TOKEN); ModelScope and Modelers are not supported",
     "hf_hub_token ms_hub_token om_hub_token", ()),
    ("vlmtune keeps its default dtype, device map and length handling", "compute_dtype device_map "
     "model_max_length", ()),
    ("vlmtune renders tool calls with the checkpoint's chat template (Qwen's format)", "tool_format", (None, "qwen")),
    ("vlmtune evaluates the validation data as one set", "eval_on_each_dataset", ()),
    ("thinking blocks are kept as the checkpoint's chat template renders them", "preserve_thinking", ()),
    ("do_predict generates with max_new_tokens and num_beams (the sampling keys); no other length or "
     "generation config", "max_length generation_max_length generation_num_beams generation_config", ()),
    ("LLaMA-Factory's evaluation benchmarks (task, n_shot) are not part of vlmtune", "eval_num_beams", ()),
    ("freeze tuning trains whole decoder layers in vlmtune", "freeze_trainable_modules freeze_extra_modules",
     ("all",)),
    ("this LoRA setting is not in vlmtune", "loraplus_lr_embedding create_new_adapter", ()),
    ("a PiSSA adapter is always saved converted, so that it applies to the original base model", "pissa_convert",
     (False, True)),
    ("OFT is not supported (finetuning_type lora, freeze or full)", "module_dropout oft_rank oft_block_size "
     "oft_target", ()),
    (f"this {_RL}", "pref_bco_weight ppo_buffer_size ppo_epochs ppo_score_norm ppo_target ppo_whiten_rewards "
     "ref_model_quantization_bit reward_model reward_model_adapters reward_model_quantization_bit "
     "reward_model_type ld_alpha", ()),
    (_OPT, "use_galore galore_target galore_rank galore_update_interval galore_scale galore_proj_type "
     "galore_layerwise use_apollo apollo_target apollo_rank apollo_update_interval apollo_scale apollo_proj "
     "apollo_proj_type apollo_scale_type apollo_layerwise apollo_scale_front use_badam badam_mode "
     "badam_start_block badam_switch_mode badam_switch_interval badam_update_ratio badam_mask_mode badam_verbose "
     "use_adam_mini use_muon optim_args optim_target_modules lr_scheduler_kwargs adam_beta1 adam_beta2 "
     "adam_epsilon", ()),
    ("vlmtune trains with the cross-entropy loss of transformers", "use_dft_loss use_asft_loss asft_alpha "
     "use_eaft_loss eaft_alpha label_smoothing_factor neftune_noise_alpha", ()),
    ("this scaling backend is not supported (use torchrun, DeepSpeed or FSDP)", "use_mca use_megatron_bridge "
     "megatron_bridge_args use_hyper_parallel hyper_parallel_args hyper_parallel_cp_size ray_num_workers "
     "ray_init_kwargs parallelism_config", ()),
    ("vlmtune trains in bf16 / fp16 mixed precision (pure bf16 and fp8 are not supported)", "pure_bf16 fp8 "
     "fp8_backend fp8_enable_fsdp_float8_all_gather", ()),
    ("LLaMA Pro block expansion is not supported", "use_llama_pro", ()),
    ("vlmtune logs the loss (and eval loss); token accuracy is not computed", "compute_accuracy", ()),
    ("the training data is always shuffled (seed)", "disable_shuffling", ()),
    ("early stopping is not supported: set max_steps", "early_stopping_steps", ()),
    ("tokens per second are not reported", "include_effective_tokens_per_second include_num_input_tokens_seen", ()),
    (_LOG, "use_swanlab swanlab_project swanlab_workspace swanlab_run_name swanlab_mode swanlab_api_key "
           "swanlab_logdir swanlab_lark_webhook_url swanlab_lark_secret trackio_space_id trackio_bucket_id "
           "trackio_static_space_id", ()),
    ("the profiler is not wired in", "enable_torch_profiler profiler_output_dir profiler_wait_steps "
     "profiler_warmup_steps profiler_active_steps profiler_repeat profiler_record_shapes profiler_profile_memory "
     "profiler_with_stack profile_modules", ()),
    (_HUB, "push_to_hub hub_token hub_private_repo hub_model_id hub_strategy hub_always_push hub_revision", ()),
    ("vlmtune keeps the last checkpoint (no best-model selection)", "load_best_model_at_end metric_for_best_model "
     "greater_is_better", ()),
    ("this Trainer setting is left at its default by vlmtune", "activation_checkpointing "
     "activation_checkpointing_kwargs gradient_checkpointing_kwargs use_cache torch_empty_cache_steps "
     "auto_find_batch_size eval_delay prediction_loss_only eval_on_start eval_do_concat_batches "
     "eval_use_gather_object eval_accumulation_steps include_for_metrics batch_eval_metrics save_on_each_node "
     "enable_jit_checkpoint ignore_data_skip restore_callback_states_from_checkpoint full_determinism data_seed "
     "use_cpu accelerator_config dataloader_drop_last dataloader_multiprocessing_context "
     "train_sampling_strategy ddp_find_unused_parameters ddp_bucket_cap_mb ddp_broadcast_buffers ddp_static_graph "
     "ddp_backend debug sortish_sampler average_tokens_across_devices", ()),
]
for _why, _keys, _also in _DEFAULT_ONLY:
    CLASSIFIED.update(_group("default", _why, _keys, also=_also))


def allowed(key: str) -> tuple:
    """The values a `default` key accepts: its `also` list, else LLaMA-Factory's default."""
    c = CLASSIFIED[key]
    return c.also or (LLAMA_FACTORY_KEYS.get(key),)


def accepts(key: str, value: Any) -> bool:
    """Whether a `default` key's value asks for nothing vlmtune lacks (same value and kind of value)."""
    def same(a: Any) -> bool:
        if isinstance(a, bool) or isinstance(value, bool) or a is None or value is None:
            return value is a or (type(value) is type(a) and value == a)
        return value == a and isinstance(value, (int, float)) == isinstance(a, (int, float))
    return any(same(a) for a in allowed(key))
