"""Header-only image accounting == what the real transformers processor does.

Three layers, each checked against transformers itself, for the three families:

1. the pixel-budget arithmetic (`grid_for`, `ModelSpec.grid`): against the processor's own
   `smart_resize` / `get_number_of_image_patches` for thousands of sizes (1 px to 200,000 px sides,
   aspect ratios at exactly 200 and just above, random and realistic pixel bounds), and against
   full processor calls on real pixels (both image-processor backends) for a few hundred sizes;
2. `read_header`: the size `load_image` produces (EXIF/XMP orientation applied) for every common
   format, without ever decoding pixels;
3. `vlmtune inspect`: per-sample token counts == `len(input_ids)` of the real processor on the
   rendered chat, sample by sample, and the exact `--json` summary.
"""

from __future__ import annotations

import io
import json
import math
import random
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, features

from _chat import hf_content
from vlmtune.commands import cli
from vlmtune.data.media import images as images_mod
from vlmtune.data.media.images import open_rgb, read_header
from vlmtune.models.grid import MAX_ASPECT_RATIO, ImageSizeError, grid_for
from vlmtune.models.load import load_spec

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
VISION = "<|vision_start|><|image_pad|><|vision_end|>"

# Pixel bounds people really use, besides the tiny checkpoints' own (at most 256 tokens per image).
REALISTIC_BOUNDS = [
    (56 * 56, 28 * 28 * 1280),  # Qwen2-VL / Qwen2.5-VL preprocessor defaults
    (65536, 16777216),  # Qwen3-VL's preprocessor_config.json
    (32 * 32, 768 * 768),  # LLaMA-Factory's image_min_pixels / image_max_pixels defaults
    (256 * 28 * 28, 1280 * 28 * 28),  # the Qwen2.5-VL model card's recommended range
    (4 * 28 * 28, 16384 * 28 * 28),  # the Qwen2.5-VL model card's widest range
]


@pytest.fixture(scope="module")
def family(tiny_ckpt):
    """`family(arch) -> Loaded`: the tiny checkpoint's own processor, config and ModelSpec."""
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = load_spec(str(tiny_ckpt(arch)))
        return cache[arch]

    return get


def hf_smart_resize(ip):
    """The `smart_resize` of the module that defines the processor's class (its own arithmetic)."""
    return sys.modules[type(ip).__module__].smart_resize


# ---------------------------------------------------------------------------------------------
# Strategies


def aspect_edge(max_short: int):
    """(h, w) with an aspect ratio of exactly 200, or 1 px below / above it, either way round."""

    def build(short, delta, tall):
        long = MAX_ASPECT_RATIO * short + delta
        return (long, short) if tall else (short, long)

    return st.builds(build, st.integers(1, max_short), st.sampled_from([-1, 0, 1]), st.booleans())


