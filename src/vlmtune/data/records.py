"""Record layouts → `Conversation`: one function per way a dataset row can hold turns and images.

A bad record raises nothing: it yields exactly one Problem (see readers.py for the accounting rules).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import Problem
from .paths import _URL_RE, MAX_PATH_CHARS, PathCache, _q, resolve_image
from .types import Conversation, ImagePart, Message, Part, TextPart

IMAGE_PLACEHOLDER = "<image>"


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
    system: str | None = "system"
    role_tag: str | None = None
    content_tag: str | None = None
    user_tag: str = "user"
    assistant_tag: str = "assistant"
    system_tag: str = "system"
    observation_tag: str = "observation"
    function_tag: str = "function_call"


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
    def __init__(self, what: str, fix: str):
        super().__init__(what)
        self.what, self.fix = what, fix


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


def _check_ref(ref: Any, where: str) -> str:
    if isinstance(ref, dict) and ref.get("bytes") is not None:  # a `datasets` Image value
        raise _BadRecord(
            f"{where} holds embedded image bytes (a `datasets` Image column); only image paths are supported",
            "keep the images as files and store their paths as strings in the column",
        )
    if isinstance(ref, dict) and isinstance(ref.get("path"), str):
        ref = ref["path"]
    if not isinstance(ref, str):
        raise _BadRecord(f"{where} is {_type_name(ref)}, expected a path string", "write the image path as a string")
    if not ref.strip():
        raise _BadRecord(f"{where} is an empty path", "write the image path, or remove the image")
    if "\x00" in ref:
        raise _BadRecord(f"{where} contains a NUL character", "fix the image path")
    if len(ref) > MAX_PATH_CHARS and not _URL_RE.match(ref):
        raise _BadRecord(
            f"{where} is {len(ref):,} characters long, above the path limit of {MAX_PATH_CHARS:,}",
            "fix the image path",
        )
    return ref


class _Builder:
    """Turns one record's turns into parts, consuming the top-level images at `<image>` placeholders."""

    def __init__(self, images: list[str], base_dir: str, allow_outside: bool, allow_remote: bool, cache: PathCache):
        self.images = images
        self.cache = cache
        self.next_image = 0
        self.placeholders = 0
        self.base_dir = base_dir
        self.allow_outside = allow_outside
        self.allow_remote = allow_remote
        self.read_problems: list[tuple[str, str, str]] = []

    def image(self, ref: str) -> ImagePart:
        path, problem = resolve_image(
            ref,
            self.base_dir,
            allow_paths_outside_media_dir=self.allow_outside,
            allow_remote_images=self.allow_remote,
            cache=self.cache,
        )
        if problem is not None:
            self.read_problems.append(problem)
        return ImagePart(ref=ref, path=path)

    def placeholder(self, parts: list[Part]) -> None:
        """An `<image>` (or an image part without a path): the next top-level image goes here."""
        self.placeholders += 1
        if self.next_image < len(self.images):
            parts.append(self.image(self.images[self.next_image]))
            self.next_image += 1

    def text(self, text: str, parts: list[Part]) -> None:
        if IMAGE_PLACEHOLDER not in text:
            if text:
                parts.append(TextPart(text))
            return
        for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i:
                self.placeholder(parts)
            if piece:
                parts.append(TextPart(piece))


