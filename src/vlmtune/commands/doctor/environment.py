"""The doctor's checks of what the run finds installed and where it runs: library versions and the video
decoder, the CPUs and RAM for the workers, bitsandbytes, the linear-attention kernels, and the distributed
launch (ranks, ddp_timeout, DeepSpeed installed, the dummy vision pass)."""

from __future__ import annotations

from typing import Any

from ...data.media.video import decoder_version
from ...models.families import FAMILIES, display_name
from .context import Context, family, model_type, world_size, worst_batch
from .data import video_problems
from .memory import zero_stage as _zero_stage
from .report import Check, MiB
from .report import mib as _mib
from .report import size_text as _size

# workers: each preprocessing worker loads the tokenizer and image processor; each dataloader worker is a
# fork of the trainer that decodes images and holds its prefetched batches.
PREPROCESS_WORKER_BYTES = 400 * MiB
DATALOADER_WORKER_BYTES = 300 * MiB
DATALOADER_PREFETCH = 2  # torch's default prefetch_factor
WORKER_RAM_WARN_SHARE = 0.5  # warn when the workers would take over half the free RAM; fail over all of it


# distributed: a rank waits this long for the others before the job fails.
DDP_TIMEOUT_WARN_S = 2 * 3600
# Above a day the warning says so; it never fails the run: LLaMA-Factory's examples all set 180000000.
DDP_TIMEOUT_DAY_S = 24 * 3600

