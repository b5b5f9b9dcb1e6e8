"""Merge a LoRA adapter into its base model and save a standalone checkpoint.

The result loads with ``AutoProcessor.from_pretrained(out)`` and
``AutoModelForImageTextToText.from_pretrained(out)``, with no peft and no adapter: the weights
(safetensors only), config.json, generation_config.json and the base model's processor.

The result keeps the base checkpoint's dtype unless `dtype` says otherwise. When it is the base's
dtype, the base is loaded in it and the merge runs there: PEFT adds each float32 LoRA delta into the
16-bit weight in one rounding, which gives the same weights as merging in float32 and casting, without
a full-precision copy of the model (a 2B bf16 base: 4.4 GB instead of 8.8 GB). Another dtype loads the
base in float32, merges exactly and casts for saving. It is written into a temporary directory next to
`out` and moved into place only once it is complete and checked, so a failed export never leaves half
a checkpoint.

An adapter trained on a 4/8-bit base (QLoRA) merges into the base's original, unquantized weights:
merging into quantized weights would round the adapter away and save integers. A base checkpoint saved
quantized is dequantized first.

The processor is the base model's, with the pixel bounds (image_min_pixels / image_max_pixels) and the
video keys (video_fps, video_maxlen; video_min/max_pixels where the video processor reads them per frame)
the training run used where the adapter directory holds its vlmtune_config.yaml, so that the merged model
sees images and clips as it was trained on them.

Tied embeddings (the Qwen-VL 2B/4B checkpoints tie lm_head to embed_tokens): merging a LoRA on
lm_head (or embed_tokens) into a tied weight would change both layers, so the embeddings are
untied before the merge and tied again afterwards only if they are still equal. An adapter that
changed one of them yields a checkpoint with ``tie_word_embeddings=False`` and both matrices.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..config.folders import EXPORT, MARKER_FILE, check, is_marked, mark, named, remove_marked
from ..errors import VlmtuneError
from ..models.load import check_adapter, check_model, load_processor

DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: the base checkpoint's dtype

# Files processor.save_pretrained writes; at least one must be present in an export.
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _check_out(out: Path, force: bool, sources: list[str], key: str = "--out") -> None:
    """Refuse, before the model loads, an `out` that export may not write: the model, an adapter or the working
    folder (or a folder holding one), anything vlmtune did not create as an export (a user's folder is never
    replaced, --force or not), or an earlier export without --force."""
    resolved = out.resolve()
    protected = [Path.cwd().resolve()]
    protected += [Path(s).expanduser().resolve() for s in sources if Path(s).expanduser().exists()]
    for p in protected:
        if resolved == p or resolved in p.parents:
            raise VlmtuneError(
                f"{named(key, out)} is or contains {p}, which would be deleted on overwrite; "
                f"set {key} to a new directory for the merged checkpoint"
            )
    check(out, EXPORT, key)
    if is_marked(out, EXPORT) and not force:
        raise VlmtuneError(f"{named(key, out)} holds an earlier export; set {key} to a new directory, or pass "
                           "--force to replace it (vlmtune made it, so it may)")


def _swap_in(tmp: Path, out: Path, key: str) -> None:
    """Put the finished export at `out`: the rename is the commit point; what was there (an earlier export or an
    empty folder, checked again in case something appeared while merging) is removed only after."""
    check(out, EXPORT, key)
    old = tmp.with_name(tmp.name + ".old")
    if os.path.lexists(out):
        os.replace(out, old)
    os.replace(tmp, out)
    remove_marked(old, EXPORT)


def _set_tied(config, tied: bool) -> None:
    """Set tie_word_embeddings on the config and its text sub-config (both are read on load)."""
    config.tie_word_embeddings = tied
    text = getattr(config, "text_config", None)
    if text is not None and hasattr(text, "tie_word_embeddings"):
        text.tie_word_embeddings = tied


def _embeddings(model):
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb_in = get_in() if get_in else None
    emb_out = get_out() if get_out else None
    if emb_in is None or emb_out is None:
        return None, None
    return emb_in, emb_out


def untie_embeddings(model) -> bool:
    """Give lm_head its own copy of a tied embedding matrix; True if they were tied."""
    import torch

    emb_in, emb_out = _embeddings(model)
    if emb_in is None or emb_out.weight.data_ptr() != emb_in.weight.data_ptr():
        return False
    emb_out.weight = torch.nn.Parameter(emb_in.weight.detach().clone(), requires_grad=emb_in.weight.requires_grad)
    _set_tied(model.config, False)
    return True


def retie_if_equal(model) -> bool:
    """Tie lm_head to the input embeddings again if their values are still identical."""
    import torch

    emb_in, emb_out = _embeddings(model)
    if emb_in is None:
        return False
    if emb_out.weight.shape == emb_in.weight.shape and torch.equal(emb_out.weight, emb_in.weight):
        emb_out.weight = emb_in.weight
        _set_tied(model.config, True)
        return True
    _set_tied(model.config, False)
    return False


def check_export(out) -> list[Path]:
    """The files of an exported checkpoint; VlmtuneError if it is not a clean safetensors export."""
    from safetensors import safe_open

    out = Path(out)
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != MARKER_FILE)  # the marker is not the model's
    names = [p.name for p in files]
    tensors = [p for p in files if p.suffix == ".safetensors"]
    bins = [p.name for p in files if p.suffix == ".bin"]
    problems = []
    if not tensors:
        problems.append("no *.safetensors weights")
    if bins:
        problems.append(f"pickle weights ({', '.join(bins)})")
    if "config.json" not in names:
        problems.append("no config.json")
    if not any(n in names for n in _PROCESSOR_FILES):
        problems.append("no processor config")
    for p in tensors:
        with safe_open(str(p), "pt") as f:
            leftovers = [k for k in f.keys() if "lora_" in k or ".base_layer." in k or "modules_to_save" in k]
        if leftovers:
            problems.append(f"adapter tensors left in {p.name} (e.g. {leftovers[0]})")
    if problems:
        raise VlmtuneError(f"the export in {out} is incomplete: {'; '.join(problems)}; this is a bug, please report it")
    return files


def stored_dtype(config) -> str:
    """The dtype a checkpoint's config.json records for its weights (float32 when it records none)."""
    import torch

    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, torch.dtype):
        d = str(d).removeprefix("torch.")
    return d if d in DTYPES[1:] else "float32"


