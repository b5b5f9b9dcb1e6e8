"""`vlmtune doctor`: each check, on a config made to trip it, says exactly what is wrong and the fix.

The hardware is made up (`DeviceInfo`), so every check runs on this CPU machine; the model is the tiny
qwen2_vl checkpoint (and, for memory at a real scale, a Qwen2-VL-2B-sized model built on the meta device).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from vlmtune.commands import doctor
from vlmtune.commands.doctor import environment as doctor_environment
from vlmtune.commands.doctor import memory as doctor_memory
from vlmtune.config import load_config
from vlmtune.commands.doctor import GiB, Check, DeviceInfo, DoctorError, run_checks, suggest_batch

A100 = DeviceInfo("cuda", "NVIDIA A100 80GB", 80 * GiB, True, (8, 0), 16, 200 * GiB)
A100_40 = DeviceInfo("cuda", "NVIDIA A100-SXM4-40GB", 40 * GiB, True, (8, 0), 16, 200 * GiB)
T4 = DeviceInfo("cuda", "Tesla T4", 15 * GiB, False, (7, 5), 8, 50 * GiB)
CPU = DeviceInfo("cpu", "Test CPU", 64 * GiB, False, None, 4, 32 * GiB, cpu_flops=10e9)
SLOW_BF16_CPU = dataclasses.replace(CPU, bf16_slowdown=23.1)  # the factor issue 16 measured per decoder layer
FAST_BF16_CPU = dataclasses.replace(CPU, bf16=True, bf16_slowdown=0.6)
AVX512_CPU = dataclasses.replace(CPU, bf16_slowdown=0.6, bf16_flags=frozenset({"avx512_bf16"}))  # fast this time
DECODER = "PyAV 18.1.0 (FFmpeg 8.1.2)"
TESTED = {"torch": "2.14.1", "transformers": "5.24.0", "peft": "0.21.2", "accelerate": "1.15.0"}
VERSIONS_OK = (
    "torch 2.14.1; transformers 5.24.0; peft 0.21.2; accelerate 1.15.0; video decoder PyAV 18.1.0 (FFmpeg 8.1.2); "
    "Qwen2-VL needs transformers >= 4.45; "
    "transformers 5 needs mm_token_type_ids with every image batch and vlmtune's collator provides it "
    "(tested with torch 2.14, transformers 5.24, peft 0.21, accelerate 1.15)"
)
DATA_TAIL = ("recommended cutoff_len: 546 keeps 95% whole, 546 99%, 546 all (0 image(s): p99 29, max 29; "
             "1 image(s): p99 108, max 108; 2 image(s): p99 546, max 546)")


@pytest.fixture(autouse=True)
def tested_versions(monkeypatch):
    """The versions this release was tested with, whatever is installed, so the tests are hermetic."""
    monkeypatch.setattr(doctor_environment, "_version", lambda lib: TESTED.get(lib))
    monkeypatch.setattr(doctor_environment, "decoder_version", lambda: DECODER)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three samples: one image (108 tokens), two 448x448 images (546 tokens), text only (29 tokens)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("doctor-data")
    for k, (w, h) in enumerate([(300, 200), (448, 448)]):
        Image.new("RGB", (w, h), (60 * k, 100, 200)).save(root / f"im{k}.png")
    records = [
        {"id": "one", "messages": [{"role": "user", "content": "<image>What colour?"},
                                   {"role": "assistant", "content": "red"}], "images": ["im0.png"]},
        {"id": "two", "messages": [{"role": "user", "content": "<image><image>describe"},
                                   {"role": "assistant", "content": "two"}], "images": ["im1.png", "im1.png"]},
        {"id": "text", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    path = root / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return str(tiny_ckpt("qwen2_vl"))


@pytest.fixture(scope="module")
def loaded(ckpt):
    from vlmtune.models.load import load_spec

    return load_spec(ckpt)


@pytest.fixture
def config(ckpt, data, tmp_path):
    def make(*overrides: str):
        return load_config(None, [f"model_name_or_path={ckpt}", f"dataset={data}", f"output_dir={tmp_path / 'out'}",
                                  "cutoff_len=600", *overrides])

    return make


@pytest.fixture
def check(config, loaded):
    """`check(name, device, *overrides, env={}, **kwargs) -> Check`: one check of run_checks."""

    def run(name: str, device: DeviceInfo, *overrides: str, env: dict | None = None, **kwargs) -> Check:
        checks = run_checks(config(*overrides), device_info=device, loaded=loaded, env=env or {}, **kwargs)
        assert [c.name for c in checks] == ["versions", "precision", "workers", "model", "quantization",
                                            "linear_attention", "vision", "data", "video", "memory", "distributed", "sharding"]
        return {c.name: c for c in checks}[name]

    return run


# -- a good config -----------------------------------------------------------------------------
def test_a_good_config_is_all_ok(config, loaded):
    cfg = config("bf16=true", "preprocessing_num_workers=4", "dataloader_num_workers=4")
    checks = run_checks(cfg, device_info=A100, loaded=loaded, env={})
    assert [(c.name, c.status, c.fix) for c in checks if c.status != "ok"] == []
    by = {c.name: c for c in checks}
    assert by["versions"].message == VERSIONS_OK
    assert by["vision"].message == ("LoRA adapters on the language_model (14 linear layers); frozen: vision_tower, "
                                    "projector; 16,384 of 276,864 parameters train")
    assert by["data"].message == ("cutoff_len=600: 0 of 3 valid samples are longer; overflow=[shrink_images, "
                                  "truncate_text, split, drop] would keep 3; " + DATA_TAIL)
    assert by["video"].message == "no videos in the data"
    assert by["distributed"].message == ("one process (no WORLD_SIZE > 1, LOCAL_RANK or deepspeed): nothing to "
                                         "synchronise")
    text = doctor.format_checks(checks)
    assert text.splitlines()[0] == "status  check        message"
    assert text.splitlines()[-1] == "0 failed, 0 warning(s), 12 ok"


# -- precision ---------------------------------------------------------------------------------
MEASURED = ("bf16 autocast measured {f}x the float32 time of a decoder-like block on Test CPU (advice only: the "
            "choice follows the CPU's instructions); no GPU found")


@pytest.mark.parametrize("device, keys, status, message, fix", [
    (T4, ["bf16=true"], "fail",
     "bf16=true but Tesla T4 (compute capability 7.5) has no bfloat16 support (it needs 8.0 or newer: Ampere, Ada, "
     "Hopper)", "set bf16: false and fp16: true"),
    (CPU, ["fp16=true"], "fail", "fp16=true but there is no GPU (Test CPU): float16 mixed precision needs CUDA",
     "set fp16: false (float32), or bf16: true on a CPU with bfloat16"),
    (SLOW_BF16_CPU, ["bf16=true"], "warn",
     "bf16=true but the CPU has no bf16 instructions (AVX512-BF16 or AMX-BF16), so `vlmtune train` will train in "
     f"float32 instead: {MEASURED.format(f=23.1)}", "set bf16: false (or force_cpu_bf16: true to keep bf16 anyway)"),
    (SLOW_BF16_CPU, ["bf16=true", "force_cpu_bf16=true"], "warn",
     "bf16=true and force_cpu_bf16=true: training keeps bfloat16 autocast although the CPU has no bf16 instructions "
     f"(AVX512-BF16 or AMX-BF16): {MEASURED.format(f=23.1)}",
     "set bf16: false and force_cpu_bf16: false (float32 is faster on such CPUs)"),
    (AVX512_CPU, ["bf16=true"], "warn",  # a fast measurement does not change the decision: it is advice
     "bf16=true but the CPU has AVX512-BF16 but no AMX-BF16, and its bf16 kernels are slower than float32 there, so "
     f"`vlmtune train` will train in float32 instead: {MEASURED.format(f=0.6)}",
     "set bf16: false (or force_cpu_bf16: true to keep bf16 anyway)"),
    (FAST_BF16_CPU, ["bf16=true"], "ok",
     f"bf16=true: kept, since the CPU has AMX-BF16; {MEASURED.format(f=0.6)}", ""),
    (A100, [], "warn",
     "neither bf16 nor fp16 is set: float32 on NVIDIA A100 80GB (compute capability 8.0), which supports bfloat16: "
     "twice the weight and activation memory, and slower", "set bf16: true"),
    (T4, [], "warn",
     "neither bf16 nor fp16 is set: float32 on Tesla T4 (compute capability 7.5): twice the weight and activation "
     "memory of fp16, and slower", "set fp16: true"),
    (T4, ["fp16=true"], "ok", "fp16 mixed precision on Tesla T4 (compute capability 7.5)", ""),
    (CPU, [], "ok", "float32 on the CPU (Test CPU); no GPU found", ""),
])
def test_precision(check, device, keys, status, message, fix):
    assert check("precision", device, *keys) == Check("precision", status, message, fix)


def test_cpu_bf16_is_measured_when_the_device_has_no_figure(check, monkeypatch):
    from vlmtune.train import speed

    monkeypatch.setattr(speed, "cpu_bf16_slowdown", lambda: 3.0)
    c = check("precision", CPU, "bf16=true")
    assert c.status == "warn" and "bf16 autocast measured 3.0x the float32 time" in c.message


# -- workers -----------------------------------------------------------------------------------
WORKER_COSTS = ("(about 400 MiB per preprocessing worker, 300 MiB + 2 prefetched batches of 9 MiB pixels per "
                "dataloader worker)")


def test_workers_more_than_cpus(check):
    c = check("workers", CPU, "preprocessing_num_workers=8", "dataloader_num_workers=6")
    assert c == Check(
        "workers", "warn",
        "preprocessing_num_workers=8 is more than the 4 CPUs; 6 dataloader workers in all is more than the 4 CPUs "
        "(preprocessing_num_workers=8, dataloader_num_workers=6, 4 CPUs, 32.0 GiB RAM free; estimated worker "
        f"memory 3.12 GiB {WORKER_COSTS})",
        "set preprocessing_num_workers to at most 4; set dataloader_num_workers to at most 4")


def test_dataloader_workers_count_for_every_local_process(check):
    c = check("workers", A100, "bf16=true", "dataloader_num_workers=4", env={"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"})
    assert c == Check(
        "workers", "warn",
        "32 dataloader workers in all is more than the 16 CPUs (preprocessing_num_workers=1, 8 training processes × "
        f"dataloader_num_workers=4, 16 CPUs, 200.0 GiB RAM free; estimated worker memory 9.95 GiB {WORKER_COSTS})",
        "set dataloader_num_workers to at most 2")


@pytest.mark.parametrize("free_gib, status, share", [(2, "warn", "over 50% of"), (1, "fail", "all")])
def test_workers_against_free_memory(check, free_gib, status, share):
    device = dataclasses.replace(CPU, free_ram=free_gib * GiB)
    c = check("workers", device, "preprocessing_num_workers=4")
    assert c == Check(
        "workers", status,
        f"the workers would take {share} the free RAM (preprocessing_num_workers=4, dataloader_num_workers=0, "
        f"4 CPUs, {free_gib}.00 GiB RAM free; estimated worker memory 1.56 GiB {WORKER_COSTS})", "use fewer workers")


# -- vision training ---------------------------------------------------------------------------
def test_unfrozen_vision_tower_without_vision_targets_fails(check):
    c = check("vision", A100, "bf16=true", "freeze_vision_tower=false", "lora_target=q_proj,v_proj")
    assert c == Check(
        "vision", "fail",
        "freeze_vision_tower=false but lora_target=[q_proj, v_proj] matches no linear layer of the vision tower, so "
        "the vision tower would stay frozen; its linear layers are named [fc1, fc2, proj, qkv]",
        "set lora_target: all (adapters on every linear layer of the parts not frozen), or add the vision tower's "
        "layers: lora_target: q_proj,v_proj,fc1,fc2,proj,qkv")


def test_named_vision_targets_on_a_frozen_tower_warn(check):
    c = check("vision", A100, "bf16=true", "lora_target=q_proj,qkv")
    assert c == Check(
        "vision", "warn",
        "lora_target=[q_proj, qkv] puts adapters on 2 layers of the vision_tower (qkv) although freeze_vision_tower "
        "is true: named targets apply wherever the name matches, whatever the freeze_* keys say (LoRA adapters on "
        "the language_model (2 linear layers) and the vision_tower (2 linear layers); frozen: projector; 4,096 of "
        "264,576 parameters train)",
        "to keep those parts frozen set lora_target: all (it follows the freeze_* keys) or name only layers of the "
        "parts that train; to train them on purpose set freeze_vision_tower: false")


def test_qwen2_5_vl_shares_mlp_names_with_its_vision_tower(tiny_ckpt, data, tmp_path):
    from vlmtune.models.load import load_spec

    path = str(tiny_ckpt("qwen2_5_vl"))
    cfg = load_config(None, [f"model_name_or_path={path}", f"dataset={data}", f"output_dir={tmp_path}",
                             "lora_target=q_proj,v_proj,gate_proj,up_proj,down_proj", "bf16=true", "cutoff_len=600"])
    c = {c.name: c for c in run_checks(cfg, device_info=A100, loaded=load_spec(path), env={})}["vision"]
    assert c.status == "warn"
    assert c.message.startswith("lora_target=[q_proj, v_proj, gate_proj, up_proj, down_proj] puts adapters on 6 "
                                "layers of the vision_tower (down_proj, gate_proj, up_proj) although "
                                "freeze_vision_tower is true")


def test_trainable_vision_tower_with_all_is_ok(check):
    c = check("vision", A100, "bf16=true", "freeze_vision_tower=false", "freeze_multi_modal_projector=false")
    assert c == Check("vision", "ok", "LoRA adapters on the language_model (14 linear layers) and the vision_tower "
                      "(8 linear layers); the projector trains in full; 49,408 of 285,056 parameters train")


def test_lora_target_matching_nothing_fails_with_the_names(check):
    c = check("vision", A100, "bf16=true", "lora_target=foo")
    assert c == Check("vision", "fail", "lora_target=[foo] matches no linear layer of the model; its linear layers "
                      "are named [0, 2, down_proj, fc1, fc2, gate_proj, k_proj, o_proj, proj, q_proj, qkv, up_proj, "
                      "v_proj]", "set lora_target: all, or to names from that list")


def test_full_finetuning_lists_what_trains(check):
    c = check("vision", A100, "bf16=true", "finetuning_type=full", "freeze_vision_tower=false")
    assert c == Check("vision", "ok", "finetuning_type=full trains the language_model and the vision_tower in full; "
                      "frozen: projector; 235,648 of 260,480 parameters train")


# -- data --------------------------------------------------------------------------------------
def test_samples_reaching_error_fail(check):
    c = check("data", A100, "bf16=true", "cutoff_len=300", "overflow=[error]")
    assert c == Check(
        "data", "fail",
        "1 sample(s) would reach the 'error' policy (two); cutoff_len=300: 1 of 3 valid samples are longer; "
        "overflow=[error] would keep 2, stop prepare on 1; " + DATA_TAIL,
        "raise cutoff_len to 546 (keeps every sample whole), or end overflow with drop")


@pytest.mark.parametrize("overflow, fates", [("[shrink_images, truncate_text, split, drop]", "keep 2, shrink 1"),
                                             ("[drop]", "keep 2, drop 1")])
def test_samples_not_kept_whole_warn(check, overflow, fates):
    c = check("data", A100, "bf16=true", "cutoff_len=300", f"overflow={overflow}")
    assert c == Check(
        "data", "warn",
        f"1 of 3 samples (33.3%) would not be kept whole (more than 5% warns); cutoff_len=300: 1 of 3 valid samples "
        f"are longer; overflow={overflow} would {fates}; " + DATA_TAIL,
        "raise cutoff_len to 546 (keeps every sample whole), or lower image_max_pixels")


def test_unreadable_dataset_fails(check, tmp_path):
    c = check("data", A100, "bf16=true", f"dataset={tmp_path / 'nope.jsonl'}")
    assert c.status == "fail"
    assert c.message.startswith(f"dataset={str(tmp_path / 'nope.jsonl')!r} gave no valid sample (1 problem(s); first: ")
    assert c.fix == "fix dataset / dataset_dir / media_dir (`vlmtune inspect` lists every problem)"


def test_skipping_more_than_max_skipped_share_warns(check, data, tmp_path):
    bad = Path(data).parent / "bad-share.jsonl"  # next to the images it names
    bad.write_text(open(data).read() + '{"messages": [], "video": "v.mp4"}\n')  # 1 of 4 records: 25%
    c = check("data", A100, "bf16=true", f"dataset={bad}", "on_bad_sample=skip")
    assert c.status == "warn"
    assert c.message.startswith("on_bad_sample=skip would leave out 1 of 4 records (25.0%) as invalid, more than "
                                "max_skipped_share=0.05; train stops there; ")
    assert c.fix == "fix the samples (`vlmtune inspect` lists every problem), or set confirm_skipped_share: true"
    assert check("data", A100, "bf16=true", f"dataset={bad}", "on_bad_sample=skip", "max_skipped_share=0.3").status == "ok"


# -- memory ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen2_vl_2b():
    """A Qwen2-VL-2B-sized model (1.5B language model, 0.6B vision tower) on the meta device: no memory."""
    import transformers

    text = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4)
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=151655,
                                        video_token_id=151656, vision_start_token_id=151652,
                                        vision_end_token_id=151653)
    return doctor_memory.meta_model(config)


def test_memory_fail_suggests_a_batch_that_fits_and_keeps_the_global_batch(check, qwen2_vl_2b):
    c = check("memory", A100_40, "bf16=true", "per_device_train_batch_size=32", "gradient_accumulation_steps=3",
              model=qwen2_vl_2b)
    assert c == Check(
        "memory", "fail",
        "estimated peak 41.5 GiB of NVIDIA A100-SXM4-40GB's 40.0 GiB (104%) for per_device_train_batch_size=32 × "
        "546 tokens with 589 image tokens (the longest fitted rows of the data): weights 4.15 GiB, gradients 35 MiB, "
        "optimizer 70 MiB, activations 36.2 GiB, step 35 MiB, batch 11 MiB, runtime 1.00 GiB; estimates are good to "
        "about ±25%, so above 80% warns",
        "set per_device_train_batch_size: 16 and gradient_accumulation_steps: 6 (16 × 6 = 96 keeps the global batch "
        "of 32 × 3; 23 is the largest per-device batch that fits)")


def test_memory_suggestion_is_below_the_threshold_and_the_next_batch_is_not(config, loaded, qwen2_vl_2b):
    cfg = config("bf16=true")
    facts = doctor.model_facts(qwen2_vl_2b.config, cfg)

    def total(batch):
        return doctor.estimate_memory(cfg, facts, "cuda", batch=batch, seq_len=546, image_tokens=589).total

    assert total(23) <= 0.8 * A100_40.total_memory < total(24)
    assert total(1) < total(2) < total(8)


def test_memory_when_nothing_smaller_helps(check, qwen2_vl_2b):
    c = check("memory", T4, "fp16=true", "finetuning_type=full", "gradient_checkpointing=false", model=qwen2_vl_2b)
    assert (c.status, c.fix) == ("fail", "per_device_train_batch_size is already 1: try gradient_checkpointing: "
                                 "true, finetuning_type: lora, a lower cutoff_len or image_max_pixels, DeepSpeed "
                                 "ZeRO-3 across several GPUs (deepspeed)")
    assert c.message.startswith("estimated peak 35.2 GiB of Tesla T4's 15.0 GiB (235%) for "
                                "per_device_train_batch_size=1 × 546 tokens with 512 image tokens")


def test_memory_on_the_cpu_is_against_free_ram(check):
    c = check("memory", CPU)
    assert c == Check(
        "memory", "ok",
        "estimated peak 1.03 GiB of 32.0 GiB of free RAM (no GPU: training runs on the CPU) (3%) for "
        "per_device_train_batch_size=1 × 546 tokens with 512 image tokens (the longest fitted rows of the data): "
        "weights 1 MiB, gradients 0 MiB, optimizer 0 MiB, activations 16 MiB, batch 9 MiB, runtime 1.00 GiB; "
        "rough time per optimizer step: 0.4 s (4.46 GFLOP of matmuls at a measured 10.0 GFLOP/s float32 on this "
        "CPU); estimates are good to about ±25%, so "
        "above 80% warns")


def test_time_per_step_grows_with_what_the_backward_runs_through(config, loaded):
    """Accumulation multiplies the step; full fine-tuning adds weight gradients; a trainable tower its backward;
    checkpointing a second forward."""
    def flops(*keys):
        cfg = config(*keys)
        facts = doctor_memory.model_facts(loaded.config, cfg)
        return doctor_memory.step_flops(cfg, facts, batch=1, seq_len=512, image_tokens=256)

    base = flops("gradient_accumulation_steps=1")
    assert flops("gradient_accumulation_steps=3") == 3 * base
    assert flops("gradient_accumulation_steps=1", "finetuning_type=full") > base
    assert flops("gradient_accumulation_steps=1", "freeze_vision_tower=false") > base
    assert flops("gradient_accumulation_steps=1", "gradient_checkpointing=false") < base


@pytest.mark.parametrize("batch, steps, largest", [(8, 1, 7), (8, 3, 5), (7, 2, 3), (32, 3, 23), (5, 5, 1),
                                                   (12, 1, 11), (6, 4, 4)])
def test_suggested_batches_keep_the_global_batch_exactly(batch, steps, largest):
    per_device, accumulation = suggest_batch(batch, steps, largest)
    assert per_device * accumulation == batch * steps
    assert 1 <= per_device <= largest
    # the largest such per-device batch
    assert not any(batch * steps % d == 0 for d in range(per_device + 1, largest + 1))


# -- versions ----------------------------------------------------------------------------------
def test_versions_below_the_requirements_fail(check, monkeypatch):
    monkeypatch.setattr(doctor_environment, "_version", lambda lib: {**TESTED, "transformers": "4.44.2"}.get(lib))
    c = check("versions", A100, "bf16=true")
    assert c == Check(
        "versions", "fail",
        "vlmtune requires transformers<6,>=5.0, found 4.44.2; Qwen2-VL needs transformers >= 4.45, found 4.44.2; "
        "torch 2.14.1; transformers 4.44.2; peft 0.21.2; accelerate 1.15.0; video decoder PyAV 18.1.0 (FFmpeg 8.1.2) "
        "(tested with torch 2.14, transformers 5.24, peft 0.21, accelerate 1.15)",
        "pip install the versions tested with: torch 2.14, transformers 5.24, peft 0.21, accelerate 1.15")


def test_untested_versions_warn(check, monkeypatch):
    monkeypatch.setattr(doctor_environment, "_version",
                        lambda lib: {**TESTED, "peft": "0.18.0", "torch": "2.15.0"}.get(lib))
    c = check("versions", A100, "bf16=true")
    assert c.status == "warn"
    assert c.message.startswith("torch 2.15.0 is newer than the tested 2.14; peft 0.18.0 is older than the tested "
                                "0.21; torch 2.15.0; ")
    assert c.fix == ("if something breaks, install the versions tested with: torch 2.14, transformers 5.24, "
                     "peft 0.21, accelerate 1.15")


# -- distributed -------------------------------------------------------------------------------
TWO_RANKS = {"WORLD_SIZE": "2", "LOCAL_RANK": "0"}


@pytest.mark.parametrize("timeout, status, what", [
    # LLaMA-Factory's examples' value: a warning, never a failure that stops `train`
    (180000000, "warn", "ddp_timeout=180000000 s lets a stuck rank hang the job for over a day"),
    (10800, "warn", "ddp_timeout=10800 s lets a stuck rank hang the job for over 2 h"),
])
def test_long_ddp_timeouts(check, timeout, status, what):
    c = check("distributed", A100, "bf16=true", f"ddp_timeout={timeout}", env=TWO_RANKS)
    assert c == Check("distributed", status, f"2 process(es): {what}; the vision tower and projector are frozen, so "
                      "text-only batches need no dummy vision pass", "set ddp_timeout: 1800 (the default) or at most "
                      "7200")


DUMMY = ("a text-only batch runs the vision tower on one dummy image with weight 0 (VlmTrainer), so every rank runs "
         "the same modules and no rank waits for gradients that never come")


def test_trainable_vision_tower_under_ddp_gets_the_dummy_pass(check):
    c = check("distributed", A100, "bf16=true", "freeze_vision_tower=false", env=TWO_RANKS)
    assert c == Check("distributed", "ok", f"2 process(es): ddp_timeout=1800 s; {DUMMY}")


def test_deepspeed_zero3_is_read_from_its_json(check, tmp_path, monkeypatch):
    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}))
    monkeypatch.setattr(doctor_environment, "_installed", lambda module: True)
    c = check("distributed", A100, "bf16=true", f"deepspeed={ds}", env=TWO_RANKS)
    assert c == Check("distributed", "ok", f"2 process(es): ddp_timeout=1800 s; DeepSpeed ZeRO stage 3 (from {ds}); "
                      "ZeRO-3 gathers each module's parameters on every rank, so text-only batches get the dummy "
                      f"vision pass too; {DUMMY}")
    monkeypatch.setattr(doctor_environment, "_installed", lambda module: False)
    c = check("distributed", A100, "bf16=true", f"deepspeed={ds}", env=TWO_RANKS)
    assert (c.status, c.fix) == ("fail", "pip install deepspeed, or set deepspeed: null")
    assert c.message.startswith(f"2 process(es): deepspeed={str(ds)!r} is set but DeepSpeed is not installed; ")


# -- sharding --------------------------------------------------------------------------------------
def test_sharding_off_under_plain_ddp(check):
    c = check("sharding", A100, "bf16=true", env=TWO_RANKS)
    assert c == Check("sharding", "ok", "no fsdp or deepspeed: each rank holds the whole model (DDP)")


def test_fsdp_wrap_classes_modalities_and_memory_per_rank(check):
    one = check("sharding", A100, "bf16=true", "finetuning_type=full", "fsdp=full_shard auto_wrap", env={})
    two = check("sharding", A100, "bf16=true", "finetuning_type=full", "fsdp=full_shard auto_wrap", env=TWO_RANKS)
    assert two.status == "ok"
    assert two.message.startswith("FSDP2 full_shard (ZeRO-3-like); shards each Qwen2VLDecoderLayer and each "
                                  "Qwen2VLVisionBlock as one unit (all present in the loaded model); mixed modalities ")
    assert "divided by the 2 ranks (WORLD_SIZE)" in two.message and "set WORLD_SIZE" in one.message
    assert one.status == "warn" and one.message.endswith(
        "fsdp: 'full_shard auto_wrap' shards the model across processes, but this run is one process (no "
        "WORLD_SIZE); launch it on several: `torchrun --nproc_per_node N -m vlmtune train <config>` "
        "(docs/sharding.md), or set fsdp: null to train on one")

    assert re.search(r"memory per rank: weights [0-9.]+ \w+, gradients [0-9.]+ \w+, optimizer [0-9.]+ \w+ ", two.message)


def test_fsdp_memory_is_divided_like_the_zero_stage_it_matches(config):
    from vlmtune.commands.doctor.memory import shard_stage

    assert shard_stage(config("fsdp=full_shard auto_wrap"), {}) == 3  # weights, gradients, optimizer states
    assert shard_stage(config("fsdp=shard_grad_op auto_wrap"), {}) == 2  # gradients, optimizer states
    assert shard_stage(config("fsdp=true", "fsdp_config={reshard_after_forward: false}"), {}) == 2
    assert shard_stage(config(), {"ACCELERATE_USE_FSDP": "true"}) == 3
    assert shard_stage(config(), {}) == 0


def test_fsdp_wrap_class_missing_from_the_model_fails(check):
    c = check("sharding", A100, "bf16=true", "fsdp=full_shard auto_wrap",
              "fsdp_config={transformer_layer_cls_to_wrap: [Qwen2VLDecoderLayer, Qwen2_5_VLVisionBlock]}", env=TWO_RANKS)
    assert c.status == "fail" and c.message.startswith(
        "wrap class(es) Qwen2_5_VLVisionBlock are not modules of this qwen2_vl model (its layer and block classes: "
        "Qwen2VLDecoderLayer, Qwen2VLVisionBlock)")
    assert "transformer_layer_cls_to_wrap" in c.fix


def test_accelerate_launch_fsdp_is_checked_like_the_keys(check):
    env = {**TWO_RANKS, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false",
           "FSDP_TRANSFORMER_CLS_TO_WRAP": "Qwen2VLDecoderLayer,NoSuchBlock"}
    c = check("sharding", A100, "bf16=true", env=env)
    assert c.status == "fail" and "NoSuchBlock" in c.message and "shard_grad_op (ZeRO-2-like) from accelerate" in c.message


def test_ddp_timeout_of_llamafactory_examples_warns_with_deepspeed_or_fsdp_as_documented(check, tmp_path, monkeypatch):
    """docs/migrating-from-llamafactory.md: a long ddp_timeout warns, never fails, sharded or not."""
    ds = tmp_path / "z2.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    monkeypatch.setattr(doctor_environment, "_installed", lambda module: True)
    for keys in ([f"deepspeed={ds}"], ["fsdp=full_shard auto_wrap"]):
        c = check("distributed", A100, "bf16=true", "ddp_timeout=180000000", *keys, env={})
        assert c.status == "warn" and "ddp_timeout=180000000 s lets a stuck rank hang the job for over a day" in c.message
        assert c.fix == "set ddp_timeout: 1800 (the default) or at most 7200"


# -- the model cannot be loaded ----------------------------------------------------------------
def test_a_missing_model_fails_and_the_other_checks_still_run(config, tmp_path):
    cfg = config(f"model_name_or_path={tmp_path / 'nothing'}", "bf16=true")
    checks = {c.name: c for c in run_checks(cfg, device_info=A100, env={})}
    assert checks["model"].status == "fail"
    assert checks["model"].message.startswith(f"cannot load model_name_or_path={str(tmp_path / 'nothing')!r}: ")
    assert [(n, c.status) for n, c in checks.items() if n != "model"] == [
        ("versions", "ok"), ("precision", "ok"), ("workers", "ok"), ("quantization", "ok"),
        ("linear_attention", "ok"), ("vision", "warn"),
        ("data", "warn"), ("video", "warn"),
        ("memory", "warn"), ("distributed", "ok"), ("sharding", "ok")]


# -- CLI and train -----------------------------------------------------------------------------
def _yaml(tmp_path, ckpt, data, **keys) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": ckpt, "dataset": str(data),
                                    "output_dir": str(tmp_path / "out"), "cutoff_len": 600, **keys}))
    return str(path)


def test_cli_exit_status_and_json(ckpt, data, tmp_path, monkeypatch, capsys):
    from vlmtune.commands.cli import main

    monkeypatch.setattr(doctor, "probe_device", lambda: CPU)
    path = _yaml(tmp_path, ckpt, data, fp16=True)
    assert main(["doctor", path, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in out] == ["versions", "precision", "workers", "model", "quantization",
                                        "linear_attention", "vision", "data", "video", "memory", "distributed", "sharding"]
    assert all(set(c) == {"name", "status", "message", "fix"} for c in out)
    assert out[1]["status"] == "fail"
    assert main(["doctor", path, "fp16=false"]) == 0
    text = capsys.readouterr().out
    assert "ok      precision    float32 on the CPU (Test CPU); no GPU found" in text
    assert text.rstrip().endswith("0 failed, 0 warning(s), 12 ok")


def test_train_stops_on_failed_checks_unless_run_doctor_is_false(config, monkeypatch):
    from vlmtune.commands.cli import train_preflight
    from vlmtune.train import recipe

    monkeypatch.setattr(doctor, "probe_device", lambda: CPU)
    cfg = config("fp16=true")
    with pytest.raises(DoctorError) as err:
        recipe.setup(cfg, progress=False, preflight=train_preflight(cfg))
    assert str(err.value) == (
        "1 doctor check(s) failed before training:\n"
        "  - precision: fp16=true but there is no GPU (Test CPU): float16 mixed precision needs CUDA\n"
        "    fix: set fp16: false (float32), or bf16: true on a CPU with bfloat16\n"
        "fix them, or set run_doctor: false to train anyway")

    class Reached(Exception):
        pass

    def stop(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(doctor, "run_checks", lambda *a, **k: pytest.fail("the doctor ran with run_doctor: false"))
    monkeypatch.setattr("transformers.set_seed", stop)
    cfg = config("fp16=true", "run_doctor=false")
    assert train_preflight(cfg) is None
    with pytest.raises(Reached):
        recipe.setup(cfg, progress=False, preflight=train_preflight(cfg))


# -- quantization (issue 15) ---------------------------------------------------------------------------------------
def test_quantization_check_reports_the_layout(check):
    pytest.importorskip("bitsandbytes")
    c = check("quantization", CPU, "quantization_bit=4")
    assert c.status == "ok"
    assert "its CPU backend works on Test CPU" in c.message
    assert c.message.endswith("4-bit nf4 with double quantization: the language model's linear layers are quantized; "
                              "the vision tower and projector, embeddings and lm_head stay in float32")
    c = check("quantization", CPU, "quantization_bit=8", "quantize_vision_tower=true")
    assert c.message.endswith("8-bit (LLM.int8): the language model's and the vision tower's linear layers are "
                              "quantized; the projector, embeddings and lm_head stay in float32")


def test_quantization_check_without_quantization(check, monkeypatch):
    monkeypatch.setattr("vlmtune.models.quant.bitsandbytes_version", lambda: None)
    assert check("quantization", CPU) == Check(
        "quantization", "ok", "no quantization (quantization_bit: null) and no bitsandbytes optimizer; bitsandbytes "
        "not installed")


def test_quantization_check_needs_bitsandbytes(check, monkeypatch):
    monkeypatch.setattr("vlmtune.models.quant.bitsandbytes_version", lambda: None)
    c = check("quantization", A100, "bf16=true", "quantization_bit=4")
    assert (c.status, c.message) == ("fail", "quantization_bit=4 needs bitsandbytes, which is not installed")
    c = check("quantization", A100, "bf16=true", "optim=paged_adamw_8bit")
    assert (c.status, c.message) == ("fail", "optim=paged_adamw_8bit needs bitsandbytes, which is not installed")


@pytest.mark.parametrize("version, status, start", [
    ("0.44.1", "fail", "bitsandbytes 0.44.1 is older than 0.45"),
    ("0.48.0", "warn", "bitsandbytes 0.48.0 is older than the tested 0.50"),
    ("0.50.2", "ok", "bitsandbytes 0.50.2; backend not probed: NVIDIA A100 80GB is not this machine's device"),
])
def test_quantization_check_versions(check, monkeypatch, version, status, start):
    import torch

    monkeypatch.setattr("vlmtune.models.quant.bitsandbytes_version", lambda: version)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    c = check("quantization", A100, "bf16=true", "quantization_bit=4")
    assert c.status == status and c.message.startswith(start)
    assert c.message.endswith("stay in bf16")


def test_quantization_check_backend_failure(check, monkeypatch):
    from vlmtune.commands.doctor import quantization

    monkeypatch.setattr("vlmtune.models.quant.bitsandbytes_version", lambda: "0.50.2")
    monkeypatch.setattr(quantization, "probe_bitsandbytes", lambda kind: "RuntimeError: no kernel")
    c = check("quantization", CPU, "quantization_bit=8")
    assert c.status == "fail"
    assert c.message.startswith("bitsandbytes does not work on this cpu (Test CPU): RuntimeError: no kernel; "
                                "bitsandbytes 0.50.2")
    assert c.fix.startswith("pip install bitsandbytes==0.50.*")


def test_quantization_with_zero3_is_refused(check, tmp_path, monkeypatch):
    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    monkeypatch.setattr("vlmtune.models.quant.bitsandbytes_version", lambda: "0.50.2")
    c = check("quantization", A100, "bf16=true", "quantization_bit=4", f"deepspeed={ds}", env=TWO_RANKS)
    assert c.status == "fail"
    assert f"quantization_bit=4 with DeepSpeed ZeRO-3 ({ds}): ZeRO-3 partitions every weight" in c.message
    assert c.fix.startswith("use DeepSpeed ZeRO-2 (examples/deepspeed/ds_z2.json) or plain DDP")


def test_memory_of_4bit_weights(config, qwen2_vl_2b):
    """The 4-bit estimate: the decoder layers' linear weights at 0.5 + 1/64 + 4/16384 bytes (double quantization),
    everything else as before; 8-bit at 1 byte (+ a float32 per row); an 8-bit optimizer's states at 2 bytes."""
    from vlmtune.commands.doctor.quantization import quantized_bytes_per_element

    plain_cfg, q4_cfg = config("bf16=true"), config("bf16=true", "quantization_bit=4")
    facts = doctor.model_facts(qwen2_vl_2b.config, plain_cfg)
    assert doctor.model_facts(qwen2_vl_2b.config, q4_cfg) == facts  # the meta model does not quantize

    def parts(cfg):
        return doctor.estimate_memory(cfg, facts, "cuda", batch=1, seq_len=546, image_tokens=512).parts

    q = facts.layer_linear_weights
    assert q == 28 * (1536 * (1536 + 256 + 256) + 1536 * 1536 + 3 * 1536 * 8960)  # q, k, v, o, gate, up, down
    one_layer = 1536 * 8960 * 2
    assert parts(plain_cfg)["weights"] - parts(q4_cfg)["weights"] == \
        int(q * (2 - (0.5 + 1 / 64 + 4 / 16384))) - one_layer
    assert quantized_bytes_per_element(config("quantization_bit=4", "double_quantization=false"), 1536) == 0.5625
    q8 = parts(config("bf16=true", "quantization_bit=8"))["weights"]
    assert parts(plain_cfg)["weights"] - q8 == int(q * (2 - (1 + 4 / 1536))) - one_layer
    assert parts(config("bf16=true", "optim=adamw_8bit"))["optimizer"] == 2 * facts.trainable_params
    assert parts(plain_cfg)["optimizer"] == 2 * 4 * facts.trainable_params


