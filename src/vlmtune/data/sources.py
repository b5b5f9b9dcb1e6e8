"""Read users' datasets as they already have them into normalised `Conversation`s.

Supported inputs (`read_samples(data, ...)`):

* a `.jsonl` file (one record per line), a `.json` file (one JSON array of records; a single JSON
  object is one record; a `.json` file that starts with `{` and is not one JSON value is read as
  JSON Lines, as `datasets` does),
* a folder of `.json` / `.jsonl` files (not recursive; `dataset_info.json` is skipped),
* a `datasets` folder written by `save_to_disk` (a DatasetDict: the "train" split, or its only split),
* comma-separated dataset names looked up in `dataset_dir/dataset_info.json` (LLaMA-Factory), or
  comma-separated paths.

Record formats (detected per record unless a `dataset_info.json` entry fixes the columns and tags):

* LLaMA-Factory sharegpt: `messages` (`{"role", "content"}`) or `conversations` (`{"from", "value"}`),
  an optional top-level `system` string, `<image>` placeholders in the text and an `images` list
  of paths: each placeholder, in order, takes the next path.
* HF chat: `messages` whose `content` is a list of parts `{"type": "text", "text"}`,
  `{"type": "image", "image" | "path" | "url"}` or `{"type": "image_url", "image_url": {"url"}}`;
  an image part without a path (TRL style) takes the next path of `images`, like `<image>`.
  Image columns of `datasets` folders must hold paths: embedded image bytes are refused.

Roles: user/human, assistant/gpt and system (or the dataset_info tags) become user, assistant and
system; any other role (observation, function_call, tool...) is kept as written and `validate`
reports it. A top-level `system` string becomes the first message unless the turns already start
with a system turn (as in LLaMA-Factory); message numbers in problems count it.

Ids and sources: a sample's `id` is the record's own `id` (a string or an integer, at most 200
characters) when it is unique across everything read, else `<file stem>:<line>` (JSONL, 1-based), `<file stem>:<index>` (JSON,
0-based) or `<folder name>:<row>` (datasets folder, 0-based); an id that would still clash gets a
`~2`, `~3`... suffix. `source` is `path:LINE` for JSONL, `path#INDEX` for JSON arrays and
`path#ROW` for datasets folders.

Images: a relative path is resolved against `media_dir` when given, else the folder of the data
file (of the dataset_dir for dataset names; of the folder holding a datasets folder). After
`os.path.realpath` (symlinks followed) a path must stay inside that folder unless
`allow_paths_outside_media_dir=True`; URLs (`http://`, `https://`, `file://`, `data:`, any
`scheme://`) are refused (remote images are not supported yet, even with `allow_remote_images`).
Nothing is fetched or opened here: checking that files exist and are images is `validate`'s job.

Accounting: bad input never raises. Every record (and every JSONL line, even one that does not
parse) counts in `ReadResult.records`. A record either yields a `Conversation` or exactly one
`Problem` in `ReadResult.problems`; an input that cannot be read at all (a missing file, an unknown
dataset name, a JSON array file that does not parse) counts as one record with one problem. So
`records == len(conversations) + len(problems)` always holds. Problems found in a record that still
yields a conversation (placeholder/image count mismatch, refused image paths) go to that
conversation's `read_problems`, not to `ReadResult.problems`; `validate` reports them and treats
the conversation as invalid.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from vlmtune.data.types import Conversation, ImagePart, Message, Part, TextPart
from vlmtune.errors import Problem

IMAGE_PLACEHOLDER = "<image>"
# A text field longer than this is certainly not a training turn (hundreds of thousands of tokens).
MAX_TEXT_CHARS = 1_000_000
MAX_PATH_CHARS = 4096
_URL_RE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.\-]*://|data:)", re.ASCII)
_ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}
_DATA_EXTS = (".json", ".jsonl")
_TYPE_NAMES = {
    dict: "an object",
    list: "a list",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
}
_PARTS_HINT = '{"type": "text", "text": ...} or {"type": "image", "image": PATH}'
_FIX_FILE = "check the path and its permissions"


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


@dataclass
class ReadResult:
    """Everything read: the conversations, the problems of records that yielded none, and the count.

    `records == len(conversations) + len(problems)`: every record is accounted for.
    """

    conversations: list[Conversation]
    problems: list[Problem]
    records: int


# ----------------------------------------------------------------------------------------------
# One record


class _BadRecord(Exception):
    def __init__(self, what: str, fix: str):
        super().__init__(what)
        self.what, self.fix = what, fix


def _short(value: str, limit: int = 80) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _q(value: str) -> str:
    return repr(_short(value))


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


class PathCache:
    """`os.path.realpath` with the folders' real paths remembered, for one read of a dataset.

    realpath(dir/name) == realpath(dir)/name unless `name` is a symlink (then it is followed) or
    `.`/`..`; that saves the per-component lstat calls of realpath for every image of a dataset.
    Make a new one per read: it does not notice files changing under it.
    """

    def __init__(self) -> None:
        self._dirs: dict[str, str] = {}

    def folder(self, folder: str) -> str:
        real = self._dirs.get(folder)
        if real is None:
            real = self._dirs[folder] = os.path.realpath(folder or ".")
        return real

    def realpath(self, path: str) -> str:
        folder, sep, name = path.rpartition(os.sep)
        if name in ("", ".", ".."):
            return os.path.realpath(path)
        if sep and not folder:
            folder = os.sep
        real_folder = self.folder(folder)
        real = (real_folder if real_folder.endswith(os.sep) else real_folder + os.sep) + name
        if os.path.islink(real):
            real = os.path.realpath(real)
        return real


def _inside(path: str, root: str) -> bool:
    if path == root:
        return True
    prefix = root if root.endswith(os.sep) else root + os.sep
    return path.startswith(prefix)


def resolve_image(
    ref: str,
    base_dir: str,
    *,
    allow_paths_outside_media_dir: bool = False,
    allow_remote_images: bool = False,
    cache: PathCache | None = None,
) -> tuple[str | None, tuple[str, str, str] | None]:
    """The resolved path of one image reference, or None and (kind, what, fix) saying why not."""
    if _URL_RE.match(ref):
        if allow_remote_images:
            what = f"image {_q(ref)} is a URL; remote images are not supported yet"
        else:
            what = f"image {_q(ref)} is a URL; remote images are refused"
        return None, ("remote_image", what, "download the image and reference the local file instead")
    cache = cache or PathCache()
    real = cache.realpath(os.path.join(base_dir, ref))
    if allow_paths_outside_media_dir:
        return real, None
    root = cache.folder(base_dir)
    if not _inside(real, root):
        return None, (
            "path_outside_media_dir",
            f"image {_q(ref)} resolves to {real}, outside the media folder {root}",
            "move the image under the media folder, set media_dir to a folder that contains it, "
            "or pass allow_paths_outside_media_dir=True if you trust this dataset",
        )
    return real, None


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


# ----------------------------------------------------------------------------------------------
# Files


@dataclass
class _Raw:
    """One record as loaded from a file, before ids are assigned."""

    value: Any
    source: str
    fallback_id: str
    base_dir: str
    fmt: RecordFormat


@dataclass
class _Input:
    path: str
    base_dir: str
    fmt: RecordFormat = AUTO_FORMAT


@dataclass
class _Loaded:
    items: list[_Raw | Problem] = field(default_factory=list)  # in input order


def _file_problem(source: str, kind: str, what: str, fix: str) -> Problem:
    return Problem(source=source, what=what, fix=fix, sample_id=None, kind=kind)


def _is_datasets_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def _parse_json(text: str) -> Any:
    """json.loads, with every failure (syntax, nesting depth, huge numbers) as ValueError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None
    except json.JSONDecodeError as e:
        where = f"column {e.colno}" if e.lineno == 1 else f"line {e.lineno}, column {e.colno}"
        raise ValueError(f"{e.msg} at {where}") from None
    except ValueError as e:  # e.g. integers with too many digits
        raise ValueError(str(e)) from None


