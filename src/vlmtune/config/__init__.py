"""The run configuration: one flat YAML, LLaMA-Factory key names, every problem reported at once.

Each key is declared once, below, with its type, default, meaning and the fix to suggest for a bad value; the
loader validates from these declarations, and scripts/gen_config_docs.py writes docs/config.md from them.
The YAML is flat like LLaMA-Factory's (keys are unique across sections); the dataclasses only group keys for reading.

    cfg = load_config("train.yaml", ["cutoff_len=1024", "overflow=[split,drop]"])
    cfg.cutoff_len, cfg.data.overflow, cfg.notes
"""

from __future__ import annotations

import difflib
import functools
import math
import operator
import os
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Iterable

import yaml

from ..errors import ConfigError

# The overflow policies, tried in the configured order on a sample longer than cutoff_len (data/fit.py).
POLICIES = ("shrink_images", "truncate_text", "split", "drop", "error")
OVERFLOW_POLICIES = POLICIES
DEFAULT_OVERFLOW = ["shrink_images", "truncate_text", "split", "drop"]

# A sample handed to one of these never reaches a later policy, so only the last policy may be one of them.
TERMINAL_POLICIES = ("drop", "error")

# transformers' SchedulerType and OptimizerNames (5.x), copied so that loading a config does not import
# transformers (seconds); tests/test_config.py checks that they still match the installed version.
LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
    "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy",
)
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor", "adamw_anyprecision",
    "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad", "adamw_bnb_8bit", "adamw_8bit",
    "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit",
    "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw",
    "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw", "apollo_adamw_layerwise",
    "stable_adamw",
)

# LLaMA-Factory keys that have no effect in vlmtune but fill its example configs: accepted with a note in
# Config.notes so that a config moves over unchanged. key -> (the values accepted, None for any; why).
LLAMA_FACTORY_IGNORED: dict[str, tuple[tuple | None, str]] = {
    "stage": (("sft",), "vlmtune only does supervised fine-tuning"),
    "do_train": ((True,), "`vlmtune train` always trains"),
    "template": (("qwen2_vl", "qwen3_vl", "qwen3_vl_nothink"), "the chat template comes from the model's processor"),
    "overwrite_output_dir": (None, "checkpoints in output_dir are resumed only when resume_from_checkpoint is set"),
    "save_only_model": ((False,), "vlmtune saves full checkpoints so that a run can resume"),
    "do_eval": (None, "vlmtune evaluates whenever val_size > 0"),
    "eval_strategy": (None, "vlmtune evaluates every eval_steps steps, or at each epoch's end, when val_size > 0"),
    "visual_inputs": (None, "Qwen-VL models always read their images"),
    "video_max_pixels": (None, "vlmtune trains on images only"),
    "video_min_pixels": (None, "vlmtune trains on images only"),
    "video_fps": (None, "vlmtune trains on images only"),
    "video_maxlen": (None, "vlmtune trains on images only"),
}

# Keys of LLaMA-Factory (or other trainers) that vlmtune rejects with a specific fix instead of "unknown key".
LLAMA_FACTORY_REPLACED: dict[str, str] = {
    "image_resolution": "set image_max_pixels to image_resolution**2 instead (262144 for 512)",
    "video_resolution": "vlmtune trains on images only; remove video_resolution",
    "vision_tower": "the vision tower comes with model_name_or_path; use freeze_vision_tower to train or freeze it",
    "quantization_bit": "vlmtune does not train quantized (QLoRA) models; remove quantization_bit",
    "train_mm_proj_only": "set finetuning_type: full with freeze_language_model: true, freeze_vision_tower: true "
    "and freeze_multi_modal_projector: false to train only the projector",
    "disable_gradient_checkpointing": "use gradient_checkpointing: false (vlmtune's key has the opposite sense; "
    "it is on by default, as in LLaMA-Factory)",
}

# A ddp_timeout above this (LLaMA-Factory's examples use 180000000) lets a stuck rank hang the job for days.
_LONG_DDP_TIMEOUT_S = 24 * 3600