# The versions this release was tested with (major.minor); the transformers each family needs is in models/families.py.
TESTED = {"torch": "2.14", "transformers": "5.24", "peft": "0.21", "accelerate": "1.15"}


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _requirements() -> dict[str, Any]:
    """vlmtune's own requirements (from its installed metadata): name -> SpecifierSet."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    try:
        reqs = [Requirement(r) for r in requires("vlmtune") or []]
    except PackageNotFoundError:
        return {}
    return {r.name: r.specifier for r in reqs if r.marker is None}


def check_versions(ctx: Context) -> Check:
    from packaging.version import Version

    fails, warns, shown = [], [], []
    required = _requirements()
    for lib, tested in TESTED.items():
        v = _version(lib)
        if v is None:
            fails.append(f"{lib} is not installed")
            continue
        shown.append(f"{lib} {v}")
        mm = Version(".".join(str(x) for x in Version(v).release[:2]))
        if lib in required and not required[lib].contains(Version(v).base_version):
            fails.append(f"vlmtune requires {lib}{required[lib]}, found {v}")
        elif mm != Version(tested):
            warns.append(f"{lib} {v} is {'older' if mm < Version(tested) else 'newer'} than the tested {tested}")
    decoder, fixes = decoder_version(), []
    if decoder is not None:
        shown.append(f"video decoder {decoder}")
    elif _video_count(ctx):
        fails.append(f"no video decoder (PyAV) installed: the data's {_video_count(ctx)} video(s) cannot be read")
        fixes.append("pip install av (vlmtune[video])")
    else:
        shown.append("no video decoder (PyAV) installed: videos cannot be read (the data has none)")
    kind = model_type(ctx)
    tv = _version("transformers")
    if kind in FAMILIES and tv is not None:
        need = FAMILIES[kind].min_transformers
        if Version(tv) < Version(need):
            fails.append(f"{display_name(kind)} needs transformers >= {need}, found {tv}")
        else:
            shown.append(f"{display_name(kind)} needs transformers >= {need}")
    if tv is not None and Version(tv).major >= 5:
        shown.append("transformers 5 needs mm_token_type_ids with every image batch and vlmtune's collator "
                     "provides it")
    tested = ", ".join(f"{k} {v}" for k, v in TESTED.items())
    message = "; ".join(fails + warns + shown) + f" (tested with {tested})"
    if fails:
        if len(fixes) < len(fails):
            fixes.insert(0, f"pip install the versions tested with: {tested}")
        return Check("versions", "fail", message, "; ".join(fixes))
    if warns:
        return Check("versions", "warn", message, f"if something breaks, install the versions tested with: {tested}")
    return Check("versions", "ok", message)


def _video_count(ctx: Context) -> int:
    """Videos in the data: those accounted, and those the data path could not read for want of a decoder."""
    if ctx.data is None:
        return 0
    return ctx.data.summary.get("videos", 0) + video_problems(ctx)["no_video_decoder"]


def _local_processes(ctx: Context) -> int:
    env = ctx.env
    for key in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        if env.get(key, "").isdigit():
            return max(1, int(env[key]))
    return 1


def check_workers(ctx: Context) -> Check:
    cfg, dev = ctx.cfg, ctx.device
    prep = int(cfg.preprocessing_num_workers or 1)
    loader = int(cfg.dataloader_num_workers)
    procs = _local_processes(ctx)
    loaders = procs * loader
    batch_pixels = _batch_pixel_bytes(ctx)
    loader_bytes = loaders * (DATALOADER_WORKER_BYTES + DATALOADER_PREFETCH * batch_pixels)
    prep_bytes = prep * PREPROCESS_WORKER_BYTES if prep > 1 else 0
    need = max(prep_bytes, loader_bytes)  # preparing ends before training starts
    who = f"{procs} training processes × " if procs > 1 else ""
    facts = (f"preprocessing_num_workers={prep}, {who}dataloader_num_workers={loader}, {dev.cpu_count} CPUs, "
             f"{_size(dev.free_ram)} RAM free; estimated worker memory {_size(need)} (about "
             f"{PREPROCESS_WORKER_BYTES // MiB} MiB per preprocessing worker, {DATALOADER_WORKER_BYTES // MiB} MiB + "
             f"{DATALOADER_PREFETCH} prefetched batches of {_mib(batch_pixels)} pixels per dataloader worker)")
    problems, fixes = [], []
    if prep > dev.cpu_count:
        problems.append(f"preprocessing_num_workers={prep} is more than the {dev.cpu_count} CPUs")
        fixes.append(f"set preprocessing_num_workers to at most {dev.cpu_count}")
    if loaders > dev.cpu_count:
        problems.append(f"{loaders} dataloader workers in all is more than the {dev.cpu_count} CPUs")
        fixes.append(f"set dataloader_num_workers to at most {dev.cpu_count // procs}")
    status = "warn" if problems else "ok"
    if need > dev.free_ram * WORKER_RAM_WARN_SHARE:
        share = "all" if need > dev.free_ram else f"over {WORKER_RAM_WARN_SHARE:.0%} of"
        problems.append(f"the workers would take {share} the free RAM")
        fixes.append("use fewer workers")
        status = "fail" if need > dev.free_ram else "warn"
    if not problems:
        return Check("workers", "ok", facts)
    return Check("workers", status, "; ".join(problems) + f" ({facts})", "; ".join(dict.fromkeys(fixes)))


def _batch_pixel_bytes(ctx: Context) -> int:
    """pixel values (images and videos) of the batch with the most vision tokens: vision tokens × merge² patches
    × 3·t·p² float32."""
    if ctx.loaded is None:
        return 0
    spec = ctx.loaded.spec
    tokens = worst_batch(ctx, ctx.cfg.per_device_train_batch_size)[1]
    return tokens * spec.merge_size**2 * 3 * spec.temporal_patch_size * spec.patch_size**2 * 4


def _installed(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(module) is not None


def check_quantization(ctx: Context) -> Check:
    """bitsandbytes for quantization_bit and its optimizers (commands/doctor/quantization.py)."""
    import torch

    from ...models.quant import bitsandbytes_version
    from .quantization import check_quantization as check

    here = ctx.device.kind == "cpu" or torch.cuda.is_available()  # a made-up GPU cannot be probed from a CPU
    return check(ctx, version=bitsandbytes_version(), zero_stage=_zero_stage(ctx.cfg)[0], probe_here=here)


# transformers#48718: Qwen3.5-9B full fine-tuning on 8 x B200, 1.22 s per step with the gated-delta layers on
# transformers' PyTorch reference vs 0.70 s with flash-linear-attention (the layers took about half the step).
LINEAR_ATTENTION_SLOWDOWN = "1.7x per step (Qwen3.5-9B on B200, transformers#48718: 1.22 s vs 0.70 s)"


def check_linear_attention(ctx: Context) -> Check:
    """Qwen3.5's gated-delta linear-attention layers: the kernels that make them fast on a GPU, and packing."""
    from ...models.hybrid import kernels_installed

    if ctx.loaded is None or not ctx.loaded.spec.linear_attention:
        return Check("linear_attention", "ok", "no linear-attention layers")
    text = getattr(ctx.loaded.config, "text_config", ctx.loaded.config)
    n = sum(t == "linear_attention" for t in getattr(text, "layer_types", None) or ())
    packing = (" packing keeps each sample's recurrent and convolution state to itself "
               "(the kernels get the boundaries; without them each layer runs once per packed sample)."
               if ctx.cfg.packing else "")
    if ctx.device.kind != "cuda":
        return Check("linear_attention", "ok", f"{n} gated-delta linear-attention layers run transformers' PyTorch "
                     f"reference on the {ctx.device.kind} (the kernels need a GPU).{packing}")
    missing = [name for name, ok in kernels_installed().items() if not ok]
    if not missing:
        return Check("linear_attention", "ok", f"{n} gated-delta linear-attention layers run the "
                     f"flash-linear-attention and causal-conv1d kernels.{packing}")
    return Check("linear_attention", "warn",
                 f"{' and '.join(missing)} not installed: the {n} gated-delta linear-attention layers of "
                 f"{family(ctx)} fall back to transformers' PyTorch reference, correct but slower (documented: "
                 f"{LINEAR_ATTENTION_SLOWDOWN}).{packing}",
                 f"pip install {' '.join(missing)} (causal-conv1d compiles against your torch and CUDA)")


