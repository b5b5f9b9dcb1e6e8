"""export: merged checkpoints load without peft and compute exactly what base + adapter computes."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmtune.commands.cli import main
from vlmtune.config import folders
from vlmtune.errors import VlmtuneError
from vlmtune.commands.export import export

QV = dict(target_modules=["q_proj", "v_proj"])


def make_adapter(ckpt, out, seed=0, **lora):
    """A non-trivial LoRA adapter (init_lora_weights=False: A and B random) saved to `out`."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_pretrained(ckpt)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **(lora or QV)))
    peft_model.save_pretrained(out)
    return out


def image_batch(processor, image_path):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in the image?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = Image.open(image_path).convert("RGB")
    return processor(text=[text], images=[image], return_tensors="pt")


@torch.inference_mode()
def logits(model, batch):
    return model.eval()(**batch).logits


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"])
def test_export_matches_base_plus_adapter(arch, tiny_ckpt, tmp_path, make_image):
    ckpt = tiny_ckpt(arch)
    adapter = make_adapter(ckpt, tmp_path / "adapter")
    img = make_image(tmp_path / "red.png", 100, 80, (255, 0, 0))
    processor = AutoProcessor.from_pretrained(ckpt)
    batch = image_batch(processor, img)

    base = AutoModelForImageTextToText.from_pretrained(ckpt)
    base_logits = logits(base, batch)
    expected = logits(PeftModel.from_pretrained(base, adapter), batch)
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter really changes the model

    out = export(ckpt, adapter, tmp_path / "merged")
    assert out == tmp_path / "merged"

    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names
    assert {"config.json", "generation_config.json", "processor_config.json", "tokenizer.json"} <= set(names)
    assert {"tokenizer_config.json", "chat_template.jinja"} <= set(names)
    assert not [n for n in names if n.endswith(".bin")]
    assert [n for n in names if n.startswith(".")] == [folders.MARKER_FILE]  # no temporary directory left behind
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "lora" in k or "base_layer" in k]

    merged = AutoModelForImageTextToText.from_pretrained(out)
    assert type(merged) is type(base)
    assert merged.config.tie_word_embeddings is True  # q/v adapters leave the tied embeddings tied
    merged_processor = AutoProcessor.from_pretrained(out)
    merged_batch = image_batch(merged_processor, img)
    assert merged_batch.keys() == batch.keys()
    for k in batch:
        assert torch.equal(merged_batch[k], batch[k]), k
    got = logits(merged, merged_batch)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


def test_export_lm_head_lora_on_tied_embeddings(tiny_ckpt, tmp_path):
    # peft's merge_and_unload would add the lm_head delta into the weight lm_head shares with
    # embed_tokens (changing the input embeddings too); export unties them first.
    ckpt = tiny_ckpt("qwen2_vl")
    adapter = make_adapter(ckpt, tmp_path / "adapter", target_modules=["q_proj", "lm_head"])
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    base = AutoModelForImageTextToText.from_pretrained(ckpt)
    expected = logits(PeftModel.from_pretrained(base, adapter), {"input_ids": ids})

    out = export(ckpt, adapter, tmp_path / "merged")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["text_config"]["tie_word_embeddings"] is False
    merged = AutoModelForImageTextToText.from_pretrained(out)
    assert merged.lm_head.weight.data_ptr() != merged.get_input_embeddings().weight.data_ptr()
    got = logits(merged, {"input_ids": ids})
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


def _user_folder(path):
    path.mkdir()
    (path / "notes.txt").write_text("keep me")
    return path


def _refused(folder, flag="--out", what="a folder with content that vlmtune did not create (it has no "
             ".vlmtune-owned)"):
    return (f"{flag} {folder} is {what}; vlmtune writes into or replaces only folders it created and never deletes "
            f"or overwrites yours: set {flag} to a new folder, or empty that one yourself")