def _read_jsonl(inp: _Input, out: _Loaded, lines: Iterable[bytes] | None = None) -> None:
    if lines is not None:
        _read_lines(inp, out, lines)
        return
    try:
        with open(inp.path, "rb") as f:
            _read_lines(inp, out, f)
    except OSError as e:
        what = f"cannot read the file: {e.strerror or e}"
        out.items.append(_file_problem(inp.path, "data_not_found", what, _FIX_FILE))


def _read_lines(inp: _Input, out: _Loaded, lines: Iterable[bytes]) -> None:
    stem = Path(inp.path).stem
    for lineno, raw in enumerate(lines, 1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if not raw.strip():
            continue
        source = f"{inp.path}:{lineno}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            out.items.append(
                _file_problem(
                    source,
                    "invalid_utf8",
                    f"line is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                    "re-save the file as UTF-8",
                )
            )
            continue
        try:
            value = _parse_json(text.rstrip("\r\n"))
        except ValueError as e:
            out.items.append(
                _file_problem(
                    source,
                    "invalid_json",
                    f"line is not valid JSON: {e}",
                    "fix the JSON on this line (a .jsonl file holds one JSON object per line)",
                )
            )
            continue
        out.items.append(_Raw(value, source, f"{stem}:{lineno}", inp.base_dir, inp.fmt))