def check_distributed(ctx: Context) -> Check:
    cfg, env = ctx.cfg, ctx.env
    world = world_size(ctx)
    launched = world > 1 or "LOCAL_RANK" in env
    if not launched and not cfg.deepspeed and not cfg.fsdp:
        return Check("distributed", "ok", "one process (no WORLD_SIZE > 1, LOCAL_RANK or deepspeed): nothing to "
                     "synchronise")
    notes, fails, warns = [], [], []
    t = cfg.ddp_timeout
    if t > DDP_TIMEOUT_DAY_S:
        warns.append(f"ddp_timeout={t} s lets a stuck rank hang the job for over a day")
    elif t > DDP_TIMEOUT_WARN_S:
        warns.append(f"ddp_timeout={t} s lets a stuck rank hang the job for over {DDP_TIMEOUT_WARN_S // 3600} h")
    else:
        notes.append(f"ddp_timeout={t} s")
    stage, problem = _zero_stage(cfg)
    if problem:
        fails.append(problem)
    if cfg.deepspeed and not problem:
        if not _installed("deepspeed"):
            fails.append(f"deepspeed={cfg.deepspeed!r} is set but DeepSpeed is not installed")
        notes.append(f"DeepSpeed ZeRO stage {stage} (from {cfg.deepspeed})")
        if stage == 3:
            notes.append("ZeRO-3 gathers each module's parameters on every rank, so text-only batches get the "
                         "dummy vision pass too")
    if cfg.deepspeed or cfg.fsdp or ctx.env.get("ACCELERATE_USE_FSDP") or _vision_trains(ctx):
        notes.append("a text-only batch runs the vision tower on one dummy image with weight 0 (VlmTrainer), so "
                     "every rank runs the same modules and no rank waits for gradients that never come")
    else:
        notes.append("the vision tower and projector are frozen, so text-only batches need no dummy vision pass")
    message = f"{world} process(es): " + "; ".join(fails + warns + notes)
    if fails:
        fix = []
        if t > DDP_TIMEOUT_WARN_S:
            fix.append("set ddp_timeout: 1800 (the default) or at most 7200")
        if problem:
            fix.append("set deepspeed to a readable DeepSpeed JSON file, or null")
        if any("not installed" in f for f in fails):
            fix.append("pip install deepspeed, or set deepspeed: null")
        return Check("distributed", "fail", message, "; ".join(fix))
    if warns:
        return Check("distributed", "warn", message, "set ddp_timeout: 1800 (the default) or at most 7200")
    return Check("distributed", "ok", message)


def _vision_trains(ctx: Context) -> bool:
    if ctx.facts is not None:
        return ctx.facts.trainable["vision_tower"] + ctx.facts.trainable["projector"] > 0
    return not (ctx.cfg.freeze_vision_tower and ctx.cfg.freeze_multi_modal_projector)