def sizes(max_side: int, huge: bool = False):
    side = st.one_of(st.integers(1, max_side), st.integers(max_side // 4, max_side))
    tiny = st.integers(1, 5)
    options = [
        st.tuples(side, side),
        st.tuples(tiny, tiny),
        st.tuples(tiny, side),
        st.tuples(side, tiny),
        aspect_edge(max_side // MAX_ASPECT_RATIO),
    ]
    if huge:
        options += [
            st.tuples(st.integers(max_side, 200_000), st.integers(max_side, 200_000)),
            st.tuples(st.integers(1, 200_000), st.integers(1, 200_000)),
            aspect_edge(1000),
        ]
    return st.one_of(*options)


def bounds(max_min: int, max_max: int):
    """None (the checkpoint's own bounds), a realistic pair, or a random pair (min may exceed max)."""
    return st.one_of(
        st.none(),
        st.sampled_from(REALISTIC_BOUNDS),
        st.tuples(st.integers(1, max_min), st.integers(1, max_max)),
    )


def ours(spec, h, w, bnd):
    """Our grid for one size, or None where we refuse it (ImageSizeError)."""
    try:
        return spec.grid(h, w) if bnd is None else spec.grid(h, w, *bnd)
    except ImageSizeError:
        return None


# ---------------------------------------------------------------------------------------------
# 1. The arithmetic against the processor's own arithmetic (thousands of sizes, any size)


@pytest.mark.parametrize("arch", FAMILIES)
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=sizes(8000, huge=True), bnd=bounds(1 << 22, 1 << 27))
@example(size=(1, 1), bnd=None)
@example(size=(1, 200), bnd=None)
@example(size=(200, 1), bnd=(56 * 56, 28 * 28 * 1280))
@example(size=(1, 201), bnd=None)
@example(size=(201, 1), bnd=(65536, 16777216))
@example(size=(40, 8000), bnd=(65536, 16777216))
@example(size=(40, 8001), bnd=(65536, 16777216))
@example(size=(200_000, 200_000), bnd=(4 * 28 * 28, 16384 * 28 * 28))
def test_grid_matches_processor_arithmetic(arch, family, size, bnd):
    loaded = family(arch)
    spec, ip = loaded.spec, loaded.processor.image_processor
    h, w = size
    assert (spec.min_pixels, spec.max_pixels) == (ip.size["shortest_edge"], ip.size["longest_edge"])
    assert (spec.patch_size, spec.merge_size) == (ip.patch_size, ip.merge_size)
    lo, hi = (spec.min_pixels, spec.max_pixels) if bnd is None else bnd
    kwargs = {} if bnd is None else {"min_pixels": lo, "max_pixels": hi}

    try:
        rh, rw = hf_smart_resize(ip)(h, w, factor=spec.factor, min_pixels=lo, max_pixels=hi)
    except ValueError as e:
        # The processor refuses the size: only for an aspect ratio above 200, and so must we.
        assert max(h, w) / min(h, w) > MAX_ASPECT_RATIO, e
        with pytest.raises(ImageSizeError, match="aspect ratio"):
            spec.grid(h, w, lo, hi)
        with pytest.raises(ImageSizeError):
            grid_for(h, w, spec.patch_size, spec.merge_size, lo, hi)
        with pytest.raises(ValueError, match="aspect ratio"):
            ip.get_number_of_image_patches(h, w, kwargs)
        return

    g = spec.grid(h, w) if bnd is None else spec.grid(h, w, lo, hi)
    assert (g.height, g.width) == (rh, rw)
    assert g.thw == [1, rh // spec.patch_size, rw // spec.patch_size]
    assert g.h * g.w == ip.get_number_of_image_patches(h, w, kwargs)
    assert g.tokens * spec.merge_size**2 == g.h * g.w  # the grid always merges evenly
    # Every way in gives the same grid.
    assert spec.with_pixels(lo, hi).grid(h, w) == g
    assert grid_for(h, w, spec.patch_size, spec.merge_size, lo, hi) == g


# ---------------------------------------------------------------------------------------------
# 1b. Against full processor calls on real pixels (image sides up to 2000 px)


def _solid(h, w, i):
    return Image.new("RGB", (w, h), ((37 * i) % 256, 90, 200))


@pytest.mark.parametrize("arch", FAMILIES)
@settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes_=st.lists(sizes(2000), min_size=1, max_size=3),
    bnd=bounds(1 << 20, 1 << 21),
)
@example(sizes_=[(1, 200), (200, 1), (1, 1)], bnd=None)
@example(sizes_=[(10, 2000), (2000, 2000)], bnd=(56 * 56, 28 * 28 * 1280))
@example(sizes_=[(3, 7), (5, 1000)], bnd=(65536, 16777216))
@example(sizes_=[(1, 201)], bnd=None)
@example(sizes_=[(64, 64), (2001, 10)], bnd=(56 * 56, 28 * 28 * 1280))
def test_grid_matches_real_processor(arch, family, sizes_, bnd):
    """processor(text, images, size=...): image_grid_thw, pixel_values rows and pad tokens."""
    loaded = family(arch)
    spec, proc = loaded.spec, loaded.processor
    images = [_solid(h, w, i) for i, (h, w) in enumerate(sizes_)]
    text = " and ".join(f"Picture {i + 1}: {VISION}" for i in range(len(images)))
    kwargs = {} if bnd is None else {"size": {"shortest_edge": bnd[0], "longest_edge": bnd[1]}}
    grids = [ours(spec, h, w, bnd) for h, w in sizes_]

    if any(g is None for g in grids):
        for (h, w), g in zip(sizes_, grids):
            assert (g is None) == (max(h, w) / min(h, w) > MAX_ASPECT_RATIO)
        with pytest.raises(ValueError, match="aspect ratio"):
            proc(text=[text], images=images, return_tensors="pt", **kwargs)
        return

    out = proc(text=[text], images=images, return_tensors="pt", **kwargs)
    assert out["image_grid_thw"].tolist() == [g.thw for g in grids]
    rows = sum(g.t * g.h * g.w for g in grids)
    assert tuple(out["pixel_values"].shape) == (rows, 3 * spec.temporal_patch_size * spec.patch_size**2)
    assert int((out["input_ids"][0] == spec.image_token_id).sum()) == sum(g.tokens for g in grids)


@pytest.mark.parametrize("arch", FAMILIES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes_=st.lists(sizes(2000), min_size=1, max_size=3), bnd=bounds(1 << 20, 1 << 21))
def test_grid_matches_pil_backend_processor(arch, family, sizes_, bnd):
    """The PIL-backend image processor, built with the family's patch/merge sizes, agrees too."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    spec = family(arch).spec
    ip = Qwen2VLImageProcessorPil(
        patch_size=spec.patch_size,
        merge_size=spec.merge_size,
        temporal_patch_size=spec.temporal_patch_size,
        size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
    )
    images = [_solid(h, w, i) for i, (h, w) in enumerate(sizes_)]
    kwargs = {} if bnd is None else {"size": {"shortest_edge": bnd[0], "longest_edge": bnd[1]}}
    grids = [ours(spec, h, w, bnd) for h, w in sizes_]
    if any(g is None for g in grids):
        with pytest.raises(ValueError, match="aspect ratio"):
            ip(images=images, return_tensors="pt", **kwargs)
        return
    out = ip(images=images, return_tensors="pt", **kwargs)
    assert out["image_grid_thw"].tolist() == [g.thw for g in grids]
    assert out["pixel_values"].shape[0] == sum(g.t * g.h * g.w for g in grids)


def test_refused_sizes_raise_a_value_error():
    assert issubclass(ImageSizeError, ValueError)
    for h, w in [(1, 201), (201, 1), (10, 2001), (3, 1000), (0, 10), (10, 0), (0, 0)]:
        with pytest.raises(ImageSizeError):
            grid_for(h, w, 14, 2, 56 * 56, 28 * 28 * 1280)
    # Exactly 200 is allowed (the processor checks "> 200").
    assert grid_for(1, 200, 14, 2, 56 * 56, 28 * 28 * 1280).thw == [1, 2, 58]
    assert grid_for(2000, 10, 16, 2, 65536, 16777216).thw == [1, 228, 2]


# ---------------------------------------------------------------------------------------------
# 2. read_header: the size load_image produces, without decoding


FORMATS = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("GIF", "gif"), ("BMP", "bmp"), ("TIFF", "tiff")]
if features.check("avif"):
    FORMATS.append(("AVIF", "avif"))


def _noise(w, h, seed=0):
    rnd = random.Random(seed)
    return Image.frombytes("RGB", (w, h), rnd.randbytes(w * h * 3))


@pytest.mark.parametrize("fmt,ext", FORMATS)
def test_read_header_matches_load_image(tmp_path, fmt, ext):
    from transformers.image_utils import load_image

    for w, h in [(1, 1), (37, 23), (640, 480), (23, 999)]:
        path = tmp_path / f"{w}x{h}.{ext}"
        _noise(w, h).save(path, format=fmt)
        hdr = read_header(str(path))
        assert (hdr.width, hdr.height, hdr.format) == (w, h, fmt)
        assert load_image(str(path)).size == (w, h)


def _with_exif_orientation(path, fmt, w, h, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    _noise(w, h).save(path, format=fmt, exif=exif)
    return str(path)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_read_header_applies_jpeg_exif_orientation(tmp_path, orientation, family):
    from transformers.image_utils import load_image

    path = _with_exif_orientation(tmp_path / "o.jpg", "JPEG", 120, 40, orientation)
    hdr = read_header(path)
    expected = (40, 120) if orientation in (5, 6, 7, 8) else (120, 40)
    assert (hdr.width, hdr.height) == expected
    assert images_mod._pillow_header(path) == hdr  # the fast JPEG path and Pillow agree
    im = load_image(path)
    assert im.size == expected
    # And the processor, fed the image as load_image opens it, gives the grid of the header's size.
    loaded = family("qwen2_vl")
    out = loaded.processor.image_processor(images=[im], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [loaded.spec.grid(hdr.height, hdr.width).thw]


@pytest.mark.parametrize("fmt,ext", [f for f in FORMATS if f[0] in ("PNG", "WEBP", "TIFF", "AVIF")])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_read_header_applies_exif_orientation_in_other_formats(tmp_path, fmt, ext, orientation):
    """TIFF matters: Pillow 13 reports its size already rotated (and rotates it on load)."""
    from transformers.image_utils import load_image

    path = _with_exif_orientation(tmp_path / f"o.{ext}", fmt, 90, 30, orientation)
    hdr = read_header(path)
    expected = (90, 30) if orientation == 3 else (30, 90)
    assert (hdr.width, hdr.height) == expected == load_image(path).size


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos < len(data):
        n, tag = struct.unpack(">I4s", data[pos : pos + 8])
        out.append((tag, data[pos + 8 : pos + 8 + n]))
        pos += 12 + n
    return out


def _png_with_tail(path, w, h, tail: list[tuple[bytes, bytes]]) -> str:
    """A PNG with extra chunks after its image data (where Pillow finds them only by decoding)."""
    buf = Path(path)
    _noise(w, h).save(buf, format="PNG")
    chunks = _png_chunks(buf.read_bytes())
    assert chunks[-1][0] == b"IEND"
    body = b"".join(_png_chunk(t, d) for t, d in chunks[:-1] + tail + [chunks[-1]])
    buf.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return str(buf)


def _exif_block(orientation: int) -> bytes:
    """An EXIF block as a PNG eXIf chunk holds it (without the "Exif\\0\\0" prefix)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()[6:]


def _xmp(orientation: int) -> bytes:
    return (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="%d"/>'
        b"</rdf:RDF></x:xmpmeta>" % orientation
    )


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param([(b"eXIf", _exif_block(6))], id="exif-after-idat"),
        pytest.param([(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + _xmp(8))], id="xmp-after-idat"),
        pytest.param([(b"tEXt", b"Comment\x00nothing to see")], id="text-after-idat"),
        pytest.param([], id="no-tail"),
    ],
)
def test_png_metadata_after_the_image_data(tmp_path, tail):
    """Pillow reads PNG chunks after IDAT only on load(); load_image sees them, so must we."""
    from transformers.image_utils import load_image

    path = _png_with_tail(tmp_path / "tail.png", 100, 20, tail)
    hdr = read_header(path)
    assert (hdr.width, hdr.height) == load_image(path).size
    rotated = any(t in (b"eXIf", b"iTXt") for t, _ in tail)
    assert (hdr.width, hdr.height) == ((20, 100) if rotated else (100, 20))


