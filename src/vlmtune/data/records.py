"""Record layouts → `Conversation`: one function per way a dataset row can hold turns and images.

A bad record raises nothing: it yields exactly one Problem (see readers.py for the accounting rules).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

from ..errors import Problem
from .paths import _URL_RE, MAX_PATH_CHARS, PathCache, _q, resolve_image
from .types import EMBEDDED_PREFIX, Conversation, ImagePart, Message, Part, TextPart, VideoPart

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
_PLACEHOLDER_RE = re.compile(r"(<image>|<video>)")

# Media that is not supported yet: reported and skipped, never trained as text.
_UNSUPPORTED_KEYS = ("audios", "audio")
_UNSUPPORTED_PLACEHOLDERS = ("<audio>",)
_UNSUPPORTED_PARTS = ("video_url", "audio", "audio_url", "input_audio")
_FIX_MEDIA = "remove the audio (or video URL part) from the sample, or the sample (audio is not supported yet)"

# The layouts recognised without a mapping (`Conversation.layout`), with what gives each away.
LAYOUTS = {
    "sharegpt": "LLaMA-Factory sharegpt / HF chat (`messages` or `conversations`, `images`)",
    "trl": "TRL / llava-instruct-mix (`messages` with image parts without a path, `images` column in order)",
    "llava": "LLaVA / ShareGPT4V (`image`, `conversations` from/value human/gpt)",
    "cauldron": "the_cauldron (`images`, `texts` of {user, assistant})",
    "openai": "OpenAI chat fine-tuning (`image_url` parts, `data:` URIs, `weight`)",
    "ranking": "LLaMA-Factory ranking pairs (`ranking: true`, `chosen` / `rejected`)",
    "trl_preference": "TRL preference pairs (`prompt` / `chosen` / `rejected`, explicit or implicit prompt)",
    "kto": "KTO answers tagged desirable / undesirable (LLaMA-Factory `kto_tag`, TRL `prompt` / `completion` / `label`)",
}

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
    `conversations` for the turns; `role`/`content` or `from`/`value` per message.
    """

    messages: str | None = None
    images: str = "images"
    videos: str = "videos"
    system: str | None = "system"
    role_tag: str | None = None
    content_tag: str | None = None
    user_tag: str = "user"
    assistant_tag: str = "assistant"
    system_tag: str = "system"
    observation_tag: str = "observation"
    function_tag: str = "function_call"
    # preference datasets (data/preference_records.py): LLaMA-Factory `ranking: true` with its chosen /
    # rejected columns, `kto_tag`, and alpaca's prompt / query columns for ranking alpaca entries
    formatting: str | None = None
    ranking: bool = False
    chosen: str = "chosen"
    rejected: str = "rejected"
    kto_tag: str | None = None
    prompt: str = "instruction"
    query: str = "input"


AUTO_FORMAT = RecordFormat()


# LLaMA-Factory's defaults for `"formatting": "sharegpt"` entries of dataset_info.json.
SHAREGPT_DEFAULTS = RecordFormat(
    messages="conversations",
    role_tag="from",
    content_tag="value",
    user_tag="human",
    assistant_tag="gpt",
)


class _BadRecord(Exception):
    def __init__(self, what: str, fix: str, kind: str = "bad_record"):
        super().__init__(what)
        self.what, self.fix, self.kind = what, fix, kind


@dataclass(frozen=True)
class _Embedded:
    """Image bytes that came with the record; `pointer` locates them inside the record."""

    data: bytes
    name: str
    pointer: tuple


def _unsupported(what: str) -> _BadRecord:
    return _BadRecord(what, _FIX_MEDIA, kind="unsupported_media")


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _check_text(text: str, where: str) -> None:
    if len(text) > MAX_TEXT_CHARS:
        raise _BadRecord(
            f"{where} is {len(text):,} characters long, above the limit of {MAX_TEXT_CHARS:,}",
            "shorten the text or remove the sample",
        )


