"""Tiny random Qwen-VL checkpoints, built locally in a few seconds.

The tests, the CI and the demo run where there is no model hub and no GPU, yet the code under
test must meet the *real* transformers classes: the real processor (its resizing, its
placeholder expansion, its ``mm_token_type_ids``), the real chat template semantics, the real
``*ForConditionalGeneration`` module tree (the LoRA target names, the vision tower, the merger)
and the real M-RoPE arithmetic. A mock would drift from all of that, so instead
`build_tiny_checkpoint` writes a directory that loads exactly like a hub checkpoint does::

    AutoProcessor.from_pretrained(out)
    AutoModelForImageTextToText.from_pretrained(out)   # or the family class

with no ``trust_remote_code``. Only the sizes are tiny:

* the tokenizer is a byte-level BPE (Qwen2's pre-tokenizer regex + ByteLevel) trained in-process
  on a small built-in English corpus, with the family's real special tokens added after it
  (models/tiny_tokenizer.py);
* the chat template renders what the family's template renders (written in tiny_tokenizer.py from
  its documented behaviour: ChatML, vision placeholders, the Qwen2-VL default system prompt);
* the image processor has the family's real patch/merge/temporal sizes and mean/std, but a
  small pixel budget (at most 256 image tokens per image) so CPU tests stay fast;
* the model has 2 text layers and 2 vision blocks with hidden sizes of a few dozen, randomly
  initialised from ``seed`` (same seed -> byte-identical safetensors).
"""

from __future__ import annotations

import os
from pathlib import Path

from .families import FAMILIES, MODEL_TYPES
from .tiny_tokenizer import CHAT_TEMPLATES, SPECIAL_TOKENS, build_tokenizer

ARCHS = MODEL_TYPES

# ---------------------------------------------------------------------------------------------
# Family settings.
# ---------------------------------------------------------------------------------------------

TEXT_HIDDEN = 64
TEXT_LAYERS = 2
# Qwen3.5: three gated-delta linear-attention layers, then one full-attention layer (its real 3:1 pattern)
HYBRID_LAYER_TYPES = ("linear_attention", "linear_attention", "linear_attention", "full_attention")
MOE_EXPERTS = 4
MOE_EXPERTS_PER_TOKEN = 2
MOE_INTERMEDIATE = 32
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_INTERMEDIATE = 128
VISION_DIM = 32
VISION_DEPTH = 2
VISION_HEADS = 2


def _family(arch: str) -> dict:
    """The tiny checkpoint's processor settings: the family's real sizes (models/families.py), a small budget."""
    if arch not in FAMILIES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    f = FAMILIES[arch]
    return dict(
        patch_size=f.patch_size,
        merge_size=f.merge_size,
        temporal_patch_size=f.temporal_patch_size,
        min_pixels=f.tiny_min_pixels,
        max_pixels=f.tiny_max_pixels,
        image_mean=list(f.image_mean),
        image_std=list(f.image_std),
        chat_template=CHAT_TEMPLATES[f.chat_template],
        tokenizer_class=f.tokenizer_class,
    )


# ---------------------------------------------------------------------------------------------
# Builders.
# ---------------------------------------------------------------------------------------------


def build_tiny_checkpoint(out_dir, arch: str = "qwen2_vl", seed: int = 0, vocab_source: str = "trained") -> Path:
    """Write a tiny random `arch` checkpoint (config, safetensors, processor) into `out_dir`; vocab_source="qwen2"
    gives it the real Qwen2 vocabulary (see build_tokenizer). `out_dir` must be new, empty, or an earlier tiny
    checkpoint (replaced whole); anything else there is refused before any work (config/folders.py)."""
    fam = _family(arch)
    out = Path(out_dir)
    _claim(out)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    tokenizer = build_tokenizer(fam["chat_template"], vocab_source=vocab_source, tokenizer_class=fam["tokenizer_class"])
    processor = _build_processor(arch, fam, tokenizer)
    config = _build_config(arch, fam, tokenizer)
    model_cls = _model_class(arch)

    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        torch.manual_seed(int(seed))
        model = model_cls(config)
    model = model.to(torch.float32).eval()
    model.generation_config.bos_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.eos_token_id = [
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    ]
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _claim(out: Path) -> None:
    from ..config import folders

    folders.check(out, folders.TINY, "OUT")
    folders.remove_marked(out, folders.TINY)  # an earlier tiny checkpoint: random weights, rebuilt from the seed
    folders.claim(out, folders.TINY)


def _model_class(arch: str):
    import transformers

    return getattr(transformers, FAMILIES[arch].model_class)


