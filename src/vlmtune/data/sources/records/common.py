"""What every record layout shares: the record format (LLaMA-Factory `columns` / `tags`), media values, the
builder that turns texts with `<image>` / `<video>` placeholders and content parts into `Part`s, and roles.

A converter raises `BadRecord` for a record it cannot read; `records.record_to_conversation` turns it into the
record's one Problem (see readers.py for the accounting rules).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ....errors import Problem
from ...media.paths import MAX_PATH_CHARS, MediaRules, resolve_image
from ...media.paths import URL_RE as _URL_RE
from ...media.paths import quoted as _q
from ...types import EMBEDDED_PREFIX, Conversation, ImagePart, Message, Part, TextPart, VideoPart

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
_PLACEHOLDER_RE = re.compile(r"(<image>|<video>)")

# Media that is not supported yet: reported and skipped, never trained as text.
UNSUPPORTED_KEYS = ("audios", "audio")
_UNSUPPORTED_PLACEHOLDERS = ("<audio>",)
_UNSUPPORTED_PARTS = ("video_url", "audio", "audio_url", "input_audio")
_FIX_MEDIA = "remove the audio (or video URL part) from the sample, or the sample (audio is not supported yet)"

_DATA_URI_RE = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),", re.ASCII)


# A text field longer than this is certainly not a training turn (hundreds of thousands of tokens).
MAX_TEXT_CHARS = 1_000_000


_ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}


_TYPE_NAMES = {
    dict: "an object",
    list: "a list",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
}


_PARTS_HINT = '{"type": "text", "text": ...} or {"type": "image", "image": PATH}'


@dataclass(frozen=True)
class RecordFormat:
    """Where a record keeps its turns and images (LLaMA-Factory `columns` and `tags`).

    `None` for `messages`, `role_tag` or `content_tag` means "detect": `messages` then
    `conversations` for the turns; `role`/`content` or `from`/`value` per message. `formatting` is the
    dataset_info.json entry's (`sharegpt`, `alpaca`, `openai`), None when records are detected one by one.
    The alpaca columns (`prompt`, `query`, `response`, `history`) apply to alpaca records; `kto_tag`,
    `ranking`, `chosen` and `rejected` mark preference data (never SFT targets: records.untrainable).
    """

    messages: str | None = None
    images: str = "images"
    videos: str = "videos"
    system: str | None = "system"
    tools: str | None = "tools"
    role_tag: str | None = None
    content_tag: str | None = None
    user_tag: str = "user"
    assistant_tag: str = "assistant"
    system_tag: str = "system"
    observation_tag: str = "observation"
    function_tag: str = "function_call"
    formatting: str | None = None
    prompt: str = "instruction"
    query: str = "input"
    response: str = "output"
    history: str | None = "history"
    kto_tag: str | None = None
    ranking: bool = False
    chosen: str | None = None
    rejected: str | None = None


AUTO_FORMAT = RecordFormat()


# LLaMA-Factory's defaults for `"formatting": "sharegpt"` entries of dataset_info.json.
SHAREGPT_DEFAULTS = RecordFormat(
    messages="conversations",
    role_tag="from",
    content_tag="value",
    user_tag="human",
    assistant_tag="gpt",
    formatting="sharegpt",
)


class BadRecord(Exception):
    def __init__(self, what: str, fix: str, kind: str = "bad_record"):
        super().__init__(what)
        self.what, self.fix, self.kind = what, fix, kind


@dataclass(frozen=True)
class Embedded:
    """Image bytes that came with the record; `pointer` locates them inside the record."""

    data: bytes
    name: str
    pointer: tuple


def unsupported(what: str) -> BadRecord:
    return BadRecord(what, _FIX_MEDIA, kind="unsupported_media")


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def check_text(text: str, where: str) -> None:
    if len(text) > MAX_TEXT_CHARS:
        raise BadRecord(
            f"{where} is {len(text):,} characters long, above the limit of {MAX_TEXT_CHARS:,}",
            "shorten the text or remove the sample",
        )


def _kept(data):
    """The bytes as they are when they are a view into a memory-mapped table (data/sources/formats.rows_of): copying
    them would read every page of every image; `bytes` otherwise."""
    return data if isinstance(data, memoryview) else bytes(data)


def image_value(value: Any, where: str, pointer: tuple) -> str | Embedded:
    """A path string, or the bytes of an embedded image (a `datasets` Image value, a PIL image)."""
    if isinstance(value, dict) and value.get("bytes") is not None:  # a `datasets` Image value
        data = value["bytes"]
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise BadRecord(f"the `bytes` of {where} are {type_name(data)}", "store the image file's bytes")
        name = value.get("path") if isinstance(value.get("path"), str) else None
        return Embedded(_kept(data), name or f"<embedded image, {len(data):,} bytes>", (*pointer, "bytes"))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Embedded(_kept(value), f"<embedded image, {len(value):,} bytes>", pointer)
    if hasattr(value, "getbands") and hasattr(value, "save"):  # a decoded PIL image
        buf = io.BytesIO()
        value.save(buf, format="PNG")  # lossless: the pixels, and so the size, are the same
        return Embedded(buf.getvalue(), "<decoded PIL image>", pointer)
    return check_ref(value, where)


def check_ref(ref: Any, where: str, media: str = "image") -> str:
    if isinstance(ref, dict) and isinstance(ref.get("path"), str):
        ref = ref["path"]
    if not isinstance(ref, str):
        raise BadRecord(f"{where} is {type_name(ref)}, expected a path string", f"write the {media} path as a string")
    if not ref.strip():
        raise BadRecord(f"{where} is an empty path", f"write the {media} path, or remove the {media}")
    if "\x00" in ref:
        raise BadRecord(f"{where} contains a NUL character", f"fix the {media} path")
    if len(ref) > MAX_PATH_CHARS and not _URL_RE.match(ref):
        raise BadRecord(
            f"{where} is {len(ref):,} characters long, above the path limit of {MAX_PATH_CHARS:,}",
            f"fix the {media} path",
        )
    return ref


@dataclass(frozen=True)
class Context:
    """What converting a record needs besides the record: where its media resolve and may live, and, for
    embedded images, the row's locator (`origin`, data/sources/formats.py; without it the bytes stay inline)."""

    base_dir: str
    rules: MediaRules = field(default_factory=MediaRules)  # the read's, one for all its records
    origin: list | None = None


