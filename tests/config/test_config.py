"""The config: defaults, YAML + overrides, every validation message, LLaMA-Factory configs, generated docs."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pickle
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmtune import config as C
from vlmtune.config import Config, load_config
from vlmtune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "dataset": "mllm_demo", "output_dir": "saves/run"}

DEFAULTS = {
    "model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct",
    "trust_remote_code": False,
    "cache_dir": None,
    "adapter_name_or_path": None,
    "dataset": "mllm_demo",
    "dataset_dir": "data",
    "media_dir": None,
    "cutoff_len": 2048,
    "image_max_pixels": None,
    "image_min_pixels": None,
    "video_max_pixels": None,
    "video_min_pixels": None,
    "video_fps": None,
    "video_maxlen": None,
    "preprocessing_num_workers": 1,
    "eval_dataset": None,
    "mix_strategy": "concat",
    "interleave_probs": None,
    "val_size": 0,
    "max_samples": None,
    "allow_paths_outside_media_dir": False,
    "allow_remote_images": False,
    "on_bad_sample": "error",
    "control_tokens_in_text": "invalid",
    "train_on_prompt": False,
    "mask_history": False,
    "default_system": None,
    "enable_thinking": True,
    "overflow": ["shrink_images", "truncate_text", "split", "drop"],
    "min_image_tokens": 4,
    "max_image_token_share": 1.0,
    "split_keep_context": True,
    "packing": False,
    "prepared_dir": "saves/run/prepared",
    "overwrite_cache": False,
    "streaming": False,
    "max_skipped_share": 0.05,
    "confirm_skipped_share": False,
    "remote_image_max_bytes": 52428800,
    "remote_image_timeout": 30.0,
    "remote_image_deadline": 120.0,
    "allow_private_remote_images": False,
    "finetuning_type": "lora",
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "lora_target": ["all"],
    "freeze_trainable_layers": 2,
    "freeze_vision_tower": True,
    "freeze_multi_modal_projector": True,
    "freeze_language_model": False,
    "freeze_router": True,
    "moe_aux_loss_coef": None,
    "additional_target": None,
    "quantization_bit": None,
    "quantization_type": "nf4",
    "double_quantization": True,
    "quantize_vision_tower": False,
    "use_dora": False,
    "use_rslora": False,
    "pissa_init": False,
    "pissa_iter": 16,
    "loraplus_lr_ratio": None,
    "output_dir": "saves/run",
    "per_device_train_batch_size": 1,
    "per_device_eval_batch_size": 1,
    "gradient_accumulation_steps": 8,
    "learning_rate": 1e-4,
    "num_train_epochs": 3.0,
    "max_steps": -1,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.0,
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "bf16": False,
    "fp16": False,
    "force_cpu_bf16": False,
    "gradient_checkpointing": True,
    "logging_steps": 10,
    "save_steps": 500,
    "save_total_limit": None,
    "eval_steps": None,
    "plot_loss": False,
    "report_to": "none",
    "overwrite_output_dir": False,
    "resume_from_checkpoint": None,
    "deepspeed": None,
    "fsdp": None,
    "fsdp_config": None,
    "seed": 42,
    "ddp_timeout": 1800,
    "dataloader_num_workers": 0,
    "group_by_length": True,
    "worst_case_first": True,
    "run_doctor": True,
    "optim": "adamw_torch",
    "do_train": True,
    "do_predict": False,
    "predict_with_generate": False,
    "max_new_tokens": 1024,
    "do_sample": True,
    "temperature": 0.95,
    "top_p": 0.7,
    "top_k": 50,
    "num_beams": 1,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "skip_special_tokens": True,
    "stage": "sft",
    "pref_beta": 0.1,
    "pref_loss": "sigmoid",
    "pref_ftx": 0.0,
    "simpo_gamma": 0.5,
    "dpo_label_smoothing": 0.0,
    "kto_chosen_weight": 1.0,
    "kto_rejected_weight": 1.0,
    "ref_model": None,
    "ref_model_adapters": None,
    "precompute_ref_log_probs": False,
}

# LLaMA-Factory's examples/train_lora/qwen2_5vl_lora_sft.yaml, with the keys its users commonly add.
LLAMA_FACTORY_YAML = """\
### model
model_name_or_path: Qwen/Qwen2-VL-7B-Instruct
image_max_pixels: 262144
video_max_pixels: 16384
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: mllm_demo,identity
template: qwen2_vl
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/qwen2_vl-7b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""


def problems_of(overrides=(), base=REQUIRED, path=None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides), base=dict(base) if base is not None else None)
    return e.value.problems


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> str:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


# --- defaults and access ------------------------------------------------------------------------------------


def test_defaults_with_only_the_required_keys():
    cfg = load_config(None, base=REQUIRED)
    assert cfg.to_dict() == DEFAULTS
    assert list(cfg.to_dict()) == list(C.KEYS)
    assert cfg.notes == ()
    assert cfg.derived == {"lora_alpha", "preprocessing_num_workers", "prepared_dir", "do_train"}