def test_memory_of_dora(config, qwen2_vl_2b):
    plain_cfg, dora_cfg = config("bf16=true", "gradient_checkpointing=false"), \
        config("bf16=true", "gradient_checkpointing=false", "use_dora=true")
    plain, dora = doctor.model_facts(qwen2_vl_2b.config, plain_cfg), doctor.model_facts(qwen2_vl_2b.config, dora_cfg)
    # lora_target all: q, k, v, o, gate, up, down in each layer; DoRA adds one magnitude per output feature.
    out = 1536 + 256 + 256 + 1536 + 8960 + 8960 + 1536
    assert plain.lora_out_per_layer == dora.lora_out_per_layer == out
    assert dora.lora_params - plain.lora_params == 28 * out

    def acts(cfg, facts):
        return doctor.estimate_memory(cfg, facts, "cuda", batch=1, seq_len=546, image_tokens=512).parts["activations"]

    assert acts(dora_cfg, dora) - acts(plain_cfg, dora) == 2 * 546 * out * 28 + 1536 * 8960 * 4


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@given(batch=st.integers(1, 8), seq=st.integers(16, 4096), share=st.floats(0, 1), bf16=st.booleans(),
       checkpointing=st.booleans(), double=st.booleans())
@settings(max_examples=40, deadline=None)
def test_quantized_estimates_are_ordered(qwen2_vl_2b, batch, seq, share, bf16, checkpointing, double):
    """For any batch: 4-bit < 8-bit < unquantized, and only the weights differ."""
    base = ["model_name_or_path=m", "dataset=d", "output_dir=o", f"bf16={str(bf16).lower()}",
            f"gradient_checkpointing={str(checkpointing).lower()}", f"double_quantization={str(double).lower()}"]
    cfgs = [load_config(None, base + extra) for extra in ([], ["quantization_bit=8"], ["quantization_bit=4"])]
    facts = doctor.model_facts(qwen2_vl_2b.config, cfgs[0])
    ests = [doctor.estimate_memory(c, facts, "cuda", batch=batch, seq_len=seq, image_tokens=int(share * seq))
            for c in cfgs]
    assert ests[0].total > ests[1].total > ests[2].total
    for e in ests[1:]:
        assert {k: v for k, v in e.parts.items() if k != "weights"} == \
            {k: v for k, v in ests[0].parts.items() if k != "weights"}