def _image_value(value: Any, where: str, pointer: tuple) -> str | _Embedded:
    """A path string, or the bytes of an embedded image (a `datasets` Image value, a PIL image)."""
    if isinstance(value, dict) and value.get("bytes") is not None:  # a `datasets` Image value
        data = value["bytes"]
        if not isinstance(data, (bytes, bytearray)):
            raise _BadRecord(f"the `bytes` of {where} are {_type_name(data)}", "store the image file's bytes")
        name = value.get("path") if isinstance(value.get("path"), str) else None
        return _Embedded(bytes(data), name or f"<embedded image, {len(data):,} bytes>", (*pointer, "bytes"))
    if isinstance(value, (bytes, bytearray)):
        return _Embedded(bytes(value), f"<embedded image, {len(value):,} bytes>", pointer)
    if hasattr(value, "getbands") and hasattr(value, "save"):  # a decoded PIL image
        buf = io.BytesIO()
        value.save(buf, format="PNG")  # lossless: the pixels, and so the size, are the same
        return _Embedded(buf.getvalue(), "<decoded PIL image>", pointer)
    return _check_ref(value, where)


def _check_ref(ref: Any, where: str, media: str = "image") -> str:
    if isinstance(ref, dict) and isinstance(ref.get("path"), str):
        ref = ref["path"]
    if not isinstance(ref, str):
        raise _BadRecord(f"{where} is {_type_name(ref)}, expected a path string", f"write the {media} path as a string")
    if not ref.strip():
        raise _BadRecord(f"{where} is an empty path", f"write the {media} path, or remove the {media}")
    if "\x00" in ref:
        raise _BadRecord(f"{where} contains a NUL character", f"fix the {media} path")
    if len(ref) > MAX_PATH_CHARS and not _URL_RE.match(ref):
        raise _BadRecord(
            f"{where} is {len(ref):,} characters long, above the path limit of {MAX_PATH_CHARS:,}",
            f"fix the {media} path",
        )
    return ref


class _Builder:
    """Turns one record's turns into parts, consuming the top-level images at `<image>` placeholders."""

    def __init__(self, images: list, base_dir: str, allow_outside: bool, allow_remote: bool, cache: PathCache,
                 origin: list | None = None, videos: list | None = None):
        self.images = images
        self.videos = videos or []
        self.next_video = 0
        self.video_placeholders = 0
        self.origin = origin
        self.cache = cache
        self.next_image = 0
        self.placeholders = 0
        self.base_dir = base_dir
        self.allow_outside = allow_outside
        self.allow_remote = allow_remote
        self.read_problems: list[tuple[str, str, str]] = []
        self.saw_pathless_part = self.saw_image_url = False

    def image(self, ref: str | _Embedded) -> ImagePart:
        if isinstance(ref, _Embedded):
            return self._embedded(ref)
        if ref.startswith("data:"):
            return self._data_uri(ref)
        return ImagePart(ref=ref, path=self._resolved(ref))

    def _embedded(self, emb: _Embedded) -> ImagePart:
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
        path, problem = resolve_image(local, self.base_dir, allow_paths_outside_media_dir=self.allow_outside,
                                      allow_remote_images=self.allow_remote, cache=self.cache, media=media)
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
                raise _unsupported(f"a text has a {tag} placeholder; {tag[1:-1]} is not supported yet")
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