def test_keys_read_flat_and_by_section():
    cfg = load_config(None, base=REQUIRED)
    assert (cfg.cutoff_len, cfg.fit.cutoff_len) == (2048, 2048)
    assert (cfg.dataset, cfg.read.dataset) == ("mllm_demo", "mllm_demo")
    assert (cfg.prepared_dir, cfg.prepare.prepared_dir) == ("saves/run/prepared",) * 2
    assert (cfg.model_name_or_path, cfg.model.model_name_or_path) == ("Qwen/Qwen2-VL-2B-Instruct",) * 2
    assert (cfg.lora_rank, cfg.finetuning.lora_rank) == (8, 8)
    assert (cfg.seed, cfg.training.seed) == (42, 42)
    assert "cutoff_len" in dir(cfg)
    with pytest.raises(AttributeError, match="Config has no key 'cutof_len'"):
        cfg.cutof_len


def test_config_is_frozen_and_replace_validates_and_rederives():
    cfg = load_config(None, base=REQUIRED)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.fit.cutoff_len = 1
    new = cfg.replace(cutoff_len=1024, lora_rank=4, output_dir="o2", dataset_dir="d2")
    assert (new.cutoff_len, new.lora_alpha, new.prepared_dir) == (1024, 8, "o2/prepared")
    # media_dir stays null (each data file's folder, dataset_dir for names): never copied from dataset_dir
    assert (new.dataset_dir, new.media_dir) == ("d2", None)
    assert cfg.cutoff_len == 2048
    with pytest.raises(ConfigError) as e:
        cfg.replace(cutoff_len=0)
    assert e.value.problems == ["cutoff_len=0 is not positive; set cutoff_len to a positive integer such as 2048"]


def test_explicit_values_are_not_rederived():
    cfg = load_config(None, ["lora_alpha=32", "media_dir=images"], base=REQUIRED)
    assert cfg.derived == {"preprocessing_num_workers", "prepared_dir", "do_train"}
    new = cfg.replace(lora_rank=64)
    assert (new.lora_alpha, new.media_dir) == (32, "images")


def test_to_dict_is_yaml_and_round_trips(tmp_path):
    cfg = load_config(None, ["overflow=split,drop", "lora_target=q_proj,v_proj"], base=REQUIRED)
    path = write(tmp_path, yaml.safe_dump(cfg.to_dict()))
    again = load_config(path)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    cfg.to_dict()["overflow"].append("error")
    assert cfg.overflow == ["split", "drop"]


def test_pickles():
    cfg = load_config(None, base=REQUIRED)
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_fingerprint_dict():
    cfg = load_config(None, base=REQUIRED)
    assert cfg.fingerprint_dict(k for k in ("cutoff_len", "overflow")) == {
        "cutoff_len": 2048,
        "overflow": ["shrink_images", "truncate_text", "split", "drop"],
    }
    with pytest.raises(KeyError, match="cutof_len"):
        cfg.fingerprint_dict(["cutof_len"])


def test_the_keys_that_change_the_prepared_dataset_are_flagged_where_declared():
    assert C.PREPARED_KEYS == (
        "model_name_or_path", "dataset", "dataset_dir", "media_dir", "max_samples", "mix_strategy", "interleave_probs",
        "allow_paths_outside_media_dir", "allow_remote_images", "on_bad_sample", "control_tokens_in_text",
        "remote_image_max_bytes", "allow_private_remote_images", "cutoff_len", "image_max_pixels", "image_min_pixels",
        "video_max_pixels", "video_min_pixels", "video_fps", "video_maxlen", "train_on_prompt", "mask_history",
        "default_system", "enable_thinking", "overflow", "min_image_tokens", "max_image_token_share",
        "split_keep_context", "stage",
    )
    cfg = load_config(None, base=REQUIRED)
    values = C.prepared_values(cfg.model, cfg.read, cfg.fit, cfg.preference)
    assert values == cfg.fingerprint_dict(C.PREPARED_KEYS)
    assert values["media_dir"] is None and values["overflow"] == ["shrink_images", "truncate_text", "split", "drop"]
    # a key that does not change the rows (a threshold, the packing) is not in the fingerprint
    assert not {"max_skipped_share", "confirm_skipped_share", "val_size", "packing", "remote_image_timeout",
                "remote_image_deadline", "eval_dataset"} & set(values)


def test_sections_load_alone_with_every_problem_at_once():
    model, read, fit = C.load_sections({"model_name_or_path": "m", "dataset": "d.jsonl", "dataset_dir": None,
                                        "cutoff_len": 512}, "model", "read", "fit")
    assert (model.model_name_or_path, read.dataset, read.dataset_dir, fit.cutoff_len) == ("m", "d.jsonl", None, 512)
    assert fit.overflow == ["shrink_images", "truncate_text", "split", "drop"]
    with pytest.raises(ConfigError) as err:
        C.load_sections({"model_name_or_path": "m", "cutoff_len": 0, "learning_rate": 1.0}, "model", "read", "fit")
    assert err.value.problems == [
        "learning_rate is not a key of the model, read, fit sections",
        "dataset is required; set dataset to a name from dataset_info.json or a path to a JSON/JSONL file, such as "
        "mllm_demo",
        "cutoff_len=0 is not positive; set cutoff_len to a positive integer such as 2048",
    ]