class Builder:
    """Turns one record's turns into parts, consuming the top-level images at `<image>` placeholders.

    `images_key` / `videos_key` name the record's media columns (checked here); their counts against the
    placeholders, and the problems met resolving paths, become the conversation's read problems (`finish`)."""

    def __init__(self, record: dict, ctx: Context, images_key: str = "images", videos_key: str = "videos"):
        self.images = media_list(record.get(images_key), images_key)
        self.videos = videos_of(record.get(videos_key), videos_key)
        self.images_key, self.videos_key = images_key, videos_key
        self.next_video = 0
        self.video_placeholders = 0
        self.origin = ctx.origin
        self.next_image = 0
        self.placeholders = 0
        self.base_dir = ctx.base_dir
        self.rules = ctx.rules
        self.read_problems: list[tuple[str, str, str]] = []
        self.saw_pathless_part = self.saw_image_url = False

    def image(self, ref: str | Embedded) -> ImagePart:
        if isinstance(ref, Embedded):
            return self._embedded(ref)
        if ref.startswith("data:"):
            return self._data_uri(ref)
        return ImagePart(ref=ref, path=self._resolved(ref))

    def _embedded(self, emb: Embedded) -> ImagePart:
        if self.origin is not None:  # a reference to the source row: no second copy of the bytes
            path = EMBEDDED_PREFIX + json.dumps([*self.origin, list(emb.pointer)], separators=(",", ":"))
        else:
            path = "data:application/octet-stream;base64," + base64.b64encode(emb.data).decode("ascii")
        return ImagePart(ref=emb.name, path=path, data=emb.data)

    def _data_uri(self, ref: str) -> ImagePart:
        m = _DATA_URI_RE.match(ref)
        shown = _q(ref[:60] + ("..." if len(ref) > 60 else ""))
        data = None
        if m and ";base64" in m.group(2).lower():
            try:
                data = base64.b64decode(ref[m.end():], validate=True)
            except (binascii.Error, ValueError):
                data = None
        if not data:
            self.read_problems.append((
                "bad_data_uri",
                f"image {shown} is not a base64 `data:` URI with image bytes",
                "write inline images as data:image/png;base64,<bytes>, or as a path",
            ))
            return ImagePart(ref=ref, path=None)
        return ImagePart(ref=ref, path=ref, data=data)

    def _resolved(self, ref: str, media: str = "image") -> str | None:
        """The resolved path of an image or video reference (a `file://` URL is a local path), else None and
        the reason recorded."""
        local = urllib.parse.unquote(urllib.parse.urlsplit(ref).path) if ref[:7].lower() == "file://" else ref
        path, problem = resolve_image(local, self.base_dir, self.rules, media=media)
        if problem is not None:
            self.read_problems.append(problem)
        return path

    def video(self, ref: str) -> VideoPart:
        return VideoPart(ref=ref, path=self._resolved(ref, "video"))

    def video_placeholder(self, parts: list[Part]) -> None:
        """A `<video>` (or a video part without a path): the next top-level video goes here."""
        self.video_placeholders += 1
        if self.next_video < len(self.videos):
            parts.append(self.video(self.videos[self.next_video]))
            self.next_video += 1

    def placeholder(self, parts: list[Part]) -> None:
        """An `<image>` (or an image part without a path): the next top-level image goes here."""
        self.placeholders += 1
        if self.next_image < len(self.images):
            parts.append(self.image(self.images[self.next_image]))
            self.next_image += 1

    def text(self, text: str, parts: list[Part]) -> None:
        for tag in _UNSUPPORTED_PLACEHOLDERS:
            if tag in text:
                raise unsupported(f"a text has a {tag} placeholder; {tag[1:-1]} is not supported yet")
        if IMAGE_PLACEHOLDER not in text and VIDEO_PLACEHOLDER not in text:
            if text:
                parts.append(TextPart(text))
            return
        for piece in _PLACEHOLDER_RE.split(text):
            if piece == IMAGE_PLACEHOLDER:
                self.placeholder(parts)
            elif piece == VIDEO_PLACEHOLDER:
                self.video_placeholder(parts)
            elif piece:
                parts.append(TextPart(piece))