# Stands for the value of a key that already has a problem, so that checks across keys skip it.
_INVALID = object()


class _Bad(ValueError):
    """A value of the wrong type; the message completes "key=value ...", e.g. "is not an integer"."""


# --- field declarations -------------------------------------------------------------------------------------


def _arg(
    default: Any = MISSING,
    help: str = "",
    *,
    expect: str | None = None,
    check: Callable[[Any], str | None] | None = None,
    choices: tuple[str, ...] | None = None,
    choices_what: str | None = None,
    convert: Callable[[Any], Any] | None = None,
    required: bool = False,
) -> Any:
    """A dataclass field whose metadata documents it (help) and validates it (expect, check, choices, convert).

    `expect` completes "set KEY to ..." in error messages; `check` returns what is wrong with a well-typed value.
    """
    meta = {"help": help, "expect": expect, "check": check, "choices": choices, "choices_what": choices_what,
            "convert": convert, "required": required}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=None if required else default, metadata=meta)


def _positive(v: float) -> str | None:
    return "is not positive" if v <= 0 else None


def _non_negative(v: float) -> str | None:
    return "is negative" if v < 0 else None


def _share(v: float) -> str | None:
    return None if 0 < v <= 1 else "is not in (0, 1]"


def _ratio(v: float) -> str | None:
    return None if 0 <= v <= 1 else "is not in [0, 1]"


def _dropout(v: float) -> str | None:
    return None if 0 <= v < 1 else "is not in [0, 1)"


def _max_steps(v: int) -> str | None:
    return None if v == -1 or v > 0 else "is neither -1 nor positive"


def _val_size(v: int | float) -> str | None:
    if v < 0:
        return "is negative"
    # LLaMA-Factory reads a float as a fraction; 1.0 or more of the data cannot be held out.
    return "is a fraction of 1 or more" if isinstance(v, float) and v >= 1 else None


def _as_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    raise _Bad("is not true or false")


