"""The one table of the Qwen-VL families vlmtune supports: names, transformers classes, versions, tiny sizes.

Everything that lists the families (ModelSpec's check of a loaded config, the tiny checkpoints, the doctor's
version check, the CLI's --arch choices) reads it from here. What a *loaded* checkpoint says (its token ids,
patch and merge sizes, pixel bounds) still comes from its processor and config (models/spec.py); the sizes
below only build the tiny random checkpoints.

Importing this module imports nothing else, so the CLI can build its parser from it without loading
transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Family:
    """One Qwen-VL family: `model_type` is the value of config.json's model_type."""

    model_type: str
    name: str  # as people write it: Qwen2.5-VL
    model_class: str  # transformers class names
    config_class: str
    processor_class: str
    video_processor_class: str
    min_transformers: str  # the transformers release that introduced the family
    # The tiny random checkpoint (models/tiny.py): the family's real patch/merge/temporal sizes and
    # normalisation, a small pixel budget (at most 256 image tokens per image).
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    tiny_min_pixels: int
    tiny_max_pixels: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    chat_template: str  # which of tiny.py's templates: "qwen2_vl" or "qwen3_vl"
    # What FSDP2 shards as one unit (fully_shard per module) and what the doctor looks for in a loaded model:
    # the language model's decoder layer class, then the vision tower's block class.
    wrap_classes: tuple[str, ...] = ()

    @property
    def factor(self) -> int:
        """Sides of a resized image are multiples of this (28 for Qwen2/2.5-VL, 32 for Qwen3-VL)."""
        return self.patch_size * self.merge_size


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            "qwen2_vl", "Qwen2-VL", "Qwen2VLForConditionalGeneration", "Qwen2VLConfig", "Qwen2VLProcessor",
            "Qwen2VLVideoProcessor", "4.45",
            14, 2, 2, 56 * 56, 28 * 28 * 256, _OPENAI_CLIP_MEAN, _OPENAI_CLIP_STD, "qwen2_vl",
            wrap_classes=("Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"),
        ),
        Family(
            "qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig",
            "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor", "4.49",
            14, 2, 2, 56 * 56, 28 * 28 * 256, _OPENAI_CLIP_MEAN, _OPENAI_CLIP_STD, "qwen2_vl",
            wrap_classes=("Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"),
        ),
        Family(
            "qwen3_vl", "Qwen3-VL", "Qwen3VLForConditionalGeneration", "Qwen3VLConfig", "Qwen3VLProcessor",
            "Qwen3VLVideoProcessor", "4.57",
            16, 2, 2, 64 * 64, 32 * 32 * 256, _HALF, _HALF, "qwen3_vl",
            wrap_classes=("Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock"),
        ),
    )
}

MODEL_TYPES: tuple[str, ...] = tuple(FAMILIES)


def family_of(model_type: str | None) -> Family:
    """The family of a config's model_type; ValueError naming the supported ones otherwise."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type={model_type!r} is not a supported Qwen-VL family; vlmtune supports {', '.join(MODEL_TYPES)}"
        )
    return FAMILIES[model_type]


def display_name(model_type: str | None) -> str:
    """Qwen2.5-VL for qwen2_5_vl; an unknown model_type as it is."""
    return FAMILIES[model_type].name if model_type in FAMILIES else str(model_type)