def _content_parts(content: Any, where: str, builder: _Builder, pointer: tuple = ()) -> list[Part]:
    parts: list[Part] = []
    if isinstance(content, str):
        _check_text(content, f"the text of {where}")
        builder.text(content, parts)
        return parts
    if not isinstance(content, list):
        raise _BadRecord(
            f"the content of {where} is {_type_name(content)}, expected a string or a list of parts",
            "write the content as a string, or as a list of {\"type\": \"text\"|\"image\", ...} parts",
        )
    for j, part in enumerate(content, 1):
        pwhere = f"part {j} of {where}"
        if isinstance(part, str):  # a bare string part: plain text
            _check_text(part, pwhere)
            builder.text(part, parts)
            continue
        if not isinstance(part, dict):
            raise _BadRecord(
                f"{pwhere} is {_type_name(part)}, expected an object",
                f"write each part as {_PARTS_HINT}",
            )
        ptype = part.get("type")
        if ptype is None:
            ptype = "text" if "text" in part else "image" if ("image" in part or "path" in part) else None
        if ptype == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _BadRecord(
                    f"the text of {pwhere} is {_type_name(text)}, expected a string", "write the text as a string"
                )
            _check_text(text, f"the text of {pwhere}")
            builder.text(text, parts)
        elif ptype == "image":
            key = next((k for k in ("image", "path", "url") if part.get(k) is not None), None)
            if key is None:  # TRL/llava style: {"type": "image"} stands for the next of `images`
                builder.saw_pathless_part = True
                builder.placeholder(parts)
            else:
                value = _image_value(part[key], f"the image of {pwhere}", (*pointer, j - 1, key))
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
            parts.append(builder.image(_image_value(url, f"the image_url of {pwhere}", ptr)))
        elif ptype in _UNSUPPORTED_PARTS:
            what = "audio is not supported yet" if "audio" in ptype else "give videos as local files (`video` parts)"
            raise _unsupported(f"{pwhere} is a `{ptype}` part; {what}")
        elif ptype is None:
            raise _BadRecord(
                f"{pwhere} has no `type`",
                f"give each part a type: {_PARTS_HINT}",
            )
        else:
            shown = _q(ptype) if isinstance(ptype, str) else _type_name(ptype)
            raise _BadRecord(
                f"{pwhere} has type {shown}; only text, image and video parts are supported",
                "remove the part or convert it to a text, image or video part",
            )
    return parts


def _role_of(raw: str, fmt: RecordFormat) -> str:
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


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def record_to_conversation(
    record: Any,
    *,
    sample_id: str,
    source: str,
    base_dir: str,
    fmt: RecordFormat = AUTO_FORMAT,
    allow_paths_outside_media_dir: bool = False,
    allow_remote_images: bool = False,
    cache: PathCache | None = None,
    origin: list | None = None,
) -> Conversation | Problem:
    """One record as a `Conversation`, or the one `Problem` (kind "bad_record") why it yields none.

    Never raises on bad input. Placeholder/image count mismatches and refused image paths still
    yield a conversation, with the problems in its `read_problems` (refused images have `path=None`).
    Relative image paths resolve against `base_dir`, which is also the folder they must stay in.
    Pass one `cache` for all the records of one read to make path resolution cheap. `origin` (a
    JSON list naming the source row, see data/formats.py) is where embedded image bytes are found
    again at training time; without it they are kept inline as a `data:` URI.
    """
    try:
        return _record_to_conversation(
            record, sample_id, source, base_dir, fmt, allow_paths_outside_media_dir, allow_remote_images, cache,
            origin,
        )
    except _BadRecord as e:
        return Problem(source=source, what=e.what, fix=e.fix, sample_id=sample_id, kind=e.kind)
    except RecursionError:
        return Problem(
            source=source,
            what="record is nested too deeply to read",
            fix="fix the record's structure",
            sample_id=sample_id,
            kind="bad_record",
        )


