"""Header-only image sizes and the pixel-budget arithmetic of the Qwen-VL image processor.

Nothing here decodes pixels: `PIL.Image.open` reads the header lazily, which is what makes
accounting for a whole dataset cheap. The arithmetic mirrors transformers' `smart_resize`
(property-tested against the real processor in tests/data/test_images.py).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from PIL import Image

MAX_ASPECT_RATIO = 200
# EXIF orientations that rotate by 90/270 degrees: the processor sees the image transposed.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


class ImageSizeError(ValueError):
    """The processor would reject this image size (aspect ratio or degenerate size)."""


@dataclass(frozen=True)
class ImageHeader:
    width: int
    height: int
    format: str | None


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


def read_header(path: str) -> ImageHeader:
    """Width and height as the processor will see them (EXIF rotation applied), without decoding.

    Raises OSError / PIL.UnidentifiedImageError for files Pillow cannot identify.
    """
    with Image.open(path) as im:
        width, height = _stored_size(im)
        fmt = im.format
        orientation = _exif_orientation(im)
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return ImageHeader(width=width, height=height, format=fmt)


def _stored_size(im: Image.Image) -> tuple[int, int]:
    """The size as stored in the file, before any EXIF rotation.

    Recent Pillow (13.0 here) reports a TIFF's size already rotated by its Orientation tag (and
    rotates the pixels on load), so for TIFF the stored size comes from the IFD, not `im.size`.
    """
    if im.format == "TIFF":
        tags = getattr(im, "tag_v2", None)
        width, height = (tags.get(256), tags.get(257)) if tags is not None else (None, None)
        if isinstance(width, int) and isinstance(height, int):
            return width, height
    return im.size


def _exif_orientation(im: Image.Image) -> int | None:
    try:
        if im.format == "PNG" and "exif" not in im.info and not _png_exif_after_idat(im):
            # PngImageFile.getexif() decodes the whole image (load()) whenever the header had no
            # eXIf chunk, only to look for metadata after the pixel data. With none there (checked
            # above by walking the chunk headers), the base method reads the same metadata the
            # header already gave (EXIF text chunks, XMP) and returns exactly what it would.
            return Image.Image.getexif(im).get(_EXIF_ORIENTATION)
        return im.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # a broken EXIF block must not hide an otherwise readable image
        return None


# Text-chunk keywords that Pillow turns into EXIF or XMP (which can hold tiff:Orientation).
_PNG_EXIF_KEYWORDS = (b"exif", b"Raw profile type exif", b"XML:com.adobe.xmp")
_PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")


def _png_exif_after_idat(im: Image.Image) -> bool:
    """Whether a PNG has EXIF/XMP metadata after its first IDAT chunk (Pillow sees it only on load).

    Walks the chunk headers (8 bytes each, seeking over the data) without decompressing anything.
    Answers True when unsure (an unreadable file), so that the caller takes Pillow's own path.
    """
    fp = im.fp
    if fp is None:
        return True
    try:
        pos, seen_idat = 8, False
        while True:
            fp.seek(pos)
            head = fp.read(8)
            if len(head) < 8:
                return False  # truncated: what load() would find is not there either
            length, ctype = struct.unpack(">I4s", head)
            if ctype == b"IEND":
                return False
            if ctype == b"IDAT":
                seen_idat = True
            elif seen_idat:
                if ctype == b"eXIf":
                    return True
                if ctype in _PNG_TEXT_CHUNKS and fp.read(min(length, 80)).split(b"\0", 1)[0] in _PNG_EXIF_KEYWORDS:
                    return True
            pos += 12 + length
    except Exception:
        return True


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


def grid_for(height: int, width: int, patch_size: int, merge_size: int, min_pixels: int, max_pixels: int) -> Grid:
    """The grid (t, h, w) in patches and the number of `<|image_pad|>` tokens for one image."""
    rh, rw = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    gh, gw = rh // patch_size, rw // patch_size
    return Grid(height=rh, width=rw, t=1, h=gh, w=gw, tokens=gh * gw // (merge_size * merge_size))


def image_tokens(height: int, width: int, patch_size: int, merge_size: int, min_pixels: int, max_pixels: int) -> int:
    return grid_for(height, width, patch_size, merge_size, min_pixels, max_pixels).tokens