def content_parts(content: Any, where: str, builder: Builder, pointer: tuple = ()) -> list[Part]:
    parts: list[Part] = []
    if isinstance(content, str):
        check_text(content, f"the text of {where}")
        builder.text(content, parts)
        return parts
    if not isinstance(content, list):
        raise BadRecord(
            f"the content of {where} is {type_name(content)}, expected a string or a list of parts",
            "write the content as a string, or as a list of {\"type\": \"text\"|\"image\", ...} parts",
        )
    for j, part in enumerate(content, 1):
        pwhere = f"part {j} of {where}"
        if isinstance(part, str):  # a bare string part: plain text
            check_text(part, pwhere)
            builder.text(part, parts)
            continue
        if not isinstance(part, dict):
            raise BadRecord(
                f"{pwhere} is {type_name(part)}, expected an object",
                f"write each part as {_PARTS_HINT}",
            )
        ptype = part.get("type")
        if ptype is None:
            ptype = "text" if "text" in part else "image" if ("image" in part or "path" in part) else None
        if ptype == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRecord(
                    f"the text of {pwhere} is {type_name(text)}, expected a string", "write the text as a string"
                )
            check_text(text, f"the text of {pwhere}")
            builder.text(text, parts)
        elif ptype == "image":
            key = next((k for k in ("image", "path", "url") if part.get(k) is not None), None)
            if key is None:  # TRL/llava style: {"type": "image"} stands for the next of `images`
                builder.saw_pathless_part = True
                builder.placeholder(parts)
            else:
                value = image_value(part[key], f"the image of {pwhere}", (*pointer, j - 1, key))
                parts.append(builder.image(value))
        elif ptype == "video":
            key = next((k for k in ("video", "path") if part.get(k) is not None), None)
            if key is None:  # {"type": "video"} stands for the next of `videos`
                builder.video_placeholder(parts)
            else:
                parts.append(builder.video(_video_value(part[key], f"the video of {pwhere}")))
        elif ptype == "image_url":
            url, ptr = part.get("image_url"), (*pointer, j - 1, "image_url")
            if isinstance(url, dict):
                url, ptr = url.get("url"), (*ptr, "url")
            builder.saw_image_url = True
            parts.append(builder.image(image_value(url, f"the image_url of {pwhere}", ptr)))
        elif ptype in _UNSUPPORTED_PARTS:
            what = "audio is not supported yet" if "audio" in ptype else "give videos as local files (`video` parts)"
            raise unsupported(f"{pwhere} is a `{ptype}` part; {what}")
        elif ptype is None:
            raise BadRecord(
                f"{pwhere} has no `type`",
                f"give each part a type: {_PARTS_HINT}",
            )
        else:
            shown = _q(ptype) if isinstance(ptype, str) else type_name(ptype)
            raise BadRecord(
                f"{pwhere} has type {shown}; only text, image and video parts are supported",
                "remove the part or convert it to a text, image or video part",
            )
    return parts


