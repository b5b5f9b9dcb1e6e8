"""Sharded training (train/sharding.py, VlmTrainer's per-modality vision passes).

Fast tests check the translation of the keys, the wrap classes of every family and the dummy passes in one
process; the torchrun tests (slow) run 2 gloo CPU ranks: FSDP2 against DDP, ranks that hold different
modalities, and resuming a sharded checkpoint.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from vlmtune.config import load_config
from vlmtune.errors import ConfigError
from vlmtune.models.families import FAMILIES
from vlmtune.train import sharding
from vlmtune.train.trainer import VlmTrainer, _find_language_model, _find_visual

from _ranks import torchrun, write_mixed  # tests/train is on sys.path (pytest's rootdir-less import)

_BASE = {"model_name_or_path": "m", "dataset": "d", "output_dir": "o"}


def _cfg(**keys):
    return load_config(None, base={**_BASE, **keys})


# -- the keys -------------------------------------------------------------------------------------------------
def test_fsdp_key_becomes_fsdp2_with_the_family_wrap_classes():
    args = sharding.fsdp_arguments(_cfg(fsdp="full_shard auto_wrap"), "qwen2_5_vl")
    assert args == {"fsdp": True, "fsdp_config": {
        "version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
        "transformer_layer_cls_to_wrap": ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"],
        "state_dict_type": "FULL_STATE_DICT"}}
    zero2 = sharding.fsdp_arguments(_cfg(fsdp="shard_grad_op auto_wrap offload"), "qwen3_vl")["fsdp_config"]
    assert zero2["reshard_after_forward"] is False and zero2["cpu_offload"] is True
    assert zero2["transformer_layer_cls_to_wrap"] == ["Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock"]
    # fsdp_config wins, with or without the fsdp_ prefix; FSDP1 keys are noted, not passed
    cfg = _cfg(fsdp=True, fsdp_config={"fsdp_transformer_layer_cls_to_wrap": ["Qwen2VLDecoderLayer"],
                                       "fsdp_state_dict_type": "SHARDED_STATE_DICT", "use_orig_params": True})
    conf = sharding.fsdp_arguments(cfg, "qwen2_vl")["fsdp_config"]
    assert conf["transformer_layer_cls_to_wrap"] == ["Qwen2VLDecoderLayer"]
    assert conf["state_dict_type"] == "SHARDED_STATE_DICT" and "use_orig_params" not in conf
    assert any("use_orig_params" in n and "FSDP1" in n for n in cfg.notes)
    assert sharding.fsdp_arguments(_cfg(), "qwen2_vl") == {}


@pytest.mark.parametrize("keys, words", [
    ({"fsdp": "hybrid_shard"}, ["fsdp='hybrid_shard'", "FSDP1"]),
    ({"fsdp": "full_shard shard_grad_op"}, ["both full_shard and shard_grad_op"]),
    ({"fsdp": True, "deepspeed": "ds.json"}, ["fsdp=", "deepspeed='ds.json'", "both set"]),
    ({"fsdp_config": {"version": 2}}, ["fsdp_config is set but fsdp is not"]),
    ({"fsdp": True, "fsdp_config": {"fsdp_versoin": 2}}, ["'versoin'", "did you mean 'version'"]),
    ({"fsdp": True, "fsdp_config": {"version": 1}}, ["version=1", "FSDP2 only"]),
    ({"fsdp": True, "fsdp_config": {"activation_checkpointing": True}}, ["gradient_checkpointing: false"]),
])
def test_bad_sharding_keys_are_named(keys, words):
    with pytest.raises(ConfigError) as e:
        _cfg(**keys)
    assert len(e.value.problems) == 1 and all(w in e.value.problems[0] for w in words), e.value.problems


def test_fsdp_config_from_a_json_file(tmp_path):
    path = tmp_path / "fsdp.json"
    path.write_text(json.dumps({"fsdp_version": 2, "fsdp_reshard_after_forward": False}))
    cfg = _cfg(fsdp="full_shard auto_wrap", fsdp_config=str(path))
    assert cfg.fsdp_config == {"fsdp_version": 2, "fsdp_reshard_after_forward": False}
    assert sharding.fsdp_arguments(cfg, "qwen2_vl")["fsdp_config"]["reshard_after_forward"] is False


def test_accelerate_launch_env_gets_the_family_wrap_classes():
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    filled = sharding.fill_accelerate_env("qwen2_vl", env)
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "Qwen2VLDecoderLayer,Qwen2VLVisionBlock" and len(filled) == 2
    mine = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "Qwen2VLDecoderLayer"}
    assert sharding.fill_accelerate_env("qwen2_vl", mine) == [] and mine["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "Qwen2VLDecoderLayer"
    assert sharding.fill_accelerate_env("qwen2_vl", {}) == []
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        sharding.fill_accelerate_env("qwen2_vl", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})


def test_fsdp_on_one_process_is_refused_before_any_work(tmp_path, monkeypatch, base_cfg, write_dataset):
    """Refused with the folders' checks, before prepare and the model load (the Trainer would refuse it after
    both, and leave ACCELERATE_USE_FSDP set in the environment for the next run in the process)."""
    import os

    from vlmtune.train.recipe import run

    cfg = load_config(None, base=base_cfg("qwen2_vl", write_dataset(["one"]), tmp_path / "out",
                                          fsdp="full_shard auto_wrap", finetuning_type="full"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    with pytest.raises(ConfigError) as e:
        run(cfg, progress=False)
    assert e.value.problems == [sharding.one_process_fsdp(cfg)]
    assert e.value.problems[0].startswith("fsdp: 'full_shard auto_wrap' shards the model across processes")
    assert not (tmp_path / "out").exists() and "ACCELERATE_USE_FSDP" not in os.environ
    assert sharding.one_process_fsdp(cfg, {"WORLD_SIZE": "2"}) is None
    assert sharding.one_process_fsdp(_cfg(), {}) is None


def test_zero_stage_and_sharding_of(tmp_path):
    z3 = tmp_path / "z3.json"
    z3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert sharding.zero_stage(str(z3)) == 3 and sharding.zero_stage(None) == 0
    assert sharding.zero_stage({"zero_optimization": {"stage": 2}}) == 2
    assert sharding.sharding_of(_cfg(deepspeed=str(z3))) == "deepspeed"
    assert sharding.sharding_of(_cfg(fsdp=True)) == "fsdp" and sharding.sharding_of(_cfg()) is None


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_family_has_wrap_classes_that_its_model_code_defines(model_type):
    """A new family without wrap classes (or with a misspelt one) fails here, not on an 8-GPU node."""
    import transformers

    family = FAMILIES[model_type]
    assert len(family.wrap_classes) == 2, f"{model_type}: add (decoder layer, vision block) to families.py"
    module = importlib.import_module(getattr(transformers, family.model_class).__module__)
    for name in family.wrap_classes:
        assert isinstance(getattr(module, name, None), type), f"{name} is not defined in {module.__name__}"


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])
def test_wrap_classes_are_modules_of_the_loaded_tiny_model(tiny_ckpt, arch):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_ckpt(arch))
    present = {type(m).__name__ for m in model.modules()}
    assert set(FAMILIES[arch].wrap_classes) <= present


def test_dataset_modalities():
    from datasets import Dataset

    rows = {"image_grid_thw": [[], [[1, 4, 4]]], "video_grid_thw": [[], []]}
    assert sharding.dataset_modalities(Dataset.from_dict(rows)) == ("image",)
    rows["video_grid_thw"] = [[[2, 4, 4]], []]
    assert sharding.dataset_modalities(Dataset.from_dict(rows)) == ("image", "video")
    text = {"image_grid_thw": [[], []], "video_grid_thw": [[], []]}
    assert sharding.dataset_modalities(Dataset.from_dict(text)) == ()
    assert sharding.dataset_modalities(iter([])) == ("image", "video")  # a stream: both, unread


# -- the dummy passes, in one process ---------------------------------------------------------------------------
def _trainer(model, spec, sharded, modalities, world_size=2):
    """A VlmTrainer with only what compute_loss and the hook read (no accelerator, no data)."""
    t = object.__new__(VlmTrainer)
    t.model, t.spec, t.sharded, t.modalities = model, spec, sharded, modalities
    t.args = SimpleNamespace(world_size=world_size, device=torch.device("cpu"), average_tokens_across_devices=False,
                             past_index=-1)
    t.accelerator, t.label_smoother, t.compute_loss_func, t.model_accepts_loss_kwargs = None, None, None, False
    t._dummy_vision, t._pending, t._zero_terms, t.moe_aux_loss_coef = True, (), [], None
    t._visual = _find_visual(model)
    _find_language_model(model).register_forward_pre_hook(t._before_language_model)
    return t


def _text_batch(processor):
    ids = processor.tokenizer("hello there, a text-only sample", return_tensors="pt")["input_ids"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.mark.parametrize("sharded, modalities, want", [
    ("fsdp", ("image", "video"), ["visual", "visual", "language_model"]),
    ("deepspeed", ("image",), ["visual", "language_model"]),
    (None, ("image", "video"), ["visual", "language_model"]),  # DDP: one pass gives the tower its gradients
])
def test_text_batch_runs_the_tower_per_modality_before_the_language_model_with_zero_weight(
        tiny_ckpt, tiny_processor, sharded, modalities, want):
    from transformers import AutoModelForImageTextToText

    from vlmtune.models.spec import ModelSpec

    processor = tiny_processor("qwen2_vl")
    model = AutoModelForImageTextToText.from_pretrained(tiny_ckpt("qwen2_vl"))
    spec = ModelSpec.from_processor(processor, model.config)
    t = _trainer(model, spec, sharded, modalities)
    calls = []
    t._visual.register_forward_pre_hook(lambda m, a: calls.append("visual"))
    _find_language_model(model).register_forward_pre_hook(lambda m, a: calls.append("language_model"))
    batch = _text_batch(processor)
    plain = model(**batch).loss.detach()
    calls.clear()
    loss = t.compute_loss(model, batch)
    assert calls == want
    assert loss.item() == plain.item()  # exactly: the dummy terms are 0.0 × a finite sum
    loss.backward()
    tower = [p.grad for p in t._visual.parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in tower)  # in the graph, with zero gradient
    # a batch with images owes no image pass; one process owes nothing
    assert t._missing({"pixel_values": 1}) == (("video",) if sharded == "fsdp" else ())
    assert _trainer(model, spec, sharded, modalities, world_size=1)._missing(batch) == ()


def test_a_missed_dummy_pass_is_an_error_not_a_hang(tiny_ckpt, tiny_processor):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_ckpt("qwen2_vl"))
    t = _trainer(model, SimpleNamespace(merge_size=2, patch_size=14, temporal_patch_size=2), "fsdp", ("image",))
    t._before_language_model = lambda *a: None  # as if the hook sat on a module the forward never calls
    t.model = torch.nn.Module()
    with pytest.raises(RuntimeError, match="dummy vision pass for image did not run"):
        VlmTrainer.compute_loss(t, _LossOnly(), _text_batch(tiny_processor("qwen2_vl")))


class _LossOnly(torch.nn.Module):
    def forward(self, **batch):
        return {"loss": torch.zeros(())}


# -- 2 gloo CPU ranks under torchrun ------------------------------------------------------------------------------
def _keys(tiny_ckpt, data, out, **extra):
    keys = {"model_name_or_path": str(tiny_ckpt("qwen2_vl")), "dataset": data, "output_dir": str(out),
            "cutoff_len": 200, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "max_steps": 4,
            "logging_steps": 1, "save_steps": 1000, "group_by_length": False, "report_to": "none", "seed": 0,
            "ddp_timeout": 120, "run_doctor": False, "learning_rate": 1e-3, "lr_scheduler_type": "constant",
            "worst_case_first": False}  # skipped under sharding anyway; under DDP it would add a batch to `seen`
    keys.update(extra)
    return keys


def _run(tmp_path, keys, name, timeout=420):
    r = torchrun(tmp_path, keys, name=name, timeout=timeout, env={"VLMTUNE_TEST_SEQUENTIAL": "1"})
    assert r["rc"] is not None, f"{name}: timed out after {timeout} s (a hang):\n{r['log'][-4000:]}"
    assert r["rc"] == 0 and sorted(r["results"]) == [0, 1], r["log"][-6000:]
    return r["results"]


@pytest.mark.slow
@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_fsdp2_first_loss_equals_ddp_with_ranks_of_different_modalities(tmp_path, tiny_ckpt, make_image,
                                                                       finetuning_type):
    # rank 0: text, image; rank 1: image + video, video (sequential sampler: micro-batch k goes to rank k % 2)
    data = write_mixed(tmp_path / "data", ["t", "iv", "i", "v"], make_image)
    keys = _keys(tiny_ckpt, data, tmp_path / "ddp", finetuning_type=finetuning_type)
    ddp = _run(tmp_path, keys, "ddp")
    fsdp = _run(tmp_path, {**keys, "output_dir": str(tmp_path / "fsdp"), "fsdp": "full_shard auto_wrap"}, "fsdp")
    assert (ddp[0]["engine"], fsdp[0]["engine"], fsdp[1]["engine"]) == ("ddp", "fsdp", "fsdp")
    assert ddp[0]["seen"] == fsdp[0]["seen"] == ["t", "i", "t", "i"]
    assert ddp[1]["seen"] == fsdp[1]["seen"] == ["iv", "v", "iv", "v"]
    assert fsdp[0]["step"] == fsdp[1]["step"] == 4 and len(fsdp[0]["losses"]) == 4
    assert math.isclose(fsdp[0]["losses"][0], ddp[0]["losses"][0], rel_tol=1e-3)
    assert all(math.isclose(a, b, rel_tol=1e-3) for a, b in zip(fsdp[0]["losses"], ddp[0]["losses"]))
    if finetuning_type == "full":  # the sharded full fine-tune is saved whole: it loads like any checkpoint
        from safetensors.torch import load_file

        a, b = load_file(tmp_path / "fsdp" / "model.safetensors"), load_file(tmp_path / "ddp" / "model.safetensors")
        assert sorted(a) == sorted(b)
        # float-level differences only (the reduction orders differ): measured at most 2.4e-6 after 4 AdamW steps
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("other", ["i", "v"])
def test_fsdp2_text_only_rank_and_image_or_video_only_rank_finish(tmp_path, tiny_ckpt, make_image, other):
    data = write_mixed(tmp_path / "data", ["t", other] * 3, make_image)
    res = _run(tmp_path, _keys(tiny_ckpt, data, tmp_path / "out", max_steps=3, fsdp="full_shard auto_wrap"),
               "fsdp", timeout=300)
    assert res[0]["seen"] == ["t"] * 3 and res[1]["seen"] == [other] * 3
    assert res[0]["step"] == res[1]["step"] == 3


@pytest.mark.slow
def test_a_corrupt_row_on_one_rank_stops_the_fsdp2_run_naming_the_sample(tmp_path, tiny_ckpt, make_image):
    """The guard still names the sample under sharding, and the other rank does not wait for it until
    ddp_timeout: the failing rank exits and torchrun stops the other."""
    data = write_mixed(tmp_path / "data", ["t", "i", "t", "i"], make_image)
    keys = _keys(tiny_ckpt, data, tmp_path / "out", fsdp="full_shard auto_wrap", ddp_timeout=600)
    r = torchrun(tmp_path, keys, name="bad", timeout=300,
                 env={"VLMTUNE_TEST_SEQUENTIAL": "1", "VLMTUNE_TEST_CUT_RUN": "data:4"})
    assert r["rc"] not in (0, None), r["log"][-3000:]  # failed, and well before ddp_timeout (600 s)
    assert "data:4" in r["log"] and "data.jsonl" in r["log"] and r["results"] == {}


@pytest.mark.slow
@pytest.mark.parametrize("state_dict_type", ["SHARDED_STATE_DICT"])
def test_sharded_checkpoint_resumes_with_the_uninterrupted_losses(tmp_path, tiny_ckpt, make_image, state_dict_type):
    from safetensors.torch import load_file

    data = write_mixed(tmp_path / "data", ["t", "iv", "i", "v"], make_image)
    keys = _keys(tiny_ckpt, data, tmp_path / "whole", finetuning_type="full", save_steps=2,
                 fsdp="full_shard auto_wrap", fsdp_config={"state_dict_type": state_dict_type})
    whole = _run(tmp_path, keys, "whole")
    part = {**keys, "output_dir": str(tmp_path / "part")}
    _run(tmp_path, {**part, "max_steps": 2}, "first-half")
    resumed = _run(tmp_path, {**part, "resume_from_checkpoint": True}, "resumed")
    assert resumed[0]["seen"] == ["t", "i"]  # only steps 3 and 4 ran
    assert resumed[0]["losses"][2:] == whole[0]["losses"][2:]  # the new steps' losses, bit for bit
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_cpu_ranks_matches_ddp_with_mixed_modalities(tmp_path, tiny_ckpt, make_image, stage):
    """DeepSpeed's CPU accelerator over gloo (its first use compiles a small op, minutes; cached afterwards)."""
    pytest.importorskip("deepspeed")
    data = write_mixed(tmp_path / "data", ["t", "iv", "i", "v"], make_image)
    # LLaMA-Factory's ddp_timeout: accepted by gloo and DeepSpeed alike (the doctor only warns about it)
    keys = _keys(tiny_ckpt, data, tmp_path / "ddp", finetuning_type="full", max_steps=2, ddp_timeout=180000000)
    ddp = _run(tmp_path, keys, "ddp")
    ds = tmp_path / f"z{stage}.json"
    ds.write_text(json.dumps({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                              "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": stage}}))
    zero = _run(tmp_path, {**keys, "output_dir": str(tmp_path / "zero"), "deepspeed": str(ds)}, "zero", timeout=900)
    assert zero[0]["engine"] == zero[1]["engine"] == "deepspeed"
    assert zero[0]["seen"] == ["t", "i"] and zero[1]["seen"] == ["iv", "v"] and zero[0]["step"] == 2
    assert math.isclose(zero[0]["losses"][0], ddp[0]["losses"][0], rel_tol=1e-3)


