"""Every shipped YAML is itself a test case: it must load against the config schema, point at files that
exist, and (slow) train one step with a tiny checkpoint of its model family on the shipped demo data."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest

from vlmtune.config import ReadArgs, load_config
from vlmtune.data.sources.readers import read_samples
from vlmtune.models.families import FAMILIES as FAMILY_TABLE
from vlmtune.models.families import MODEL_TYPES, display_name

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
DEEPSPEED = sorted((ROOT / "examples" / "deepspeed").glob("*.json"))
DATA = ROOT / "examples" / "data"

# File-name prefix -> tiny-model arch; longest prefix first (qwen2_5vl before qwen2vl would not clash,
# but the order keeps the lookup obviously unambiguous).
FAMILIES = (("qwen2_5vl_", "qwen2_5_vl"), ("qwen2vl_", "qwen2_vl"), ("qwen3vl_", "qwen3_vl"),
            ("qwen3vlmoe_", "qwen3_vl_moe"), ("qwen3_5_", "qwen3_5"), ("qwen3_5moe_", "qwen3_5_moe"))
# The DeepSpeed keys the transformers Trainer fills in from TrainingArguments; a number here would
# silently disagree with the YAML's batch size, accumulation, clipping or precision.
DS_AUTO_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "fp16.enabled", "bf16.enabled")


def family_of(path: Path) -> str:
    for prefix, arch in FAMILIES:
        if path.name.startswith(prefix):
            return arch
    raise AssertionError(f"{path.name} does not start with one of {[p for p, _ in FAMILIES]}")


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def test_every_family_has_an_example():
    assert {family_of(p) for p in EXAMPLES} == set(MODEL_TYPES)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_loads(path):
    cfg = load_config(str(path))
    assert cfg.model_name_or_path and cfg.output_dir and cfg.dataset
    assert cfg.notes == ()  # a shipped example uses no ignored LLaMA-Factory key


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_names_its_family(path):
    cfg = load_config(str(path))
    # a hub id spells the family as people write it: Qwen/Qwen2.5-VL-7B-Instruct; a MoE checkpoint by its
    # dense family's name and its active parameters: Qwen/Qwen3.5-35B-A3B
    family = family_of(path)
    assert f"/{display_name(family).removesuffix('-MoE')}-" in cfg.model_name_or_path
    assert bool(re.search(r"-\d+B-A\d+B", cfg.model_name_or_path)) == FAMILY_TABLE[family].moe


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_dataset_is_shipped(path):
    """Run from the repository root, every example reads its data without edits: every record, every image."""
    cfg = load_config(str(path))
    dataset_dir = ROOT / cfg.dataset_dir
    info = json.loads((dataset_dir / "dataset_info.json").read_text(encoding="utf-8"))
    records = sum(len(json.loads((dataset_dir / info[n]["file_name"]).read_text(encoding="utf-8")))
                  for n in cfg.dataset.split(","))
    read = read_samples(replace(cfg.read, dataset_dir=str(dataset_dir)), preference=cfg.stage != "sft")
    assert read.problems == []
    assert len(read.conversations) == records > 0
    media = [m for c in read.conversations for m in c.images + c.videos]
    assert media and all(Path(m.path).is_file() for m in media)


def test_deepspeed_configs_exist():
    assert [p.name for p in DEEPSPEED] == ["ds_z2.json", "ds_z3.json"]


@pytest.mark.parametrize("path", DEEPSPEED, ids=[p.name for p in DEEPSPEED])
def test_deepspeed_config_parses(path):
    ds = json.loads(path.read_text(encoding="utf-8"))
    assert ds["zero_optimization"]["stage"] == int(path.stem.removeprefix("ds_z"))
    for key in DS_AUTO_KEYS:
        assert _get(ds, key) == "auto", key
    # No optimizer/scheduler sections: the Trainer builds them from optim, learning_rate, lr_scheduler_type.
    assert "optimizer" not in ds and "scheduler" not in ds


@pytest.mark.parametrize("path", DEEPSPEED, ids=[p.name for p in DEEPSPEED])
def test_deepspeed_config_is_used(path):
    users = [e.name for e in EXAMPLES if load_config(str(e)).deepspeed == f"examples/deepspeed/{path.name}"]
    assert users, f"no example uses {path.name}"


@pytest.mark.parametrize("path", [e for e in EXAMPLES if load_config(str(e)).deepspeed],
                         ids=[e.name for e in EXAMPLES if load_config(str(e)).deepspeed])
def test_deepspeed_reference(path):
    """Paths are relative to the repository root (where the commands in the comments run); the stage
    in the example's name is the stage of the JSON it names."""
    cfg = load_config(str(path))
    ds_path = ROOT / cfg.deepspeed
    assert ds_path.is_file(), cfg.deepspeed
    stage = json.loads(ds_path.read_text(encoding="utf-8"))["zero_optimization"]["stage"]
    assert f"_ds_z{stage}" in path.stem


