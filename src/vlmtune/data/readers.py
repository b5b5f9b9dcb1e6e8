"""Read users' datasets as they already have them into normalised `Conversation`s.

Supported inputs (`read_samples(data, ...)`):

* a `.jsonl` file (one record per line), a `.json` file (one JSON array of records; a single JSON
  object is one record; a `.json` file that starts with `{` and is not one JSON value is read as
  JSON Lines, as `datasets` does),
* a folder of `.json` / `.jsonl` files (not recursive; `dataset_info.json` is skipped),
* a `datasets` folder written by `save_to_disk` (a DatasetDict: the "train" split, or its only split),
* a `.parquet` or `.arrow` file, a folder in the Hub layout (`data/train-00000-of-00002.parquet`),
  or a Hub dataset id (see data/formats.py: read a batch at a time, images never decoded),
* comma-separated dataset names looked up in `dataset_dir/dataset_info.json` (LLaMA-Factory), or
  comma-separated paths.

Record formats (detected per record unless a `dataset_info.json` entry fixes the columns and tags):

* LLaMA-Factory sharegpt: `messages` (`{"role", "content"}`) or `conversations` (`{"from", "value"}`),
  an optional top-level `system` string, `<image>` placeholders in the text and an `images` list
  of paths: each placeholder, in order, takes the next path.
* HF chat: `messages` whose `content` is a list of parts `{"type": "text", "text"}`,
  `{"type": "image", "image" | "path" | "url"}` or `{"type": "image_url", "image_url": {"url"}}`;
  an image part without a path (TRL style) takes the next path of `images`, like `<image>`.
* LLaVA / ShareGPT4V (`image`), the_cauldron (`images` + `texts`), OpenAI (`image_url`, `weight`):
  see data/records.py. Images may be paths, embedded bytes (`{"bytes", "path"}`), `data:` URIs.

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
`allow_paths_outside_media_dir=True`; `file://` URLs are local paths and `data:` URIs inline
images; http(s) URLs are refused unless `allow_remote_images`, when data/remote.py fetches them
into a cache after reading; other `scheme://` URLs are refused. Checking that files exist and are
images is `validate`'s job.

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
import copy
import gc
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import Problem
from . import formats
from .dataset_info import DatasetEntry, _looks_like_hub_id, dataset_entries, entry_for_path
from .paths import PathCache, _short
from .records import (
    AUTO_FORMAT,
    RecordFormat,
    _type_name,
    file_problem,
    record_to_conversation,
)
from .types import Conversation

_DATA_EXTS = (".json", ".jsonl")
PROGRESS_MIN = 10_000  # inputs with fewer records than this show no progress bar


_FIX_FILE = "check the path and its permissions"


@dataclass
class ReadResult:
    """Everything read: the conversations, the problems of records that yielded none, and the count.

    `records == len(conversations) + len(problems)`: every record is accounted for.
    """

    conversations: list[Conversation]
    problems: list[Problem]
    records: int
    notes: list[str] = field(default_factory=list)  # what was recognised, one line each


@dataclass
class _Raw:
    """One record as loaded from a file, before ids are assigned."""

    value: Any
    source: str
    fallback_id: str
    base_dir: str
    fmt: RecordFormat
    origin: list | None = None  # the row's locator for embedded images (data/formats.py)


@dataclass
class _Input:
    path: str
    base_dir: str
    fmt: RecordFormat = AUTO_FORMAT


@dataclass
class _Loaded:
    items: list[_Raw | Problem] = field(default_factory=list)  # in input order


def _is_datasets_folder(path: str) -> bool:
    return formats.is_datasets_folder(path)


def _read_table_rows(rows, base_dir: str, fmt: RecordFormat, out: _Loaded) -> None:
    for item in rows:
        if isinstance(item, Problem):
            out.items.append(item)
        else:
            out.items.append(_Raw(item.value, item.source, item.fallback_id, base_dir, fmt, item.origin))


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
        out.items.append(file_problem(inp.path, "data_not_found", what, _FIX_FILE))


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
                file_problem(
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
                file_problem(
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
        out.items.append(file_problem(inp.path, "data_not_found", what, _FIX_FILE))
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
            file_problem(
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
            file_problem(
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
            file_problem(
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


def _read_path(path: str, base_dir: str | None, fmt: RecordFormat, out: _Loaded, split: str | None = None) -> None:
    if os.path.isdir(path):
        if _is_datasets_folder(path):
            parent = os.path.dirname(os.path.abspath(path.rstrip("/\\") or path))
            _read_table_rows(formats.iter_datasets_folder(path, split), base_dir or parent, fmt, out)
            return
        if formats.table_files_in(path):  # the Hub layout: data/train-00000-of-00002.parquet, ...
            found = formats.split_files(path, split)
            if isinstance(found, Problem):
                out.items.append(found)
                return
            for name in found[0]:
                _read_path(name, base_dir or path, fmt, out)
            return
        try:
            names = sorted(n for n in os.listdir(path) if n.endswith(_DATA_EXTS) and n != "dataset_info.json")
        except OSError as e:
            what = f"cannot list the folder: {e.strerror or e}"
            out.items.append(file_problem(path, "data_not_found", what, _FIX_FILE))
            return
        names = [n for n in names if os.path.isfile(os.path.join(path, n))]
        if not names:
            out.items.append(
                file_problem(
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
    if path.endswith(".parquet"):
        _read_table_rows(formats.iter_parquet(path), folder, fmt, out)
    elif path.endswith(".arrow"):
        _read_table_rows(formats.iter_arrow(path), folder, fmt, out)
    elif path.endswith(".jsonl"):
        _read_jsonl(_Input(path, folder, fmt), out)
    elif path.endswith(".json"):
        _read_json(_Input(path, folder, fmt), out)
    else:
        out.items.append(
            file_problem(
                path,
                "data_not_found",
                f"unsupported data file type {Path(path).suffix or '(no extension)'!r}",
                "use a .json, .jsonl, .parquet or .arrow file, a folder of them (the Hub layout), "
                "a `save_to_disk` folder or a Hub dataset id",
            )
        )


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
    remote_options=None,
    progress: bool = False,
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
        return _read_samples(data, dataset_dir, media_dir, allow_paths_outside_media_dir, allow_remote_images,
                             remote_options, progress)


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
    remote_options=None,
    progress: bool = False,
) -> ReadResult:
    out = _Loaded()
    if os.path.exists(data):
        _read_given_path(data, dataset_dir, media_dir, out)
    else:
        items = [x.strip() for x in data.split(",") if x.strip()]
        if items and all(os.path.exists(x) for x in items):
            for x in items:
                _read_given_path(x, dataset_dir, media_dir, out)
        elif items and (dataset_dir is not None or all(_looks_like_hub_id(x) for x in items)):
            for entry in dataset_entries(items, dataset_dir or ".", media_dir, hub_ids=True):
                if isinstance(entry, Problem):
                    out.items.append(entry)
                else:
                    _read_entry(entry, out)
        else:
            out.items.append(
                file_problem(
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
    from .remote import fetch_remote_images  # noqa: PLC0415 (only when a record has a URL)
    conversations: list[Conversation] = []
    problems: list[Problem] = []
    cache = PathCache()
    from tqdm.auto import tqdm

    bar = tqdm(out.items, desc="reading", unit="record", disable=not progress or len(out.items) < PROGRESS_MIN or None)
    for item in bar:
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
            origin=item.origin,
        )
        item.value = None  # the conversation holds what is needed (embedded bytes too, until validation)
        (problems if isinstance(result, Problem) else conversations).append(result)
    if allow_remote_images:
        fetch_remote_images(conversations, *([remote_options] if remote_options is not None else []))
    return ReadResult(conversations=conversations, problems=problems, records=len(out.items),
                      notes=layout_notes(conversations))


def _read_given_path(path: str, dataset_dir: str | None, media_dir: str | None, out: _Loaded) -> None:
    """A path given directly: a dataset_info.json entry naming it still applies (columns, tags, split)."""
    entry = entry_for_path(path, dataset_dir)
    if entry is None:
        _read_path(path, media_dir, AUTO_FORMAT, out)
    else:
        _read_entry(DatasetEntry(path, media_dir or "", entry.fmt, entry.split, entry.subset, None,
                                 entry.num_samples), out)


def _read_entry(entry: DatasetEntry, out: _Loaded) -> None:
    part = _Loaded()
    if entry.hub_id is not None:
        _read_table_rows(formats.iter_hub(entry.hub_id, entry.subset, entry.split), entry.root or ".", entry.fmt,
                         part)
    else:
        _read_path(entry.path, entry.root or None, entry.fmt, part, entry.split)
    items = part.items
    if entry.num_samples is not None:
        items = _sample(items, entry.num_samples)
    out.items.extend(items)


def _sample(items: list, k: int) -> list:
    """LLaMA-Factory's `num_samples`: k records drawn at random (all of them, then repeats, when k > n).

    Seeded, so that the same config prepares the same data; problems of unreadable inputs are kept.
    """
    import numpy as np

    problems = [x for x in items if isinstance(x, Problem)]
    raws = [x for x in items if not isinstance(x, Problem)]
    n = len(raws)
    if n == 0:
        return items
    rng = np.random.default_rng(0)
    order = list(rng.permutation(n)[:k])
    if k > n:
        order += list(rng.choice(n, k - n))
    return problems + [copy.copy(raws[i]) for i in order]  # a repeat is its own record


def layout_notes(conversations: list[Conversation]) -> list[str]:
    """One line per record layout recognised, with how many records had it."""
    from .records import LAYOUTS

    counts = Counter(c.layout for c in conversations)
    specific = [k for k in counts if k != "sharegpt"]
    if len(specific) == 1 and "sharegpt" in counts:  # records without images cannot tell the layouts apart
        counts = Counter({specific[0]: sum(counts.values())})
    return [f"recognised {LAYOUTS.get(k, k)}: {n} record(s)" for k, n in counts.most_common()]