def test_png_xmp_orientation_before_the_image_data(tmp_path):
    from PIL.PngImagePlugin import PngInfo
    from transformers.image_utils import load_image

    info = PngInfo()
    info.add_itxt("XML:com.adobe.xmp", _xmp(6).decode())
    path = tmp_path / "xmp.png"
    _noise(100, 20).save(path, format="PNG", pnginfo=info)
    hdr = read_header(str(path))
    assert (hdr.width, hdr.height) == (20, 100) == load_image(str(path)).size


@pytest.fixture
def no_decoding(monkeypatch):
    """Record every call that would decode pixels: any `load` and Pillow's decoder factory."""
    calls: list[str] = []
    Image.init()
    classes = {Image.Image, ImageFile.ImageFile}
    classes |= {f for f, _ in Image.OPEN.values() if isinstance(f, type)}
    for cls in classes:
        if "load" in vars(cls):
            orig = vars(cls)["load"]

            def spy(self, *a, _orig=orig, _name=cls.__name__, **k):
                calls.append(f"{_name}.load")
                return _orig(self, *a, **k)

            monkeypatch.setattr(cls, "load", spy)
    orig_decoder = Image._getdecoder

    def decoder_spy(*a, **k):
        calls.append("_getdecoder")
        return orig_decoder(*a, **k)

    monkeypatch.setattr(Image, "_getdecoder", decoder_spy)
    return calls


