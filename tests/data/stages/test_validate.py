"""Validation: every problem of every sample, each an exact report entry (kind, id, source, what, fix)."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from vlmtune.data.stages import validate as validate_mod
from vlmtune.data.media.images import ImageHeader
from vlmtune.data.sources.records import record_to_conversation
from vlmtune.data.types import Conversation, ImagePart, Message, TextPart
from vlmtune.data.stages.validate import DEFAULT_MAX_IMAGE_PIXELS, validate
from vlmtune.errors import Problem

from _spec import pixel_spec

PIX = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 256, patch_size=14, merge_size=2)
SRC = "train.jsonl:3"
FIX_REPLACE = "replace it with a valid image file (JPEG, PNG, WebP, ...) or remove the sample"
FIX_REEXPORT = "re-export or re-download the image, or remove the sample"


def P(kind, what, fix, sample_id="s1", source=SRC):
    return Problem(source=source, what=what, fix=fix, sample_id=sample_id, kind=kind)


def M(role, *parts):
    return Message(role, [TextPart(p) if isinstance(p, str) else p for p in parts])


def C(*messages, id="s1", source=SRC):
    return Conversation(id=id, source=source, messages=list(messages))


def with_image(path, ref=None):
    return C(M("user", ImagePart(ref or os.path.basename(path), path), "what?"), M("assistant", "that."))


def run(*convs, **kw):
    return validate(list(convs), pixel_spec(**PIX), **kw)


# ---------------------------------------------------------------------------------------------
# Valid samples


def test_valid_samples_pass_and_headers_are_returned(tmp_path, write_image):
    a = write_image(tmp_path / "a.png", 64, 32)
    b = write_image(tmp_path / "b.jpg", 10, 20)
    c1 = with_image(a)
    c2 = C(
        M("system", "be nice"),
        M("user", ImagePart("a.png", a), "q"),
        M("assistant", "x", ImagePart("b.jpg", b)),  # an image in an assistant turn is allowed
        M("user", "more"),
        M("assistant", "ok"),
        id="s2",
    )
    res = run(c1, c2)
    assert res.problems == []
    assert res.valid == [c1, c2]
    assert res.headers == {a: ImageHeader(64, 32, "PNG"), b: ImageHeader(10, 20, "JPEG")}


def test_each_distinct_path_is_read_once(tmp_path, write_image, monkeypatch):
    a = write_image(tmp_path / "a.png", 30, 30)
    calls = []
    real = validate_mod.read_header
    monkeypatch.setattr(validate_mod, "read_header", lambda p: calls.append(p) or real(p))
    missing = str(tmp_path / "missing.png")
    convs = [with_image(a) for _ in range(50)] + [with_image(missing) for _ in range(5)]
    res = run(*convs)
    assert calls == [a, missing]
    assert len(res.valid) == 50 and len(res.problems) == 5


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (3, 3), (1, 5), (5, 1), (5, 5), (1, 200), (3, 600), (2, 3)])
def test_tiny_images_are_accepted(tmp_path, write_image, size):
    path = write_image(tmp_path / "t.png", *size)
    res = run(with_image(path))
    assert res.problems == [] and res.headers[path] == ImageHeader(size[0], size[1], "PNG")


def test_real_processor_handles_tiny_pil_images():
    """Why small images are not rejected: transformers 5.24's processor upsamples them fine."""
    from transformers import Qwen2VLImageProcessor

    from vlmtune.models.grid import grid_for

    proc = Qwen2VLImageProcessor(
        patch_size=14, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 256}
    )
    for w, h in [(1, 1), (3, 1), (1, 3), (2, 2), (3, 3), (1, 5), (5, 5), (1, 200)]:
        out = proc(images=[Image.new("RGB", (w, h), (255, 0, 0))], return_tensors="pt")
        assert out["image_grid_thw"].tolist() == [grid_for(h, w, **PIX).thw], (w, h)
        red = out["pixel_values"].reshape(-1, 3, 2, 14, 14).float().mean(dim=(0, 2, 3, 4))
        assert red[0] > 1 and red[1] < -1 and red[2] < -1, (w, h)  # channels not mixed up
    with pytest.raises(ValueError, match="aspect ratio"):
        proc(images=[Image.new("RGB", (1, 201))], return_tensors="pt")