def _build_processor(arch: str, fam: dict, tokenizer):
    import transformers

    size = {"shortest_edge": fam["min_pixels"], "longest_edge": fam["max_pixels"]}
    common = dict(
        patch_size=fam["patch_size"],
        merge_size=fam["merge_size"],
        temporal_patch_size=fam["temporal_patch_size"],
        image_mean=fam["image_mean"],
        image_std=fam["image_std"],
    )
    image_processor = transformers.Qwen2VLImageProcessor(size=size, **common)
    # Videos: the same per-frame budget; a handful of frames at most.
    video_size = {"shortest_edge": fam["min_pixels"], "longest_edge": fam["max_pixels"] * 4}
    family = FAMILIES[arch]
    video_processor = getattr(transformers, family.video_processor_class)(size=video_size, max_frames=8, **common)
    return getattr(transformers, family.processor_class)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=fam["chat_template"],
    )


def _vocab_size(tokenizer) -> int:
    n = len(tokenizer)
    return (n + 63) // 64 * 64


def _build_config(arch: str, fam: dict, tokenizer):
    import transformers

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    token_ids = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    text = dict(
        vocab_size=_vocab_size(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_INTERMEDIATE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        tie_word_embeddings=True,
    )
    head_dim = TEXT_HIDDEN // TEXT_HEADS  # 16: 8 rotary frequencies
    vision_common = dict(
        depth=VISION_DEPTH,
        num_heads=VISION_HEADS,
        in_channels=3,
        patch_size=fam["patch_size"],
        spatial_merge_size=fam["merge_size"],
        temporal_patch_size=fam["temporal_patch_size"],
    )
    if arch == "qwen2_vl":
        # Qwen2-VL splits the 8 frequencies t/h/w as [2, 3, 3] (the real [16, 24, 24] scaled down).
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}
        vision = dict(vision_common, embed_dim=VISION_DIM, hidden_size=TEXT_HIDDEN, mlp_ratio=4, hidden_act="quick_gelu")
    elif arch == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}
        vision = dict(
            vision_common,
            hidden_size=VISION_DIM,
            intermediate_size=2 * VISION_DIM,
            out_hidden_size=TEXT_HIDDEN,
            hidden_act="silu",
            window_size=112,
            fullatt_block_indexes=[VISION_DEPTH - 1],
            tokens_per_second=2,
        )
    elif FAMILIES[arch].linear_attention:
        vision = _qwen3_5_sizes(arch, text, vision_common)
    else:
        # Qwen3-VL interleaves t/h/w over the frequencies; [4, 2, 2] is the real [24, 20, 20] scaled down.
        text["head_dim"] = head_dim
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        }
        vision = dict(_qwen3_vision(vision_common), deepstack_visual_indexes=[0])
        if FAMILIES[arch].moe:
            text.update(_moe_sizes(), decoder_sparse_step=1, mlp_only_layers=[])
    rope = text["rope_parameters"]
    assert sum(rope["mrope_section"]) * 2 == int(text.get("head_dim", head_dim) * rope.get("partial_rotary_factor", 1))
    cfg_cls = getattr(transformers, FAMILIES[arch].config_class)
    return cfg_cls(text_config=text, vision_config=vision, tie_word_embeddings=True, **token_ids)


def _moe_sizes() -> dict:
    """A few small experts, two of them active per token."""
    return dict(num_experts=MOE_EXPERTS, num_experts_per_tok=MOE_EXPERTS_PER_TOKEN,
                moe_intermediate_size=MOE_INTERMEDIATE)


def _qwen3_vision(vision_common: dict) -> dict:
    """Qwen3-VL's vision tower (Qwen3.5 has the same, without deepstack)."""
    return dict(
        vision_common,
        hidden_size=VISION_DIM,
        intermediate_size=2 * VISION_DIM,
        out_hidden_size=TEXT_HIDDEN,
        hidden_act="gelu_pytorch_tanh",
        num_position_embeddings=64,  # an 8x8 learned grid, resampled to each image's grid
    )


def _qwen3_5_sizes(arch: str, text: dict, vision_common: dict) -> dict:
    """Qwen3.5 (and Qwen3.5-MoE): hybrid layers, gated attention with partial rotary (set into `text`); returns
    its vision config, Qwen3-VL's without deepstack."""
    # Full-attention layers rotate a quarter of each 32-dim head (8 dims, 4 frequencies), interleaved t/h/w as
    # [2, 1, 1] (the real [11, 11, 10] over 32 frequencies, scaled down).
    text.update(
        head_dim=32,
        layer_types=list(HYBRID_LAYER_TYPES),
        num_hidden_layers=len(HYBRID_LAYER_TYPES),
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,  # as in the real ones, two value heads per key head
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
    )
    if FAMILIES[arch].moe:
        text.update(_moe_sizes(), shared_expert_intermediate_size=MOE_INTERMEDIATE)
    return _qwen3_vision(vision_common)