def _read_json(inp: _Input, out: _Loaded) -> None:
    try:
        with open(inp.path, "rb") as f:
            data = f.read()
    except OSError as e:
        what = f"cannot read the file: {e.strerror or e}"
        out.items.append(_file_problem(inp.path, "data_not_found", what, _FIX_FILE))
        return
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    stripped = data.lstrip()
    if not stripped:
        return  # an empty file holds no records
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if stripped.startswith(b"{"):  # JSON Lines in a .json file: report the bad lines only
            _read_jsonl(inp, out, iter(data.split(b"\n")))
            return
        out.items.append(
            _file_problem(
                inp.path,
                "invalid_utf8",
                f"file is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})",
                "re-save the file as UTF-8",
            )
        )
        return
    try:
        value = _parse_json(text)
    except ValueError as e:
        if stripped.startswith(b"{"):
            _read_jsonl(inp, out, iter(data.split(b"\n")))
            return
        out.items.append(
            _file_problem(
                inp.path,
                "invalid_json",
                f"file is not valid JSON: {e}",
                "fix the JSON syntax (a .json file holds one JSON array of records; "
                "use .jsonl for one record per line)",
            )
        )
        return
    if isinstance(value, dict):
        # A single record: LLaMA-Factory (via `datasets`) reads it as one row.
        value = [value]
    if not isinstance(value, list):
        out.items.append(
            _file_problem(
                inp.path,
                "invalid_json",
                f"file holds {_type_name(value)}, expected a JSON array of records",
                "write the records as a JSON array: [{\"messages\": [...]}, ...]",
            )
        )
        return
    stem = Path(inp.path).stem
    for i, rec in enumerate(value):
        out.items.append(_Raw(rec, f"{inp.path}#{i}", f"{stem}:{i}", inp.base_dir, inp.fmt))


def _read_datasets_folder(inp: _Input, out: _Loaded) -> None:
    try:
        import datasets

        ds = datasets.load_from_disk(inp.path)
        if isinstance(ds, datasets.DatasetDict):
            if "train" in ds:
                ds = ds["train"]
            elif len(ds) == 1:
                ds = next(iter(ds.values()))
            else:
                out.items.append(
                    _file_problem(
                        inp.path,
                        "data_not_found",
                        f"the DatasetDict has no \"train\" split (splits: {', '.join(sorted(ds))})",
                        "save the training split as \"train\", or point `data` at the split's folder",
                    )
                )
                return
        # Arrow rows: no decoding of Image features (they come back as {"bytes", "path"}).
        rows: list = []
        for batch in ds.with_format("arrow").iter(batch_size=4096):
            rows.extend(batch.to_pylist())
    except Exception as e:  # a broken folder must be reported, not crash the run
        out.items.append(
            _file_problem(
                inp.path,
                "data_not_found",
                f"cannot load the datasets folder: {type(e).__name__}: {_short(str(e), 200)}",
                "check that the folder was written by `Dataset.save_to_disk`",
            )
        )
        return
    name = Path(inp.path.rstrip("/\\") or inp.path).name
    for i, rec in enumerate(rows):
        out.items.append(_Raw(rec, f"{inp.path}#{i}", f"{name}:{i}", inp.base_dir, inp.fmt))


