"""The training side of the config's typed sections: what trains (`cfg.finetuning`), how (`cfg.training`) and
the preference stages' keys (`cfg.preference`). The data side (`cfg.model`, `cfg.read`, `cfg.fit`, `cfg.prepare`)
and the table of all sections are in sections.py; the rules for declaring a key are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from .values import (
    LR_SCHEDULERS,
    OPTIMIZERS,
    arg as _arg,
    as_comma_str as _as_comma_str,
    as_fsdp as _as_fsdp,
    as_mapping_or_json as _as_mapping_or_json,
    dropout as _dropout,
    minus_one_or_positive as _minus_one_or_positive,
    non_negative as _non_negative,
    positive as _positive,
    ratio as _ratio,
    share as _share,
)


@dataclass(frozen=True)
class FinetuningArgs:
    """Which weights train, and how."""

    finetuning_type: str = _arg(
        "lora",
        "lora: train LoRA adapters on lora_target; full: train every weight not frozen by the freeze_* keys; "
        "freeze: train only freeze_trainable_layers decoder layers of the language model (and additional_target).",
        choices=("lora", "full", "freeze"),
    )
    lora_rank: int = _arg(8, "Rank of the LoRA matrices.", expect="a positive integer such as 8", check=_positive)
    lora_alpha: int | None = _arg(
        None,
        "LoRA scaling numerator (scale = lora_alpha / lora_rank); null: 2 × lora_rank, as in LLaMA-Factory.",
        expect="a positive integer such as 16, or null for 2 × lora_rank",
        check=_positive,
    )
    lora_dropout: float = _arg(
        0.0, "Dropout on the LoRA input.", expect="a number in [0, 1) such as 0.05", check=_dropout
    )
    lora_target: list[str] = _arg(
        ["all"],
        "Modules that get LoRA adapters: all (every linear layer of the parts not frozen, and a mixture-of-experts "
        "model's experts, not its routers) or module names, comma-separated or as a list, such as q_proj,v_proj "
        "(experts, gate_up_proj or down_proj name a MoE's fused expert weights; docs/moe.md).",
        expect="all or module names such as q_proj,v_proj",
    )
    freeze_trainable_layers: int = _arg(
        2,
        "With finetuning_type freeze: how many decoder layers of the language model train; positive: the last "
        "ones, negative: the first ones (as in LLaMA-Factory).",
        expect="a non-zero integer such as 2",
        check=lambda v: None if v != 0 else "is zero",
    )
    freeze_vision_tower: bool = _arg(True, "Keep the vision encoder's weights fixed.")
    freeze_multi_modal_projector: bool = _arg(
        True, "Keep the projector (merger) between the vision encoder and the language model fixed."
    )
    freeze_language_model: bool = _arg(False, "Keep the language model's weights fixed.")
    freeze_router: bool = _arg(
        True,
        "Mixture-of-experts models: keep the routers (each MoE layer's expert gate, and Qwen3.5-MoE's shared-expert "
        "gate) fixed; false trains them in full, with LoRA too (they are small). The experts themselves follow "
        "lora_target and finetuning_type.",
    )
    moe_aux_loss_coef: float | None = _arg(
        None,
        "Mixture-of-experts models: the router's load-balancing loss, times this coefficient, is added to the "
        "training loss and logged as aux_loss (0: logged, not added); null: not computed.",
        expect="a non-negative number such as 0.001, or null",
        check=_non_negative,
    )
    additional_target: list[str] | None = _arg(
        None,
        "Modules trained in full besides the adapters, comma-separated or as a list, such as "
        "embed_tokens,lm_head; null: none.",
        expect="module names such as embed_tokens,lm_head, or null",
    )
    # -- QLoRA and PEFT's LoRA variants (LLaMA-Factory's key names); cross-key rules in _check_quant_variants.
    quantization_bit: int | None = _arg(
        None,
        "Load the base model's language-model linear layers in 4 or 8 bits with bitsandbytes and train LoRA "
        "adapters on top (QLoRA); null: no quantization. Needs finetuning_type lora and no DeepSpeed ZeRO-3.",
        expect="4, 8 or null",
        check=lambda v: None if v in (4, 8) else "is neither 4 nor 8",
    )
    quantization_type: str = _arg(
        "nf4", "4-bit data type: nf4 (normal float, QLoRA's) or fp4.", choices=("nf4", "fp4")
    )
    double_quantization: bool = _arg(
        True, "4-bit: quantize the quantization constants too (about 0.4 bit per weight less)."
    )
    quantize_vision_tower: bool = _arg(
        False,
        "With quantization_bit: quantize the vision tower's blocks too. Off: the vision tower and projector stay "
        "in 16/32 bits, since they are a small share of the weights and their error reaches every image token.",
    )
    use_dora: bool = _arg(False, "DoRA: train a magnitude vector next to the LoRA direction (PEFT's use_dora).")
    use_rslora: bool = _arg(False, "rsLoRA: scale adapters by lora_alpha / sqrt(lora_rank) instead of / lora_rank.")
    pissa_init: bool = _arg(
        False,
        "PiSSA: initialise the adapters from the principal singular vectors of each weight; the saved adapter is "
        "converted so that it applies to the original base model.",
    )
    pissa_iter: int = _arg(
        16,
        "PiSSA: iterations of the fast randomized SVD; -1: an exact SVD (slow on large layers).",
        expect="-1 or a positive integer such as 16",
        check=_minus_one_or_positive,
    )
    loraplus_lr_ratio: float | None = _arg(
        None,
        "LoRA+: the learning rate of the lora_B matrices is learning_rate × this ratio (16 in the paper); "
        "null: one learning rate.",
        expect="a number of at least 1 such as 16.0, or null",
        check=lambda v: None if v >= 1 else "is below 1",
    )


@dataclass(frozen=True)
class TrainArgs:
    """The optimisation loop, checkpoints and logging (transformers' TrainingArguments names)."""

    output_dir: str = _arg(
        help="Folder for checkpoints, the trained adapter or model, logs and the loss plot: new, empty or vlmtune's "
        "(marked `.vlmtune-owned`); a folder of yours with content is refused (docs/security.md).",
        expect="a folder such as saves/qwen2_vl-2b/lora/sft",
        required=True,
    )
    per_device_train_batch_size: int = _arg(1, "Training samples per device per step.",
                                            expect="a positive integer such as 1", check=_positive)
    per_device_eval_batch_size: int = _arg(1, "Validation samples per device per step; do_predict generates for this "
                                           "many samples at a time (left-padded, in input order in the file).",
                                           expect="a positive integer such as 1", check=_positive)
    gradient_accumulation_steps: int = _arg(
        8, "Steps whose gradients add up before each optimiser update.",
        expect="a positive integer such as 8", check=_positive,
    )
    learning_rate: float = _arg(1e-4, "Peak learning rate.", expect="a positive number such as 1.0e-4",
                                check=_positive)
    num_train_epochs: float = _arg(3.0, "Passes over the training data (fractions allowed).",
                                   expect="a positive number such as 3.0", check=_positive)
    max_steps: int = _arg(
        -1, "Stop after this many optimiser updates; -1: train for num_train_epochs.",
        expect="-1 or a positive integer such as 1000", check=_minus_one_or_positive,
    )
    lr_scheduler_type: str = _arg(
        "cosine", "Learning-rate schedule after warmup (a transformers SchedulerType).", choices=LR_SCHEDULERS
    )
    warmup_ratio: float = _arg(0.0, "Share of the updates spent warming the learning rate up.",
                               expect="a number in [0, 1] such as 0.1", check=_ratio)
    warmup_steps: int = _arg(0, "Updates spent warming up; overrides warmup_ratio when above 0.",
                             expect="a non-negative integer such as 100", check=_non_negative)
    weight_decay: float = _arg(0.0, "AdamW weight decay.", expect="a non-negative number such as 0.01",
                               check=_non_negative)
    max_grad_norm: float = _arg(1.0, "Gradient-norm clipping threshold; 0: no clipping.",
                                expect="a non-negative number such as 1.0", check=_non_negative)
    bf16: bool = _arg(False, "Train in bfloat16 mixed precision (Ampere or newer GPUs).")
    fp16: bool = _arg(False, "Train in float16 mixed precision (older GPUs); at most one of bf16 and fp16.")
    force_cpu_bf16: bool = _arg(
        False, "On a CPU, keep bf16: true even where the CPU lacks AMX-BF16 (by default `vlmtune train` then trains "
        "in float32 and says so: bfloat16 autocast is slower than float32 there)."
    )
    gradient_checkpointing: bool = _arg(
        True, "Recompute activations in the backward pass to save memory (on by default, as in LLaMA-Factory)."
    )
    logging_steps: int = _arg(10, "Log the loss every this many updates.", expect="a positive integer such as 10",
                              check=_positive)
    save_steps: int = _arg(500, "Save a checkpoint every this many updates.",
                           expect="a positive integer such as 500", check=_positive)
    save_total_limit: int | None = _arg(
        None, "Keep at most this many checkpoints, deleting the oldest; null: keep all.",
        expect="a positive integer such as 3, or null to keep all", check=_positive,
    )
    eval_steps: int | None = _arg(
        None, "Evaluate every this many updates when val_size > 0; null: at the end of each epoch.",
        expect="a positive integer such as 500, or null for once per epoch", check=_positive,
    )
    plot_loss: bool = _arg(False, "Save a plot of the loss curve in output_dir when training ends.")
    report_to: str = _arg(
        "none", "Where metrics go: none, or integrations such as tensorboard,wandb (comma-separated or a list).",
        expect="none or integrations such as tensorboard,wandb", convert=_as_comma_str,
    )
    overwrite_output_dir: bool = _arg(
        False, "Train from scratch in an output_dir that holds an earlier run's checkpoints: vlmtune removes the "
        "checkpoints it marked complete there (vlmtune_complete) before the first step and writes over the rest "
        "by name. false: such an output_dir is refused unless the run resumes from one of them. Never applies to a "
        "folder vlmtune did not create (docs/security.md).",
    )
    resume_from_checkpoint: bool | str | None = _arg(
        None, "Resume training: true for the latest checkpoint in output_dir, or a checkpoint folder; "
        "null or false: start fresh.",
        expect="true, a checkpoint folder such as saves/run1/checkpoint-500, or null",
    )
    deepspeed: str | None = _arg(None, "Path to a DeepSpeed JSON config; null: no DeepSpeed.",
                                 expect="a path such as ds_z2_config.json, or null")
    fsdp: str | None = _arg(
        None, "PyTorch FSDP2 (fully_shard), as the Trainer's key: `full_shard auto_wrap` (LLaMA-Factory's spelling; "
        "ZeRO-3-like: weights, gradients and optimizer states sharded), `shard_grad_op auto_wrap` (ZeRO-2-like), "
        "`offload` to keep shards in CPU memory, or true for full_shard. The family's decoder layers and vision "
        "blocks are each sharded as one unit unless fsdp_config names transformer_layer_cls_to_wrap. null: no FSDP.",
        expect="full_shard auto_wrap, shard_grad_op auto_wrap, true, or null", convert=_as_fsdp,
    )
    fsdp_config: dict | None = _arg(
        None, "Settings for fsdp, as the Trainer's fsdp_config: a mapping or the path of a JSON file; keys with or "
        "without the fsdp_ prefix (version, transformer_layer_cls_to_wrap, reshard_after_forward, "
        "state_dict_type, cpu_ram_efficient_loading, activation_checkpointing, offload_params).",
        expect="a mapping such as {version: 2} or the path of a JSON file, or null", convert=_as_mapping_or_json,
    )
    seed: int = _arg(42, "Seed for shuffling, dropout and initialisation.", expect="a non-negative integer such as 42",
                     check=_non_negative)
    ddp_timeout: int = _arg(
        1800, "Seconds a rank waits for the others before the job fails. Bounded so that a stuck rank fails "
        "the job instead of hanging it.",
        expect="a positive number of seconds such as 1800", check=_positive,
    )
    dataloader_num_workers: int = _arg(0, "Worker processes loading batches; 0: the main process.",
                                       expect="a non-negative integer such as 4", check=_non_negative)
    group_by_length: bool = _arg(True, "Batch samples of similar length together, so less compute goes to padding.")
    worst_case_first: bool = _arg(
        True, "Run one forward/backward pass on the longest batch before training, so an out-of-memory error "
        "shows in the first minute, not hours in.",
    )
    run_doctor: bool = _arg(True, "`vlmtune train` runs the doctor's checks before it starts.")
    optim: str = _arg("adamw_torch", "Optimizer (a transformers OptimizerNames value).", choices=OPTIMIZERS,
                      choices_what="a transformers optimizer name")
    # -- generation over eval_dataset (LLaMA-Factory's do_train / do_predict), its GeneratingArguments --
    do_train: bool | None = _arg(
        None, "Train on dataset. false (with do_predict: true): only predict, on eval_dataset, with model_name_or_path "
        "and adapter_name_or_path; no dataset needed. null: true, unless do_predict: true comes without a dataset (a "
        "LLaMA-Factory predict config).", expect="true, false (with do_predict: true) or null")
    do_predict: bool = _arg(
        False, "Generate an answer for every sample of eval_dataset (when training, or of the val_size split) after "
        "training, or instead of it with do_train: false; write generated_predictions.jsonl (prompt, predict, label; "
        "input order) and predict_results.json (BLEU-4, ROUGE-1/2/L), as LLaMA-Factory does.")
    predict_with_generate: bool = _arg(False, "With do_predict: generate the answers (LLaMA-Factory's switch).")
    max_new_tokens: int = _arg(1024, "do_predict: most tokens generated per answer.",
                               expect="a positive integer such as 512", check=_positive)
    do_sample: bool = _arg(True, "do_predict: sample (with temperature, top_p, top_k); false: greedy or beams.")
    temperature: float = _arg(0.95, "do_predict: sampling temperature.", expect="a positive number such as 0.95",
                              check=_positive)
    top_p: float = _arg(0.7, "do_predict: nucleus sampling's probability mass.", expect="a number in (0, 1] such as 0.7",
                        check=_share)
    top_k: int = _arg(50, "do_predict: sample among this many most likely tokens.", expect="a positive integer such as 50",
                      check=_positive)
    num_beams: int = _arg(1, "do_predict: beams of beam search; 1: none.", expect="a positive integer such as 1",
                          check=_positive)
    repetition_penalty: float = _arg(1.0, "do_predict: penalty on repeated tokens; 1.0: none.",
                                     expect="a positive number such as 1.0", check=_positive)
    length_penalty: float = _arg(1.0, "do_predict: beam search's length penalty.", expect="a number such as 1.0")
    skip_special_tokens: bool = _arg(True, "do_predict: leave special tokens out of the decoded answers.")


PREF_LOSSES = ("sigmoid", "hinge", "ipo", "orpo", "simpo", "robust", "sppo_hard", "nca_pair")


@dataclass(frozen=True)
class PreferenceArgs:
    """Preference training (LLaMA-Factory's `stage: dpo | kto` keys; docs/preference.md)."""

    stage: str = _arg(
        "sft",
        "sft: supervised fine-tuning; dpo: pairs (chosen / rejected) with pref_loss (DPO and its variants, ORPO, "
        "SimPO); kto: single answers tagged desirable or undesirable.",
        choices=("sft", "dpo", "kto"), prepared=True,
    )
    pref_beta: float = _arg(0.1, "beta of the preference loss (how far the policy may move from the reference).",
                            expect="a positive number such as 0.1", check=_positive)
    pref_loss: str = _arg(
        "sigmoid",
        "stage dpo: the loss. sigmoid (DPO), hinge, ipo, robust, sppo_hard, nca_pair (with a reference); "
        "orpo, simpo (reference-free, on length-averaged log-probabilities).",
        choices=PREF_LOSSES,
    )
    pref_ftx: float = _arg(0.0, "Weight of an SFT loss on the chosen (kto: desirable) answers added to the "
                           "preference loss; 0: none.", expect="a non-negative number such as 0.1",
                           check=_non_negative)
    simpo_gamma: float = _arg(0.5, "pref_loss simpo: the target reward margin gamma.",
                              expect="a non-negative number such as 0.5", check=_non_negative)
    dpo_label_smoothing: float = _arg(
        0.0, "pref_loss sigmoid / robust: the probability that a pair's labels are flipped (cDPO); in [0, 0.5).",
        expect="a number in [0, 0.5) such as 0.1",
        check=lambda v: None if 0 <= v < 0.5 else "is not in [0, 0.5)",
    )
    kto_chosen_weight: float = _arg(1.0, "stage kto: weight of the desirable answers' losses.",
                                    expect="a positive number such as 1.0", check=_positive)
    kto_rejected_weight: float = _arg(1.0, "stage kto: weight of the undesirable answers' losses.",
                                      expect="a positive number such as 1.0", check=_positive)
    ref_model: str | None = _arg(
        None,
        "The reference model (a checkpoint folder or Hub id); null: the starting model itself (LoRA: the base "
        "with the adapter disabled, no second copy; full / freeze: a frozen copy).",
        expect="a checkpoint folder or Hub id, or null",
    )
    ref_model_adapters: str | None = _arg(
        None, "A LoRA adapter folder applied to ref_model (merged into it); null: none.",
        expect="an adapter folder, or null",
    )
    precompute_ref_log_probs: bool = _arg(
        False,
        "Compute the reference's log-probabilities of every row once before training, so that no reference "
        "model stays in memory during training (full fine-tuning: no frozen copy).",
    )