def test_demo_data_inspects(tiny_ckpt):
    """`vlmtune inspect --data examples/data/mllm_demo.json` (and by name through dataset_info.json)."""
    from vlmtune.data.drivers.tally import account, summarize
    from vlmtune.models.load import load_spec

    loaded = load_spec(str(tiny_ckpt("qwen2_vl")))
    by_path = summarize(account(str(DATA / "mllm_demo.json"), loaded, progress=False))
    by_name = summarize(account(ReadArgs(dataset="mllm_demo", dataset_dir=str(DATA)), loaded, progress=False))
    assert by_path["records"] == by_path["samples"] == 6 and by_path["problems"] == []
    assert by_name == by_path
    assert set(by_path["by_image_count"]) == {"0", "1", "2", "3"}
    images = sorted((DATA / "mllm_demo_data").iterdir())
    assert images and all(p.stat().st_size < 16_000 for p in images)  # tiny files in the repository


def test_video_demo_data_inspects(tiny_ckpt):
    """`vlmtune inspect --data mllm_video_demo --dataset-dir examples/data`: three clips, one with an image."""
    from vlmtune.data.drivers.tally import account, summarize
    from vlmtune.models.load import load_spec

    loaded = load_spec(str(tiny_ckpt("qwen2_vl")))
    s = summarize(account(ReadArgs(dataset="mllm_video_demo", dataset_dir=str(DATA)), loaded, progress=False))
    assert (s["records"], s["samples"], s["videos"], s["images"], s["problems"]) == (3, 3, 3, 1, [])
    clips = sorted((DATA / "mllm_video_demo_data").iterdir())
    assert [p.name for p in clips] == ["1.mp4", "2.mp4", "3.mp4"] and all(p.stat().st_size < 16_000 for p in clips)


def test_dpo_demo_data_inspects_as_pairs(tiny_ckpt):
    """`vlmtune inspect --data dpo_demo --dataset-dir examples/data --stage dpo` (docs/preference.md): four
    ranking pairs, one with two pictures; each pair's length is its longer side."""
    from vlmtune.config import PreferenceArgs
    from vlmtune.data.drivers.tally import account, summarize
    from vlmtune.models.load import load_spec

    loaded = load_spec(str(tiny_ckpt("qwen2_vl")))
    acc = account(ReadArgs(dataset="dpo_demo", dataset_dir=str(DATA)), loaded, progress=False,
                  preference=PreferenceArgs(stage="dpo"))
    s = summarize(acc)
    assert (s["stage"], s["records"], s["pairs"], s["images"], s["problems"]) == ("dpo", 4, 4, 5, [])
    assert set(s["by_image_count"]) == {"1", "2"}
    assert [st.tokens for st in acc.stats] == [max(st.chosen_tokens, st.rejected_tokens) for st in acc.stats]


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_trains_one_step(path, tiny_ckpt, tmp_path):
    """The example as shipped, with a tiny checkpoint of its family on the CPU: one optimizer step."""
    from vlmtune.train.recipe import run

    cfg = load_config(str(path)).replace(
        model_name_or_path=str(tiny_ckpt(family_of(path))),
        dataset_dir=str(DATA),
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        bf16=False,
        fp16=False,
        deepspeed=None,  # not installed in the test environment
        fsdp=None,  # one process here, which vlmtune refuses to shard; FSDP2 itself runs on 2 ranks in test_sharding
        fsdp_config=None,
    )
    result = run(cfg, progress=False)
    assert result.global_step == 1
    records = {"mllm_demo": 6, "mllm_video_demo": 3, "dpo_demo": 4}[cfg.dataset]
    assert result.prepared.records == records  # one fit-report line per record of the shipped dataset
    losses = [h["loss"] for h in result.log_history if "loss" in h] or [result.log_history[-1]["train_loss"]]
    assert all(math.isfinite(x) for x in losses)
    saved = {p.name for p in Path(result.output_dir).iterdir()}
    weights = "adapter_model.safetensors" if cfg.finetuning_type == "lora" else "model.safetensors"
    assert weights in saved
    trained = {c for c, d in result.trainable.items() if d["trainable"]}
    expected = {c for c, frozen in (("language_model", cfg.freeze_language_model),
                                    ("vision_tower", cfg.freeze_vision_tower),
                                    ("projector", cfg.freeze_multi_modal_projector)) if not frozen}
    assert trained == expected