def test_loading_a_bf16_checkpoint_into_float32_on_the_cpu_holds_both_copies(config, loaded):
    """The load spike: float32 weights + the mapped bfloat16 file + runtime; training peaks lower for a tiny model."""
    cfg = config()
    facts = dataclasses.replace(doctor_memory.model_facts(loaded.config, cfg), stored_bytes=2)
    est = doctor_memory.estimate_memory(cfg, facts, "cpu", batch=1, seq_len=64, image_tokens=16)
    n = facts.total_params - facts.lora_params
    assert est.load_peak == n * 4 + n * 2 + doctor_memory.RUNTIME_BYTES["cpu"]
    assert est.total == max(est.load_peak, est.train_peak)
    on_gpu = doctor_memory.estimate_memory(cfg.replace(bf16=True), facts, "cuda", batch=1, seq_len=64,
                                           image_tokens=16)
    assert on_gpu.load_peak == 0  # bf16 weights from a bf16 file: no conversion on the device


# -- video -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def video_data(tmp_path_factory, make_clip):
    """Three samples: a long clip (60 frames at 10 fps, 112x84), a short one (8 frames at 4 fps, 56x42), text."""
    root = tmp_path_factory.mktemp("doctor-video")
    make_clip(root / "long.mp4", 60, 112, 84, rate=10)
    make_clip(root / "short.mp4", 8, 56, 42, rate=4)
    records = [
        {"id": "long", "messages": [{"role": "user", "content": "<video>What happens?"},
                                    {"role": "assistant", "content": "a fade"}], "videos": ["long.mp4"]},
        {"id": "short", "messages": [{"role": "user", "content": "<video>And here?"},
                                     {"role": "assistant", "content": "less"}], "videos": ["short.mp4"]},
        {"id": "text", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    path = root / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def planned_tokens(loaded, clip) -> int:
    """The clip's tokens by the arithmetic alone (models/video_grid.py), as the processor would make them."""
    from vlmtune.data.media.video import read_facts

    f = read_facts(str(clip))
    return loaded.video.for_clip(f.frames, f.fps).plan(f.frames, f.fps, f.height, f.width).tokens


def test_a_video_over_cutoff_len_warns_with_the_largest(config, loaded, video_data, monkeypatch):
    from vlmtune.data.drivers import prepare

    from_cache = []
    real = prepare._facts_from_cache
    monkeypatch.setattr(prepare, "_facts_from_cache", lambda prep: from_cache.append(prep) or real(prep))
    long_tokens, short_tokens = planned_tokens(loaded, video_data.parent / "long.mp4"), \
        planned_tokens(loaded, video_data.parent / "short.mp4")
    assert (long_tokens, short_tokens) == (48, 8)  # grids [4, 6, 8] and [2, 4, 4], merge 2: t·h·w / 4

    def run(*keys):
        return {c.name: c for c in run_checks(config(f"dataset={video_data}", "bf16=true", *keys), device_info=A100,
                                              loaded=loaded, env={})}

    facts = "2 video(s) in 2 sample(s), 56 video tokens; the largest video takes 48 tokens (sample long)"
    checks = run("cutoff_len=40")
    assert checks["video"] == Check(
        "video", "warn",
        "1 sample(s) have a video whose tokens alone exceed cutoff_len=40: a video is never cut, so such a clip fits "
        "in no row unless shrink_images lowers its pixel budget, then its frame count; otherwise the rest of overflow "
        f"leaves it out or drops the sample; {facts}",
        "lower video_max_pixels, video_fps or video_maxlen, or raise cutoff_len")
    # the data check's per-count summary has the videos; the memory check counts their pads as vision tokens
    assert checks["data"].message.endswith("recommended cutoff_len: 85 keeps 95% whole, 85 99%, 85 all (0 image(s): "
                                           "p99 85, max 85; 0 video(s): p99 29, max 29; 1 video(s): p99 85, max 85)")
    assert checks["data"].fix == ("raise cutoff_len to 85 (keeps every sample whole), or lower image_max_pixels or "
                                  "video_max_pixels")
    assert "per_device_train_batch_size=1 × 40 tokens with 8 vision tokens (image and video) (the longest fitted " \
        "rows of the data)" in checks["memory"].message
    video = run("cutoff_len=40", "overflow=[split, drop]")["video"]
    assert (video.status, video.message.split(": ", 1)[1].split(";")[0]) == (
        "warn", "a video is never cut and overflow has no shrink_images, so such a clip fits in no row: the rest "
                "of overflow leaves it out or drops the sample")
    ok = Check("video", "ok", f"{facts}, within cutoff_len=48")
    assert run("cutoff_len=48")["video"] == ok and not from_cache
    assert run("cutoff_len=48")["video"] == ok  # again, from the prepared cache's per-sample columns
    assert len(from_cache) == 1


def test_videos_without_a_decoder_fail_with_the_fix(config, loaded, video_data, data, monkeypatch):
    from vlmtune.data.media import video as video_mod
    from vlmtune.data.media.video import VideoReadError

    def no_av(path):
        raise VideoReadError(path, "no_decoder", "PyAV is not installed", "pip install av (vlmtune[video])")

    monkeypatch.setattr(doctor_environment, "decoder_version", lambda: None)
    monkeypatch.setattr(video_mod, "_av", no_av)  # what read_facts meets without PyAV
    checks = {c.name: c for c in run_checks(config(f"dataset={video_data}", "bf16=true", "on_bad_sample=skip",
                                                   "confirm_skipped_share=true"),
                                            device_info=A100, loaded=loaded, env={})}
    assert checks["versions"] == Check(
        "versions", "fail",
        "no video decoder (PyAV) installed: the data's 2 video(s) cannot be read; "
        + VERSIONS_OK.replace("video decoder PyAV 18.1.0 (FFmpeg 8.1.2); ", ""),
        "pip install av (vlmtune[video])")
    assert checks["video"] == Check("video", "fail", "2 video(s) in the data cannot be read: no video decoder (PyAV) "
                                    "is installed, so their samples are invalid", "pip install av (vlmtune[video])")
    # without videos in the data, a missing decoder is a note
    plain = {c.name: c for c in run_checks(config("bf16=true"), device_info=A100, loaded=loaded, env={})}
    assert plain["versions"].status == "ok"
    assert plain["versions"].message == VERSIONS_OK.replace(
        "video decoder PyAV 18.1.0 (FFmpeg 8.1.2)", "no video decoder (PyAV) installed: videos cannot be read (the "
        "data has none)")


def test_unusable_videos_are_counted_by_kind(config, loaded, tmp_path):
    """A checkpoint's videos that the data path refuses (a missing clip, a file that is no video) are named here,
    not hidden behind "no videos in the data"."""
    (tmp_path / "fake.mp4").write_text("not a video")
    records = [{"messages": [{"role": "user", "content": "<video>q"}, {"role": "assistant", "content": "a"}],
                "videos": [name]} for name in ("gone.mp4", "fake.mp4")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    keys = ("bf16=true", "on_bad_sample=skip", "confirm_skipped_share=true")
    checks = {c.name: c for c in run_checks(config(f"dataset={bad}", *keys), device_info=A100, loaded=loaded, env={})}
    assert checks["video"] == Check(
        "video", "warn", "no usable video: 2 video problem(s) made their samples invalid (bad_video: 1, missing_file: 1)",
        "fix the clips (`vlmtune inspect` lists every problem), or remove those samples")


# -- Qwen3.5's linear-attention layers -------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen3_5(tiny_ckpt):
    from vlmtune.models.load import load_spec

    path = str(tiny_ckpt("qwen3_5"))
    return path, load_spec(path)


@pytest.mark.parametrize("kernels", [(False, False), (True, False), (True, True)])
def test_linear_attention_kernels_on_a_gpu(qwen3_5, data, tmp_path, monkeypatch, kernels):
    from vlmtune.models import hybrid

    path, loaded = qwen3_5
    monkeypatch.setattr(hybrid, "kernels_installed", lambda: dict(zip(("flash-linear-attention", "causal-conv1d"),
                                                                      kernels)))
    cfg = load_config(None, [f"model_name_or_path={path}", f"dataset={data}", f"output_dir={tmp_path / 'out'}",
                             "bf16=true", "packing=true"])
    c = {c.name: c for c in run_checks(cfg, device_info=A100, loaded=loaded, env={})}["linear_attention"]
    if all(kernels):
        assert c.status == "ok" and c.message.startswith("3 gated-delta linear-attention layers run the "
                                                         "flash-linear-attention and causal-conv1d kernels.")
        return
    missing = "causal-conv1d" if kernels[0] else "flash-linear-attention and causal-conv1d"
    assert c.status == "warn"
    assert c.message.startswith(f"{missing} not installed: the 3 gated-delta linear-attention layers of Qwen3.5 "
                                "(qwen3_5) fall back to transformers' PyTorch reference, correct but slower "
                                "(documented: 1.7x per step")
    assert "packing keeps each sample's recurrent and convolution state to itself" in c.message
    assert c.fix.startswith(f"pip install {missing.replace(' and ', ' ')}")


def test_linear_attention_on_the_cpu_and_other_families(qwen3_5, check, data, tmp_path):
    path, loaded = qwen3_5
    cfg = load_config(None, [f"model_name_or_path={path}", f"dataset={data}", f"output_dir={tmp_path / 'out'}"])
    c = {c.name: c for c in run_checks(cfg, device_info=CPU, loaded=loaded, env={})}["linear_attention"]
    assert (c.status, c.message) == ("ok", "3 gated-delta linear-attention layers run transformers' PyTorch "
                                           "reference on the cpu (the kernels need a GPU).")
    assert check("linear_attention", A100).message == "no linear-attention layers"


def test_doctor_refuses_overlapping_folders_before_any_work(tmp_path, monkeypatch, capsys):
    import json as _json

    from vlmtune.commands.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("")
    monkeypatch.setattr(doctor, "load_context", lambda *a, **k: pytest.fail("the model loaded first"))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model_name_or_path: {tmp_path / 'm'}\ndataset: {data}\noutput_dir: {tmp_path / 'out'}\n")
    rc = main(["doctor", str(cfg), "--json", f"prepared_dir={tmp_path / 'out'}"])
    out = _json.loads(capsys.readouterr().out)
    assert rc == 2 and [(c["name"], c["status"]) for c in out] == [("config", "fail")]
    assert out[0]["message"].startswith(f"prepared_dir={str(tmp_path / 'out')!r} is output_dir")


def test_memory_of_a_dpo_run_counts_both_sides_of_each_pair_and_the_reference(config, qwen2_vl_2b):
    def est(*keys, batch=2, images=589):
        cfg = config("bf16=true", *keys)
        facts = doctor.model_facts(qwen2_vl_2b.config, cfg)
        return facts, doctor.estimate_memory(cfg, facts, "cuda", batch=batch, seq_len=546, image_tokens=images)

    _, sft = est(batch=4, images=2 * 589)  # each side carries the pair's images
    _, lora = est("stage=dpo")
    # a dpo batch of 2 pairs is 4 sequences: the policy's activations and batch of an sft batch of 4, plus the
    # reference's logits (the adapter is disabled: no weights added)
    assert lora.parts["reference"] == 0 and lora.parts["weights"] == sft.parts["weights"]
    assert lora.parts["batch"] == sft.parts["batch"]
    assert lora.parts["activations"] == sft.parts["activations"] + 4 * 546 * 151936 * (2 + 4)
    assert (lora.batch, lora.image_tokens) == (2, 589)  # reported per row, as configured
    facts, full = est("stage=dpo", "finetuning_type=full")
    assert full.parts["reference"] == facts.total_params * 2  # a frozen bf16 copy
    _, pre = est("stage=dpo", "finetuning_type=full", "precompute_ref_log_probs=true")
    _, simpo = est("stage=dpo", "pref_loss=simpo")
    assert pre.parts["reference"] == simpo.parts["reference"] == 0
    assert simpo.parts["activations"] == sft.parts["activations"]
