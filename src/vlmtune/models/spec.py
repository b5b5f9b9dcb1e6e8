"""ModelSpec: the one description of a Qwen-VL family that the data path is allowed to know.

It is read from a loaded processor and config, never from a checkpoint's name, so a fine-tuned
checkpoint with a changed pixel budget or a renamed token is described correctly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .families import family_of
from .grid import Grid, grid_for


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    image_token: str
    image_token_id: int
    video_token: str
    video_token_id: int
    vision_start_token: str
    vision_start_token_id: int
    vision_end_token: str
    vision_end_token_id: int
    im_start_token: str
    im_start_token_id: int
    im_end_token: str
    im_end_token_id: int
    pad_token_id: int
    eos_token_id: int
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int
    vocab_size: int

    # The family's traits (models/families.py), for the code that must know how a family differs.
    @property
    def video_timestamps(self) -> bool:
        """A video is one run per temporal patch, each after its `<T seconds>` text (Qwen3-VL video processor)."""
        return family_of(self.model_type).video_timestamps

    @property
    def video_absolute_time(self) -> bool:
        """A video's M-RoPE time axis is absolute: second_per_grid_ts × tokens_per_second (Qwen2.5-VL)."""
        return family_of(self.model_type).video_absolute_time

    @property
    def linear_attention(self) -> bool:
        """Some decoder layers carry recurrent and convolution state (Qwen3.5's gated-delta layers)."""
        return family_of(self.model_type).linear_attention

    @property
    def moe(self) -> bool:
        return family_of(self.model_type).moe

    @property
    def factor(self) -> int:
        """Sides of a resized image are multiples of this (28 for Qwen2/2.5-VL, 32 for Qwen3-VL)."""
        return self.patch_size * self.merge_size

    def grid(self, height: int, width: int, min_pixels: int | None = None, max_pixels: int | None = None) -> Grid:
        """The grid of an image of this size under this spec's (or the given) pixel bounds."""
        return grid_for(
            height,
            width,
            self.patch_size,
            self.merge_size,
            self.min_pixels if min_pixels is None else min_pixels,
            self.max_pixels if max_pixels is None else max_pixels,
        )

    def with_pixels(self, min_pixels: int | None, max_pixels: int | None) -> "ModelSpec":
        return replace(
            self,
            min_pixels=self.min_pixels if min_pixels is None else int(min_pixels),
            max_pixels=self.max_pixels if max_pixels is None else int(max_pixels),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_processor(cls, processor, config) -> "ModelSpec":
        tok = processor.tokenizer
        ip = processor.image_processor
        model_type = family_of(getattr(config, "model_type", None)).model_type
        size = _as_dict(getattr(ip, "size", None))
        min_pixels = size.get("shortest_edge") or getattr(ip, "min_pixels", None)
        max_pixels = size.get("longest_edge") or getattr(ip, "max_pixels", None)

        def tid(token: str) -> int:
            i = tok.convert_tokens_to_ids(token)
            if i is None or i == tok.unk_token_id:
                raise ValueError(f"the tokenizer has no {token!r} token; is this a Qwen-VL checkpoint?")
            return int(i)

        image_token = getattr(processor, "image_token", "<|image_pad|>")
        video_token = getattr(processor, "video_token", "<|video_pad|>")
        text_cfg = getattr(config, "text_config", config)
        eos = tid("<|im_end|>")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tid("<|endoftext|>")
        return cls(
            model_type=model_type,
            image_token=image_token,
            image_token_id=tid(image_token),
            video_token=video_token,
            video_token_id=tid(video_token),
            vision_start_token="<|vision_start|>",
            vision_start_token_id=tid("<|vision_start|>"),
            vision_end_token="<|vision_end|>",
            vision_end_token_id=tid("<|vision_end|>"),
            im_start_token="<|im_start|>",
            im_start_token_id=tid("<|im_start|>"),
            im_end_token="<|im_end|>",
            im_end_token_id=eos,
            pad_token_id=int(pad),
            eos_token_id=eos,
            patch_size=int(ip.patch_size),
            merge_size=int(ip.merge_size),
            temporal_patch_size=int(ip.temporal_patch_size),
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            vocab_size=int(getattr(text_cfg, "vocab_size", len(tok))),
        )


def _as_dict(size) -> dict:
    if size is None:
        return {}
    if isinstance(size, dict):
        return dict(size)
    return {k: getattr(size, k) for k in ("shortest_edge", "longest_edge") if getattr(size, k, None) is not None}
