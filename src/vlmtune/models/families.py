"""The one table of the Qwen-VL families vlmtune supports: names, transformers classes, versions, tiny sizes.

Everything that lists the families (ModelSpec's check of a loaded config, the tiny checkpoints, the doctor's
version check, the CLI's --arch choices) reads it from here. What a *loaded* checkpoint says (its token ids,
patch and merge sizes, pixel bounds) still comes from its processor and config (models/spec.py); the sizes
below only build the tiny random checkpoints.

Importing this module imports nothing but vlmtune.errors, so the CLI can build its parser from it without
loading transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import VlmtuneError

_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Experts:
    """Where a mixture-of-experts family keeps its experts and routers, as transformers names them inside each
    decoder layer's `mlp` block (models/load.py reads these; nothing else spells the names)."""

    # The experts' weights, each one 3-D tensor [experts, out, in] (not an nn.Linear per expert): LoRA reaches them
    # through PEFT's target_parameters, and bitsandbytes, which quantizes nn.Linear layers, leaves them as they are.
    fused: tuple[str, ...] = ("experts.gate_up_proj", "experts.down_proj")
    # The modules that route tokens (a top-k softmax router) or gate a shared expert: frozen unless freeze_router
    # is false, and never LoRA targets of lora_target: all.
    routers: tuple[str, ...] = ("gate",)
    block: str = "mlp"  # the decoder layer's attribute that holds the experts and the routers


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
    chat_template: str  # which of tiny_tokenizer.CHAT_TEMPLATES: "qwen2_vl", "qwen3_vl" or "qwen3_5" (thinking blocks)
    tokenizer_class: str = "Qwen2Tokenizer"
    # Traits: how the family differs, for the code that must know (instead of comparing model_type strings).
    # Its video processor writes each video as one run per temporal patch, after a `<T seconds>` timestamp
    # (the Qwen3-VL video processor); otherwise a video is one run.
    video_timestamps: bool = False
    # Its M-RoPE time axis of a video is absolute (second_per_grid_ts × tokens_per_second: Qwen2.5-VL).
    video_absolute_time: bool = False
    # Some of its decoder layers are gated-delta linear attention with a causal conv1d (Qwen3.5): recurrent and
    # convolution state that packing must keep inside each sample (models/hybrid.py).
    linear_attention: bool = False
    # Its MLPs are mixtures of experts with a router: where its experts and routers are (None: dense MLPs).
    experts: Experts | None = None
    # What FSDP2 shards as one unit (fully_shard per module) and what the doctor looks for in a loaded model:
    # the language model's decoder layer class, then the vision tower's block class.
    wrap_classes: tuple[str, ...] = ()

    @property
    def moe(self) -> bool:
        """Its MLPs are mixtures of experts with a router."""
        return self.experts is not None

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
            video_absolute_time=True, wrap_classes=("Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"),
        ),
        Family(
            "qwen3_vl", "Qwen3-VL", "Qwen3VLForConditionalGeneration", "Qwen3VLConfig", "Qwen3VLProcessor",
            "Qwen3VLVideoProcessor", "4.57",
            16, 2, 2, 64 * 64, 32 * 32 * 256, _HALF, _HALF, "qwen3_vl", video_timestamps=True,
            wrap_classes=("Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock"),
        ),
        Family(
            "qwen3_vl_moe", "Qwen3-VL-MoE", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeConfig",
            "Qwen3VLProcessor", "Qwen3VLVideoProcessor", "4.57",
            16, 2, 2, 64 * 64, 32 * 32 * 256, _HALF, _HALF, "qwen3_vl", video_timestamps=True,
            experts=Experts(),
            wrap_classes=("Qwen3VLMoeTextDecoderLayer", "Qwen3VLMoeVisionBlock"),
        ),
        Family(
            "qwen3_5", "Qwen3.5", "Qwen3_5ForConditionalGeneration", "Qwen3_5Config", "Qwen3VLProcessor",
            "Qwen3VLVideoProcessor", "5.2",
            16, 2, 2, 64 * 64, 32 * 32 * 256, _HALF, _HALF, "qwen3_5", tokenizer_class="Qwen3_5Tokenizer",
            video_timestamps=True, linear_attention=True, wrap_classes=("Qwen3_5DecoderLayer", "Qwen3_5VisionBlock"),
        ),
        Family(
            "qwen3_5_moe", "Qwen3.5-MoE", "Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeConfig",
            "Qwen3VLProcessor", "Qwen3VLVideoProcessor", "5.2",
            16, 2, 2, 64 * 64, 32 * 32 * 256, _HALF, _HALF, "qwen3_5", tokenizer_class="Qwen3_5Tokenizer",
            video_timestamps=True, linear_attention=True, experts=Experts(routers=("gate", "shared_expert_gate")),
            wrap_classes=("Qwen3_5MoeDecoderLayer", "Qwen3_5MoeVisionBlock"),
        ),
    )
}

MODEL_TYPES: tuple[str, ...] = tuple(FAMILIES)


class UnsupportedFamily(VlmtuneError, ValueError):
    """A checkpoint whose model_type is not in the table: one line that names the supported families."""


def supported() -> str:
    """The supported families as a user reads them: "Qwen2-VL (qwen2_vl), ..."."""
    return ", ".join(f"{f.name} ({t})" for t, f in FAMILIES.items())


def family_of(model_type: str | None) -> Family:
    """The family of a config's model_type; UnsupportedFamily naming the supported ones otherwise."""
    if model_type not in FAMILIES:
        raise UnsupportedFamily(
            f"model_type={model_type!r} is not a supported Qwen-VL family; vlmtune supports {supported()}"
        )
    return FAMILIES[model_type]


def experts_of(model_type: str | None) -> Experts | None:
    """The experts of a MoE family; None for a dense family or a model_type vlmtune does not know."""
    family = FAMILIES.get(model_type)
    return family.experts if family is not None else None


def display_name(model_type: str | None) -> str:
    """Qwen2.5-VL for qwen2_5_vl; an unknown model_type as it is."""
    return FAMILIES[model_type].name if model_type in FAMILIES else str(model_type)