def test_sections_partition_the_keys():
    names = [f.name for cls in C.SECTIONS.values() for f in dataclasses.fields(cls)]
    assert names == list(C.KEYS)
    assert {f.name for f in dataclasses.fields(C.FitArgs)} == {
        "cutoff_len", "image_max_pixels", "image_min_pixels", "train_on_prompt", "enable_thinking", "overflow",
        "min_image_tokens",
        "max_image_token_share", "split_keep_context", "packing", "video_max_pixels", "video_min_pixels", "video_fps",
        "video_maxlen", "mask_history", "default_system", "enable_thinking",
    }
    assert {f.name for f in dataclasses.fields(C.ReadArgs)} == {
        "dataset", "dataset_dir", "media_dir", "max_samples", "val_size", "allow_paths_outside_media_dir",
        "allow_remote_images", "on_bad_sample", "max_skipped_share", "confirm_skipped_share", "remote_image_max_bytes",
        "remote_image_timeout", "remote_image_deadline", "allow_private_remote_images", "control_tokens_in_text", "eval_dataset",
        "mix_strategy", "interleave_probs",
    }


# --- YAML and overrides -------------------------------------------------------------------------------------


def test_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\ndataset: d\noutput_dir: o\ncutoff_len: 4096\nbf16: false\n")
    cfg = load_config(
        path,
        [
            "cutoff_len=1024",
            "overflow=[drop]",
            "bf16=true",
            "lora_target=q_proj, v_proj",
            "learning_rate=1e-4",
            "dataset=a,b",
            "val_size=100",
            "resume_from_checkpoint=true",
            "  seed = 7",
        ],
    )
    assert (cfg.cutoff_len, cfg.overflow, cfg.bf16) == (1024, ["drop"], True)
    assert (cfg.lora_target, cfg.learning_rate) == (["q_proj", "v_proj"], 1e-4)
    assert (cfg.dataset, cfg.val_size, cfg.resume_from_checkpoint, cfg.seed) == ("a,b", 100, True, 7)
    assert cfg.model_name_or_path == "m"


def test_sources_in_order_base_file_overrides(tmp_path):
    path = write(tmp_path, "cutoff_len: 1000\nseed: 1\n")
    cfg = load_config(path, ["seed=2"], base={**REQUIRED, "cutoff_len": 500, "seed": 0, "packing": True})
    assert (cfg.cutoff_len, cfg.seed, cfg.packing) == (1000, 2, True)