def _read_path(path: str, base_dir: str | None, fmt: RecordFormat, out: _Loaded) -> None:
    if os.path.isdir(path):
        if _is_datasets_folder(path):
            parent = os.path.dirname(os.path.abspath(path.rstrip("/\\") or path))
            _read_datasets_folder(_Input(path, base_dir or parent, fmt), out)
            return
        try:
            names = sorted(n for n in os.listdir(path) if n.endswith(_DATA_EXTS) and n != "dataset_info.json")
        except OSError as e:
            what = f"cannot list the folder: {e.strerror or e}"
            out.items.append(_file_problem(path, "data_not_found", what, _FIX_FILE))
            return
        names = [n for n in names if os.path.isfile(os.path.join(path, n))]
        if not names:
            out.items.append(
                _file_problem(
                    path,
                    "data_not_found",
                    "the folder holds no .json or .jsonl files",
                    "point `data` at a data file, a folder of .json/.jsonl files or a `save_to_disk` folder",
                )
            )
            return
        for n in names:
            _read_path(os.path.join(path, n), base_dir or path, fmt, out)
        return
    folder = base_dir or os.path.dirname(path) or "."
    if path.endswith(".jsonl"):
        _read_jsonl(_Input(path, folder, fmt), out)
    elif path.endswith(".json"):
        _read_json(_Input(path, folder, fmt), out)
    else:
        out.items.append(
            _file_problem(
                path,
                "data_not_found",
                f"unsupported data file type {Path(path).suffix or '(no extension)'!r}",
                "use a .json or .jsonl file, a folder of them, or a `save_to_disk` folder",
            )
        )


def _format_from_entry(entry: dict, name: str, info_path: str) -> RecordFormat | Problem:
    def bad(what: str, fix: str) -> Problem:
        return _file_problem(f"{info_path}#{name}", "bad_dataset_info", what, fix)

    formatting = entry.get("formatting")
    if formatting not in (None, "sharegpt"):
        return bad(
            f"dataset {name!r} has formatting {formatting!r}; only sharegpt is supported",
            "convert the data to sharegpt (messages with <image> placeholders and an `images` list)",
        )
    if entry.get("ranking"):
        return bad(f"dataset {name!r} is a ranking (preference) dataset", "use a supervised (sharegpt) dataset")
    columns = entry.get("columns") or {}
    tags = entry.get("tags") or {}
    if not isinstance(columns, dict) or not isinstance(tags, dict):
        return bad(f"`columns` and `tags` of dataset {name!r} must be objects", "fix dataset_info.json")
    for key, value in [*columns.items(), *tags.items()]:
        if not isinstance(value, str):
            what = f"`{key}` of dataset {name!r} is {_type_name(value)}, expected a string"
            return bad(what, "fix dataset_info.json")
    base = SHAREGPT_DEFAULTS if formatting == "sharegpt" else AUTO_FORMAT
    return RecordFormat(
        messages=columns.get("messages", base.messages),
        images=columns.get("images", base.images),
        system=columns.get("system", base.system),
        role_tag=tags.get("role_tag", base.role_tag),
        content_tag=tags.get("content_tag", base.content_tag),
        user_tag=tags.get("user_tag", base.user_tag),
        assistant_tag=tags.get("assistant_tag", base.assistant_tag),
        system_tag=tags.get("system_tag", base.system_tag),
        observation_tag=tags.get("observation_tag", base.observation_tag),
        function_tag=tags.get("function_tag", base.function_tag),
    )


def _read_names(names: list[str], dataset_dir: str, media_dir: str | None, out: _Loaded) -> None:
    info_path = os.path.join(dataset_dir, "dataset_info.json")
    try:
        with open(info_path, "rb") as f:
            info = json.loads(f.read().decode("utf-8-sig"))
    except OSError:
        out.items.append(
            _file_problem(
                info_path,
                "data_not_found",
                f"{', '.join(names)} is not a file or folder, and {info_path} does not exist",
                "point `data` at a data file or folder, or set dataset_dir to the folder holding dataset_info.json",
            )
        )
        return
    except (ValueError, RecursionError) as e:
        what = f"dataset_info.json is not valid JSON: {_short(str(e), 200)}"
        out.items.append(_file_problem(info_path, "bad_dataset_info", what, "fix dataset_info.json"))
        return
    if not isinstance(info, dict):
        what = "dataset_info.json does not hold an object"
        out.items.append(_file_problem(info_path, "bad_dataset_info", what, "fix dataset_info.json"))
        return
    root = media_dir or dataset_dir
    for name in names:
        entry = info.get(name)
        if not isinstance(entry, dict):
            known = ", ".join(sorted(info)) or "(none)"
            out.items.append(
                _file_problem(
                    f"{info_path}#{name}",
                    "data_not_found",
                    f"dataset {name!r} is not in dataset_info.json (it lists: {known})",
                    "add the dataset to dataset_info.json or fix its name",
                )
            )
            continue
        file_name = entry.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            out.items.append(
                _file_problem(
                    f"{info_path}#{name}",
                    "bad_dataset_info",
                    f"dataset {name!r} has no `file_name`; "
                    "only local files are supported (not hub or script datasets)",
                    "download the dataset and point `file_name` at the local file",
                )
            )
            continue
        fmt = _format_from_entry(entry, name, info_path)
        if isinstance(fmt, Problem):
            out.items.append(fmt)
            continue
        path = os.path.join(dataset_dir, file_name)
        if not os.path.exists(path):
            out.items.append(
                _file_problem(
                    path,
                    "data_not_found",
                    f"file {file_name!r} of dataset {name!r} does not exist in {dataset_dir}",
                    "fix `file_name` in dataset_info.json or add the file",
                )
            )
            continue
        _read_path(path, root, fmt, out)


