"""Header-only image sizes and the pixel-budget arithmetic of the Qwen-VL image processor.

Nothing here decodes pixels: `PIL.Image.open` reads the header lazily, which is what makes
accounting for a whole dataset cheap. Two rare exceptions, both so as to give exactly the size
`transformers.image_utils.load_image` produces: a PNG with EXIF/XMP after its pixel data, and a
truncated PNG (Pillow finds out about either only by decoding). Most JPEGs take a faster path
still: a port of the part of Pillow's JPEG header parser that finds the size and the EXIF/XMP
orientation, which leaves the file to Pillow at anything it does not reproduce exactly. The
arithmetic mirrors transformers' `smart_resize` (property-tested against the real processor in
tests/data/media/test_images.py).
"""

from __future__ import annotations

import io
import os
import re
import struct
from dataclasses import dataclass
from typing import Union

from PIL import Image, ImageOps

# EXIF orientations that rotate by 90/270 degrees: the processor sees the image transposed.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageHeader:
    width: int
    height: int
    format: str | None


# An image to open: a file path or its bytes (an embedded `datasets.Image` value, a `data:` URI).
Source = Union[str, bytes, memoryview]


class _ViewFile(io.RawIOBase):
    """A file over a memoryview that copies only what is read: io.BytesIO would copy (and so page in) the
    whole image, and pyarrow's BufferReader refuses the seeks past the end that Pillow's format probes make."""

    def __init__(self, view: memoryview):
        super().__init__()
        self._view, self._pos = view.cast("B"), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        chunk = self._view[self._pos:self._pos + len(b)]
        n = len(chunk)
        b[:n] = chunk
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        if base + offset < 0:
            raise OSError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


def fileobj(source: Source):
    if isinstance(source, memoryview):  # a view into a memory-mapped table: read in place
        return io.BufferedReader(_ViewFile(source), buffer_size=4096)
    return io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source


def read_header(source: Source) -> ImageHeader:
    """Width and height as the processor will see them (EXIF rotation applied), without decoding.

    `source` is a path or the file's bytes (the same answer for both). Raises OSError /
    PIL.UnidentifiedImageError for files Pillow cannot identify.
    """
    header = _jpeg_header(source)
    if header is not None:
        return header
    return _pillow_header(source)


