"""The typed sections of the config: each key declared once, with its type, default, meaning and fix.

The YAML is flat like LLaMA-Factory's (keys are unique across sections); the sections group the keys so that a
function can be handed the part it uses (`cfg.read`, `cfg.fit`, `cfg.model`, ...), and scripts/gen_config_docs.py
writes docs/config.md from these declarations. The data side is declared here, the training side (finetuning,
training, preference) in training_sections.py; `SECTIONS` below is the table of all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .training_sections import FinetuningArgs, PreferenceArgs, TrainArgs
from .values import (
    DEFAULT_OVERFLOW,
    arg as _arg,
    as_comma_str as _as_comma_str,
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
    adapter_name_or_path: str | None = _arg(
        None, "A LoRA adapter folder (what a LoRA run saved) applied to model_name_or_path when only predicting "
        "(do_train: false); `vlmtune export CONFIG.yaml` merges it. Not for training (unsupported). null: "
        "model_name_or_path as it is (a base or fully fine-tuned checkpoint).",
        expect="an adapter folder such as saves/qwen2_vl-2b/lora/sft, or null")


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


SECTIONS: dict[str, type] = {"model": ModelArgs, "read": ReadArgs, "fit": FitArgs, "prepare": PrepareArgs,
                             "finetuning": FinetuningArgs, "training": TrainArgs, "preference": PreferenceArgs}