def _content_parts(content: Any, where: str, builder: _Builder) -> list[Part]:
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
            ref = next((part[k] for k in ("image", "path", "url") if part.get(k) is not None), None)
            if ref is None:  # TRL/llava style: {"type": "image"} stands for the next of `images`
                builder.placeholder(parts)
            else:
                parts.append(builder.image(_check_ref(ref, f"the image of {pwhere}")))
        elif ptype == "image_url":
            url = part.get("image_url")
            if isinstance(url, dict):
                url = url.get("url")
            parts.append(builder.image(_check_ref(url, f"the image_url of {pwhere}")))
        elif ptype is None:
            raise _BadRecord(
                f"{pwhere} has no `type`",
                f"give each part a type: {_PARTS_HINT}",
            )
        else:
            shown = _q(ptype) if isinstance(ptype, str) else _type_name(ptype)
            raise _BadRecord(
                f"{pwhere} has type {shown}; only text and image parts are supported",
                "remove the part or convert it to a text or image part",
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
) -> Conversation | Problem:
    """One record as a `Conversation`, or the one `Problem` (kind "bad_record") why it yields none.

    Never raises on bad input. Placeholder/image count mismatches and refused image paths still
    yield a conversation, with the problems in its `read_problems` (refused images have `path=None`).
    Relative image paths resolve against `base_dir`, which is also the folder they must stay in.
    Pass one `cache` for all the records of one read to make path resolution cheap.
    """
    try:
        return _record_to_conversation(
            record, sample_id, source, base_dir, fmt, allow_paths_outside_media_dir, allow_remote_images, cache
        )
    except _BadRecord as e:
        return Problem(source=source, what=e.what, fix=e.fix, sample_id=sample_id, kind="bad_record")
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
) -> Conversation:
    if not isinstance(record, dict):
        raise _BadRecord(
            f"record is {_type_name(record)}, expected an object with a `messages` list",
            "write each record as {\"messages\": [...], \"images\": [...]}",
        )
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
    images = record.get(fmt.images)
    if images is None:
        images = []
    elif isinstance(images, (str, dict)):
        images = [images]
    elif not isinstance(images, list):
        raise _BadRecord(
            f"`{fmt.images}` is {_type_name(images)}, expected a list of paths",
            f"write `{fmt.images}` as a list of image paths",
        )
    images = [_check_ref(ref, f"`{fmt.images}`[{i}]") for i, ref in enumerate(images)]
    videos = record.get("videos")
    if videos:
        raise _BadRecord("record has `videos`; videos are not supported", "remove the videos or the sample")
    system = record.get(fmt.system) if fmt.system else None
    if system is not None and not isinstance(system, str):
        raise _BadRecord(
            f"`{fmt.system}` is {_type_name(system)}, expected a string", f"write `{fmt.system}` as a string"
        )

    builder = _Builder(images, base_dir, allow_outside, allow_remote, cache or PathCache())
    messages: list[Message] = []
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
        parts = _content_parts(turn[content_tag], where, builder)
        messages.append(Message(role=_role_of(raw_role, fmt), parts=parts))

    if system and not (messages and messages[0].role == "system"):
        _check_text(system, f"`{fmt.system}`")
        parts = []
        builder_before = builder.placeholders
        builder.text(system, parts)
        if builder.placeholders != builder_before:
            raise _BadRecord(
                f"`{fmt.system}` contains an {IMAGE_PLACEHOLDER} placeholder",
                "put images in a user turn, not in the system prompt",
            )
        messages.insert(0, Message(role="system", parts=parts))

    read_problems: list[Problem] = []
    if builder.placeholders != len(images):
        p, n = builder.placeholders, len(images)
        what = f"{_plural(p, IMAGE_PLACEHOLDER + ' placeholder')} but {_plural(n, 'image')} in `{fmt.images}`"
        if p > n:
            fix = "add the missing image path or remove the extra placeholder"
        else:
            fix = f"add an {IMAGE_PLACEHOLDER} placeholder where each image goes, or remove the extra image path"
        read_problems.append(
            Problem(source=source, what=what, fix=fix, sample_id=sample_id, kind="placeholder_mismatch")
        )
    for kind, what, fix in builder.read_problems:
        read_problems.append(Problem(source=source, what=what, fix=fix, sample_id=sample_id, kind=kind))
    return Conversation(id=sample_id, source=source, messages=messages, read_problems=read_problems)


def file_problem(source: str, kind: str, what: str, fix: str) -> Problem:
    return Problem(source=source, what=what, fix=fix, sample_id=None, kind=kind)
