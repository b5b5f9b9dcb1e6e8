"""A ModelSpec built in code (no checkpoint) for tests that need only its token ids and pixel rules."""

from __future__ import annotations

from vlmtune.models.spec import ModelSpec


def pixel_spec(min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 256, patch_size: int = 14, merge_size: int = 2,
               model_type: str = "qwen2_vl") -> ModelSpec:
    """Qwen2-VL-like token ids (as tests/data/stages/test_pack.py spells them) with the given pixel rules."""
    return ModelSpec(model_type, "<|image_pad|>", 9, "<|video_pad|>", 10, "<|vision_start|>", 7, "<|vision_end|>", 8,
                     "<|im_start|>", 1, "<|im_end|>", 2, 0, 2, patch_size, merge_size, 2, min_pixels, max_pixels, 100)