# ---------------------------------------------------------------------------------------------
# Image problems


def test_missing_file(tmp_path):
    path = str(tmp_path / "gone.png")
    res = run(with_image(path, ref="imgs/gone.png"))
    assert res.valid == [] and res.headers == {}
    assert res.problems == [
        P(
            "missing_file",
            f"image 'imgs/gone.png' not found at {path}",
            "check the path, or set media_dir to the folder the image paths are relative to",
        )
    ]


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "fake.jpg"
    path.write_text("definitely not a jpeg")
    res = run(with_image(str(path)))
    assert res.problems == [P("not_an_image", f"image 'fake.jpg' is not an image file Pillow can identify: {path}", FIX_REPLACE)]


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    res = run(with_image(str(path)))
    assert res.problems == [P("not_an_image", f"image 'empty.png' is an empty file (0 bytes): {path}", FIX_REPLACE)]


def test_folder_instead_of_image(tmp_path):
    d = tmp_path / "dir.png"
    d.mkdir()
    res = run(with_image(str(d)))
    assert res.problems == [P("not_an_image", f"image 'dir.png' is a folder ({d}), not an image file", "point the path at an image file")]


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated_image_is_caught_by_its_missing_end_marker(tmp_path, ext):
    full = tmp_path / f"full.{ext}"
    Image.effect_noise((128, 128), 64).convert("RGB").save(full)
    data = full.read_bytes()
    path = tmp_path / f"trunc.{ext}"
    path.write_bytes(data[: len(data) // 2])
    fmt = "PNG" if ext == "png" else "JPEG"
    # no decode: the last bytes of the file lack the format's end marker
    assert run(with_image(str(path))).problems == [
        P("corrupt_image", f"image 'trunc.{ext}' is truncated: its {fmt} end marker is missing ({path})",
          FIX_REEXPORT)]
    assert run(with_image(str(full))).problems == []


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated_image_with_verify(tmp_path, ext):
    full = tmp_path / f"full.{ext}"
    Image.effect_noise((128, 128), 64).convert("RGB").save(full)
    data = full.read_bytes()
    path = tmp_path / f"trunc.{ext}"
    path.write_bytes(data[: len(data) // 2])
    res = run(with_image(str(path)), verify_images=True)
    detail = {"png": "image file is truncated", "jpg": "image file is truncated (62 bytes not processed)"}[ext]
    assert len(res.problems) == 1
    got = res.problems[0]
    assert (got.kind, got.sample_id, got.source, got.fix) == ("corrupt_image", "s1", SRC, FIX_REEXPORT)
    assert got.what.startswith(f"image 'trunc.{ext}' is truncated or corrupt (image file is truncated")
    assert got.what.endswith(f"): {path}")
    if ext == "png":
        assert got.what == f"image 'trunc.png' is truncated or corrupt ({detail}): {path}"
    # the header was read fine, so it is still returned
    assert res.headers == {str(path): ImageHeader(128, 128, "PNG" if ext == "png" else "JPEG")}


def test_broken_header_is_corrupt(tmp_path):
    path = tmp_path / "bad.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + b"\x00" * 3)
    res = run(with_image(str(path)))
    assert res.problems == [P("corrupt_image", f"image 'bad.png' cannot be read (OSError: Truncated File Read): {path}", FIX_REEXPORT)]


def test_aspect_ratio(tmp_path, write_image):
    ok = write_image(tmp_path / "ok.png", 200, 1)
    wide = write_image(tmp_path / "wide.png", 201, 1)
    tall = write_image(tmp_path / "tall.png", 3, 1000)
    res = run(with_image(ok, "ok.png"), with_image(wide, "wide.png"), with_image(tall, "tall.png"))
    fix = "crop or pad the image so that its longer side is at most 200 times its shorter side"
    assert res.problems == [
        P("aspect_ratio", "image 'wide.png' is 201x1: its aspect ratio 201.0 is above the processor's limit of 200", fix),
        P("aspect_ratio", "image 'tall.png' is 3x1000: its aspect ratio 333.3 is above the processor's limit of 200", fix),
    ]
    assert len(res.valid) == 1 and set(res.headers) == {ok, wide, tall}


def test_zero_size_header_is_too_small(tmp_path, monkeypatch):
    # Pillow refuses to open zero-sized files itself; the rule is still checked on the header.
    monkeypatch.setattr(validate_mod, "read_header", lambda p: ImageHeader(0, 10, "PNG"))
    res = run(with_image(str(tmp_path / "z.png")))
    assert res.problems == [
        P("too_small", "image 'z.png' has a zero size (0x10)", "replace the image: the processor cannot resize an image with no pixels")
    ]


def test_decompression_bomb_above_pillow_limit_is_not_decoded(tmp_path, write_png_header, monkeypatch):
    path = write_png_header(tmp_path / "bomb.png", 20000, 10000)
    loads = []
    Image.init()  # Pillow's plugins build images (and load them) when first imported: not this test's decode
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(1))
    res = run(with_image(path), verify_images=True)
    assert res.problems == [
        P(
            "too_many_pixels",
            "image 'bomb.png' is 20000x10000 = 200,000,000 pixels, above the limit of 178,956,970 "
            "(a possible decompression bomb); it was not decoded",
            "downscale the image file (the model sees at most image_max_pixels anyway), or remove the sample",
        )
    ]
    assert loads == [] and DEFAULT_MAX_IMAGE_PIXELS == 178_956_970


def test_too_many_pixels_with_own_limit(tmp_path, write_png_header):
    path = write_png_header(tmp_path / "big.png", 100, 50)
    res = run(with_image(path), max_image_pixels=4999)
    assert res.problems == [
        P(
            "too_many_pixels",
            "image 'big.png' is 100x50 = 5,000 pixels, above the limit of 4,999 (a possible decompression bomb); it was not decoded",
            "downscale the image file (the model sees at most image_max_pixels anyway), or remove the sample",
        )
    ]
    assert res.headers == {path: ImageHeader(100, 50, "PNG")}


def test_bomb_within_own_limit_but_above_pillows(tmp_path, write_png_header):
    path = write_png_header(tmp_path / "bomb.png", 20000, 10000)
    res = run(with_image(path), max_image_pixels=10**9)
    assert res.problems == [
        P(
            "too_many_pixels",
            "image 'bomb.png' is 20000x10000 = 200,000,000 pixels, above Pillow's limit of 178,956,970 "
            "(a possible decompression bomb); it was not decoded",
            "downscale the image, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file",
        )
    ]


def test_refused_paths_are_not_reported_twice(tmp_path):
    rec = {"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}], "images": ["../x.png"]}
    conv = record_to_conversation(rec, sample_id="s1", source=SRC, base_dir=str(tmp_path))
    res = run(conv)
    assert [p.kind for p in res.problems] == ["path_outside_media_dir"]
    assert res.problems == conv.read_problems and res.valid == []


def test_unresolved_image_without_read_problem(tmp_path):
    res = run(C(M("user", ImagePart("x.png", None)), M("assistant", "a")))
    assert res.problems == [
        P("missing_file", "image 'x.png' could not be resolved to a file", "check the path, or set media_dir to the folder the image paths are relative to")
    ]


def test_check_images_false_skips_files(tmp_path):
    res = run(with_image(str(tmp_path / "gone.png")), check_images=False)
    assert res.problems == [] and len(res.valid) == 1 and res.headers == {}


# ---------------------------------------------------------------------------------------------
# Placeholders (found while reading, reported here)


def test_placeholder_mismatch_more_placeholders(tmp_path, write_image):
    write_image(tmp_path / "a.png", 30, 30)
    rec = {"messages": [{"role": "user", "content": "<image><image>q"}, {"role": "assistant", "content": "a"}], "images": ["a.png"]}
    res = run(record_to_conversation(rec, sample_id="s1", source=SRC, base_dir=str(tmp_path)))
    assert res.valid == []
    assert res.problems == [
        P("placeholder_mismatch", "2 <image> placeholders but 1 image in `images`", "add the missing image path or remove the extra placeholder")
    ]


def test_placeholder_mismatch_more_images(tmp_path, write_image):
    write_image(tmp_path / "a.png", 30, 30)
    rec = {"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}], "images": ["a.png", "a.png", "a.png"]}
    res = run(record_to_conversation(rec, sample_id="s1", source=SRC, base_dir=str(tmp_path)))
    assert res.problems == [
        P(
            "placeholder_mismatch",
            "1 <image> placeholder but 3 images in `images`",
            "add an <image> placeholder where each image goes, or remove the extra image path",
        )
    ]


# ---------------------------------------------------------------------------------------------
# Conversation structure


def test_empty_conversation():
    res = run(C())
    assert res.problems == [P("empty_conversation", "conversation has no messages", "add a user turn and an assistant turn, or remove the sample")]


_FIX_ROLE = ("use one of the roles system, user, assistant, function_call, observation "
             "(sharegpt: system, human, gpt, function_call, observation; OpenAI: tool)")


def test_unknown_role():
    res = run(C(M("user", "q"), M("assistant", "call"), M("critic", "42"), M("assistant", "done")))
    assert res.problems == [
        P("unknown_role", "message 3 has role 'critic', which is not supported", _FIX_ROLE),
        # the unknown turn is left out of the order check; the two assistant turns then clash
        P("turn_order", "messages 2 and 4 are both assistant turns", "alternate user and assistant turns: merge the two turns into one"),
    ]


def test_tool_turns_take_the_answer_and_question_places():
    call = Message("function_call", [], tool_calls=[{"name": "f", "arguments": {}}])
    assert run(C(M("user", "q"), call, M("observation", "42"), M("assistant", "done"))).problems == []
    assert run(C(M("user", "q"), call)).problems == []  # a function call is a target
    res = run(C(M("user", "q"), M("observation", "42"), M("assistant", "a")))
    assert [p.what for p in res.problems] == ["messages 1 and 2 are both user turns"]


def test_system_not_first():
    res = run(C(M("user", "q"), M("system", "s"), M("assistant", "a")))
    assert res.problems == [
        P(
            "turn_order",
            "message 2 is a system turn; a system turn may only come first",
            "move the system prompt to the first message (or the top-level `system` field)",
        )
    ]


@pytest.mark.parametrize("first", [[], [M("system", "s")]])
def test_assistant_first(first):
    res = run(C(*first, M("assistant", "a"), M("user", "q"), M("assistant", "a")))
    n = len(first) + 1
    assert res.problems == [
        P("turn_order", f"message {n} (assistant) comes before any user turn", "start the conversation with a user turn (after an optional system turn)")
    ]


def test_two_user_turns_in_a_row():
    res = run(C(M("user", "q"), M("user", "q2"), M("assistant", "a")))
    assert res.problems == [
        P("turn_order", "messages 1 and 2 are both user turns", "alternate user and assistant turns: merge the two turns into one")
    ]


def test_ends_with_user_turn():
    res = run(C(M("user", "q"), M("assistant", "a"), M("user", "q2")))
    assert res.problems == [
        P("turn_order", "the conversation ends with a user turn (message 3) that has no answer", "add the assistant's answer, or remove the last user turn")
    ]


def test_no_assistant():
    res = run(C(M("system", "s"), M("user", "q")))
    assert res.problems == [
        P("no_assistant", "conversation has no assistant turn, so there is nothing to learn", "add the assistant's answer, or remove the sample")
    ]


def test_empty_turns():
    res = run(C(M("user", "q"), M("assistant", "  \n"), M("user"), M("assistant", "a")))
    assert res.problems == [
        P("empty_turn", "message 2 ('assistant') is empty", "write the turn's text, or remove the turn"),
        P("empty_turn", "message 3 ('user') is empty", "write the turn's text, or remove the turn"),
    ]


def test_image_only_turn_is_not_empty(tmp_path, write_image):
    a = write_image(tmp_path / "a.png", 30, 30)
    assert run(C(M("user", ImagePart("a.png", a)), M("assistant", "a"))).problems == []


def test_several_problems_of_one_sample_and_several_samples(tmp_path, write_image):
    ok = write_image(tmp_path / "ok.png", 30, 30)
    bad = C(M("assistant", ImagePart("gone.png", str(tmp_path / "gone.png"))), M("tool", "x"), id="b", source="d.json#1")
    good = C(M("user", ImagePart("ok.png", ok)), M("assistant", "a"), id="g", source="d.json#0")
    res = run(good, bad)
    assert res.valid == [good]
    assert res.problems == [
        P(
            "unknown_role",
            "message 2 has role 'tool', which is not supported",
            _FIX_ROLE,
            sample_id="b",
            source="d.json#1",
        ),
        P("turn_order", "message 1 (assistant) comes before any user turn", "start the conversation with a user turn (after an optional system turn)", sample_id="b", source="d.json#1"),
        P(
            "missing_file",
            f"image 'gone.png' not found at {tmp_path / 'gone.png'}",
            "check the path, or set media_dir to the folder the image paths are relative to",
            sample_id="b",
            source="d.json#1",
        ),
    ]


def _garbage_idat_png(path, w=64, h=48) -> str:
    """A PNG whose header, CRCs and IEND are intact but whose compressed pixel data is garbage (issue 21)."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"\x78\x9c" + bytes(range(256)) * 8)
                     + chunk(b"IEND", b""))
    return str(path)


@pytest.mark.parametrize("verify", [False, True])
def test_pixels_that_do_not_decode_are_found_by_decoding_only(tmp_path, verify):
    path = _garbage_idat_png(tmp_path / "garbage.png")
    res = run(with_image(path), verify_images=verify)
    if not verify:  # the header, the CRCs and the end marker are all fine: a header read cannot tell
        assert res.problems == []
        return
    (got,) = res.problems
    assert (got.kind, got.sample_id, got.fix) == ("corrupt_image", "s1", FIX_REEXPORT)
    assert got.what.startswith("image 'garbage.png' is truncated or corrupt (") and got.what.endswith(path)


def test_a_jpeg_is_decoded_at_reduced_scale(tmp_path, monkeypatch):
    from PIL import JpegImagePlugin

    path = tmp_path / "big.jpg"
    Image.effect_noise((800, 640), 64).convert("RGB").save(path, quality=90)
    sizes = []
    real = JpegImagePlugin.JpegImageFile.load

    def load(im):
        sizes.append(im.size)
        return real(im)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", load)
    assert run(with_image(str(path)), verify_images=True).problems == []
    assert sizes == [(100, 80)]  # draft: 1/8 scale


def test_a_fifo_named_like_an_image_is_refused_without_being_opened(tmp_path):
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes: the test would hang
    res = run(with_image(str(fifo)), verify_images=True)
    assert res.problems == [P("not_an_image", f"image 'photo.png' is not a regular file (a FIFO, device or socket): "
                                              f"{fifo}", "point the path at an image file")]