def role_of(raw: str, fmt: RecordFormat) -> str:
    if raw == fmt.user_tag:
        return "user"
    if raw == fmt.assistant_tag:
        return "assistant"
    if raw == fmt.system_tag:
        return "system"
    if raw == fmt.observation_tag:
        return "observation"
    if raw == fmt.function_tag:
        return "function_call"
    # Unknown roles (observation, function_call, tool, ...) are kept as written; validate reports them.
    return _ROLE_ALIASES.get(raw, raw)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _video_value(value: Any, where: str) -> str:
    """A video reference: a path string (or {"path": ...}); clips are decoded from files, never embedded."""
    if isinstance(value, (bytes, bytearray)) or (isinstance(value, dict) and value.get("bytes") is not None):
        raise BadRecord(f"{where} holds embedded video bytes; videos are read from files",
                         "write the clip to a file and reference its path")
    return check_ref(value, where, "video")


def media_list(images: Any, key: str) -> list:
    """A record's image column as a list of paths or embedded images (a single value is a list of one)."""
    if images is None:
        return []
    if isinstance(images, (str, dict, bytes)) or hasattr(images, "getbands"):
        return [image_value(images, f"`{key}`", (key,))]
    if not isinstance(images, list):
        raise BadRecord(f"`{key}` is {type_name(images)}, expected a list of paths",
                        f"write `{key}` as a list of image paths")
    return [image_value(ref, f"`{key}`[{i}]", (key, i)) for i, ref in enumerate(images)]


def videos_of(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, dict, bytes, bytearray)):
        return [_video_value(value, f"`{key}`")]
    if not isinstance(value, list):
        raise BadRecord(f"`{key}` is {type_name(value)}, expected a list of paths",
                         f"write `{key}` as a list of video paths")
    return [_video_value(v, f"`{key}`[{i}]") for i, v in enumerate(value)]


def file_problem(source: str, kind: str, what: str, fix: str, file: str | None = None,
                 index: int | None = None) -> Problem:
    return Problem(source=source, what=what, fix=fix, sample_id=None, kind=kind, file=file, index=index)


class Converted(NamedTuple):
    """What a converter makes of a record: its messages, the builder that consumed its media, its tools."""

    messages: list[Message]
    builder: Builder
    tools: list | None


def finish(builder: Builder, messages: list[Message], layout: str, sample_id: str, source: str,
           tools: list | None = None) -> Conversation:
    """The record's conversation, with placeholder/media count mismatches and path problems as read problems."""
    read_problems: list[Problem] = []
    counts = ((builder.placeholders, len(builder.images), IMAGE_PLACEHOLDER, "image", "an", builder.images_key),
              (builder.video_placeholders, len(builder.videos), VIDEO_PLACEHOLDER, "video", "a", builder.videos_key))
    for p, n, placeholder, media, article, key in counts:
        if p == n:
            continue
        what = f"{plural(p, placeholder + ' placeholder')} but {plural(n, media)} in `{key}`"
        if p > n:
            fix = f"add the missing {media} path or remove the extra placeholder"
        else:
            fix = f"add {article} {placeholder} placeholder where each {media} goes, or remove the extra {media} path"
        read_problems.append(
            Problem(source=source, what=what, fix=fix, sample_id=sample_id, kind="placeholder_mismatch")
        )
    for kind, what, fix in builder.read_problems:
        read_problems.append(Problem(source=source, what=what, fix=fix, sample_id=sample_id, kind=kind))
    return Conversation(id=sample_id, source=source, messages=messages, read_problems=read_problems, layout=layout,
                        tools=tools)


def column(record: dict, key: str, expect: type, what: str, required: bool = True) -> Any:
    """`record[key]` checked to be `expect` (None when absent and not required)."""
    value = record.get(key)
    if value is None:
        if required:
            raise BadRecord(f"record has no `{key}` ({what})", f"add `{key}` to the record, or fix the mapping")
        return None
    if not isinstance(value, expect):
        raise BadRecord(f"`{key}` is {type_name(value)}, expected {_TYPE_NAMES.get(expect, expect.__name__)} ({what})",
                        f"write `{key}` as {_TYPE_NAMES.get(expect, expect.__name__)}")
    return value