def test_yaml_spellings_llama_factory_users_write(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string; lists and comma strings mean the same.
    text = "learning_rate: 1e-4\nlora_target: [q_proj, v_proj]\ndataset: [a, b]\noverflow: error\nreport_to: [wandb]\n"
    cfg = load_config(write(tmp_path, text), base=REQUIRED)
    assert (cfg.learning_rate, cfg.lora_target, cfg.dataset) == (1e-4, ["q_proj", "v_proj"], "a,b")
    assert (cfg.overflow, cfg.report_to) == (["error"], "wandb")


def test_normalisations():
    cfg = load_config(
        None,
        ["overflow= shrink_images , drop", "additional_target=embed_tokens,lm_head", "resume_from_checkpoint=false"],
        base={**REQUIRED, "output_dir": Path("out"), "learning_rate": 2, "num_train_epochs": 1},
    )
    assert cfg.overflow == ["shrink_images", "drop"]
    assert cfg.additional_target == ["embed_tokens", "lm_head"]
    assert cfg.resume_from_checkpoint is None
    assert (cfg.output_dir, cfg.learning_rate, cfg.num_train_epochs) == ("out", 2.0, 1.0)
    assert type(cfg.learning_rate) is float


def test_trust_remote_code_is_only_true_when_written_true():
    assert load_config(None, base=REQUIRED).trust_remote_code is False
    assert load_config(None, ["trust_remote_code=true"], base=REQUIRED).trust_remote_code is True
    assert problems_of(["trust_remote_code=1"]) == [
        "trust_remote_code=1 is not true or false; set trust_remote_code to true or false"
    ]


# --- every validation message -------------------------------------------------------------------------------

SCHEDULERS = ", ".join(map(repr, C.LR_SCHEDULERS))
POLICIES = "'shrink_images', 'truncate_text', 'split', 'drop', 'error'"

MESSAGES = [
    # types
    ("cutoff_len=abc", "cutoff_len='abc' is not an integer; set cutoff_len to a positive integer such as 2048"),
    ("cutoff_len=true", "cutoff_len=True is not an integer; set cutoff_len to a positive integer such as 2048"),
    ("cutoff_len=1.5", "cutoff_len=1.5 is not an integer; set cutoff_len to a positive integer such as 2048"),
    ("cutoff_len=", "cutoff_len=None is not an integer; set cutoff_len to a positive integer such as 2048"),
    ("learning_rate=abc", "learning_rate='abc' is not a number; set learning_rate to a positive number such as 1.0e-4"),
    ("learning_rate=.inf", "learning_rate=inf is not a finite number; set learning_rate to a positive number such as "
     "1.0e-4"),
    ("val_size=.nan", "val_size=nan is not a finite number; set val_size to a fraction such as 0.1 or a count such "
     "as 100 (0 for no validation set)"),
    ("bf16='true'", "bf16='true' is not true or false; set bf16 to true or false"),
    ("val_size=abc", "val_size='abc' is not a number; set val_size to a fraction such as 0.1 or a count such as 100 "
     "(0 for no validation set)"),
    ("val_size=true", "val_size=True is not a number; set val_size to a fraction such as 0.1 or a count such as 100 "
     "(0 for no validation set)"),
    ("dataset=5", "dataset=5 is not a string or a list of strings; set dataset to a name from dataset_info.json or a "
     "path to a JSON/JSONL file, such as mllm_demo"),
    ("overflow=5", "overflow=5 is not a string or a list of strings; set overflow to a list of policies such as "
     "[shrink_images, truncate_text, split, drop]"),
    ("resume_from_checkpoint=5", "resume_from_checkpoint=5 is not true, false or a path; set resume_from_checkpoint "
     "to true, a checkpoint folder such as saves/run1/checkpoint-500, or null"),
    ("image_max_pixels=big", "image_max_pixels='big' is not an integer; set image_max_pixels to a positive integer "
     "such as 1003520, or null for the processor's"),
    # ranges
    ("cutoff_len=0", "cutoff_len=0 is not positive; set cutoff_len to a positive integer such as 2048"),
    ("lora_rank=0", "lora_rank=0 is not positive; set lora_rank to a positive integer such as 8"),
    ("lora_alpha=0", "lora_alpha=0 is not positive; set lora_alpha to a positive integer such as 16, or null for "
     "2 × lora_rank"),
    ("lora_dropout=1", "lora_dropout=1 is not in [0, 1); set lora_dropout to a number in [0, 1) such as 0.05"),
    ("val_size=-1", "val_size=-1 is negative; set val_size to a fraction such as 0.1 or a count such as 100 "
     "(0 for no validation set)"),
    ("val_size=1.5", "val_size=1.5 is a fraction of 1 or more; set val_size to a fraction such as 0.1 or a count "
     "such as 100 (0 for no validation set)"),
    ("per_device_train_batch_size=0", "per_device_train_batch_size=0 is not positive; set "
     "per_device_train_batch_size to a positive integer such as 1"),
    ("gradient_accumulation_steps=0", "gradient_accumulation_steps=0 is not positive; set "
     "gradient_accumulation_steps to a positive integer such as 8"),
    ("learning_rate=0", "learning_rate=0 is not positive; set learning_rate to a positive number such as 1.0e-4"),
    ("max_image_token_share=0", "max_image_token_share=0 is not in (0, 1]; set max_image_token_share to a number "
     "in (0, 1] such as 0.75"),
    ("max_image_token_share=1.5", "max_image_token_share=1.5 is not in (0, 1]; set max_image_token_share to a "
     "number in (0, 1] such as 0.75"),
    ("max_steps=0", "max_steps=0 is neither -1 nor positive; set max_steps to -1 or a positive integer such as 1000"),
    ("warmup_ratio=2", "warmup_ratio=2 is not in [0, 1]; set warmup_ratio to a number in [0, 1] such as 0.1"),
    ("seed=-1", "seed=-1 is negative; set seed to a non-negative integer such as 42"),
    ("ddp_timeout=0", "ddp_timeout=0 is not positive; set ddp_timeout to a positive number of seconds such as 1800"),
    ("min_image_tokens=0", "min_image_tokens=0 is not positive; set min_image_tokens to a positive integer such as 4"),
    # choices
    ("finetuning_type=loar", "finetuning_type='loar' is not one of 'lora', 'full', 'freeze'; did you mean 'lora'?"),
    ("finetuning_type=xyz", "finetuning_type='xyz' is not one of 'lora', 'full', 'freeze'; set finetuning_type to "
     "one of lora, full, freeze"),
    ("on_bad_sample=skipp", "on_bad_sample='skipp' is not one of 'error', 'skip'; did you mean 'skip'?"),
    ("lr_scheduler_type=cosin", f"lr_scheduler_type='cosin' is not one of {SCHEDULERS}; did you mean 'cosine'?"),
    ("optim=adamw", "optim='adamw' is not a transformers optimizer name; did you mean 'adamw_torch'?"),
    ("optim=xyz", "optim='xyz' is not a transformers optimizer name; set optim to a transformers optimizer name "
     "such as adamw_torch"),
    # overflow
    ("overflow=[shrink_image]", f"overflow policy 'shrink_image' is not one of {POLICIES}; did you mean "
     "'shrink_images'?"),
    ("overflow=truncate,drop", f"overflow policy 'truncate' is not one of {POLICIES}; did you mean 'truncate_text'?"),
    ("overflow=[bogus]", f"overflow policy 'bogus' is not one of {POLICIES}; use only these"),
    ("overflow=[error,drop]", "overflow=['error', 'drop'] has 'drop' after 'error', which ends the search, so it "
     "would never run; make 'error' the last policy"),
    ("overflow=[drop,split]", "overflow=['drop', 'split'] has 'split' after 'drop', which ends the search, so it "
     "would never run; make 'drop' the last policy"),
    ("overflow=[split,split]", "overflow=['split', 'split'] lists 'split' twice; list each policy once"),
    ("overflow=[]", "overflow=[] is empty; set overflow to policies such as [shrink_images, truncate_text, split, "
     "drop]"),
    # names
    ("lora_target=[]", "lora_target=[] is empty; set lora_target to all or module names such as q_proj,v_proj"),
    ("lora_target=all,q_proj", "lora_target=['all', 'q_proj'] mixes all with module names; set lora_target to all "
     "or to module names"),
    ("additional_target=[]", "additional_target=[] is empty; set additional_target to module names or null"),
    # across keys
    ("freeze_trainable_layers=0", "freeze_trainable_layers=0 is zero; set freeze_trainable_layers to a non-zero "
     "integer such as 2"),
    ("freeze_language_model=true", "freeze_vision_tower, freeze_multi_modal_projector and freeze_language_model are "
     "all true, so finetuning_type='lora' has nothing to train; set one of them to false"),
    # required
    ("dataset=", "dataset is required; set dataset to a name from dataset_info.json or a path to a JSON/JSONL file, "
     "such as mllm_demo"),
    # keys
    ("cutof_len=1", "unknown key 'cutof_len' (in override 'cutof_len=1'); did you mean 'cutoff_len'?"),
    ("lora_rnak=8", "unknown key 'lora_rnak' (in override 'lora_rnak=8'); did you mean 'lora_rank'?"),
    ("zzzz=1", "unknown key 'zzzz' (in override 'zzzz=1'); see docs/config.md"),
    ("cutoff_len", "override 'cutoff_len' is not key=value; write it like cutoff_len=1024"),
    ("=5", "override '=5' is not key=value; write it like cutoff_len=1024"),
    ("overflow=[drop", "override 'overflow=[drop' has a value that is not valid YAML (expected ',' or ']', but got "
     "'<stream end>' at line 1, column 6); quote it"),
    # LLaMA-Factory keys
    ("stage=ppo", "stage='ppo' is not one of 'sft', 'dpo', 'kto'; did you mean 'dpo'?"),
    ("pref_beta=0.2", "pref_beta=0.2 applies to the preference stages only, but stage='sft'; set stage: dpo (or kto), "
     "or remove pref_beta"),
    ("do_train=false", "do_train=false with do_predict=false leaves nothing to do; set do_predict: true (with "
     "eval_dataset) to only predict, or do_train: true"),
    ("template=llava", "template='llava' is not supported; the chat template comes from the model's processor; "
     "remove template or set it to qwen2_vl or qwen3_vl or qwen3_vl_nothink or qwen3_5 or "
     "qwen3_5_nothink"),
    ("save_only_model=true", "save_only_model=True is not supported; vlmtune saves full checkpoints so that a run "
     "can resume; remove save_only_model or set it to false"),
    ("image_resolution=512", "image_resolution=512 (in override 'image_resolution=512') is replaced by "
     "image_max_pixels; set image_max_pixels to image_resolution**2 = 262144 instead"),
    ("image_resolution=big", "image_resolution (in override 'image_resolution=big') is not supported; set "
     "image_max_pixels to image_resolution**2 instead (262144 for 512)"),
    ("vision_tower=x", "vision_tower (in override 'vision_tower=x') is not supported; the vision tower comes with "
     "model_name_or_path; use freeze_vision_tower to train or freeze it"),
    ("quantization_bit=3", "quantization_bit=3 is neither 4 nor 8; set quantization_bit to 4, 8 or null"),
    ("quantization_type=int4", "quantization_type='int4' is not one of 'nf4', 'fp4'; set quantization_type to one "
     "of nf4, fp4"),
    ("loraplus_lr_ratio=0.5", "loraplus_lr_ratio=0.5 is below 1; set loraplus_lr_ratio to a number of at least 1 "
     "such as 16.0, or null"),
]


@pytest.mark.parametrize("override,message", MESSAGES, ids=[o for o, _ in MESSAGES])
def test_problem_message(override, message):
    assert problems_of([override]) == [message]


def test_freeze_needs_the_language_model():
    assert problems_of(["finetuning_type=freeze", "freeze_language_model=true"]) == [
        "finetuning_type='freeze' trains decoder layers of the language model, but freeze_language_model is true; "
        "set freeze_language_model to false or set finetuning_type to lora or full"
    ]


def test_pairs_that_conflict():
    assert problems_of(["bf16=true", "fp16=true"]) == [
        "bf16 and fp16 are both true; set at most one of them (bf16 where the GPU supports it)"
    ]
    assert problems_of(["image_min_pixels=1000", "image_max_pixels=500"]) == [
        "image_min_pixels=1000 is larger than image_max_pixels=500; lower image_min_pixels or raise image_max_pixels"
    ]
    # Each pair is valid on its own terms:
    assert load_config(None, ["image_min_pixels=500", "image_max_pixels=500", "bf16=true"], base=REQUIRED)
    assert load_config(None, ["finetuning_type=freeze", "additional_target=lm_head"], base=REQUIRED)
    assert load_config(None, ["freeze_language_model=true", "additional_target=lm_head"], base=REQUIRED)


def test_missing_required_keys():
    assert problems_of(base={}) == [
        "model_name_or_path is required; set model_name_or_path to a Hugging Face model id or a local folder such as "
        "Qwen/Qwen2-VL-2B-Instruct",
        "dataset is required; set dataset to a name from dataset_info.json or a path to a JSON/JSONL file, such as "
        "mllm_demo",
        "output_dir is required; set output_dir to a folder such as saves/qwen2_vl-2b/lora/sft",
    ]
    assert problems_of(base=None) == problems_of(base={})


def test_all_problems_reported_together(tmp_path):
    path = write(
        tmp_path,
        "model_name_or_path: m\ncutof_len: 1024\nlora_rank: 0\noverflow: [error, drop]\nbf16: true\nfp16: true\n"
        "stage: ppo\nimage_resolution: 448\n",
    )
    problems = problems_of(["learning_rate=fast", "finetuning_type=ful", "bogus"], base=None, path=path)
    assert problems == [
        "override 'bogus' is not key=value; write it like cutoff_len=1024",
        f"unknown key 'cutof_len' (in {path}); did you mean 'cutoff_len'?",
        f"image_resolution=448 (in {path}) is replaced by image_max_pixels; set image_max_pixels to "
        "image_resolution**2 = 200704 instead",
        "dataset is required; set dataset to a name from dataset_info.json or a path to a JSON/JSONL file, such as "
        "mllm_demo",
        "overflow=['error', 'drop'] has 'drop' after 'error', which ends the search, so it would never run; make "
        "'error' the last policy",
        "finetuning_type='ful' is not one of 'lora', 'full', 'freeze'; did you mean 'full'?",
        "lora_rank=0 is not positive; set lora_rank to a positive integer such as 8",
        "output_dir is required; set output_dir to a folder such as saves/qwen2_vl-2b/lora/sft",
        "learning_rate='fast' is not a number; set learning_rate to a positive number such as 1.0e-4",
        "stage='ppo' is not one of 'sft', 'dpo', 'kto'; did you mean 'dpo'?",
        "bf16 and fp16 are both true; set at most one of them (bf16 where the GPU supports it)",
    ]


def test_config_error_message_lists_every_problem():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["cutoff_len=0", "lora_rank=0"], base=REQUIRED)
    assert str(e.value) == (
        "2 problem(s) in the configuration:\n"
        "  - cutoff_len=0 is not positive; set cutoff_len to a positive integer such as 2048\n"
        "  - lora_rank=0 is not positive; set lora_rank to a positive integer such as 8"
    )


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "cutof_len: 1024\n")
    assert problems_of(path=path) == [f"unknown key 'cutof_len' (in {path}); did you mean 'cutoff_len'?"]
    assert problems_of(base={**REQUIRED, "lora_ranc": 8}) == [
        "unknown key 'lora_ranc' (in the base config); did you mean 'lora_rank'?"
    ]


