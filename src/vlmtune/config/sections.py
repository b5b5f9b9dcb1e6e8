"""The typed sections of the config: each key declared once, with its type, default, meaning and fix.

The YAML is flat like LLaMA-Factory's (keys are unique across sections); the sections group the keys so that a
function can be handed the part it uses (`cfg.read`, `cfg.fit`, `cfg.model`, ...), and scripts/gen_config_docs.py
writes docs/config.md from these declarations.
"""

from __future__ import annotations

from dataclasses import dataclass

from .values import (
    DEFAULT_OVERFLOW,
    LR_SCHEDULERS,
    OPTIMIZERS,
    arg as _arg,
    as_comma_str as _as_comma_str,
    as_fsdp as _as_fsdp,
    as_mapping_or_json as _as_mapping_or_json,
    dropout as _dropout,
    max_steps as _max_steps,
    non_negative as _non_negative,
    positive as _positive,
    ratio as _ratio,
    share as _share,
    val_size as _val_size,
)


@dataclass(frozen=True)
class ModelArgs:
    """Which checkpoint to start from."""

    model_name_or_path: str = _arg(
        help="Hugging Face model id or local folder of a Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5 or "
        "Qwen3.5-MoE checkpoint.",
        expect="a Hugging Face model id or a local folder such as Qwen/Qwen2-VL-2B-Instruct",
        required=True,
        prepared=True,
    )
    trust_remote_code: bool = _arg(
        False,
        "Run Python code shipped inside the checkpoint. Never implied: that code runs with your permissions, "
        "and Qwen-VL models need none.",
    )
    cache_dir: str | None = _arg(
        None,
        "Where downloaded checkpoints are cached; null: the Hugging Face default (HF_HOME).",
        expect="a folder such as ~/.cache/huggingface, or null",
    )


@dataclass(frozen=True)
class ReadArgs:
    """What to read and from where: the datasets, where their images are, which samples are kept."""

    dataset: str = _arg(
        help="Datasets to train on: comma-separated names from dataset_dir/dataset_info.json, or a path to a "
        "JSON/JSONL file or a `datasets` folder. A YAML list of names is joined with commas.",
        expect="a name from dataset_info.json or a path to a JSON/JSONL file, such as mllm_demo",
        convert=_as_comma_str,
        required=True,
        prepared=True,
    )
    dataset_dir: str | None = _arg(
        "data",
        "Folder holding dataset_info.json and the data files it names; null: none (only paths and Hub ids are read, "
        "as `vlmtune inspect` does without --dataset-dir).",
        expect="a folder such as data", prepared=True,
    )
    media_dir: str | None = _arg(
        None,
        "Folder that relative image paths are resolved against; null: each data file's own folder "
        "(dataset_dir for names from dataset_info.json), as in LLaMA-Factory.",
        expect="a folder such as data, or null for each data file's folder",
        prepared=True,
    )
    max_samples: int | None = _arg(
        None,
        "Use at most this many samples of each dataset; null: all.",
        expect="a positive integer such as 1000, or null for all",
        check=_positive,
        prepared=True,
    )
    eval_dataset: str | None = _arg(
        None,
        "Datasets to evaluate on instead of a val_size split: names or paths, like dataset; prepared and fitted "
        "the same way, with their own fit report (eval_fit_report.jsonl). Not with val_size.",
        expect="a name from dataset_info.json or a path, or null",
        convert=_as_comma_str,
    )
    mix_strategy: str = _arg(
        "concat",
        "How several datasets mix: concat (one after the other, shuffled by the trainer), interleave_under "
        "(alternate until the smallest runs out), interleave_over (until the largest runs out, repeating the others).",
        choices=("concat", "interleave_under", "interleave_over"),
        prepared=True,
    )
    interleave_probs: str | None = _arg(
        None,
        "With interleave_*: the chance of drawing each dataset, comma-separated in the order of `dataset`; "
        "null: alternate evenly.",
        expect="comma-separated probabilities such as 0.5,0.3,0.2, or null",
        convert=_as_comma_str,
        prepared=True,
    )
    val_size: int | float = _arg(
        0,
        "Samples held out for validation: a fraction below 1 (0.1) or a count (100); 0: none.",
        expect="a fraction such as 0.1 or a count such as 100 (0 for no validation set)",
        check=_val_size,
    )
    allow_paths_outside_media_dir: bool = _arg(
        False,
        "Allow image paths that resolve outside media_dir (absolute paths, `..`). Off so that a data file "
        "cannot make training read arbitrary files.",
        prepared=True,
    )
    allow_remote_images: bool = _arg(
        False, "Allow http(s) image URLs. Off so that preparing data never touches the network.",
        prepared=True,
    )
    on_bad_sample: str = _arg(
        "error",
        "A sample that fails validation (missing image, bad roles, placeholder count): error stops with every "
        "problem listed; skip leaves it out and records why in the fit report.",
        choices=("error", "skip"),
        prepared=True,
    )
    control_tokens_in_text: str = _arg(
        "invalid",
        "A message whose text holds a token that frames turns or media (<|im_start|>, <|im_end|>, <|image_pad|>, "
        "<|video_pad|>, <|vision_start|>, <|vision_end|>, <|endoftext|>): invalid makes it a bad sample (see "
        "on_bad_sample); text trains it as the plain text it is, never as the control token. Tokens the chat "
        "template gives a meaning inside content (<think>, <tool_call>) are not affected.",
        choices=("invalid", "text"),
        prepared=True,
    )
    # -- how much bad data a run accepts, and remote images --
    max_skipped_share: float = _arg(
        0.05,
        "With on_bad_sample: skip, the largest share of the records that may be left out as invalid; above it "
        "doctor warns and prepare/train stop (a broken image folder should not train on what is left).",
        expect="a number in [0, 1] such as 0.05",
        check=_ratio,
    )
    confirm_skipped_share: bool = _arg(
        False, "Train even when on_bad_sample: skip leaves out more than max_skipped_share of the records."
    )
    remote_image_max_bytes: int = _arg(
        50 * 1024 * 1024, "With allow_remote_images: the largest image fetched, in bytes; larger ones are bad samples.",
        expect="a positive integer such as 52428800", check=_positive,
        prepared=True,
    )
    remote_image_timeout: float = _arg(
        30.0, "With allow_remote_images: seconds to wait for a connection, and for each read, per attempt.",
        expect="a positive number of seconds such as 30", check=_positive,
    )
    remote_image_deadline: float = _arg(
        120.0, "With allow_remote_images: seconds one image's whole fetch may take (attempts, redirects and reads "
        "together), however slowly the server sends.",
        expect="a positive number of seconds such as 120", check=_positive,
    )
    allow_private_remote_images: bool = _arg(
        False, "With allow_remote_images: also fetch from loopback, private, link-local and multicast addresses "
        "(checked after resolving the host, and at each redirect). Off so that a data file cannot make vlmtune "
        "reach services inside your network (docs/security.md).",
        prepared=True,
    )