def _record_to_conversation(
    record: Any,
    sample_id: str,
    source: str,
    base_dir: str,
    fmt: RecordFormat,
    allow_outside: bool,
    allow_remote: bool,
    cache: PathCache | None,
    origin: list | None = None,
) -> Conversation:
    if not isinstance(record, dict):
        raise _BadRecord(
            f"record is {_type_name(record)}, expected an object with a `messages` list",
            "write each record as {\"messages\": [...], \"images\": [...]}",
        )
    for key in _UNSUPPORTED_KEYS:
        if record.get(key):
            raise _unsupported(f"record has `{key}`; {key.rstrip('s')} is not supported yet")
    layout = None
    images_key = fmt.images
    if fmt.messages is None and "messages" not in record and "conversations" not in record and "texts" in record:
        record = {**record, "messages": _cauldron_turns(record["texts"], record.get(fmt.images))}
        layout = "cauldron"
    elif fmt.images not in record and "image" in record:
        images_key, layout = "image", "llava"
    # The turns.
    if fmt.messages is not None:
        column = fmt.messages
        if column not in record:
            raise _BadRecord(f"record has no `{column}` list", f"add the turns as a `{column}` list")
    elif "messages" in record:
        column = "messages"
    elif "conversations" in record:
        column = "conversations"
    else:
        raise _BadRecord(
            "record has no `messages` (or `conversations`) list",
            "add the turns as a `messages` list of {\"role\", \"content\"} objects",
        )
    turns = record[column]
    if not isinstance(turns, list):
        raise _BadRecord(
            f"`{column}` is {_type_name(turns)}, expected a list of turns",
            f"write `{column}` as a list of {{\"role\", \"content\"}} objects",
        )
    # The images consumed by `<image>` placeholders.
    images = record.get(images_key)
    if images is None:
        images = []
    elif isinstance(images, (str, dict, bytes)) or hasattr(images, "getbands"):
        images = [_image_value(images, f"`{images_key}`", (images_key,))]
    elif not isinstance(images, list):
        raise _BadRecord(
            f"`{images_key}` is {_type_name(images)}, expected a list of paths",
            f"write `{images_key}` as a list of image paths",
        )
    else:
        images = [_image_value(ref, f"`{images_key}`[{i}]", (images_key, i)) for i, ref in enumerate(images)]
    videos_key = fmt.videos if fmt.videos in record or "video" not in record else "video"  # LLaVA-Video's
    videos = _videos_of(record.get(videos_key), videos_key)
    system = record.get(fmt.system) if fmt.system else None
    if system is not None and not isinstance(system, str):
        raise _BadRecord(
            f"`{fmt.system}` is {_type_name(system)}, expected a string", f"write `{fmt.system}` as a string"
        )

    builder = _Builder(images, base_dir, allow_outside, allow_remote, cache or PathCache(), origin, videos)
    messages: list[Message] = []
    weighted = False
    for i, turn in enumerate(turns, 1):
        where = f"message {i}"
        if not isinstance(turn, dict):
            raise _BadRecord(
                f"{where} is {_type_name(turn)}, expected an object with a role and a content",
                "write each turn as {\"role\": ..., \"content\": ...}",
            )
        role_tag, content_tag = fmt.role_tag, fmt.content_tag
        if role_tag is None:
            if "role" in turn:
                role_tag, content_tag = "role", content_tag or "content"
            elif "from" in turn:
                role_tag, content_tag = "from", content_tag or "value"
            else:
                raise _BadRecord(f"{where} has neither `role` nor `from`", "give each turn a `role` and a `content`")
        elif role_tag not in turn:
            raise _BadRecord(f"{where} has no `{role_tag}`", f"give each turn a `{role_tag}`")
        if content_tag is None:
            content_tag = "content" if role_tag == "role" else "value"
        raw_role = turn[role_tag]
        if not isinstance(raw_role, str):
            raise _BadRecord(
                f"the `{role_tag}` of {where} is {_type_name(raw_role)}, expected a string",
                "write the role as a string such as \"user\" or \"assistant\"",
            )
        if len(raw_role) > 100:
            raise _BadRecord(
                f"the `{role_tag}` of {where} is {len(raw_role):,} characters long", "fix the role name"
            )
        if content_tag not in turn:
            raise _BadRecord(f"{where} has no `{content_tag}`", f"give each turn a `{content_tag}`")
        parts = _content_parts(turn[content_tag], where, builder, (column, i - 1, content_tag))
        weight = turn.get("weight", 1)
        if "weight" in turn:
            weighted = True
            if isinstance(weight, bool) or weight not in (0, 1):
                raise _BadRecord(
                    f"the `weight` of {where} is {weight!r}, expected 0 or 1",
                    "set weight to 0 (not trained) or 1 (trained), as in OpenAI fine-tuning files",
                )
        messages.append(Message(role=_role_of(raw_role, fmt), parts=parts, weight=int(weight)))

    if system and not (messages and messages[0].role == "system"):
        _check_text(system, f"`{fmt.system}`")
        parts = []
        builder_before = builder.placeholders + builder.video_placeholders
        builder.text(system, parts)
        if builder.placeholders + builder.video_placeholders != builder_before:
            raise _BadRecord(
                f"`{fmt.system}` contains an {IMAGE_PLACEHOLDER} or {VIDEO_PLACEHOLDER} placeholder",
                "put images and videos in a user turn, not in the system prompt",
            )
        messages.insert(0, Message(role="system", parts=parts))

    read_problems: list[Problem] = []
    counts = ((builder.placeholders, len(images), IMAGE_PLACEHOLDER, "image", "an", images_key),
              (builder.video_placeholders, len(videos), VIDEO_PLACEHOLDER, "video", "a", videos_key))
    for p, n, placeholder, media, article, key in counts:
        if p == n:
            continue
        what = f"{_plural(p, placeholder + ' placeholder')} but {_plural(n, media)} in `{key}`"
        if p > n:
            fix = f"add the missing {media} path or remove the extra placeholder"
        else:
            fix = f"add {article} {placeholder} placeholder where each {media} goes, or remove the extra {media} path"
        read_problems.append(
            Problem(source=source, what=what, fix=fix, sample_id=sample_id, kind="placeholder_mismatch")
        )
    for kind, what, fix in builder.read_problems:
        read_problems.append(Problem(source=source, what=what, fix=fix, sample_id=sample_id, kind=kind))
    if layout is None:
        layout = ("openai" if builder.saw_image_url or weighted else "trl" if builder.saw_pathless_part
                  else "sharegpt")
    return Conversation(id=sample_id, source=source, messages=messages, read_problems=read_problems, layout=layout)