@pytest.mark.parametrize("fmt,ext", FORMATS)
def test_read_header_decodes_nothing(tmp_path, fmt, ext, no_decoding):
    path = tmp_path / f"big.{ext}"
    _noise(640, 480).save(path, format=fmt)
    if fmt == "JPEG":
        _with_exif_orientation(tmp_path / "rot.jpg", "JPEG", 640, 480, 6)
    no_decoding.clear()
    hdr = read_header(str(path))
    assert (hdr.width, hdr.height) == (640, 480)
    if fmt == "JPEG":
        rot = read_header(str(tmp_path / "rot.jpg"))
        assert (rot.width, rot.height) == (480, 640)
    assert no_decoding == []
    # The spy does see decoding when it happens.
    with Image.open(path) as im:
        im.load()
    assert no_decoding


def test_read_header_of_truncated_files(tmp_path, write_png_header):
    """Files whose pixel data is cut or missing still give their header size (nothing is decoded)."""
    png = tmp_path / "cut.png"
    _noise(640, 480).save(png, format="PNG")
    data = png.read_bytes()
    png.write_bytes(data[: len(data) // 2])
    jpg = tmp_path / "cut.jpg"
    _noise(640, 480).save(jpg, format="JPEG")
    data = jpg.read_bytes()
    jpg.write_bytes(data[: len(data) // 2])
    for path in (png, jpg):
        hdr = read_header(str(path))
        assert (hdr.width, hdr.height) == (640, 480)
        with pytest.raises(OSError):  # decoding it would fail: so none happened
            with Image.open(path) as im:
                im.load()
    # A header claiming 8000x6000 with 16 bytes of pixel data.
    hdr = read_header(write_png_header(tmp_path / "claims.png", 8000, 6000))
    assert (hdr.width, hdr.height) == (8000, 6000)


# ---------------------------------------------------------------------------------------------
# 2b. read_header's fast paths give exactly what plain Pillow gives (size, orientation, errors)


def _reference_outcome(path):
    """What plain Pillow says: the stored size turned by `getexif()`'s orientation (which decodes
    a PNG to look for metadata after its pixels), or the exception it raises."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(path) as im:
                w, h = images_mod._stored_size(im)
                fmt = im.format
                try:
                    orientation = im.getexif().get(0x0112)
                except Exception:
                    orientation = None
        except Exception as e:
            return type(e).__name__
    return (h, w, fmt) if orientation in (5, 6, 7, 8) else (w, h, fmt)


def _outcome(fn, path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            hdr = fn(path)
        except Exception as e:
            return type(e).__name__
    return (hdr.width, hdr.height, hdr.format)


def _jpeg_segments(data: bytes):
    """A plain JPEG as (header segments [(marker, payload)], the rest from SOS on)."""
    assert data[:2] == b"\xff\xd8"
    pos, segs = 2, []
    while data[pos + 1] != 0xDA:
        marker = data[pos + 1]
        n = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        segs.append((marker, data[pos + 4 : pos + 2 + n]))
        pos += 2 + n
    return segs, data[pos:]


def _seg(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def often(usual, unusual):
    """Mostly `usual` (about 3 draws in 4), sometimes `unusual`."""
    return st.sampled_from([True, True, True, False]).flatmap(lambda u: usual if u else unusual)


@st.composite
def exif_entries(draw, e: str):
    """IFD0 entries: mostly a well-formed Orientation (a SHORT, 1-8) among other tags."""
    entries = []
    for tag in draw(st.lists(st.sampled_from([0x010F, 0x011A, 0x0128, 0x8769, 0x0100, 0x9999, 0x0112]), max_size=3)):
        typ = draw(st.sampled_from([1, 2, 3, 4, 5, 5, 7, 10, 0, 99]))
        count = draw(st.one_of(st.integers(0, 3), st.integers(0, 40)))
        value = draw(st.one_of(st.integers(0, 120), st.sampled_from([200, 1000, 2**32 - 1])))  # data offset
        entries.append((tag, typ, count, value))
    if draw(st.booleans()):  # the pair JpegImageFile._read_dpi_from_exif reads (data at offset 0)
        x_type = draw(st.sampled_from([5, 1, 2, 7, 3]))
        entries[:0] = [(0x0128, 3, 1, 2), (0x011A, x_type, draw(often(st.just(1), st.integers(0, 2))), 0)]
    if draw(often(st.just(True), st.just(False))):
        typ = draw(often(st.just(3), st.sampled_from([4, 1, 9])))
        count = draw(often(st.just(1), st.integers(0, 3)))
        value = draw(often(st.integers(1, 8), st.integers(0, 2**16 - 1)))
        entries.insert(draw(st.integers(0, len(entries))), (0x0112, typ, count, value))
    out = b""
    for tag, typ, count, value in entries:
        field = struct.pack(e + "HH", value % 65536, 0) if typ == 3 and count == 1 else struct.pack(e + "L", value)
        out += struct.pack(e + "HHL", tag, typ, count) + field
    return len(entries), out


@st.composite
def exif_payloads(draw):
    prefix = draw(often(st.sampled_from([b"II*\x00", b"MM\x00*"]), st.sampled_from([b"II\x00*", b"MM*\x00", b"II+\x00", b"JUNK"])))
    e = ">" if prefix.startswith(b"MM") else "<"
    count, entries = draw(exif_entries(e))
    ifd_offset = draw(often(st.just(8), st.integers(0, 200)))
    extra = draw(st.binary(max_size=48))
    tiff = prefix + struct.pack(e + "L", ifd_offset) + struct.pack(e + "H", count) + entries + b"\0\0\0\0" + extra
    tiff = tiff[: draw(often(st.just(len(tiff)), st.integers(0, len(tiff))))]
    twice = draw(often(st.just(False), st.just(True)))
    return b"Exif\0\0" + (b"Exif\0\0" if twice else b"") + tiff


def _xmp_payload(text: bytes) -> bytes:
    return b"http://ns.adobe.com/xap/1.0/\x00" + text


XMP_TEXTS = [b'<r tiff:Orientation="6"/>', b"<tiff:Orientation>8</tiff:Orientation>", b'tiff:Orientation="3"', b"none", b""]


def _sof(marker, bits, height, width, layers, cut):
    """A (second) start-of-frame segment; `cut` drops the last byte of its component table."""
    body = bytes([bits]) + struct.pack(">HH", height, width) + bytes([layers]) + bytes(3 * layers)
    return _seg(marker, body[: len(body) - cut])


# Segments and stray bytes to put in a JPEG header: each either mirrored by the fast path or
# handed to Pillow.
JPEG_EXTRAS = st.one_of(
    exif_payloads().map(lambda p: _seg(0xE1, p)),
    st.sampled_from(XMP_TEXTS).map(lambda t: _seg(0xE1, _xmp_payload(t))),
    st.binary(max_size=20).map(lambda b: _seg(0xE2, b"ICC_PROFILE\0" + b)),
    st.tuples(st.sampled_from([b"JFIF", b"JFIF\0"]), st.binary(max_size=10)).map(lambda t: _seg(0xE0, t[0] + t[1])),
    st.binary(max_size=10).map(lambda b: _seg(0xEE, b"Adobe" + b)),
    st.binary(max_size=10).map(lambda b: _seg(0xE2, b"MPF\0" + b)),
    st.binary(max_size=10).map(lambda b: _seg(0xED, b"Photoshop 3.0\x00" + b)),
    st.binary(max_size=10).map(lambda b: _seg(0xE2, b"FPXR\0" + b)),
    st.tuples(st.integers(0xE0, 0xEF), st.binary(max_size=12)).map(lambda t: _seg(*t)),
    st.binary(max_size=12).map(lambda b: _seg(0xFE, b)),
    st.binary(max_size=140).map(lambda b: _seg(0xDB, b)),
    st.builds(
        _sof,
        marker=st.sampled_from([0xC0, 0xC2, 0xC3, 0xDE]),
        bits=st.sampled_from([8, 8, 12, 0]),
        height=st.integers(0, 65535),
        width=st.integers(0, 2000),
        layers=st.sampled_from([1, 3, 4, 2]),
        cut=st.sampled_from([0, 0, 1]),
    ),
    st.sampled_from([b"\xff", b"\xff\xff", b"\x00", b"\x12\x34", b"\xff\x00", b"\xff\xd0", b"\xff\xc8", b"\xff\x10", b"\xff\xf3"]),
    st.just(b"\xff\xe1\x00"),  # a length cut short
)


@st.composite
def jpeg_files(draw):
    mode = draw(st.sampled_from(["RGB", "L", "CMYK"]))
    w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    buf = io.BytesIO()
    Image.new(mode, (w, h), 90 if mode == "L" else (10, 200, 30, 0)[: len(mode)]).save(
        buf, format="JPEG", progressive=draw(st.booleans()), quality=draw(st.sampled_from([50, 95]))
    )
    segs, rest = _jpeg_segments(buf.getvalue())
    items = [_seg(m, p) for m, p in segs]
    inserts = draw(st.lists(JPEG_EXTRAS, max_size=4)) if draw(st.booleans()) else []
    # An EXIF and an XMP segment half of the time each, besides whatever else was drawn.
    inserts += draw(st.lists(exif_payloads().map(lambda p: _seg(0xE1, p)), max_size=1))
    inserts += draw(st.lists(st.sampled_from(XMP_TEXTS).map(lambda t: _seg(0xE1, _xmp_payload(t))), max_size=1))
    for item in inserts:
        items.insert(draw(st.integers(0, len(items))), item)
    data = b"\xff\xd8" + b"".join(items) + rest
    if draw(st.integers(0, 19)) == 0:
        data = data[: draw(st.integers(2, len(data)))]
    return data


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fast-path")


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=jpeg_files())
def test_jpeg_fast_path_equals_pillow(scratch, data):
    from hypothesis import event

    path = scratch / "x.jpg"
    path.write_bytes(data)
    reference = _reference_outcome(str(path))
    fast = images_mod._jpeg_header(str(path))
    event("fast path" if fast is not None else "left to Pillow")
    if fast is not None:
        assert (fast.width, fast.height, fast.format) == reference
    assert _outcome(read_header, str(path)) == reference


@pytest.mark.parametrize(
    "first_tag,orientation_survives",
    [
        ((0x011A, 5, 1, 1000), False),  # a RATIONAL whose data lies past the block: Pillow stops there
        ((0x011A, 5, 1, 8), True),
        ((0x010F, 2, 30, 500), False),
        ((0x010F, 2, 3, 0), True),  # 3 ASCII bytes fit in the entry itself
    ],
)
def test_exif_tags_before_the_orientation_matter(tmp_path, first_tag, orientation_survives):
    entries = [first_tag, (0x0112, 3, 1, 6)]
    tiff = b"II*\x00" + struct.pack("<LH", 8, len(entries))
    tiff += b"".join(struct.pack("<HHLL", *entry) for entry in entries) + b"\0\0\0\0"
    buf = io.BytesIO()
    Image.new("RGB", (64, 24)).save(buf, format="JPEG")
    data = buf.getvalue()
    path = tmp_path / "e.jpg"
    path.write_bytes(data[:2] + _seg(0xE1, b"Exif\0\0" + tiff) + data[2:])
    expected = (24, 64, "JPEG") if orientation_survives else (64, 24, "JPEG")
    assert _reference_outcome(str(path)) == expected
    assert _outcome(read_header, str(path)) == expected
    assert (images_mod._jpeg_header(str(path)) is not None) == orientation_survives


@pytest.mark.parametrize(
    "x_resolution,opens",
    [
        ((0x011A, 5, 1, 200), True),  # one RATIONAL (its 8 bytes at offset 200): the normal case
        ((0x011A, 1, 1, 5), False),  # a BYTE: Pillow's _read_dpi_from_exif raises, open() fails
        ((0x011A, 2, 1, 0), False),  # an empty string: the same
        ((0x011A, 7, 1, 5), False),  # UNDEFINED: the same
    ],
)
def test_exif_resolution_tags_that_pillow_cannot_open(tmp_path, x_resolution, opens):
    """A JPEG Pillow refuses must stay refused: the fast path must not accept it."""
    entries = [(0x0128, 3, 1, 2), x_resolution, (0x0112, 3, 1, 6)]
    tiff = b"II*\x00" + struct.pack("<LH", 8, len(entries))
    tiff += b"".join(struct.pack("<HHLL", *entry) for entry in entries) + b"\0\0\0\0"
    tiff = tiff.ljust(200, b"\0") + struct.pack("<LL", 72, 1)
    buf = io.BytesIO()
    Image.new("RGB", (64, 24)).save(buf, format="JPEG")
    data = buf.getvalue()
    path = tmp_path / "dpi.jpg"
    path.write_bytes(data[:2] + _seg(0xE1, b"Exif\0\0" + tiff) + data[2:])
    reference = _reference_outcome(str(path))
    assert reference == ((24, 64, "JPEG") if opens else "UnidentifiedImageError")
    assert _outcome(read_header, str(path)) == reference
    assert (images_mod._jpeg_header(str(path)) is not None) == opens


def _jpeg_with(tmp_path, name, **save):
    path = tmp_path / name
    Image.new(save.pop("mode", "RGB"), (64, 24)).save(path, format="JPEG", **save)
    return str(path)


def test_common_jpegs_take_the_fast_path(tmp_path):
    from PIL import ImageCms
    from transformers.image_utils import load_image

    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Camera maker"
    exif[0x011A] = 72.0
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    files = [
        _jpeg_with(tmp_path, "plain.jpg"),
        _jpeg_with(tmp_path, "exif6.jpg", exif=exif),
        _jpeg_with(tmp_path, "icc.jpg", icc_profile=srgb, exif=exif, progressive=True),
        _jpeg_with(tmp_path, "xmp.jpg", xmp=b'<x:xmpmeta><r tiff:Orientation="8"/></x:xmpmeta>'),
        _jpeg_with(tmp_path, "gray.jpg", mode="L", dpi=(300, 300)),
        _jpeg_with(tmp_path, "cmyk.jpg", mode="CMYK", comment=b"hello"),
    ]
    for path in files:
        fast = images_mod._jpeg_header(path)
        assert fast is not None, path
        assert (fast.width, fast.height, fast.format) == _reference_outcome(path)
        assert (fast.width, fast.height) == load_image(path).size
    assert _reference_outcome(files[1])[:2] == (24, 64)
    assert _reference_outcome(files[3])[:2] == (24, 64)


@st.composite
def png_files(draw):
    w, h = draw(st.integers(1, 30)), draw(st.integers(1, 30))
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (1, 2, 3)).save(buf, format="PNG")
    chunks = _png_chunks(buf.getvalue())
    raw_profile = "\nexif\n{:8}\n{}\n".format(len(_exif_block(6)) + 6, (b"Exif\0\0" + _exif_block(6)).hex())
    extra = st.one_of(
        st.integers(1, 8).map(lambda o: (b"eXIf", _exif_block(o))),
        st.sampled_from([b"exif", b"Raw profile type exif", b"XML:com.adobe.xmp", b"Comment"]).map(
            lambda k: (b"tEXt", k + b"\0" + (raw_profile.encode() if k.startswith(b"Raw") else _xmp(6) if k.startswith(b"XML") else b"Exif\0\0" + _exif_block(8) if k == b"exif" else b"hi"))
        ),
        st.integers(1, 8).map(lambda o: (b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + _xmp(o))),
        st.just((b"zTXt", b"Raw profile type exif\0\0" + zlib.compress(raw_profile.encode()))),
        st.binary(max_size=8).map(lambda b: (b"prVt", b)),
    )
    before = draw(st.lists(extra, max_size=2))
    after = draw(st.lists(extra, max_size=2))
    # chunks: IHDR, [...], IDAT..., IEND
    body = chunks[:1] + before + chunks[1:-1] + after + chunks[-1:]
    data = b"\x89PNG\r\n\x1a\n" + b"".join(_png_chunk(t, d) for t, d in body)
    if draw(st.integers(0, 7)) == 0:
        data = data[: draw(st.integers(8, len(data)))]
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=png_files())
def test_png_header_equals_pillow(scratch, data):
    path = scratch / "x.png"
    path.write_bytes(data)
    assert _outcome(read_header, str(path)) == _reference_outcome(str(path))
    assert _outcome(read_header, memoryview(data)) == _outcome(read_header, data)


# ---------------------------------------------------------------------------------------------
# 3. inspect == the real processor, sample by sample


WORDS = "the a red blue circle square picture shows what is in this image describe count two three left right".split()


def _words(rnd: random.Random, n: int) -> str:
    return " ".join(rnd.choice(WORDS) for _ in range(n))


def _random_dataset(root: Path, seed: int, n: int):
    """n sharegpt records with 0-4 images each (PNG/JPEG/WEBP, some EXIF-rotated, some reused)."""
    rnd = random.Random(seed)
    media = root / "media"
    media.mkdir(parents=True)
    pool: list[str] = []

    def new_image() -> str:
        k = len(pool)
        if rnd.random() < 0.15:
            side = rnd.randint(1, 6)
            w, h = (side, rnd.randint(1, min(1000, side * 200)))
        else:
            w, h = rnd.randint(1, 1000), rnd.randint(1, 1000)
            if max(w, h) / min(w, h) > 200:
                w = h = 64
        if rnd.random() < 0.5:
            w, h = h, w
        kind = rnd.choice(["png", "jpg", "webp", "rot"])
        name = f"img{k}.{'jpg' if kind == 'rot' else kind}"
        im = Image.new("RGB", (w, h), (rnd.randrange(256), 80, 160))
        if kind == "rot":
            exif = Image.Exif()
            exif[0x0112] = rnd.choice([6, 8, 3])
            im.save(media / name, format="JPEG", exif=exif)
        else:
            im.save(media / name, format={"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[kind])
        pool.append(name)
        return name

    records = []
    counts = [i % 5 for i in range(n)]
    rnd.shuffle(counts)
    for i, k in enumerate(counts):
        images = [rnd.choice(pool) if pool and rnd.random() < 0.2 else new_image() for _ in range(k)]
        rounds = rnd.randint(1, 2)
        per_round = [0] * rounds
        for _ in range(k):
            per_round[rnd.randrange(rounds)] += 1
        messages = []
        for r in range(rounds):
            pieces = [_words(rnd, rnd.randint(0, 6)) for _ in range(per_round[r] + 1)]
            user = "<image>".join(pieces) or _words(rnd, 3)
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": _words(rnd, rnd.randint(1, 12))}]
        record = {"id": f"s{i}", "messages": messages, "images": [f"media/{p}" for p in images]}
        if rnd.random() < 0.3:
            record["system"] = _words(rnd, 5)
        records.append(record)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return data, records


def _processor_lengths(proc, root: Path, records, image_token_id) -> dict[str, tuple[int, int, int]]:
    """id -> (len(input_ids), image pad tokens, images) from the real processor."""
    from transformers.image_utils import load_image

    out = {}
    for rec in records:
        msgs = []
        if "system" in rec:
            msgs.append({"role": "system", "content": [{"type": "text", "text": rec["system"]}]})
        msgs += [{"role": m["role"], "content": hf_content(m["content"])} for m in rec["messages"]]
        text = proc.apply_chat_template(msgs, tokenize=False)
        images = [load_image(str(root / p)) for p in rec.get("images", [])] or None
        enc = proc(text=[text], images=images, return_tensors="pt")
        ids = enc["input_ids"][0]
        out[rec["id"]] = (len(ids), int((ids == image_token_id).sum()), len(rec.get("images", [])))
    return out


@pytest.mark.parametrize("arch", FAMILIES)
def test_inspect_per_sample_counts_equal_the_processor(arch, family, tiny_ckpt, tmp_path, capsys):
    data, records = _random_dataset(tmp_path, seed=FAMILIES.index(arch) + 7, n=30)
    per_sample = tmp_path / "per_sample.jsonl"
    rc = cli.main(["inspect", "--model", str(tiny_ckpt(arch)), "--data", str(data), "--per-sample", str(per_sample), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["problems"] == []
    rows = [json.loads(line) for line in per_sample.read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in records]

    loaded = family(arch)
    expected = _processor_lengths(loaded.processor, tmp_path, records, loaded.spec.image_token_id)
    got = {r["id"]: (r["tokens"], r["image_tokens"], r["images"]) for r in rows}
    assert got == expected
    for r in rows:
        assert r["text_tokens"] == r["tokens"] - r["image_tokens"]
    assert {r["images"] for r in rows} == {0, 1, 2, 3, 4}


def _nearest_rank(values, q):
    v = sorted(values)
    return v[max(1, math.ceil(q * len(v))) - 1]


def test_inspect_json_summary_is_exact(family, tiny_ckpt, tmp_path, capsys):
    arch = "qwen2_vl"
    media = tmp_path / "media"
    media.mkdir()
    for name, (w, h) in {"a.png": (640, 480), "b.jpg": (33, 700), "c.webp": (1024, 1024), "wide.png": (201, 1)}.items():
        Image.new("RGB", (w, h), (10, 20, 30)).save(media / name)
    good = [
        {"id": "zero", "messages": [{"role": "user", "content": "Describe the picture."}, {"role": "assistant", "content": "There is none."}]},
        {"id": "one", "messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A"}], "images": ["media/a.png"]},
        {"id": "two", "system": "Be brief.", "messages": [
            {"role": "user", "content": "<image> and <image>: compare"}, {"role": "assistant", "content": "The first is red."},
            {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}],
         "images": ["media/b.jpg", "media/c.webp"]},
        {"id": "again", "messages": [{"role": "user", "content": "<image>Count."}, {"role": "assistant", "content": "three"}], "images": ["media/a.png"]},
    ]
    bad = [
        {"id": "gone", "messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A"}], "images": ["media/missing.png"]},
        {"id": "thin", "messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A"}], "images": ["media/wide.png"]},
    ]
    records = [good[0], bad[0], good[1], good[2], bad[1], good[3]]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))

    loaded = family(arch)
    lengths = _processor_lengths(loaded.processor, tmp_path, good, loaded.spec.image_token_id)
    tok = [lengths[r["id"]][0] for r in good]
    cutoff = sorted(tok)[1]

    rc = cli.main(["inspect", "--model", str(tiny_ckpt(arch)), "--data", str(data), "--json", "--cutoff-len", str(cutoff)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)

    def dist(values):
        return {
            "samples": len(values),
            "p50": _nearest_rank(values, 0.5),
            "p95": _nearest_rank(values, 0.95),
            "p99": _nearest_rank(values, 0.99),
            "max": max(values),
        }

    by_count: dict[str, list[int]] = {}
    for r in good:
        by_count.setdefault(str(len(r.get("images", []))), []).append(lengths[r["id"]][0])
    image_tokens = sum(v[1] for v in lengths.values())
    src = str(data)
    fix_aspect = "crop or pad the image so that its longer side is at most 200 times its shorter side"
    missing = str((media / "missing.png").resolve())
    expected = {
        "records": 6,
        "samples": 4,
        "invalid_samples": 2,
        "images": 4,
        "tokens": sum(tok),
        "image_tokens": image_tokens,
        "text_tokens": sum(tok) - image_tokens,
        "lengths": dist(tok),
        "by_image_count": {k: dist(v) for k, v in sorted(by_count.items())},
        "videos": 0,
        "video_tokens": 0,
        "by_video_count": {"0": dist(tok)},
        "recommended_cutoff_len": {"p95": _nearest_rank(tok, 0.95), "p99": _nearest_rank(tok, 0.99), "max": max(tok)},
        "cutoff_len": cutoff,
        "over_cutoff": sum(1 for n in tok if n > cutoff),
        "problems": [
            {
                "source": f"{src}:2",
                "what": f"image 'media/missing.png' not found at {missing}",
                "fix": "check the path, or set media_dir to the folder the image paths are relative to",
                "sample_id": "gone",
                "kind": "missing_file",
                "file": src,
                "index": 2,
            },
            {
                "source": f"{src}:5",
                "what": "image 'media/wide.png' is 201x1: its aspect ratio 201.0 is above the processor's limit of 200",
                "fix": fix_aspect,
                "sample_id": "thin",
                "kind": "aspect_ratio",
                "file": src,
                "index": 5,
            },
        ],
        "notes": ["recognised LLaMA-Factory sharegpt / HF chat (`messages` or `conversations`, `images`): 6 record(s)"],
        "stage": "sft",
    }
    assert summary == expected
    assert list(summary["by_image_count"]) == ["0", "1", "2"]
    assert summary["over_cutoff"] == 2  # cutoff is the second-shortest of four distinct lengths
    assert len(set(tok)) == 4
    # The processor refuses the image the summary reports.
    with pytest.raises(ValueError, match="aspect ratio"):
        loaded.processor.image_processor(images=[Image.open(media / "wide.png")], return_tensors="pt")


# -- images as bytes (embedded, inline) and the one RGB conversion -------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(w=st.integers(1, 400), h=st.integers(1, 400), fmt=st.sampled_from(["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"]),
       orientation=st.sampled_from([None, 1, 3, 6, 8]))
def test_header_from_bytes_equals_header_from_the_file(tmp_path, w, h, fmt, orientation):
    im = Image.new("RGB", (w, h), (10, 200, 30))
    kwargs = {}
    if orientation is not None and fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    path = tmp_path / f"x.{fmt.lower()}"
    im.save(path, format=fmt, **kwargs)
    data = path.read_bytes()
    assert read_header(data) == read_header(str(path))
    assert read_header(memoryview(data)) == read_header(data)  # a view into a mapped Parquet file, read in place
    assert open_rgb(data).size == (read_header(data).width, read_header(data).height)
    assert np.array_equal(np.asarray(open_rgb(data)), np.asarray(open_rgb(str(path))))


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # what Pillow gives for a 16-bit grey PNG
        clipped = np.asarray(im.convert("RGB"))[0, :, 0].tolist()
    assert clipped == [0, 255, 255, 255]  # the saturation the processor would see without the scaling
    rgb = np.asarray(open_rgb(str(tmp_path / "g16.png")))
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255] and (rgb[..., 0] == rgb[..., 2]).all()


def test_transparency_is_composited_on_white_like_transformers(tmp_path):
    from transformers.image_transforms import convert_to_rgb

    rgba = Image.new("RGBA", (4, 2), (200, 10, 10, 255))
    rgba.putpixel((0, 0), (200, 10, 10, 0))
    rgba.putpixel((1, 0), (200, 10, 10, 128))
    pal = Image.new("RGB", (3, 1), (0, 0, 255)).convert("P")
    pal.putpixel((0, 0), 0)
    pal.info["transparency"] = pal.getpixel((1, 0))
    la = Image.new("LA", (2, 2), (50, 0))
    for name, im in (("rgba.png", rgba), ("p.png", pal), ("la.png", la)):
        im.save(tmp_path / name)
        with Image.open(tmp_path / name) as opened:
            want = np.asarray(convert_to_rgb(opened, return_numpy=True))
        assert np.array_equal(np.asarray(open_rgb(str(tmp_path / name))), want), name
    assert np.asarray(open_rgb(str(tmp_path / "rgba.png")))[0, 0].tolist() == [255, 255, 255]


def test_cmyk_and_exif_rotation(tmp_path):
    Image.new("CMYK", (5, 3), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    with Image.open(tmp_path / "c.jpg") as im:
        want = np.asarray(im.convert("RGB"))
    assert np.array_equal(np.asarray(open_rgb((tmp_path / "c.jpg").read_bytes())), want)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (7, 3)).save(tmp_path / "r.jpg", exif=exif.tobytes())
    data = (tmp_path / "r.jpg").read_bytes()
    assert (read_header(data).width, read_header(data).height) == open_rgb(data).size == (3, 7)
