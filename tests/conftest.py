"""Shared fixtures: tiny local Qwen-VL checkpoints and test images (no hub, no network)."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Where deepspeed is installed (the `deepspeed` extra), the tiny checkpoints built in-process here import it before
# any command runs: keep its accelerator line off the captured stdout as the CLI does.
logging.getLogger("DeepSpeed").addFilter(__import__("vlmtune.commands.cli", fromlist=["x"]).DEEPSPEED_DETECTION)

_JPEG_SUFFIXES = {".jpg", ".jpeg"}


def _make_image(path, width: int, height: int, color=(255, 0, 0), fmt: str | None = None) -> Path:
    """Write a solid-colour `width` x `height` image to `path` (PNG unless the suffix or `fmt` says JPEG)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt is None:
        fmt = "JPEG" if path.suffix.lower() in _JPEG_SUFFIXES else "PNG"
    fmt = fmt.upper()
    if fmt == "JPG":
        fmt = "JPEG"
    color = tuple(color)
    if fmt == "JPEG" or len(color) == 3:
        mode, color = "RGB", color[:3]
    else:
        mode = "RGBA"
    Image.new(mode, (int(width), int(height)), color).save(path, format=fmt)
    return path


@pytest.fixture(scope="session")
def make_image():
    """`make_image(path, width, height, color=(255, 0, 0), fmt=None) -> Path`."""
    return _make_image


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """`tiny_ckpt(arch="qwen2_vl", seed=0) -> Path`: a tiny random checkpoint, built once per session.

    Treat the directory as read-only (it is shared by every test); copy it to change it.
    """
    from vlmtune.models.tiny import build_tiny_checkpoint

    cache: dict[tuple[str, int], Path] = {}

    def get(arch: str = "qwen2_vl", seed: int = 0) -> Path:
        key = (arch, int(seed))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{arch}-seed{seed}")
            cache[key] = build_tiny_checkpoint(out, arch=arch, seed=seed)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_processor(tiny_ckpt):
    """`tiny_processor(arch="qwen2_vl") -> processor` loaded with AutoProcessor, cached per session.

    Shared: do not mutate it (e.g. its image_processor.size); load a fresh one for that.
    """
    from transformers import AutoProcessor

    cache: dict[str, object] = {}

    def get(arch: str = "qwen2_vl"):
        if arch not in cache:
            cache[arch] = AutoProcessor.from_pretrained(tiny_ckpt(arch))
        return cache[arch]

    return get