# --- the file itself ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,what",
    [
        ("- cutoff_len: 1\n", "is a list, not a mapping"),
        ("just words\n", "is a str, not a mapping"),
        ("", "is empty"),
    ],
)
def test_file_that_is_not_a_mapping(tmp_path, text, what):
    path = write(tmp_path, text)
    assert problems_of(path=path) == [f"{path} {what}; write one `key: value` per line, such as `cutoff_len: 2048`"]


def test_file_with_bad_yaml(tmp_path):
    path = write(tmp_path, "cutoff_len: [1, 2\nseed: 3\n")
    assert problems_of(path=path) == [
        f"{path} is not valid YAML: expected ',' or ']', but got ':' at line 2, column 5; fix the syntax there"
    ]


def test_file_with_a_repeated_key(tmp_path):
    path = write(tmp_path, "cutoff_len: 1024\nseed: 1\ncutoff_len: 4096\n")
    assert problems_of(path=path) == [f"{path}: key 'cutoff_len' appears twice (lines 1 and 3); keep one"]


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    assert problems_of(path=path) == [f"cannot read config file {path}: No such file or directory; check the path"]


# --- LLaMA-Factory configs ----------------------------------------------------------------------------------


def test_llama_factory_example_loads(tmp_path):
    cfg = load_config(write(tmp_path, LLAMA_FACTORY_YAML))
    expected = {
        **DEFAULTS,
        "model_name_or_path": "Qwen/Qwen2-VL-7B-Instruct",
        "image_max_pixels": 262144,
        "trust_remote_code": True,
        "dataset": "mllm_demo,identity",
        "max_samples": 1000,
        "overwrite_cache": True,
        "preprocessing_num_workers": 16,
        "dataloader_num_workers": 4,
        "output_dir": "saves/qwen2_vl-7b/lora/sft",
        "prepared_dir": "saves/qwen2_vl-7b/lora/sft/prepared",
        "overwrite_output_dir": True,
        "plot_loss": True,
        "warmup_ratio": 0.1,
        "bf16": True,
        "ddp_timeout": 180000000,
        "val_size": 0.1,
        "eval_steps": 500,
        "video_max_pixels": 16384,
    }
    assert cfg.to_dict() == expected
    assert cfg.notes == (
        "ignored template='qwen2_vl': the chat template comes from the model's processor",
        "ignored save_only_model=False: vlmtune saves full checkpoints so that a run can resume",
        "ignored eval_strategy='steps': vlmtune evaluates every eval_steps steps, or at each epoch's end, when "
        "val_size > 0",
        "ddp_timeout=180000000 s lets a stuck rank hang the job for over a day instead of failing it; the default "
        "is 1800",
        "trust_remote_code=true runs Python code shipped with the checkpoint; Qwen-VL models need none with "
        "transformers >= 4.45, so remove it unless your checkpoint really ships custom code",
    )


