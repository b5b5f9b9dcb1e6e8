"""Check conversations before training and report every problem of every sample at once.

`validate` returns the valid conversations, every problem of every invalid one (a sample can have
several; each names the sample, its source, what is wrong and the fix) and the image headers it
read, keyed by resolved path, so that later accounting does not read them again.

Image checks read the header of each distinct path, once (`read_header`). A header read cannot see pixel
data that does not decode (a PNG with garbage compressed data, a truncated file): `verify_images=True`, which
prepare (and so train and doctor) sets, also decodes every image, as cheaply as its format allows
(`images.check_decodes`: JPEG at 1/8 scale), so that no image that passes here fails at training time;
inspect stays header-only. Small images are fine: transformers 5.24's Qwen2-VL image
processor upsamples any PIL image of at least 1x1 with an aspect ratio up to 200 to `min_pixels`
(checked for every size up to 11x11, 1x200, 3x600...), so only a zero-sized header is "too small".

Problem kinds (`Problem.kind`), read-time ones included (see `sources`):
    placeholder_mismatch, path_outside_media_dir, remote_image, bad_data_uri  (from `Conversation.read_problems`)
    missing_file, not_an_image, unreadable_file, corrupt_image, too_many_pixels, too_small,
    aspect_ratio, empty_conversation, control_token, unknown_role, turn_order, no_assistant, no_trained_turn, empty_turn,
    bad_video (with the reader's reason), no_video_decoder, video_sample (the processor would refuse the clip),
    unsupported_media
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import struct
import warnings
from dataclasses import dataclass, field, replace
from typing import Iterable

from PIL import Image, UnidentifiedImageError

from ...errors import Problem
from ...models.grid import MAX_ASPECT_RATIO, ImageSizeError
from ...models.spec import ModelSpec
from ...models.video_grid import VideoSampleError, VideoSpec
from ..media.images import ImageHeader, Source, check_decodes, read_header
from ..media.images import fileobj as _fileobj
from ..media.paths import quoted as _q
from ..media.video import PlannedClip, VideoReadError, plan_clip, read_facts
from ..types import ROLES, TOOL_ROLES, Conversation, ImagePart, VideoPart

# Pillow refuses to open images above 2 * Image.MAX_IMAGE_PIXELS (89,478,485 by default) with
# DecompressionBombError; we use the same number so that whatever passes here also opens later.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970

_BOMB_RE = re.compile(r"\((\d+) pixels\)")


@dataclass
class ValidationResult:
    valid: list[Conversation]
    problems: list[Problem]
    headers: dict[str, ImageHeader]
    videos: dict[str, PlannedClip] = field(default_factory=dict)  # the valid videos, read and planned, by path


# ----------------------------------------------------------------------------------------------
# Images: one check per distinct path, the outcome cached as a header or (kind, detail, fix)


@dataclass(frozen=True)
class _Bad:
    kind: str
    detail: str  # follows "image 'ref' " in the message
    fix: str


_FIX_REPLACE = "replace it with a valid image file (JPEG, PNG, WebP, ...) or remove the sample"
_FIX_REEXPORT = "re-export or re-download the image, or remove the sample"
_FIX_PATH = "check the path, or set media_dir to the folder the image paths are relative to"
_FIX_BOMB = "downscale the image file (the model sees at most image_max_pixels anyway), or remove the sample"


def _header_ignoring_bomb_limit(path: Source) -> tuple[int, int] | None:
    """The size in an image header, without Pillow's decompression-bomb check (no decoding)."""
    try:
        Image.init()
        with (open(path, "rb") if isinstance(path, str) else _fileobj(path)) as fp:
            prefix = fp.read(16)
            for fmt in Image.ID:
                factory, accept = Image.OPEN[fmt]
                accepted = True if accept is None else accept(prefix)
                if not accepted or isinstance(accepted, str):  # a str is Pillow's "cannot open" note
                    continue
                fp.seek(0)
                try:
                    im = factory(fp, path if isinstance(path, str) else "")
                except (SyntaxError, IndexError, TypeError, struct.error, OSError, ValueError):
                    continue
                try:
                    return im.size
                finally:
                    im.close()
    except Exception:
        return None
    return None