_TRAINING_KEYS = ("image_min_pixels", "image_max_pixels", "video_min_pixels", "video_max_pixels", "video_fps",
                  "video_maxlen")


def training_pixel_bounds(adapter) -> dict[str, float]:
    """The image and video keys the training run set (pixel bounds, video_fps, video_maxlen), from the adapter's
    vlmtune_config.yaml."""
    import yaml

    path = Path(adapter) / "vlmtune_config.yaml"
    if not path.is_file():
        return {}
    try:
        keys = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise VlmtuneError(f"cannot read {path}: {e}; fix or remove it (it only carries the training run's "
                           "pixel bounds into the export)") from e
    return {k: (float if k == "video_fps" else int)(keys[k]) for k in _TRAINING_KEYS if keys.get(k) is not None}


def apply_pixel_bounds(processor, bounds: dict[str, float]) -> None:
    """Set the image processor's min/max pixels (the `size` dict transformers 5 reads, and the old attributes),
    and the video processor's sampling (fps, max_frames) and, for Qwen2/2.5-VL, per-frame `size`. Qwen3-VL's
    video processor bounds a whole clip, which a per-frame key cannot say without the clip: its `size` is left
    as the base's (training planned each clip at video_max_pixels × its frames; docs/video.md)."""
    if not bounds:
        return
    _apply_video_keys(processor, bounds)
    ip = processor.image_processor
    size = dict(getattr(ip, "size", None) or {})
    if "image_min_pixels" in bounds:
        size["shortest_edge"] = bounds["image_min_pixels"]
        if hasattr(ip, "min_pixels"):
            ip.min_pixels = bounds["image_min_pixels"]
    if "image_max_pixels" in bounds:
        size["longest_edge"] = bounds["image_max_pixels"]
        if hasattr(ip, "max_pixels"):
            ip.max_pixels = bounds["image_max_pixels"]
    ip.size = size