@pytest.mark.slow
def test_accelerate_launch_with_an_fsdp2_config(tmp_path, tiny_ckpt, make_image):
    """`accelerate launch --config_file` (examples/accelerate/fsdp2.yaml, on 2 CPU processes): FSDP2 with the
    family's wrap classes filled in, the same losses as DDP."""
    import sys

    import yaml

    from _ranks import free_port

    conf = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "accelerate",
                                            "fsdp2.yaml"), encoding="utf-8"))
    conf.update(num_processes=2, use_cpu=True, mixed_precision="no")
    (tmp_path / "acc.yaml").write_text(yaml.safe_dump(conf))
    data = write_mixed(tmp_path / "data", ["t", "iv", "i", "v"], make_image)
    keys = _keys(tiny_ckpt, data, tmp_path / "ddp", finetuning_type="full", max_steps=2)
    ddp = _run(tmp_path, keys, "ddp")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "acc.yaml"),
                "--main_process_port", str(free_port())]
    r = torchrun(tmp_path, {**keys, "output_dir": str(tmp_path / "acc")}, name="acc", timeout=420,
                 env={"VLMTUNE_TEST_SEQUENTIAL": "1"}, launcher=launcher)
    assert r["rc"] == 0 and sorted(r["results"]) == [0, 1], r["log"][-5000:]
    assert "fsdp_transformer_layer_cls_to_wrap=Qwen2VLDecoderLayer,Qwen2VLVisionBlock" in r["log"]
    assert r["results"][0]["engine"] == "fsdp" and r["results"][1]["seen"] == ["iv", "v"]
    assert r["results"][0]["losses"] == pytest.approx(ddp[0]["losses"], rel=1e-3)