def _video_value(value: Any, where: str) -> str:
    """A video reference: a path string (or {"path": ...}); clips are decoded from files, never embedded."""
    if isinstance(value, (bytes, bytearray)) or (isinstance(value, dict) and value.get("bytes") is not None):
        raise _BadRecord(f"{where} holds embedded video bytes; videos are read from files",
                         "write the clip to a file and reference its path")
    return _check_ref(value, where, "video")


def _videos_of(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, dict, bytes, bytearray)):
        return [_video_value(value, f"`{key}`")]
    if not isinstance(value, list):
        raise _BadRecord(f"`{key}` is {_type_name(value)}, expected a list of paths",
                         f"write `{key}` as a list of video paths")
    return [_video_value(v, f"`{key}`[{i}]") for i, v in enumerate(value)]


def _cauldron_turns(texts: Any, images: Any) -> list[dict]:
    """the_cauldron's `texts` [{user, assistant}] as turns; the images open the first user turn."""
    if not isinstance(texts, list):
        raise _BadRecord(f"`texts` is {_type_name(texts)}, expected a list of {{user, assistant}} objects",
                         "write `texts` as a list of {\"user\": ..., \"assistant\": ...} objects")
    n = len(images) if isinstance(images, list) else (0 if images is None else 1)
    turns: list[dict] = []
    for i, t in enumerate(texts, 1):
        if not isinstance(t, dict) or not isinstance(t.get("user"), str) or not isinstance(t.get("assistant"), str):
            raise _BadRecord(f"`texts`[{i - 1}] is not an object with `user` and `assistant` strings",
                             "write each exchange as {\"user\": ..., \"assistant\": ...}")
        head = [{"type": "image"}] * n if i == 1 else []
        turns.append({"role": "user", "content": [*head, {"type": "text", "text": t["user"]}]})
        turns.append({"role": "assistant", "content": t["assistant"]})
    return turns


def file_problem(source: str, kind: str, what: str, fix: str) -> Problem:
    return Problem(source=source, what=what, fix=fix, sample_id=None, kind=kind)