def _no_model_load(monkeypatch):
    """Refusals come before the model loads: loading it fails the test."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")
    monkeypatch.setattr("vlmtune.commands.export.load_processor", boom)


def test_export_never_replaces_a_folder_it_did_not_create_even_with_force(tiny_ckpt, tmp_path, monkeypatch):
    # Before: --force deleted a user's folder named as --out (and this test asserted it). The product's rule
    # (DESIGN.md "Safety"): vlmtune deletes or overwrites only folders it created and marked.
    ckpt = tiny_ckpt("qwen2_vl")
    adapter = make_adapter(ckpt, tmp_path / "adapter")
    out = _user_folder(tmp_path / "merged")
    _no_model_load(monkeypatch)
    for force in (False, True):
        with pytest.raises(VlmtuneError) as e:
            export(ckpt, adapter, out, force=force)
        assert str(e.value) == _refused(out)
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
        assert (out / "notes.txt").read_text() == "keep me"
    # A file, a link, or a folder vlmtune made for something else (a training output) are refused alike.
    (tmp_path / "file").write_text("x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    trained = tmp_path / "trained"
    trained.mkdir()
    folders.mark(trained, folders.OUTPUT)
    (trained / "adapter_model.safetensors").write_text("weights")
    for path, what in [(tmp_path / "file", "a file"), (tmp_path / "link", "a link"),
                       (trained, "a folder vlmtune made for something else (vlmtune training output, says its "
                                 ".vlmtune-owned)")]:
        with pytest.raises(VlmtuneError) as e:
            export(ckpt, adapter, path, force=True)
        assert str(e.value) == _refused(path, what=what)
    assert (tmp_path / "file").read_text() == "x" and (trained / "adapter_model.safetensors").is_file()
    # Never over the model or adapter directories, even with force.
    with pytest.raises(VlmtuneError) as e:
        export(ckpt, adapter, adapter, force=True)
    assert str(e.value).startswith(f"--out {adapter} is or contains {adapter.resolve()}, which would be deleted")
    assert (adapter / "adapter_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "elsewhere", "file", "link", "merged",
                                                         "trained"]


def test_export_writes_new_or_empty_folders_and_force_replaces_only_an_earlier_export(tiny_ckpt, tmp_path):
    ckpt = tiny_ckpt("qwen2_vl")
    adapter = make_adapter(ckpt, tmp_path / "adapter")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export(ckpt, adapter, empty) / "model.safetensors").is_file()
    assert folders.owner_of(empty) == folders.EXPORT  # marked: a later --force may replace it

    out = export(ckpt, adapter, tmp_path / "merged")
    assert folders.owner_of(out) == folders.EXPORT
    (out / "added.txt").write_text("inside vlmtune's export")
    with pytest.raises(VlmtuneError) as e:
        export(ckpt, adapter, out)
    assert str(e.value) == (f"--out {out} holds an earlier export; set --out to a new directory, or pass --force to "
                            "replace it (vlmtune made it, so it may)")
    assert (out / "added.txt").is_file()
    export(ckpt, adapter, out, force=True)
    assert not (out / "added.txt").exists() and (out / "model.safetensors").is_file()
    assert folders.owner_of(out) == folders.EXPORT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "empty", "merged"]  # no temp or old folder left


def test_export_checks_the_folder_again_before_the_swap(tiny_ckpt, tmp_path, monkeypatch):
    # Something that appears at --out while the model merges is refused at the swap, and the export is discarded.
    import vlmtune.commands.export as ex

    ckpt = tiny_ckpt("qwen2_vl")
    adapter = make_adapter(ckpt, tmp_path / "adapter")
    out = tmp_path / "merged"
    real = ex.check_export

    def meanwhile(folder):
        if not out.exists():
            _user_folder(out)
        return real(folder)
    monkeypatch.setattr(ex, "check_export", meanwhile)
    with pytest.raises(VlmtuneError) as e:
        export(ckpt, adapter, out, force=True)
    assert str(e.value) == _refused(out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]


def test_export_merge_yaml_names_export_dir_when_refused(tiny_ckpt, tmp_path, capsys, monkeypatch):
    ckpt = tiny_ckpt("qwen2_vl")
    out = _user_folder(tmp_path / "mine")
    (tmp_path / "merge.yaml").write_text(f"model_name_or_path: {ckpt}\nexport_dir: {out}\n")
    _no_model_load(monkeypatch)
    assert main(["export", str(tmp_path / "merge.yaml"), "--force"]) == 2
    assert capsys.readouterr().err.endswith(
        f"export_dir={str(out)!r} is a folder with content that vlmtune did not create (it has no .vlmtune-owned); "
        "vlmtune writes into or replaces only folders it created and never deletes or overwrites yours: set "
        "export_dir to a new folder, or empty that one yourself\n")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_export_bad_inputs(tiny_ckpt, tmp_path):
    ckpt = tiny_ckpt("qwen2_vl")
    with pytest.raises(VlmtuneError, match=r"^dtype='float64' is not supported; use one of auto, float32, bfloat16, float16$"):
        export(ckpt, tmp_path, tmp_path / "out", dtype="float64")
    with pytest.raises(VlmtuneError) as e:
        export(ckpt, tmp_path, tmp_path / "out")
    assert str(e.value) == (
        f"adapter {tmp_path} has no adapter_config.json; pass the directory a LoRA training run saved its "
        "adapter to (it holds adapter_config.json and adapter_model.safetensors)"
    )
    missing = tmp_path / "no" / "such" / "adapter"
    with pytest.raises(VlmtuneError, match="^adapter not found: "):
        export(ckpt, missing, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_cli_bfloat16(tiny_ckpt, tmp_path, capsys):
    ckpt = tiny_ckpt("qwen2_vl")
    adapter = make_adapter(ckpt, tmp_path / "adapter")
    out = tmp_path / "merged-bf16"
    argv = ["export", "--model", str(ckpt), "--adapter", str(adapter), "--out", str(out), "--dtype", "bfloat16"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote a merged checkpoint to {out}:\n")
    assert "  model.safetensors  (" in printed and "  processor_config.json  (" in printed
    assert "dtype bfloat16, tie_word_embeddings=True" in printed
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert AutoModelForImageTextToText.from_pretrained(out).dtype == torch.bfloat16

    # A second run refuses; the CLI reports it as an error (exit 2), not a traceback.
    capsys.readouterr()
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"error: --out {out} holds an earlier export; set --out to a new directory, or pass --force to replace it "
        "(vlmtune made it, so it may)\n"
    )


# -- QLoRA (issue 15) ----------------------------------------------------------------------------------------------
def make_qlora_adapter(ckpt, out, bits):
    """A non-trivial LoRA adapter made on the `bits`-bit base, with the vlmtune_config.yaml `train` saves beside it."""
    import yaml

    from vlmtune.config import load_config
    from vlmtune.models.quant import load_kwargs

    cfg = load_config(None, base=dict(model_name_or_path=str(ckpt), dataset="d", output_dir=str(out),
                                      quantization_bit=bits))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32, **load_kwargs(cfg.finetuning, torch.float32))
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **QV))
    peft_model.save_pretrained(out)
    (out / "vlmtune_config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    return out, peft_model


@pytest.mark.parametrize("bits", [4, 8])
def test_export_qlora_adapter_merges_into_the_unquantized_base(bits, tiny_ckpt, tmp_path):
    """The merged checkpoint computes base (loaded unquantized, float32) + adapter to 1e-5; it holds no integer
    weights; and describe_export says what the adapter was merged into."""
    from vlmtune.commands.export import describe_export

    pytest.importorskip("bitsandbytes")
    ckpt = tiny_ckpt("qwen2_vl")
    adapter, qlora = make_qlora_adapter(ckpt, tmp_path / "adapter", bits)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    base = AutoModelForImageTextToText.from_pretrained(ckpt)
    expected = logits(PeftModel.from_pretrained(base, adapter), {"input_ids": ids})

    out = export(ckpt, adapter, tmp_path / "merged")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F32"}
    merged = AutoModelForImageTextToText.from_pretrained(out)
    assert getattr(merged.config, "quantization_config", None) is None
    got = logits(merged, {"input_ids": ids})
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    # ... which is not the quantized model the adapter was trained with: that differs by the quantization error.
    assert (logits(qlora, {"input_ids": ids}) - got).abs().max() > 1e-5
    text = describe_export(out, adapter=adapter)
    assert f"note: the adapter was trained on a {bits}-bit quantized base (quantization_bit={bits})" in text
    assert describe_export(out).count("note:") == 0

@pytest.fixture(scope="module")
def bf16_base(tiny_ckpt, tmp_path_factory):
    """The tiny qwen2_vl checkpoint saved again in bfloat16, as the real Qwen-VL checkpoints are."""
    out = tmp_path_factory.mktemp("bf16-base")
    ckpt = tiny_ckpt("qwen2_vl")
    AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.bfloat16).save_pretrained(out)
    AutoProcessor.from_pretrained(ckpt).save_pretrained(out)
    return out


def test_a_bf16_base_exports_bf16_by_default_without_a_float32_copy(bf16_base, tmp_path, monkeypatch):
    adapter = make_adapter(bf16_base, tmp_path / "adapter")
    loaded = []
    real = AutoModelForImageTextToText.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        loaded.append(kwargs.get("dtype"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", classmethod(spy))
    out = export(bf16_base, adapter, tmp_path / "merged")
    assert loaded == [torch.bfloat16]  # the base was never held in float32
    monkeypatch.undo()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    merged = AutoModelForImageTextToText.from_pretrained(out)
    assert merged.dtype == torch.bfloat16

    # The same weights as merging in float32 and rounding once to bfloat16.
    exact = export(bf16_base, adapter, tmp_path / "merged-f32", dtype="float32")
    reference = AutoModelForImageTextToText.from_pretrained(exact).to(torch.bfloat16).state_dict()
    got = merged.state_dict()
    assert set(got) == set(reference)
    differ = [k for k in got if not torch.equal(got[k], reference[k])]
    assert differ == []


def test_the_export_keeps_the_pixel_bounds_training_used(tiny_ckpt, tmp_path):
    import yaml

    ckpt = tiny_ckpt("qwen2_vl")
    adapter = make_adapter(ckpt, tmp_path / "adapter")
    (adapter / "vlmtune_config.yaml").write_text(yaml.safe_dump({"image_min_pixels": 3136,
                                                                 "image_max_pixels": 50176}))
    out = export(ckpt, adapter, tmp_path / "merged")
    ip = AutoProcessor.from_pretrained(out).image_processor
    assert (ip.size["shortest_edge"], ip.size["longest_edge"]) == (3136, 50176)
    base_ip = AutoProcessor.from_pretrained(ckpt).image_processor
    assert base_ip.size["longest_edge"] != 50176


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])
def test_the_export_keeps_the_video_keys_training_used(tiny_ckpt, tmp_path, arch):
    """So that `vlmtune chat --model merged --video` samples and sizes a clip as training did."""
    import yaml

    from vlmtune.models.video_grid import VideoSpec

    ckpt = tiny_ckpt(arch)
    adapter = make_adapter(ckpt, tmp_path / "adapter")
    (adapter / "vlmtune_config.yaml").write_text(yaml.safe_dump(
        {"video_fps": 1.0, "video_maxlen": 6, "video_min_pixels": 3136, "video_max_pixels": 50176}))
    out = export(ckpt, adapter, tmp_path / "merged")
    exported = VideoSpec.from_processor(AutoProcessor.from_pretrained(out))
    base = VideoSpec.from_processor(AutoProcessor.from_pretrained(ckpt))
    assert (exported.fps, exported.max_frames) == (1.0, 6)
    if arch == "qwen2_vl":  # per-frame bounds: the processor's own
        assert (exported.min_pixels, exported.max_pixels) == (3136, 50176)
    else:  # per-clip bounds: left as the base's
        assert (exported.min_pixels, exported.max_pixels) == (base.min_pixels, base.max_pixels)



# -- LLaMA-Factory's merge YAML (issue 24) ----------------------------------------------------------------------------
def test_export_merge_yaml_exports_and_the_result_loads(tiny_ckpt, tmp_path, capsys, make_image):
    ckpt = tiny_ckpt("qwen2_vl")
    adapter = make_adapter(ckpt, tmp_path / "adapter")
    out = tmp_path / "merged"
    (tmp_path / "merge.yaml").write_text(
        f"### model\nmodel_name_or_path: {ckpt}\nadapter_name_or_path: {adapter}\ntemplate: qwen2_vl\n"
        "trust_remote_code: false\n\n### export\n"
        f"export_dir: {out}\nexport_size: 5\nexport_device: cpu\nexport_legacy_format: false\n")
    assert main(["export", str(tmp_path / "merge.yaml")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("note: ignored template=qwen2_vl: the chat template comes from the checkpoint's "
                              f"processor\nwrote a merged checkpoint to {out}:\n")
    img = make_image(tmp_path / "red.png", 100, 80, (255, 0, 0))
    batch = image_batch(AutoProcessor.from_pretrained(out), img)
    base = AutoModelForImageTextToText.from_pretrained(ckpt)
    expected = logits(PeftModel.from_pretrained(base, adapter), batch)
    got = logits(AutoModelForImageTextToText.from_pretrained(out), batch)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_export_merge_yaml_problems_are_reported_together(tmp_path, capsys):
    (tmp_path / "merge.yaml").write_text("model_name_or_path: m\nexport_legacy_format: true\nexport_size: 0\n"
                                         "export_hub_model_id: me/x\nlearning_rate: 1\n")
    assert main(["export", str(tmp_path / "merge.yaml")]) == 2
    err = capsys.readouterr().err
    assert "learning_rate is not a key of a merge config" in err
    assert "export_dir is required" in err
    assert "export_legacy_format=True is not supported: vlmtune writes safetensors only; remove it" in err
    assert "export_hub_model_id='me/x' is not supported" in err
    assert "export_size=0 is not a positive number of GB" in err


def test_a_full_fine_tune_exports_without_an_adapter(tiny_ckpt, tmp_path, capsys):
    ckpt = tiny_ckpt("qwen2_vl")
    out = tmp_path / "full"
    assert main(["export", "--model", str(ckpt), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"note: no --adapter: {ckpt} is exported as it is (a full fine-tune "
                                              "needs no merge)\nwrote a merged checkpoint to")
    ids = torch.tensor([[1, 2, 3, 4]])
    want = logits(AutoModelForImageTextToText.from_pretrained(ckpt), {"input_ids": ids})
    assert torch.equal(logits(AutoModelForImageTextToText.from_pretrained(out), {"input_ids": ids}), want)
