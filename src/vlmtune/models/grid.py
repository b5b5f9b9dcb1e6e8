"""The Qwen-VL processors' resize arithmetic: an image's (height, width) → its resized size, grid and token count.

It mirrors transformers' `smart_resize` (property-tested against the real processors in tests/data/media/test_images.py)
and is the model-side half of header-only accounting: data/media/images.py reads the sizes, this turns them into tokens.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

MAX_ASPECT_RATIO = 200


class ImageSizeError(ValueError):
    """The processor would reject this image size (aspect ratio or degenerate size)."""


@dataclass(frozen=True)
class Grid:
    """The resized size and the vision grid the processor will produce for one image."""

    height: int
    width: int
    t: int
    h: int
    w: int
    tokens: int

    @property
    def thw(self) -> list[int]:
        return [self.t, self.h, self.w]


def check_aspect(height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise ImageSizeError(f"image has a zero size ({width}x{height})")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageSizeError(
            f"aspect ratio {ratio:.1f} ({width}x{height}) is above the processor's limit of {MAX_ASPECT_RATIO}"
        )


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (height, width) the Qwen-VL image processor resizes an image to.

    Both sides become multiples of `factor` (patch_size * merge_size), the area lands within
    [min_pixels, max_pixels] and the aspect ratio is kept as closely as the grid allows.
    """
    check_aspect(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@functools.lru_cache(maxsize=1 << 16, typed=True)  # sizes repeat, and validate + encode both ask
def grid_for(height: int, width: int, patch_size: int, merge_size: int, min_pixels: int, max_pixels: int) -> Grid:
    """The grid (t, h, w) in patches and the number of `<|image_pad|>` tokens for one image."""
    rh, rw = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    gh, gw = rh // patch_size, rw // patch_size
    return Grid(height=rh, width=rw, t=1, h=gh, w=gw, tokens=gh * gw // (merge_size * merge_size))