def _as_int(v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    raise _Bad("is not an integer")


def _as_float(v: Any) -> float:
    # PyYAML reads `1e-4` (no dot) as a string; accept what float() reads so such configs still load.
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            pass
    return float(_as_number(v))


def _as_number(v: Any) -> int | float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if not math.isfinite(v):  # YAML's .inf and .nan pass every range check
            raise _Bad("is not a finite number")
        return v
    raise _Bad("is not a number")


def _as_str(v: Any) -> str:
    if isinstance(v, (str, os.PathLike)):
        return os.fspath(v)
    raise _Bad("is not a string")


def _as_str_list(v: Any) -> list[str]:
    """A list of names, from a YAML list or from a comma-separated string (LLaMA-Factory's form)."""
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _Bad("is not a string or a list of strings")
    return [s.strip() for s in items if s.strip()]


def _as_comma_str(v: Any) -> str:
    """A comma-separated string; a YAML list is joined so both spellings mean the same."""
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return ",".join(s.strip() for s in v)
    if isinstance(v, (str, os.PathLike)):
        return os.fspath(v)
    raise _Bad("is not a string or a list of strings")


def _as_checkpoint(v: Any) -> str | bool | None:
    if v is False:  # HF's spelling of "do not resume"
        return None
    if v is True or isinstance(v, (str, os.PathLike)):
        return os.fspath(v) if isinstance(v, os.PathLike) else v
    raise _Bad("is not true, false or a path")


_CONVERTERS: dict[Any, Callable[[Any], Any]] = {
    bool: _as_bool,
    int: _as_int,
    float: _as_float,
    str: _as_str,
    int | float: _as_number,
    list[str]: _as_str_list,
    bool | str: _as_checkpoint,
}


@dataclass(frozen=True)
class ModelArgs:
    """Which checkpoint to start from."""

    model_name_or_path: str = _arg(
        help="Hugging Face model id or local folder of a Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint.",
        expect="a Hugging Face model id or a local folder such as Qwen/Qwen2-VL-2B-Instruct",
        required=True,
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
class DataArgs:
    """Which data, and how samples are turned into token sequences that fit."""

    dataset: str = _arg(
        help="Datasets to train on: comma-separated names from dataset_dir/dataset_info.json, or a path to a "
        "JSON/JSONL file or a `datasets` folder. A YAML list of names is joined with commas.",
        expect="a name from dataset_info.json or a path to a JSON/JSONL file, such as mllm_demo",
        convert=_as_comma_str,
        required=True,
    )
    dataset_dir: str = _arg("data", "Folder holding dataset_info.json and the data files it names.",
                            expect="a folder such as data")
    media_dir: str | None = _arg(
        None,
        "Folder that relative image paths are resolved against; null: dataset_dir.",
        expect="a folder such as data, or null for dataset_dir",
    )
    cutoff_len: int = _arg(
        2048,
        "Longest sample in tokens, image tokens included. Longer samples go through the overflow policies.",
        expect="a positive integer such as 2048",
        check=_positive,
    )
    image_max_pixels: int | None = _arg(
        None,
        "Most pixels (height × width after resizing) of one image; null: the processor's max_pixels. "
        "Replaces LLaMA-Factory's image_resolution: use its square.",
        expect="a positive integer such as 1003520, or null for the processor's",
        check=_positive,
    )
    image_min_pixels: int | None = _arg(
        None,
        "Fewest pixels of one image; null: the processor's min_pixels. shrink_images never goes below it.",
        expect="a positive integer such as 3136, or null for the processor's",
        check=_positive,
    )
    preprocessing_num_workers: int | None = _arg(
        None,
        "Processes that prepare the dataset; null: 1.",
        expect="a positive integer such as 4, or null for 1",
        check=_positive,
    )
    val_size: int | float = _arg(
        0,
        "Samples held out for validation: a fraction below 1 (0.1) or a count (100); 0: none.",
        expect="a fraction such as 0.1 or a count such as 100 (0 for no validation set)",
        check=_val_size,
    )
    max_samples: int | None = _arg(
        None,
        "Use at most this many samples of each dataset; null: all.",
        expect="a positive integer such as 1000, or null for all",
        check=_positive,
    )
    allow_paths_outside_media_dir: bool = _arg(
        False,
        "Allow image paths that resolve outside media_dir (absolute paths, `..`). Off so that a data file "
        "cannot make training read arbitrary files.",
    )
    allow_remote_images: bool = _arg(
        False, "Allow http(s) image URLs. Off so that preparing data never touches the network."
    )
    on_bad_sample: str = _arg(
        "error",
        "A sample that fails validation (missing image, bad roles, placeholder count): error stops with every "
        "problem listed; skip leaves it out and records why in the fit report.",
        choices=("error", "skip"),
    )
    train_on_prompt: bool = _arg(
        False, "Compute the loss on every turn; false: on assistant turns only (the prompt is masked)."
    )
    overflow: list[str] = _arg(
        DEFAULT_OVERFLOW,
        "Policies tried in order on a sample longer than cutoff_len: shrink_images, truncate_text, split, drop, "
        "error. drop and error end the search, so only the last policy may be one of them. A comma-separated "
        "string is accepted.",
        expect="a list of policies such as [shrink_images, truncate_text, split, drop]",
    )
    min_image_tokens: int = _arg(
        4,
        "shrink_images never makes an image smaller than this many tokens, nor smaller than image_min_pixels.",
        expect="a positive integer such as 4",
        check=_positive,
    )
    max_image_token_share: float = _arg(
        1.0,
        "Images may take at most this share of cutoff_len; a sample whose images take more is shrunk first. "
        "In (0, 1].",
        expect="a number in (0, 1] such as 0.75",
        check=_share,
    )
    split_keep_context: bool = _arg(
        True, "Each part made by split starts with as much of the preceding conversation as still fits."
    )
    packing: bool = _arg(False, "Pack several samples into each cutoff_len sequence (positions restart per sample).")
    prepared_dir: str | None = _arg(
        None,
        "Where the prepared dataset is cached; null: `<output_dir>/prepared`.",
        expect="a folder such as saves/run1/prepared, or null for <output_dir>/prepared",
    )
    overwrite_cache: bool = _arg(False, "Prepare the dataset again even if prepared_dir holds a matching one.")
    # -- issue 12: datasets as users have them (bad-sample share, remote images) --
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
    )
    remote_image_timeout: float = _arg(
        30.0, "With allow_remote_images: seconds to wait for a connection, and for each read, per attempt.",
        expect="a positive number of seconds such as 30", check=_positive,
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
        "Modules that get LoRA adapters: all (every linear layer of the parts not frozen) or module names, "
        "comma-separated or as a list, such as q_proj,v_proj.",
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
    additional_target: list[str] | None = _arg(
        None,
        "Modules trained in full besides the adapters, comma-separated or as a list, such as "
        "embed_tokens,lm_head; null: none.",
        expect="module names such as embed_tokens,lm_head, or null",
    )


@dataclass(frozen=True)
class TrainArgs:
    """The optimisation loop, checkpoints and logging (transformers' TrainingArguments names)."""

    output_dir: str = _arg(
        help="Folder for checkpoints, the trained adapter or model, logs and the loss plot.",
        expect="a folder such as saves/qwen2_vl-2b/lora/sft",
        required=True,
    )
    per_device_train_batch_size: int = _arg(1, "Training samples per device per step.",
                                            expect="a positive integer such as 1", check=_positive)
    per_device_eval_batch_size: int = _arg(1, "Validation samples per device per step.",
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
    resume_from_checkpoint: bool | str | None = _arg(
        None, "Resume training: true for the latest checkpoint in output_dir, or a checkpoint folder; "
        "null or false: start fresh.",
        expect="true, a checkpoint folder such as saves/run1/checkpoint-500, or null",
    )
    deepspeed: str | None = _arg(None, "Path to a DeepSpeed JSON config; null: no DeepSpeed.",
                                 expect="a path such as ds_z2_config.json, or null")
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


SECTIONS: dict[str, type] = {"model": ModelArgs, "data": DataArgs, "finetuning": FinetuningArgs,
                             "training": TrainArgs}


def _key_table() -> dict[str, tuple[str, Any, Any]]:
    """key -> (section, dataclass Field, resolved type hint), in declaration order."""
    table = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            assert f.name not in table, f"key {f.name} is declared twice; the YAML is flat, keys must be unique"
            table[f.name] = (section, f, hints[f.name])
    return table


_KEYS = _key_table()
KEYS: tuple[str, ...] = tuple(_KEYS)


def _without_none(hint: Any) -> tuple[Any, bool]:
    """(the hint with None removed, whether None is allowed)."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else ()
    if type(None) not in args:
        return hint, False
    rest = [a for a in args if a is not type(None)]
    return functools.reduce(operator.or_, rest), True


def _converter(f: Any, hint: Any) -> Callable[[Any], Any]:
    return f.metadata["convert"] or _CONVERTERS[_without_none(hint)[0]]


def _check_declarations() -> None:
    """Every declared type needs a converter: fail at import, not when some user's config sets the key."""
    for _, f, hint in _KEYS.values():
        _converter(f, hint)


_check_declarations()


def default_of(key: str) -> Any:
    """The declared default of a key (None for required keys), as a fresh object."""
    f = _KEYS[key][1]
    return f.default_factory() if f.default is MISSING else f.default


def field_help(key: str) -> str:
    """The documented meaning of a key (the Meaning column of docs/config.md)."""
    return _KEYS[key][1].metadata["help"]


# --- the Config object --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """A validated configuration. Every key reads flat (`cfg.cutoff_len`); sections read as `cfg.data` etc.

    Equal when every key is equal (notes aside). Frozen: change keys with `cfg.replace(cutoff_len=1024)`,
    which validates the result again.
    `notes` lists what was accepted but ignored (LLaMA-Factory keys) and other advice that is not an error.
    Keys whose null default depends on another key (lora_alpha, media_dir, preprocessing_num_workers,
    prepared_dir) hold the effective value; `derived` names those that were filled in that way.
    """

    model: ModelArgs
    data: DataArgs
    finetuning: FinetuningArgs
    training: TrainArgs
    notes: tuple[str, ...] = field(default=(), compare=False)
    derived: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def __getattr__(self, name: str) -> Any:
        # Called only when normal lookup fails, i.e. for the flat keys that live in a section.
        if name not in _KEYS:
            raise AttributeError(f"Config has no key {name!r}")
        return getattr(object.__getattribute__(self, _KEYS[name][0]), name)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(KEYS))

    def to_dict(self) -> dict[str, Any]:
        """Every key, flat, in declaration order; plain YAML types, so `yaml.safe_dump` writes it."""
        return {k: _copy(getattr(self, k)) for k in KEYS}

    def fingerprint_dict(self, keys: Iterable[str]) -> dict[str, Any]:
        """The values of the given keys, e.g. those that decide a prepared dataset's content."""
        keys = list(keys)
        unknown = [k for k in keys if k not in _KEYS]
        if unknown:
            raise KeyError(f"not config keys: {unknown}")
        return {k: _copy(getattr(self, k)) for k in keys}

    def replace(self, **changes: Any) -> Config:
        """A new Config with some keys changed, validated like a loaded one; raises ConfigError."""
        # Derived keys go back to null so that they follow their source: replace(lora_rank=16) doubles lora_alpha.
        given = {k: None if k in self.derived else v for k, v in self.to_dict().items()}
        new = load_config(None, base={**given, **changes})
        return Config(new.model, new.data, new.finetuning, new.training,
                      tuple(dict.fromkeys((*self.notes, *new.notes))), new.derived)


def _copy(v: Any) -> Any:
    return list(v) if isinstance(v, list) else v


def _assemble(values: dict[str, Any], notes: list[str], derived: frozenset[str]) -> Config:
    sections = {name: cls(**{f.name: values[f.name] for f in fields(cls)}) for name, cls in SECTIONS.items()}
    return Config(**sections, notes=tuple(dict.fromkeys(notes)), derived=derived)


# --- loading ------------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike | None, overrides: Iterable[str] = (), base: dict | None = None) -> Config:
    """Read a YAML config, apply `key=value` overrides on top, validate, and return a Config.

    Later sources win: `base` (defaults a caller supplies, e.g. the demo), then the file, then the overrides.
    Every problem found, in any source, is raised together in one ConfigError.
    """
    problems: list[str] = []
    raw: dict[str, Any] = {}
    origin: dict[str, str] = {}
    _merge(raw, origin, base or {}, lambda k: "in the base config")
    if path is not None:
        where = os.fspath(path)
        _merge(raw, origin, _read_yaml(where, problems), lambda k: f"in {where}")
    parsed, texts = _parse_overrides(overrides, problems)
    _merge(raw, origin, parsed, lambda k: f"in override {texts[k]!r}")
    return _build(raw, origin, problems)


def _merge(raw: dict, origin: dict, new: dict, where: Callable[[str], str]) -> None:
    for key, value in new.items():
        raw[key] = value
        origin[key] = where(key)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that reports a repeated key instead of silently keeping the last value."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.repeated: list[str] = []


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if not isinstance(key, typing.Hashable):
            continue  # construct_mapping below reports it
        if key in seen:
            loader.repeated.append(f"key {key!r} appears twice (lines {seen[key]} and {line}); keep one")
        seen.setdefault(key, line)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: str, problems: list[str]) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as e:
        problems.append(f"cannot read config file {path}: {e.strerror}; check the path")
        return {}
    loader = _UniqueKeyLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as e:
        problems.append(f"{path} is not valid YAML: {_yaml_error(e)}; fix the syntax there")
        return {}
    finally:
        loader.dispose()
    problems.extend(f"{path}: {r}" for r in loader.repeated)
    if not isinstance(data, dict):
        what = "empty" if data is None else f"a {type(data).__name__}, not a mapping"
        problems.append(f"{path} is {what}; write one `key: value` per line, such as `cutoff_len: 2048`")
        return {}
    return data


def _yaml_error(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e)
    return f"{what} at line {mark.line + 1}, column {mark.column + 1}" if mark else what


def _parse_overrides(overrides: Iterable[str], problems: list[str]) -> tuple[dict, dict]:
    """`key=value` strings -> ({key: value}, {key: the text}); values read as YAML, so `bf16=true` is a bool."""
    parsed, texts = {}, {}
    for text in overrides:
        key, eq, value = text.partition("=")
        key = key.strip()
        if not eq or not key:
            problems.append(f"override {text!r} is not key=value; write it like cutoff_len=1024")
            continue
        try:
            parsed[key] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            problems.append(f"override {text!r} has a value that is not valid YAML ({_yaml_error(e)}); quote it")
            continue
        texts[key] = text
    return parsed, texts


def _build(raw: dict, origin: dict, problems: list[str]) -> Config:
    notes: list[str] = []
    for key, value in raw.items():
        if key not in _KEYS:
            _foreign_key(key, value, origin[key], problems, notes)
    values = {key: _field_value(key, raw.get(key, default_of(key)), problems) for key in KEYS}
    problems.extend(_check_together(values))
    if problems:
        raise ConfigError(problems)
    derived = _resolve(values)
    notes.extend(_advice(values))
    return _assemble(values, notes, derived)


def _foreign_key(key: Any, value: Any, where: str, problems: list[str], notes: list[str]) -> None:
    """A key that is not ours: an ignored or replaced LLaMA-Factory key, or a mistake."""
    if key in LLAMA_FACTORY_IGNORED:
        accepted, why = LLAMA_FACTORY_IGNORED[key]
        if accepted is None or value in accepted and type(value) in {type(a) for a in accepted}:
            notes.append(f"ignored {key}={value!r}: {why}")
        else:
            allowed = " or ".join(_yaml_text(a) for a in accepted)
            problems.append(f"{key}={value!r} is not supported; {why}; remove {key} or set it to {allowed}")
    elif key == "image_resolution" and isinstance(value, int) and not isinstance(value, bool) and value > 0:
        problems.append(
            f"image_resolution={value} ({where}) is replaced by image_max_pixels; "
            f"set image_max_pixels to image_resolution**2 = {value * value} instead"
        )
    elif key in LLAMA_FACTORY_REPLACED:
        problems.append(f"{key} ({where}) is not supported; {LLAMA_FACTORY_REPLACED[key]}")
    else:
        problems.append(f"unknown key {key!r} ({where}); {_did_you_mean(str(key), KEYS, 'see docs/config.md')}")


def _did_you_mean(word: str, options: Iterable[str], otherwise: str) -> str:
    options = list(options)
    # A prefix is usually a shortened name ("adamw" for adamw_torch); difflib alone would pick grokadamw.
    close = [o for o in options if word and o.startswith(word)][:1] or difflib.get_close_matches(word, options, n=1)
    return f"did you mean {close[0]!r}?" if close else otherwise


def _yaml_text(v: Any) -> str:
    return "true" if v is True else "false" if v is False else "null" if v is None else str(v)


def _field_value(key: str, value: Any, problems: list[str]) -> Any:
    """The key's value converted to its declared type, or _INVALID after adding a problem."""
    _, f, hint = _KEYS[key]
    meta = f.metadata
    expect = meta["expect"] or "true or false"
    if value is None and (meta["required"] or _without_none(hint)[1]):
        if meta["required"]:
            problems.append(f"{key} is required; set {key} to {expect}")
            return _INVALID
        return None
    try:
        converted = _converter(f, hint)(value)
    except _Bad as e:
        fix = _choices_fix(key, meta) if meta["choices"] else f"set {key} to {expect}"
        problems.append(f"{key}={value!r} {e}; {fix}")
        return _INVALID
    problem = _check_value(key, converted, value, meta)
    if problem:
        problems.append(problem)
        return _INVALID
    return converted


def _check_value(key: str, value: Any, given: Any, meta: dict) -> str | None:
    """What is wrong with a well-typed value, if anything; messages show the value as `given`."""
    if meta["choices"] and value not in meta["choices"]:
        what = meta["choices_what"] or "one of " + ", ".join(map(repr, meta["choices"]))
        return f"{key}={value!r} is not {what}; {_did_you_mean(value, meta['choices'], _choices_fix(key, meta))}"
    wrong = meta["check"](value) if meta["check"] else None
    if wrong:
        return f"{key}={given!r} {wrong}; set {key} to {meta['expect']}"
    return _check_names(key, value)


def _choices_fix(key: str, meta: dict) -> str:
    if meta["choices_what"]:
        return f"set {key} to {meta['choices_what']} such as {meta['choices'][0]}"
    return f"set {key} to one of " + ", ".join(meta["choices"])


def _check_names(key: str, value: Any) -> str | None:
    """The list-valued keys: each has its own rules."""
    if key == "overflow":
        return _check_overflow(value)
    if key == "lora_target" and not value:
        return f"lora_target={value!r} is empty; set lora_target to all or module names such as q_proj,v_proj"
    if key == "lora_target" and "all" in value and len(value) > 1:
        return f"lora_target={value!r} mixes all with module names; set lora_target to all or to module names"
    if key == "additional_target" and not value:
        return f"additional_target={value!r} is empty; set additional_target to module names or null"
    return None


def _check_overflow(policies: list[str]) -> str | None:
    for p in policies:
        if p not in OVERFLOW_POLICIES:
            known = ", ".join(map(repr, OVERFLOW_POLICIES))
            hint = _did_you_mean(p, OVERFLOW_POLICIES, "use only these")
            return f"overflow policy {p!r} is not one of {known}; {hint}"
    if not policies:
        return "overflow=[] is empty; set overflow to policies such as [shrink_images, truncate_text, split, drop]"
    repeated = [p for i, p in enumerate(policies) if p in policies[:i]]
    if repeated:
        return f"overflow={policies!r} lists {repeated[0]!r} twice; list each policy once"
    for i, p in enumerate(policies[:-1]):
        if p in TERMINAL_POLICIES:
            return (
                f"overflow={policies!r} has {policies[i + 1]!r} after {p!r}, which ends the search, so it would "
                f"never run; make {p!r} the last policy"
            )
    return None


def _check_together(v: dict[str, Any]) -> list[str]:
    """Rules that involve several keys, each checked only when all its keys are valid on their own."""
    problems = []
    lo, hi = v["image_min_pixels"], v["image_max_pixels"]
    if _valid(lo, hi) and lo is not None and hi is not None and lo > hi:
        problems.append(
            f"image_min_pixels={lo} is larger than image_max_pixels={hi}; lower image_min_pixels or raise "
            "image_max_pixels"
        )
    if v["bf16"] is True and v["fp16"] is True:
        problems.append("bf16 and fp16 are both true; set at most one of them (bf16 where the GPU supports it)")
    problems.extend(_check_trainable(v))
    return problems


def _valid(*values: Any) -> bool:
    return all(x is not _INVALID for x in values)


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


def _resolve(v: dict[str, Any]) -> frozenset[str]:
    """Fill the null defaults that depend on other keys, so every reader sees one effective value.

    Returns the keys filled in.
    """
    fill = {
        "lora_alpha": lambda: 2 * v["lora_rank"],
        "media_dir": lambda: v["dataset_dir"],
        "preprocessing_num_workers": lambda: 1,
        "prepared_dir": lambda: os.path.join(v["output_dir"], "prepared"),
    }
    derived = frozenset(k for k in fill if v[k] is None)
    for k in derived:
        v[k] = fill[k]()
    return derived


def _advice(v: dict[str, Any]) -> list[str]:
    notes = []
    if v["ddp_timeout"] > _LONG_DDP_TIMEOUT_S:
        notes.append(
            f"ddp_timeout={v['ddp_timeout']} s lets a stuck rank hang the job for over a day instead of failing "
            f"it; the default is {default_of('ddp_timeout')}"
        )
    if v["trust_remote_code"] is True:
        notes.append(
            "trust_remote_code=true runs Python code shipped with the checkpoint; Qwen-VL models need none "
            "with transformers >= 4.45, so remove it unless your checkpoint really ships custom code"
        )
    return notes