def _pillow_header(source: Source) -> ImageHeader:
    """read_header through Pillow: any format, every corner case (the reference for the fast path)."""
    with Image.open(fileobj(source)) as im:
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

    Walks the chunk headers (8 bytes each, skipping over the data) without decompressing anything.
    Answers True when unsure (an unreadable file), so that the caller takes Pillow's own path.
    """
    fp = im.fp
    if fp is None:
        return True
    try:
        read_at = _reader_at(fp)
        pos, seen_idat = 8, False
        while True:
            head = read_at(pos, 8)
            if len(head) < 8:
                return True  # truncated: load() fails, and Pillow's path says what that means
            length, ctype = struct.unpack(">I4s", head)
            if ctype == b"IEND":
                return False
            if ctype == b"IDAT":
                seen_idat = True
            elif seen_idat:
                if ctype == b"eXIf":
                    return True
                if ctype in _PNG_TEXT_CHUNKS and read_at(pos + 8, min(length, 80)).split(b"\0", 1)[0] in _PNG_EXIF_KEYWORDS:
                    return True
            pos += 12 + length
    except Exception:
        return True


def _reader_at(fp):
    """`read_at(offset, n)`: n bytes at offset, one pread(2) where there is one (no buffer refills)."""
    if hasattr(os, "pread"):
        try:
            fd = fp.fileno()
        except (AttributeError, OSError, ValueError):
            fd = None
        if fd is not None:
            return lambda offset, n: os.pread(fd, n, offset)

    def read_at(offset, n):
        fp.seek(offset)
        return fp.read(n)

    return read_at


# ---------------------------------------------------------------------------------------------
# The JPEG fast path: Pillow's `JpegImageFile._open` marker loop and `Image.getexif`, ported for the
# size and the orientation only. `_NotMirrored` means "not exactly as Pillow would": the caller
# then asks Pillow itself, so every file gives the same header (or error) as `_pillow_header`.


class _NotMirrored(Exception):
    pass


_JPEG_FIRST_READ = 16 * 1024
_JPEG_MAX_READ = 512 * 1024  # headers longer than this (huge EXIF/ICC blocks) are left to Pillow
# Markers Pillow handles with its SOF handler (SOF0-15 but DHT, JPG and DAC; and DHP).
_JPEG_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xDE))
# Markers whose segment Pillow reads and drops: DHT, DAC, SOS, DNL, DRI, EXP and COM.
_JPEG_SKIP = frozenset((0xC4, 0xCC, 0xDA, 0xDC, 0xDD, 0xDF, 0xFE))
_JPEG_SOS = 0xDA
_JPEG_DQT = 0xDB
_XMP_PREFIX = b"http://ns.adobe.com/xap/1.0/\x00"
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')  # Image.getexif's own pattern
_EXIF_RESOLUTION_UNIT = 0x0128
_EXIF_X_RESOLUTION = 0x011A


def _jpeg_header(source: Source) -> ImageHeader | None:
    """The header of a plain JPEG without Pillow, or None to leave the file to Pillow."""
    if not isinstance(source, str):
        if bytes(source[:3]) != b"\xff\xd8\xff":
            return None
        try:
            try:  # the first bytes usually hold the whole header: copy those, not the image
                width, height, orientation = _parse_jpeg(bytes(source[:_JPEG_FIRST_READ]))
            except _NeedMore:
                width, height, orientation = _parse_jpeg(bytes(source[:_JPEG_MAX_READ]))
        except (_NotMirrored, IndexError, ValueError, struct.error):
            return None
        if orientation in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
        return ImageHeader(width=width, height=height, format="JPEG")
    path = source
    try:
        with open(path, "rb", buffering=0) as f:
            data = f.read(_JPEG_FIRST_READ)
            if data[:3] != b"\xff\xd8\xff":
                return None
            try:
                width, height, orientation = _parse_jpeg(data)
            except _NeedMore:
                data += f.read(_JPEG_MAX_READ - len(data))
                width, height, orientation = _parse_jpeg(data)
    except (_NotMirrored, OSError, IndexError, ValueError, struct.error):
        return None
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return ImageHeader(width=width, height=height, format="JPEG")


class _NeedMore(_NotMirrored):
    """The header goes on past the bytes read."""


def _parse_jpeg(data: bytes) -> tuple[int, int, int | None]:
    """(width, height, EXIF orientation) as Pillow finds them, or _NotMirrored."""
    n = len(data)
    pos = 3  # after FF D8 FF: data[2] is the first marker's 0xFF
    lead = True  # the previous byte was a marker's 0xFF
    size = None
    exif = xmp = None
    icc: list[bytes] = []
    while True:
        if pos >= n:
            raise _NeedMore  # (also a file that ends before its scan: Pillow decides)
        b = data[pos]
        pos += 1
        if not lead:  # Pillow skips non-0xFF bytes one at a time
            lead = b == 0xFF
            continue
        if b == 0xFF:  # padding: this 0xFF leads the marker
            continue
        if b == 0x00:  # an escaped 0xFF: skip on
            lead = False
            continue
        if b < 0xC0:
            raise _NotMirrored  # Pillow: "no marker found"
        lead = False
        if b == 0xC8 or 0xD0 <= b <= 0xD9 or 0xF0 <= b <= 0xFD:
            continue  # markers without a handler (JPG, RSTn, SOI, EOI, JPGn): nothing read
        if pos + 2 > n:
            raise _NeedMore
        length = ((data[pos] << 8) | data[pos + 1]) - 2
        pos += 2
        if length < 0:
            raise _NotMirrored
        if pos + length > n:
            raise _NeedMore
        seg = data[pos : pos + length]
        pos += length
        if b in _JPEG_SKIP:
            if b == _JPEG_SOS:
                break
        elif b in _JPEG_SOF:
            # SOF(): size, 8-bit samples, 1/3/4 layers, whole 3-byte component entries, and the
            # ICC fragments gathered so far (it indexes byte 13 of the first one).
            if len(seg) < 6 or seg[0] != 8 or seg[5] not in (1, 3, 4) or (len(seg) - 6) % 3:
                raise _NotMirrored
            if icc:
                if len(min(icc)) < 14:
                    raise _NotMirrored
                icc = []
            size = ((seg[3] << 8) | seg[4], (seg[1] << 8) | seg[2])
        elif b == _JPEG_DQT:
            while seg:
                qt_length = 1 + (1 if seg[0] // 16 == 0 else 2) * 64
                if len(seg) < qt_length:
                    raise _NotMirrored  # Pillow: "bad quantization table marker"
                seg = seg[qt_length:]
        else:  # APP0-APP15
            if b == 0xE0 and seg.startswith(b"JFIF"):
                if len(seg) < 7:
                    raise _NotMirrored
            elif b == 0xE1 and seg.startswith(b"Exif\0\0"):
                if exif is not None:
                    raise _NotMirrored  # Pillow concatenates them
                exif = seg
            elif b == 0xE1 and seg.startswith(_XMP_PREFIX):
                xmp = seg.split(b"\x00", 1)[1]
            elif b == 0xE2 and seg.startswith(b"FPXR\0"):
                pass
            elif b == 0xE2 and seg.startswith(b"ICC_PROFILE\0"):
                icc.append(seg)
            elif b == 0xE2 and seg.startswith(b"MPF\0"):
                raise _NotMirrored  # maybe an MPO
            elif b == 0xED and seg.startswith(b"Photoshop 3.0\x00"):
                raise _NotMirrored
            elif b == 0xEE and seg.startswith(b"Adobe"):
                if len(seg) < 7:
                    raise _NotMirrored
    if size is None or size[0] <= 0 or size[1] <= 0:
        raise _NotMirrored  # Pillow: "not identified by this driver"
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        raise _NotMirrored  # Pillow warns or raises DecompressionBombError
    orientation = _exif_ifd0_orientation(exif) if exif is not None else None
    if orientation is None and xmp:
        m = _XMP_ORIENTATION.search(xmp)
        if m:
            orientation = int(m[2])
    return size[0], size[1], orientation


def _tiff_unit_sizes() -> dict[int, int]:
    from PIL import TiffImagePlugin

    return {typ: unit for typ, (unit, _) in TiffImagePlugin.ImageFileDirectory_v2._load_dispatch.items()}


_TIFF_UNIT_SIZES: dict[int, int] | None = None


def _exif_ifd0_orientation(segment: bytes) -> int | None:
    """The Orientation tag of IFD0 as `Image.Exif` reads it (a SHORT), or None when it has none."""
    global _TIFF_UNIT_SIZES
    if _TIFF_UNIT_SIZES is None:
        _TIFF_UNIT_SIZES = _tiff_unit_sizes()
    tiff = segment[6:]
    if tiff.startswith(b"Exif\0\0"):  # Exif.load strips the prefix up to twice
        tiff = tiff[6:]
    if not tiff:
        return None
    if tiff[:4] == b"II*\x00":
        e = "<"
    elif tiff[:4] == b"MM\x00*":
        e = ">"
    else:
        raise _NotMirrored
    n = len(tiff)
    (offset,) = struct.unpack_from(e + "L", tiff, 4)
    if offset + 2 > n:
        raise _NotMirrored
    (count,) = struct.unpack_from(e + "H", tiff, offset)
    if offset + 2 + 12 * count > n:
        raise _NotMirrored
    orientation = None
    total = 0
    dpi_tags: dict[int, tuple[int, int]] = {}
    for k in range(count):
        p = offset + 2 + 12 * k
        tag, typ, cnt, value_offset = struct.unpack_from(e + "HHLL", tiff, p)
        unit = _TIFF_UNIT_SIZES.get(typ)
        if tag == _EXIF_ORIENTATION:
            if orientation is not None or typ != 3 or cnt != 1:
                raise _NotMirrored
            (orientation,) = struct.unpack_from(e + "H", tiff, p + 8)
            continue
        if unit is not None and cnt * unit > 4:
            # Out-of-range tag data makes Pillow stop reading the IFD (or skip the tag).
            total += cnt * unit
            if value_offset + cnt * unit > n or total > n:
                raise _NotMirrored
        if tag in (_EXIF_RESOLUTION_UNIT, _EXIF_X_RESOLUTION):
            if tag in dpi_tags:
                raise _NotMirrored
            dpi_tags[tag] = (typ, cnt)
    # JpegImageFile._read_dpi_from_exif reads ResolutionUnit and XResolution when the JFIF header
    # has no dpi, and some odd XResolution types (a BYTE, an empty string...) make it raise, so
    # that Pillow cannot open the file at all. Anything but one RATIONAL is left to Pillow.
    if _EXIF_RESOLUTION_UNIT in dpi_tags and dpi_tags.get(_EXIF_X_RESOLUTION, (5, 1)) != (5, 1):
        raise _NotMirrored
    return orientation


_HIGH_DEPTH_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def to_rgb(im: Image.Image) -> Image.Image:
    """One conversion of any decoded image to 8-bit RGB, used for accounting's reference and training.

    EXIF rotation applied; 16-bit (and 32-bit integer) grey scaled to 8 bits, where Pillow's
    convert would clip everything above 255 to white; transparency (alpha, palette or tRNS)
    composited onto white as transformers' `convert_to_rgb` does; CMYK, LAB, ... by Pillow.
    """
    im = ImageOps.exif_transpose(im)
    if im.mode in _HIGH_DEPTH_MODES or im.mode == "F":
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        top = 1.0 if im.mode == "F" and a.size and a.max() <= 1.0 else _HIGH_DEPTH_MODES.get(im.mode, 65535)
        im = Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def check_decodes(source: Source) -> None:
    """Decode the image's pixels as cheaply as its format allows, raising what the decode at training time
    would raise (a PNG whose compressed data is garbage, a truncated file): a JPEG at 1/8 scale (libjpeg's DCT
    scaling still reads every entropy-coded block, so truncation and broken markers are found; the inverse DCT
    shrinks 64-fold), every other format fully (Pillow has no reduced decoding for them)."""
    with Image.open(fileobj(source)) as im:
        if im.format == "JPEG":
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
        im.load()


def open_rgb(source: Source) -> Image.Image:
    """The decoded image as the processor should see it (see `to_rgb`), from a path or bytes.

    Raises OSError / ValueError (PIL.UnidentifiedImageError is an OSError) for unreadable files.
    """
    with Image.open(fileobj(source)) as im:
        im.load()
        return to_rgb(im)