def test_older_llama_factory_config_with_image_resolution(tmp_path):
    text = LLAMA_FACTORY_YAML.replace("template: qwen2_vl", "template: qwen3_vl")
    path = write(tmp_path, text.replace("image_max_pixels: 262144", "image_resolution: 512"))
    assert problems_of(path=path, base=None) == [
        f"image_resolution=512 (in {path}) is replaced by image_max_pixels; set image_max_pixels to "
        "image_resolution**2 = 262144 instead"
    ]
    cfg = load_config(write(tmp_path, text, "fixed.yaml"))
    assert "ignored template='qwen3_vl': the chat template comes from the model's processor" in cfg.notes


def test_design_doc_llama_factory_keys_are_all_known():
    lf_keys = """model_name_or_path dataset dataset_dir media_dir cutoff_len image_max_pixels image_min_pixels
    preprocessing_num_workers finetuning_type lora_rank lora_alpha lora_dropout lora_target freeze_vision_tower
    freeze_multi_modal_projector packing per_device_train_batch_size gradient_accumulation_steps learning_rate
    num_train_epochs max_steps bf16 fp16 output_dir logging_steps save_steps plot_loss report_to
    resume_from_checkpoint deepspeed val_size seed""".split()
    assert set(lf_keys) <= set(C.KEYS)