@dataclass(frozen=True)
class FitArgs:
    """How a sample becomes token sequences of at most cutoff_len: image sizes, labels, overflow policies, packing."""

    cutoff_len: int = _arg(
        2048,
        "Longest sample in tokens, image tokens included. Longer samples go through the overflow policies.",
        expect="a positive integer such as 2048",
        check=_positive,
        prepared=True,
    )
    image_max_pixels: int | None = _arg(
        None,
        "Most pixels (height × width after resizing) of one image; null: the processor's max_pixels. "
        "Replaces LLaMA-Factory's image_resolution: use its square.",
        expect="a positive integer such as 1003520, or null for the processor's",
        check=_positive,
        prepared=True,
    )
    image_min_pixels: int | None = _arg(
        None,
        "Fewest pixels of one image; null: the processor's min_pixels. shrink_images never goes below it.",
        expect="a positive integer such as 3136, or null for the processor's",
        check=_positive,
        prepared=True,
    )
    video_max_pixels: int | None = _arg(
        None,
        "Most pixels (height × width after resizing) of one video frame, as in LLaMA-Factory; null: the video "
        "processor's bound (per frame for Qwen2/2.5-VL; for Qwen3-VL the processor's bound is for the whole "
        "sampled clip, and this key caps it at video_max_pixels × frames).",
        expect="a positive integer such as 65536, or null for the processor's",
        check=_positive,
        prepared=True,
    )
    video_min_pixels: int | None = _arg(
        None,
        "Fewest pixels of one video frame (Qwen3-VL: × frames for the clip); null: the video processor's. "
        "shrink_images never goes below it.",
        expect="a positive integer such as 3136, or null for the processor's",
        check=_positive,
        prepared=True,
    )
    video_fps: float | None = _arg(
        None,
        "Frames sampled per second of video; null: the video processor's fps, else 2.0 (qwen-vl-utils' default).",
        expect="a positive number such as 2.0, or null",
        check=_positive,
        prepared=True,
    )
    video_maxlen: int | None = _arg(
        None,
        "Most frames sampled from one video; null: the video processor's max_frames. LLaMA-Factory's default "
        "is 128.",
        expect="a positive integer such as 128, or null for the processor's",
        check=_positive,
        prepared=True,
    )
    train_on_prompt: bool = _arg(
        False, "Compute the loss on every turn; false: on assistant turns only (the prompt is masked).",
        prepared=True,
    )
    mask_history: bool = _arg(
        False, "Compute the loss on the last answer (or function call) of each sample only; earlier answers are "
        "context, as in LLaMA-Factory.",
        prepared=True,
    )
    default_system: str | None = _arg(
        None, "System prompt for samples that have none; null: the chat template's own default (if any).",
        expect="a string such as 'You are a helpful assistant.', or null",
        prepared=True,
    )
    enable_thinking: bool = _arg(
        True,
        "Thinking checkpoints (Qwen3.5): true trains each answer with its thinking block as the checkpoint's chat "
        "template writes it (an empty `<think>` block when the data has no reasoning); false drops the data's "
        "reasoning and makes the empty block part of the prompt, as the template's enable_thinking=false "
        "generation prompt does. `template: qwen3_5_nothink` sets it to false. No effect on templates without "
        "thinking blocks. See docs/thinking.md.",
        prepared=True,
    )
    overflow: list[str] = _arg(
        DEFAULT_OVERFLOW,
        "Policies tried in order on a sample longer than cutoff_len: shrink_images, truncate_text, split, drop, "
        "error. drop and error end the search, so only the last policy may be one of them. A comma-separated "
        "string is accepted.",
        expect="a list of policies such as [shrink_images, truncate_text, split, drop]",
        prepared=True,
    )
    min_image_tokens: int = _arg(
        4,
        "shrink_images never makes an image smaller than this many tokens, nor smaller than image_min_pixels.",
        expect="a positive integer such as 4",
        check=_positive,
        prepared=True,
    )
    max_image_token_share: float = _arg(
        1.0,
        "Images may take at most this share of cutoff_len; a sample whose images take more is shrunk first. "
        "In (0, 1].",
        expect="a number in (0, 1] such as 0.75",
        check=_share,
        prepared=True,
    )
    split_keep_context: bool = _arg(
        True, "Each part made by split starts with as much of the preceding conversation as still fits.",
        prepared=True,
    )
    packing: bool = _arg(False, "Pack several samples into each cutoff_len sequence (positions restart per sample). "
                         "No attention, and on Qwen3.5 no linear-attention state, crosses from one sample into "
                         "the next.")