def export(
    model: str,
    adapter: str | list[str] | None,
    out,
    dtype: str = "auto",
    force: bool = False,
    *,
    out_key: str = "--out",
    trust_remote_code: bool = False,
    max_shard_size: str | None = None,
    device: str = "cpu",
) -> Path:
    """Merge `adapter` (or several, in order) into `model` and save a standalone `dtype` checkpoint in `out` (auto:
    the base's dtype). Without an adapter (a full or freeze fine-tune) the checkpoint is written again as a
    standalone export: safetensors in `max_shard_size` shards, with its processor. `out` must be new, empty, or
    (with `force`) an earlier export: vlmtune marks each export and never replaces a folder it did not make;
    `out_key` is how errors name it (--out, or export_dir in a merge YAML)."""
    if dtype not in DTYPES:
        raise VlmtuneError(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    adapters = [str(a) for a in adapter] if isinstance(adapter, (list, tuple)) else [] if adapter is None else [str(adapter)]
    model, out = str(model), Path(out).expanduser()
    check_model(model)
    for a in adapters:
        check_adapter(a)
    _check_out(out, force, [model, *adapters], out_key)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    # The base model's processor (the adapter directory may hold a copy saved by training).
    processor, config = load_processor(model, trust_remote_code=trust_remote_code)
    apply_pixel_bounds(processor, training_pixel_bounds(adapters[-1] if adapters else model))
    stored = stored_dtype(config)
    dtype = stored if dtype == "auto" else dtype
    load_dtype = dtype if dtype == stored else "float32"
    on = "cuda" if device == "auto" and torch.cuda.is_available() else "cpu"
    base = AutoModelForImageTextToText.from_pretrained(model, dtype=getattr(torch, load_dtype), device_map=on,
                                                       trust_remote_code=trust_remote_code, use_safetensors=True)
    from ..models.quant import is_quantized

    if is_quantized(base):  # a checkpoint saved quantized: merge into its dequantized weights, not the integers
        base = base.dequantize().to(getattr(torch, load_dtype))
    was_tied = untie_embeddings(base) if adapters else False
    merged = base
    for a in adapters:  # LLaMA-Factory merges a list of adapters one after the other
        merged = PeftModel.from_pretrained(merged, a, autocast_adapter_dtype=True).merge_and_unload()
    if was_tied:
        retie_if_equal(merged)
    merged = merged.to("cpu").to(getattr(torch, dtype)).eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        mark(tmp, EXPORT)  # the export says vlmtune made it: a later --force may replace it
        merged.save_pretrained(tmp, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
        processor.save_pretrained(tmp)
        check_export(tmp)
        _swap_in(tmp, out, out_key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # mkdtemp made it, under a name of its own
        raise
    return out


def quantized_base_note(adapter, dtype: str = "float32") -> str | None:
    """For an adapter trained on a 4/8-bit base (QLoRA): what export merged it into, and what that means."""
    from ..models.quant import trained_quantization

    bits = trained_quantization(adapter)["quantization_bit"] if adapter is not None else None
    if bits is None:
        return None
    return (f"note: the adapter was trained on a {bits}-bit quantized base (quantization_bit={bits}); it was merged "
            f"into the base's original weights loaded in float32 and saved in {dtype}, never into quantized "
            "weights, so the merged model differs from the training-time model by the base's quantization error "
            "(usually an improvement); quantize the merged checkpoint again to serve it in 4/8 bits")


def describe_export(out, adapter=None) -> str:
    """What an export wrote: one line per file with its size, then the dtype and tying (and, given the adapter,
    a note when it was trained on a quantized base)."""
    import json

    out = Path(out)
    lines = [f"wrote a merged checkpoint to {out}:"]
    for p in check_export(out):
        lines.append(f"  {p.relative_to(out)}  ({_size(p.stat().st_size)})")
    cfg = json.loads((out / "config.json").read_text())
    tied = cfg.get("tie_word_embeddings")
    lines.append(
        f"dtype {cfg.get('dtype')}, tie_word_embeddings={tied}; load it with "
        "AutoModelForImageTextToText.from_pretrained and AutoProcessor.from_pretrained"
    )
    note = quantized_base_note(adapter, str(cfg.get("dtype")))
    if note:
        lines.append(note)
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _apply_video_keys(processor, keys: dict[str, float]) -> None:
    from ..models.video_grid import QWEN2_RULE, VideoSpec

    vp = getattr(processor, "video_processor", None)
    if vp is None or not any(k.startswith("video_") for k in keys):
        return
    if "video_fps" in keys:
        vp.fps = float(keys["video_fps"])
        if getattr(vp, "num_frames", None) is not None:
            vp.num_frames = None  # fps and num_frames are exclusive, as in VideoSpec.with_overrides
    if "video_maxlen" in keys:
        vp.max_frames = int(keys["video_maxlen"])
    try:
        per_frame = VideoSpec.from_processor(processor).rule == QWEN2_RULE
    except ValueError:
        return
    if per_frame:
        size = dict(vp.size or {})
        size.update({edge: int(keys[k]) for k, edge in (("video_min_pixels", "shortest_edge"),
                                                          ("video_max_pixels", "longest_edge")) if k in keys})
        vp.size = size


# LLaMA-Factory's merge YAML (examples/merge_lora/*.yaml): the keys `vlmtune export CONFIG.yaml` reads.
MERGE_KEYS = ("model_name_or_path", "adapter_name_or_path", "template", "finetuning_type", "trust_remote_code",
              "export_dir", "export_size", "export_device", "export_legacy_format", "export_hub_model_id",
              "export_quantization_bit", "cache_dir", "infer_dtype")


def merge_job(path: str) -> tuple[dict, list[str]]:
    """The export's arguments from a LLaMA-Factory merge YAML, and notes; every problem raised together."""
    from ..config import read_yaml
    from ..errors import ConfigError

    raw = read_yaml(path)
    problems, notes = [], []
    for key in raw:
        if key not in MERGE_KEYS:
            problems.append(f"{key} is not a key of a merge config ({path}); it takes " + ", ".join(MERGE_KEYS))
    model, out = raw.get("model_name_or_path"), raw.get("export_dir")
    for key, value in (("model_name_or_path", model), ("export_dir", out)):
        if not isinstance(value, str) or not value:
            problems.append(f"{key} is required in {path}; set it to a path")
    refused = {"export_legacy_format": (False, "vlmtune writes safetensors only"),
               "export_hub_model_id": (None, "vlmtune never uploads; push export_dir with huggingface-cli"),
               "export_quantization_bit": (None, "vlmtune exports unquantized merged weights"),
               "infer_dtype": ("auto", "export keeps the base checkpoint's dtype")}
    for key, (ok, why) in refused.items():
        if raw.get(key, ok) != ok:
            problems.append(f"{key}={raw[key]!r} is not supported: {why}; remove it")
    size = raw.get("export_size", 5)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        problems.append(f"export_size={size!r} is not a positive number of GB; set it such as 5")
    device = raw.get("export_device", "cpu")
    if device not in ("cpu", "auto"):
        problems.append(f"export_device={device!r} is not cpu or auto; set it to cpu or auto")
    adapters = raw.get("adapter_name_or_path")
    kind = raw.get("finetuning_type", "lora")
    if kind not in ("lora", "full", "freeze"):
        problems.append(f"finetuning_type={kind!r} is not lora, full or freeze")
    if problems:
        raise ConfigError(problems)
    if "template" in raw:
        notes.append(f"ignored template={raw['template']}: the chat template comes from the checkpoint's processor")
    adapters = [a.strip() for a in str(adapters).split(",") if a.strip()] if adapters else []
    if not adapters:
        notes.append(f"no adapter_name_or_path: {model} is exported as it is (a {kind} fine-tune needs no merge)")
    return ({"model": model, "adapter": adapters, "out": out, "out_key": "export_dir", "max_shard_size": f"{size}GB",
             "device": device, "trust_remote_code": bool(raw.get("trust_remote_code", False))}, notes)