# --- declarations, docs, transformers ---------------------------------------------------------------------


def test_every_key_is_documented_with_a_fix():
    for section in C.SECTIONS.values():
        for f in dataclasses.fields(section):
            assert f.metadata["help"].endswith((".", ")")), f.name
            needs_expect = f.type not in ("bool",) and not f.metadata["choices"]
            assert bool(f.metadata["expect"]) == needs_expect, f.name


def test_sections_do_not_shadow_keys():
    assert not {*C.SECTIONS, "notes", "derived", "replace", "to_dict", "fingerprint_dict"} & set(C.KEYS)
    assert list(C.SECTIONS) == ["model", "read", "fit", "prepare", "finetuning", "training", "preference"]


def test_docs_config_md_is_up_to_date():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    doc = ROOT / "docs" / "config.md"
    assert doc.read_text(encoding="utf-8") == gen.render(), "docs/config.md is stale: run scripts/gen_config_docs.py"
    for key in C.KEYS:
        assert f"| `{key}` |" in gen.render()


def test_scheduler_and_optimizer_names_match_transformers():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    assert C.LR_SCHEDULERS == tuple(s.value for s in SchedulerType)
    assert C.OPTIMIZERS == tuple(o.value for o in OptimizerNames)


# --- any input gives a Config or a ConfigError, nothing else ------------------------------------------------

_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(), st.text(max_size=12)
)
_VALUES = st.one_of(
    _SCALARS, st.lists(_SCALARS, max_size=4), st.dictionaries(st.text(max_size=5), _SCALARS, max_size=2)
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(C.KEYS + ("stage", "template", "image_resolution", "cutof_len")), _VALUES))
def test_any_values_give_a_config_or_a_config_error(values):
    try:
        cfg = load_config(None, base={**REQUIRED, **values})
    except ConfigError as e:
        assert e.problems and all(isinstance(p, str) for p in e.problems)
    else:
        assert isinstance(cfg, Config)
        assert load_config(None, base=cfg.to_dict()) == cfg


# -- QLoRA and the LoRA variants (issue 15) --------------------------------------------------------------------


@pytest.mark.parametrize("key,value", [("quantization_bit", "4"), ("use_dora", "true"), ("use_rslora", "true"),
                                       ("pissa_init", "true"), ("loraplus_lr_ratio", "16")])
@pytest.mark.parametrize("kind", ["full", "freeze"])
def test_lora_only_keys_need_lora(key, value, kind):
    problems = problems_of([f"finetuning_type={kind}", f"{key}={value}"])
    assert len(problems) == 1
    assert problems[0].startswith(f"{key}=") and f"needs finetuning_type='lora', but finetuning_type='{kind}'" \
        in problems[0] and problems[0].endswith(f"set finetuning_type: lora or remove {key}")