def _assign_ids(raws: list[_Raw]) -> list[str]:
    own: list[str | None] = []
    for raw in raws:
        value = raw.value.get("id") if isinstance(raw.value, dict) else None
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            own.append(None)
            continue
        text = str(value)
        own.append(text if text.strip() and len(text) <= 200 else None)
    counts = Counter(x for x in own if x is not None)
    used: set[str] = set()
    ids = []
    for raw, mine in zip(raws, own):
        sid = mine if mine is not None and counts[mine] == 1 else raw.fallback_id
        if sid in used:
            k = 2
            while f"{sid}~{k}" in used:
                k += 1
            sid = f"{sid}~{k}"
        used.add(sid)
        ids.append(sid)
    return ids


def read_samples(
    data: str,
    dataset_dir: str | None = None,
    media_dir: str | None = None,
    *,
    allow_paths_outside_media_dir: bool = False,
    allow_remote_images: bool = False,
) -> ReadResult:
    """Read every record of `data` into conversations, accounting for each record.

    `data` is a .json/.jsonl file, a folder of them, a `save_to_disk` folder, comma-separated
    paths, or comma-separated dataset names from `dataset_dir/dataset_info.json`. Image paths are
    resolved against `media_dir`, else the data file's folder (dataset_dir for dataset names).
    Never raises on bad data: see the module docstring for what goes where.
    """
    # Reading builds millions of small acyclic objects; the cyclic GC would rescan them over and
    # over (about 3x the reading time on 100k records), so it is paused while reading.
    with _gc_paused():
        return _read_samples(data, dataset_dir, media_dir, allow_paths_outside_media_dir, allow_remote_images)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _read_samples(
    data: str,
    dataset_dir: str | None,
    media_dir: str | None,
    allow_paths_outside_media_dir: bool,
    allow_remote_images: bool,
) -> ReadResult:
    out = _Loaded()
    if os.path.exists(data):
        _read_path(data, media_dir, AUTO_FORMAT, out)
    else:
        items = [x.strip() for x in data.split(",") if x.strip()]
        if items and all(os.path.exists(x) for x in items):
            for x in items:
                _read_path(x, media_dir, AUTO_FORMAT, out)
        elif dataset_dir is not None and items:
            _read_names(items, dataset_dir, media_dir, out)
        else:
            out.items.append(
                _file_problem(
                    data,
                    "data_not_found",
                    f"{data!r} is not a file or folder"
                    + ("" if dataset_dir else " (and no dataset_dir was given to look up dataset names)"),
                    "point `data` at a .json/.jsonl file, a folder of them or a `save_to_disk` folder, "
                    "or give dataset names with dataset_dir",
                )
            )
    raws = [x for x in out.items if isinstance(x, _Raw)]
    ids = iter(_assign_ids(raws))
    conversations: list[Conversation] = []
    problems: list[Problem] = []
    cache = PathCache()
    for item in out.items:
        if isinstance(item, Problem):
            problems.append(item)
            continue
        result = record_to_conversation(
            item.value,
            sample_id=next(ids),
            source=item.source,
            base_dir=item.base_dir,
            fmt=item.fmt,
            allow_paths_outside_media_dir=allow_paths_outside_media_dir,
            allow_remote_images=allow_remote_images,
            cache=cache,
        )
        (problems if isinstance(result, Problem) else conversations).append(result)
    return ReadResult(conversations=conversations, problems=problems, records=len(out.items))