def _special_file(path: str) -> bool:
    """Whether path exists and is neither a regular file nor a folder (reported as such elsewhere)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _too_many(claimed: str, limit: int) -> _Bad:
    what = f"{claimed}, above the limit of {limit:,} (a possible decompression bomb); it was not decoded"
    return _Bad("too_many_pixels", what, _FIX_BOMB)


# The last bytes of a complete file: a truncated download or copy loses them. Reading 16 bytes from
# the end catches most truncated JPEG/PNG files without decoding anything.
_END_MARKERS = {"JPEG": (b"\xff\xd9",), "PNG": (b"IEND\xaeB`\x82",)}


def _tail_ok(path: Source, fmt: str | None) -> bool:
    markers = _END_MARKERS.get(fmt or "")
    if not markers:
        return True
    if not isinstance(path, str):
        return any(m in bytes(path[-16:]) for m in markers)  # bytes, or a memoryview (no `in` on views)
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16))
            tail = f.read()
    except OSError:
        return True  # reported by the header read or at training time
    # JPEG writers may pad after EOI; any marker in the last bytes counts.
    return any(m in tail for m in markers)


@dataclass
class _ImageRules:
    spec: ModelSpec  # its patch, merge and pixel bounds decide whether an image has a grid
    max_image_pixels: int
    verify: bool

    def check(self, source: Source, path: str) -> ImageHeader | _Bad | tuple[ImageHeader, _Bad]:
        """The header, or why the image is refused (with its header when that could be read).

        `source` is the file path or the image's bytes (embedded, inline); `path` is how it is shown.
        """
        if not isinstance(source, str):
            path = "embedded bytes" if path.startswith(("embedded:", "data:")) else path
        elif _special_file(source):  # a FIFO would block the read forever, a device never end: never opened
            return _Bad("not_an_image", f"is not a regular file (a FIFO, device or socket): {path}",
                        "point the path at an image file")
        try:
            header = read_header(source)
        except FileNotFoundError:
            return _Bad("missing_file", f"not found at {path}", _FIX_PATH)
        except IsADirectoryError:
            return _Bad("not_an_image", f"is a folder ({path}), not an image file", "point the path at an image file")
        except PermissionError:
            return _Bad("unreadable_file", f"cannot be read: permission denied ({path})", "make the file readable")
        except Image.DecompressionBombError as e:
            return self._bomb(source, e)
        except UnidentifiedImageError:
            try:
                empty = (os.path.getsize(source) if isinstance(source, str) else len(source)) == 0
            except OSError:
                empty = False
            if empty:
                return _Bad("not_an_image", f"is an empty file (0 bytes): {path}", _FIX_REPLACE)
            return _Bad("not_an_image", f"is not an image file Pillow can identify: {path}", _FIX_REPLACE)
        except Exception as e:  # broken headers raise all sorts (SyntaxError, struct.error, OSError...)
            return _Bad("corrupt_image", f"cannot be read ({type(e).__name__}: {str(e)[:200]}): {path}", _FIX_REEXPORT)

        w, h = header.width, header.height
        if w * h > self.max_image_pixels:
            return header, _too_many(f"is {w}x{h} = {w * h:,} pixels", self.max_image_pixels)
        if w <= 0 or h <= 0:
            fix = "replace the image: the processor cannot resize an image with no pixels"
            return header, _Bad("too_small", f"has a zero size ({w}x{h})", fix)
        try:
            self.spec.grid(h, w)
        except ImageSizeError:
            ratio = max(w, h) / min(w, h)
            return header, _Bad(
                "aspect_ratio",
                f"is {w}x{h}: its aspect ratio {ratio:.1f} is above the processor's limit of {MAX_ASPECT_RATIO}",
                f"crop or pad the image so that its longer side is at most {MAX_ASPECT_RATIO} times its shorter side",
            )
        if not self.verify and not _tail_ok(source, header.format):
            return header, _Bad("corrupt_image", f"is truncated: its {header.format} end marker is missing ({path})",
                                _FIX_REEXPORT)
        if self.verify:
            try:
                check_decodes(source)
            except Exception as e:
                return header, _Bad("corrupt_image", f"is truncated or corrupt ({str(e)[:200]}): {path}", _FIX_REEXPORT)
        return header

    def _bomb(self, path: Source, error: Exception) -> _Bad:
        size = _header_ignoring_bomb_limit(path)
        if size is not None:
            claimed = f"is {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels"
            if size[0] * size[1] > self.max_image_pixels:
                return _too_many(claimed, self.max_image_pixels)
        else:
            m = _BOMB_RE.search(str(error))
            claimed = f"claims {int(m.group(1)):,} pixels" if m else "claims too many pixels"
        # Within max_image_pixels but above Pillow's own limit: it would not open later either.
        pil_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        return _Bad(
            "too_many_pixels",
            f"{claimed}, above Pillow's limit of {pil_limit:,} (a possible decompression bomb); it was not decoded",
            "downscale the image, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file",
        )


# ----------------------------------------------------------------------------------------------
# Conversations

_FIX_ROLE = (
    "use one of the roles system, user, assistant, function_call, observation "
    "(sharegpt: system, human, gpt, function_call, observation; OpenAI: tool)"
)
# For the turn order a function call is an answer and a tool result a question (LLaMA-Factory's rule).
_ORDER_ROLE = {"function_call": "assistant", "observation": "user"}


# The tokens that frame turns and media in Qwen-VL's ChatML. Typed into a message they would be read as the
# control token (a turn boundary, an image run without an image, an end of text trained as a label), so a sample
# holding one is a `control_token` problem, unless control_tokens_in_text: text encodes them as plain text
# (encode.py). Tokens the chat template gives a meaning inside content (<think>, <tool_call>) are not here.
CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                  "<|vision_end|>", "<|endoftext|>")
_CONTROL_RE = re.compile("|".join(re.escape(t) for t in CONTROL_TOKENS))
_FIX_CONTROL = ("remove the token from the text, or set control_tokens_in_text: text to train it as plain text "
                "(docs/datasets.md)")


def _control_token_problems(conv: Conversation, as_text: bool) -> list[tuple[str, str, str]]:
    """Control tokens typed into the conversation: in message text (plain text with control_tokens_in_text:
    text), and in tool calls and tool definitions (JSON the template writes out as is: always a problem)."""
    out = []
    for i, m in enumerate(conv.messages, 1):
        places = [] if as_text else [("text", m.text)]
        places += [("tool call", json.dumps(c, ensure_ascii=False)) for c in m.tool_calls or []]
        for where, text in places:
            found = sorted(set(_CONTROL_RE.findall(text)))
            if found:
                what = f"message {i} ({_q(m.role)}) has the control token(s) {', '.join(found)} in its {where}"
                out.append(("control_token", what, _FIX_CONTROL))
    found = sorted(set(_CONTROL_RE.findall(json.dumps(conv.tools or [], ensure_ascii=False))))
    if found:
        out.append(("control_token", f"the tool definitions have the control token(s) {', '.join(found)}",
                    "remove the token from the tool definitions"))
    return out


def _conversation_problems(conv: Conversation) -> list[tuple[str, str, str]]:
    messages = conv.messages
    if not messages:
        return [
            (
                "empty_conversation",
                "conversation has no messages",
                "add a user turn and an assistant turn, or remove the sample",
            )
        ]
    out: list[tuple[str, str, str]] = []
    known: list[tuple[int, str]] = []
    for i, m in enumerate(messages, 1):
        if m.role not in ROLES and m.role not in TOOL_ROLES:
            out.append(("unknown_role", f"message {i} has role {_q(m.role)}, which is not supported", _FIX_ROLE))
        else:
            known.append((i, _ORDER_ROLE.get(m.role, m.role)))
        if not m.images and not m.videos and not m.text.strip() and not m.tool_calls:
            what = f"message {i} ({_q(m.role)}) is empty"
            out.append(("empty_turn", what, "write the turn's text, or remove the turn"))
    order = _order_problem(known)
    if order is not None:
        out.append(order)
    assistants = [m for m in messages if m.role in ("assistant", "function_call")]
    if assistants and all(m.weight == 0 for m in assistants):
        out.append(
            (
                "no_trained_turn",
                f"every assistant turn has weight 0 ({len(assistants)}), so there is nothing to learn",
                "give at least one assistant turn weight 1, or remove the sample",
            )
        )
    if not any(role == "assistant" for _, role in known):
        out.append(
            (
                "no_assistant",
                "conversation has no assistant turn, so there is nothing to learn",
                "add the assistant's answer, or remove the sample",
            )
        )
    return out


def _order_problem(known: list[tuple[int, str]]) -> tuple[str, str, str] | None:
    """The first turn-order problem: system only first, then user/assistant alternating from user."""
    prev: str | None = None
    for pos, (i, role) in enumerate(known):
        if role == "system":
            if pos != 0:
                return (
                    "turn_order",
                    f"message {i} is a system turn; a system turn may only come first",
                    "move the system prompt to the first message (or the top-level `system` field)",
                )
        elif prev in (None, "system"):
            if role == "assistant":
                return (
                    "turn_order",
                    f"message {i} (assistant) comes before any user turn",
                    "start the conversation with a user turn (after an optional system turn)",
                )
        elif role == prev:
            return (
                "turn_order",
                f"messages {known[pos - 1][0]} and {i} are both {role} turns",
                "alternate user and assistant turns: merge the two turns into one",
            )
        prev = role
    if prev == "user" and any(role == "assistant" for _, role in known):
        return (
            "turn_order",
            f"the conversation ends with a user turn (message {known[-1][0]}) that has no answer",
            "add the assistant's answer, or remove the last user turn",
        )
    return None


def _located(found: list[Problem], conv: Conversation) -> list[Problem]:
    """The sample's problems with its place in the data (file, index), as the readers' own problems carry it."""
    if conv.origin is None:
        return found
    return [p if p.file is not None else dataclasses.replace(p, file=conv.origin.file, index=conv.origin.index)
            for p in found]


def validate(
    conversations: Iterable[Conversation],
    spec: ModelSpec,
    *,
    check_images: bool = True,
    verify_images: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    progress: bool = False,
    video_spec: VideoSpec | None = None,
    control_tokens_as_text: bool = False,
) -> ValidationResult:
    """Every problem of every conversation, the valid ones, and the image headers read.

    A conversation is valid when it has no `read_problems` and no problem here. Problems come per
    sample in this order: its read problems, conversation structure, then its images in order.
    Only the first turn-order problem of a sample is reported (later ones are usually its echo);
    turns with unknown roles are left out of the order check. An image in an assistant turn is
    allowed (the Qwen chat template renders it). `check_images=False` skips the files (structure
    only); `verify_images=True` decodes each image fully to catch truncated files. Images whose
    header claims more than `max_image_pixels` (default: Pillow's own hard limit, 178,956,970)
    are rejected without being decoded. Each distinct path is checked once. An image's grid (its aspect ratio
    and size) is checked under `spec`'s patch and merge sizes and pixel bounds.

    Videos: each distinct clip's container is read once (`read_facts`: packet headers and the first frame),
    then planned under `video_spec` (the loaded processor's, with the config's video keys); a clip that
    cannot be read or that the processor would refuse is a problem of each sample that has it. Without a
    `video_spec` (a processor vlmtune cannot account videos for) every video is refused.
    """
    rules = _ImageRules(spec, max_image_pixels, verify_images)
    valid: list[Conversation] = []
    problems: list[Problem] = []
    headers: dict[str, ImageHeader] = {}
    checked: dict[str, ImageHeader | _Bad | tuple[ImageHeader, _Bad]] = {}
    clips: dict[str, PlannedClip | _Bad] = {}
    videos: dict[str, PlannedClip] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if progress and isinstance(conversations, list) and len(conversations) >= 10_000:
            from tqdm.auto import tqdm

            conversations = tqdm(conversations, desc="validating", unit="sample")
        for conv in conversations:
            found: list[Problem] = list(conv.read_problems)
            for kind, what, fix in _conversation_problems(conv) + _control_token_problems(conv, control_tokens_as_text):
                found.append(Problem(source=conv.source, what=what, fix=fix, sample_id=conv.id, kind=kind))
            if check_images:
                for img in conv.images:
                    bad = _image_problem(img, conv, rules, checked, headers)
                    if bad is not None:
                        found.append(bad)
                for video in conv.videos:
                    bad = _video_problem(video, conv, video_spec, clips)
                    if bad is not None:
                        found.append(bad)
                _drop_bytes(conv)
            if found:
                problems.extend(_located(found, conv))
            else:
                valid.append(conv)
                videos.update((v.path, clips[v.path]) for v in conv.videos if check_images)
    return ValidationResult(valid=valid, problems=problems, headers=headers, videos=videos)


def _drop_bytes(conv: Conversation) -> None:
    """Embedded/inline bytes are needed only for the header: later stages find them again through the
    path, so that memory holds the images of the chunk in flight, not of the whole dataset."""
    for m in conv.messages:
        for j, p in enumerate(m.parts):
            if isinstance(p, ImagePart) and p.data is not None:
                m.parts[j] = replace(p, data=None)


def _image_problem(
    img: ImagePart, conv: Conversation, rules: _ImageRules, checked: dict, headers: dict[str, ImageHeader]
) -> Problem | None:
    if img.path is None:
        if conv.read_problems:  # refused or unresolvable at read time: already reported
            return None
        what = f"image {_q(img.ref)} could not be resolved to a file"
        return Problem(source=conv.source, what=what, fix=_FIX_PATH, sample_id=conv.id, kind="missing_file")
    outcome = checked.get(img.path)
    if outcome is None:
        outcome = checked[img.path] = rules.check(img.data if img.data is not None else img.path, img.path)
        if isinstance(outcome, ImageHeader):
            headers[img.path] = outcome
        elif isinstance(outcome, tuple):
            headers[img.path] = outcome[0]
    if isinstance(outcome, ImageHeader):
        return None
    bad = outcome[1] if isinstance(outcome, tuple) else outcome
    what = f"image {_q(img.ref)} {bad.detail}"
    return Problem(source=conv.source, what=what, fix=bad.fix, sample_id=conv.id, kind=bad.kind)


_VIDEO_KINDS = {"missing": "missing_file", "no_decoder": "no_video_decoder"}


def _video_problem(video: VideoPart, conv: Conversation, spec: VideoSpec | None, clips: dict) -> Problem | None:
    """The problem of one video of `conv`, or None; each distinct path is read and planned once."""
    if video.path is None:
        if conv.read_problems:  # refused or unresolvable at read time: already reported
            return None
        what = f"video {_q(video.ref)} could not be resolved to a file"
        return Problem(source=conv.source, what=what, fix=_FIX_PATH, sample_id=conv.id, kind="missing_file")
    if spec is None:
        return Problem(source=conv.source, what=f"video {_q(video.ref)}: this processor has no Qwen-VL video processor",
                       fix="use a Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint, or remove the video",
                       sample_id=conv.id, kind="unsupported_media")
    outcome = clips.get(video.path)
    if outcome is None and _special_file(video.path):
        outcome = clips[video.path] = _Bad("bad_video", f"is not a regular file (a FIFO, device or socket): "
                                           f"{video.path}", "point the path at a video file")
    if outcome is None:
        outcome = clips[video.path] = _check_clip(video.path, spec)
    if isinstance(outcome, PlannedClip):
        return None
    return Problem(source=conv.source, what=f"video {_q(video.ref)} {outcome.detail}", fix=outcome.fix,
                   sample_id=conv.id, kind=outcome.kind)


def _check_clip(path: str, spec: VideoSpec) -> PlannedClip | _Bad:
    try:
        facts = read_facts(path)
    except VideoReadError as e:
        return _Bad(_VIDEO_KINDS.get(e.kind, "bad_video"), f"{e.what} ({path})", e.fix)
    try:
        return plan_clip(path, spec, facts)
    except VideoSampleError as e:
        return _Bad("video_sample", f"({facts.frames} frames at {facts.fps:.3g} fps, {facts.width}x{facts.height}) "
                    f"cannot be sampled by the processor: {e}",
                    "change video_fps / video_maxlen, re-encode the clip, or remove the sample")