@dataclass(frozen=True)
class PrepareArgs:
    """How the prepared dataset is made and cached."""

    preprocessing_num_workers: int | None = _arg(
        None,
        "Processes that prepare the dataset; null: 1.",
        expect="a positive integer such as 4, or null for 1",
        check=_positive,
    )
    prepared_dir: str | None = _arg(
        None,
        "Where the prepared dataset is cached; null: `<output_dir>/prepared`. vlmtune replaces it only when it made "
        "it (it holds `.vlmtune-owned`); it may not be output_dir or hold the data (docs/security.md).",
        expect="a folder such as saves/run1/prepared, or null for <output_dir>/prepared",
    )
    overwrite_cache: bool = _arg(False, "Prepare the dataset again even if prepared_dir holds a matching one.")
    streaming: bool = _arg(
        False,
        "Train straight from the data, fitted on the fly, without a prepared copy (for datasets too large to "
        "prepare); the fit report is written as samples are read. Needs max_steps; no packing, no val_size.",
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
        check=lambda v: None if v == -1 or v > 0 else "is neither -1 nor positive",
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
        expect="-1 or a positive integer such as 1000", check=_max_steps,
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
    # -- generation over eval_dataset after training (LLaMA-Factory's do_predict), its GeneratingArguments --
    do_predict: bool = _arg(
        False, "After training, generate an answer for every sample of eval_dataset and write "
        "generated_predictions.jsonl (prompt, predict, label) and predict_results.json (BLEU-4, ROUGE-1/2/L), "
        "as LLaMA-Factory does. Needs eval_dataset and predict_with_generate: true.",
    )
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


SECTIONS: dict[str, type] = {"model": ModelArgs, "read": ReadArgs, "fit": FitArgs, "prepare": PrepareArgs,
                             "finetuning": FinetuningArgs, "training": TrainArgs, "preference": PreferenceArgs}