def test_quantization_and_variants_load():
    cfg = load_config(None, base=dict(REQUIRED, quantization_bit=4, use_dora=True, use_rslora=True,
                                      loraplus_lr_ratio=16, double_quantization=False))
    assert (cfg.quantization_bit, cfg.quantization_type, cfg.double_quantization, cfg.quantize_vision_tower) == \
        (4, "nf4", False, False)
    assert (cfg.use_dora, cfg.use_rslora, cfg.pissa_init, cfg.pissa_iter, cfg.loraplus_lr_ratio) == \
        (True, True, False, 16, 16.0)


def test_pissa_refuses_quantization():
    problems = problems_of(["quantization_bit=4", "pissa_init=true"])
    assert len(problems) == 1 and problems[0].startswith("pissa_init=true with quantization_bit=4")


def test_quantization_type_is_4bit_only():
    problems = problems_of(["quantization_bit=8", "quantization_type=fp4"])
    assert len(problems) == 1 and problems[0].startswith("quantization_type='fp4' applies to 4-bit only")


# -- hostile YAML (issue 21): alias bombs refused fast, values bounded when echoed, merge keys work -------------
def _alias_bomb(levels: int) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for k in range(1, levels):
        lines.append(f"a{k}: &a{k} [{', '.join(f'*a{k - 1}' for _ in range(9))}]")
    lines.append(f"dataset: *a{levels - 1}")
    return "\n".join(lines) + "\nmodel_name_or_path: m\noutput_dir: out\n"


def test_an_alias_bomb_is_refused_before_it_is_built_with_a_short_message(tmp_path, capsys):
    from vlmtune.commands.cli import main

    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(9))  # 9**9 strings once expanded
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problems[0] == (f"{path} expands, through its aliases (*name), to more than 100,000 values; "
                                     "write the values out instead of nesting aliases")
    assert main(["doctor", str(path)]) == 2
    out = capsys.readouterr()
    assert "expands, through its aliases" in out.err and len(out.err) + len(out.out) < 1000


def test_an_alias_bomb_in_an_override_is_refused_too():
    bomb = "[" + ", ".join(["&a [x, x, x, x, x, x, x, x, x, x]"] + ["*a"] * 9200) + "]"
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"dataset={bomb}"], base=REQUIRED)
    assert "override 'dataset' expands, through its aliases" in err.value.problems[0]


def test_a_huge_value_is_echoed_bounded(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(f"cutoff_len: {'9x' * 20_000}\nlora_target: [{', '.join(['all'] * 5_000)}]\n"
                    f"{'k' * 1000}: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, base=REQUIRED)
    assert sorted(p.split("=")[0].split(" ")[0] for p in err.value.problems) == ["cutoff_len", "lora_target", "unknown"]
    assert all(len(p) < 600 for p in err.value.problems), [len(p) for p in err.value.problems]
    assert len(str(err.value)) < 2000


def test_merge_keys_work_and_the_mappings_own_keys_win(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("<<: &base {cutoff_len: 512, lora_rank: 4, output_dir: saves/a}\n"
                    "model_name_or_path: m\ndataset: d\ncutoff_len: 1024\n")
    cfg = load_config(path)
    assert (cfg.cutoff_len, cfg.lora_rank, cfg.output_dir) == (1024, 4, "saves/a")


def test_a_config_that_is_not_a_regular_file_is_not_opened(tmp_path):
    fifo = tmp_path / "cfg.yaml"
    os.mkfifo(fifo)  # opening it would block forever
    with pytest.raises(ConfigError) as err:
        load_config(fifo)
    assert err.value.problems[0] == f"cannot read config file {fifo}: it is not a regular file; check the path"


def test_moe_keys():
    cfg = load_config(None, ["freeze_router=false", "moe_aux_loss_coef=0.001"], base=REQUIRED)
    assert (cfg.freeze_router, cfg.moe_aux_loss_coef) == (False, 0.001)
    assert cfg.finetuning.moe_aux_loss_coef == 0.001
    with pytest.raises(ConfigError) as e:
        load_config(None, ["moe_aux_loss_coef=-1"], base=REQUIRED)
    assert e.value.problems[0].startswith("moe_aux_loss_coef=-1")
    with pytest.raises(ConfigError) as e:
        load_config(None, ["moe_aux_loss_coef=0.01", "stage=dpo"], base=REQUIRED)
    assert e.value.problems[0].startswith("moe_aux_loss_coef=0.01 is not added to the stage 'dpo' loss")


def test_a_huge_value_of_a_llamafactory_key_is_noted_bounded(tmp_path):
    path = tmp_path / "lf.yaml"
    path.write_text(f"model_name_or_path: m\ndataset: d\noutput_dir: o\nrun_name: {'r' * 50_000}\n")
    cfg = load_config(path)
    assert cfg.notes and all(len(n) < 600 for n in cfg.notes)
