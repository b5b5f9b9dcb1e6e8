"""Read users' datasets as they already have them into normalised `Conversation`s, as a stream.

API: each takes the read section (config's `ReadArgs`; a bare path: its defaults, `reading`).
`iter_raw(read)` yields every record as a `RawRecord` (or a `Problem`) in input order, from
the per-format generators in `FILE_READERS` (a new format is one more `(path, base_dir, fmt) ->
Iterator[RawRecord | Problem]` registered by extension); `iter_samples(read)` yields
`Conversation | Problem` with globally unique ids (`IdPlan`: a first pass counts ids as hashes);
`read_samples` is its list form.

Supported inputs (the section's `dataset`):

* a `.jsonl` file (one record per line), a `.json` file (one JSON array of records; a single JSON
  object is one record; a `.json` file that starts with `{` and is not one JSON value is read as
  JSON Lines, as `datasets` does),
* a folder of `.json` / `.jsonl` files (not recursive; `dataset_info.json` is skipped),
* a `datasets` folder written by `save_to_disk` (a DatasetDict: the "train" split, or its only split),
* a `.parquet` or `.arrow` file, a folder in the Hub layout (`data/train-00000-of-00002.parquet`),
  or a Hub dataset id (see data/sources/formats.py: read a batch at a time, images never decoded),
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
  see data/sources/records.py. Images may be paths, embedded bytes (`{"bytes", "path"}`), `data:` URIs.

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
images; http(s) URLs are refused unless `allow_remote_images`, when data/media/remote.py fetches them
into a cache as records are read (a chunk at a time); other `scheme://` URLs are refused. Checking
that files exist and are images is `validate`'s job.

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ...config import ReadArgs
from ...errors import Problem
from ..media.paths import MediaRules
from ..types import Conversation, Origin
from . import formats
from .dataset_info import DatasetEntry, dataset_entries, entry_for_path
from .dataset_info import looks_like_hub_id as _looks_like_hub_id
from .ids import IdPlan
from .mix import Mix, interleave
from .preference_records import preference_kind, preference_to_conversation
from .records import (
    AUTO_FORMAT,
    RecordFormat,
    file_problem,
    record_to_conversation,
    type_name,
)

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
class RawRecord:
    """One record as loaded from a file, before its id is assigned.

    `source` names where it is (`path:LINE`, `path#INDEX`); `fallback_id` is the id it takes when it has
    no unique id of its own (`<stem>:<line>`, `<stem>:<index>`); image paths resolve against `base_dir`.
    """

    value: Any
    source: str
    fallback_id: str
    base_dir: str
    fmt: RecordFormat
    origin: list | None = None  # the row's locator for embedded images (data/sources/formats.py)
    file: str = ""  # the data file (table: its path or shown name) and the record's index there: types.Origin
    index: int = 0


# A file reader: (path, base_dir, fmt) -> the file's records in order, each a RawRecord or the Problem
# of a record (or of the whole file) that cannot be read. Readers are generators: nothing is held
# beyond the record being yielded (a JSON array file is the exception: json has no incremental parser).
# `ids_only=True` (the id plan's pass) may leave out of `value` everything but the record's own "id": table formats
# then skip their (image-heavy) columns.
FileReader = Callable[..., Iterator["RawRecord | Problem"]]


def _is_datasets_folder(path: str) -> bool:
    return formats.is_datasets_folder(path)


def _table(rows: Iterator, base_dir: str, fmt: RecordFormat) -> Iterator[RawRecord | Problem]:
    """data/sources/formats.py's rows (Parquet, Arrow, datasets folders, Hub ids) as RawRecords."""
    for item in rows:
        yield item if isinstance(item, Problem) else \
            RawRecord(item.value, item.source, item.fallback_id, base_dir, fmt, item.origin, item.file, item.index)


def read_parquet(path: str, base_dir: str, fmt: RecordFormat = AUTO_FORMAT,
                 ids_only: bool = False) -> Iterator[RawRecord | Problem]:
    return _table(formats.iter_parquet(path, ids_only=ids_only), base_dir, fmt)


def read_arrow(path: str, base_dir: str, fmt: RecordFormat = AUTO_FORMAT,
               ids_only: bool = False) -> Iterator[RawRecord | Problem]:
    return _table(formats.iter_arrow(path, ids_only=ids_only), base_dir, fmt)


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


# The longest line of a .jsonl file read as one record (a record with embedded base64 images is a few MB): a
# longer one (a file that is not JSON Lines, a runaway write) is a bad line, read past in blocks, never held whole.
MAX_LINE_BYTES = 64 * 1024 * 1024


def read_jsonl(path: str, base_dir: str, fmt: RecordFormat = AUTO_FORMAT,
               ids_only: bool = False) -> Iterator[RawRecord | Problem]:
    """A JSON Lines file, one line at a time."""
    try:
        f = open(path, "rb")
    except OSError as e:
        yield file_problem(path, "data_not_found", f"cannot read the file: {e.strerror or e}", _FIX_FILE)
        return
    with f:
        try:
            yield from _read_lines(path, base_dir, fmt, _bounded_lines(f, path))
        except OSError as e:
            yield file_problem(path, "data_not_found", f"cannot read the file: {e.strerror or e}", _FIX_FILE)


class _LongLine(bytes):
    """Stands for a line longer than MAX_LINE_BYTES (its length so far is not kept)."""


def _bounded_lines(f, path: str) -> Iterator[bytes]:
    while True:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while True:  # skip the rest of the line in blocks
                rest = f.readline(1 << 20)
                if not rest or rest.endswith(b"\n"):
                    break
            yield _LongLine()
            continue
        yield line


def _read_lines(path: str, base_dir: str, fmt: RecordFormat, lines: Iterable[bytes]) -> Iterator[RawRecord | Problem]:
    stem = Path(path).stem
    for lineno, raw in enumerate(lines, 1):
        source = f"{path}:{lineno}"
        if isinstance(raw, _LongLine):
            yield file_problem(source, "invalid_json", f"line is longer than {MAX_LINE_BYTES:,} bytes",
                               "a .jsonl file holds one JSON object per line; check that this is one", path, lineno)
            continue
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield file_problem(
                source,
                "invalid_utf8",
                f"line is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                "re-save the file as UTF-8", path, lineno,
            )
            continue
        try:
            value = _parse_json(text.rstrip("\r\n"))
        except ValueError as e:
            yield file_problem(
                source,
                "invalid_json",
                f"line is not valid JSON: {e}",
                "fix the JSON on this line (a .jsonl file holds one JSON object per line)", path, lineno,
            )
            continue
        yield RawRecord(value, source, f"{stem}:{lineno}", base_dir, fmt, file=path, index=lineno)


def read_json(path: str, base_dir: str, fmt: RecordFormat = AUTO_FORMAT,
              ids_only: bool = False) -> Iterator[RawRecord | Problem]:
    """A JSON array file (or one JSON object: one record; or JSON Lines in a .json file, as `datasets` reads it)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        yield file_problem(path, "data_not_found", f"cannot read the file: {e.strerror or e}", _FIX_FILE)
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
            yield from _read_lines(path, base_dir, fmt, iter(data.split(b"\n")))
            return
        yield file_problem(
            path,
            "invalid_utf8",
            f"file is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})",
            "re-save the file as UTF-8",
        )
        return
    try:
        value = _parse_json(text)
    except ValueError as e:
        if stripped.startswith(b"{"):
            yield from _read_lines(path, base_dir, fmt, iter(data.split(b"\n")))
            return
        yield file_problem(
            path,
            "invalid_json",
            f"file is not valid JSON: {e}",
            "fix the JSON syntax (a .json file holds one JSON array of records; "
            "use .jsonl for one record per line)",
        )
        return
    del data, text
    if isinstance(value, dict):
        # A single record: LLaMA-Factory (via `datasets`) reads it as one row.
        value = [value]
    if not isinstance(value, list):
        yield file_problem(
            path,
            "invalid_json",
            f"file holds {type_name(value)}, expected a JSON array of records",
            "write the records as a JSON array: [{\"messages\": [...]}, ...]",
        )
        return
    stem = Path(path).stem
    value.reverse()  # pop from the end: each record is released once it has been read
    i = 0
    while value:
        yield RawRecord(value.pop(), f"{path}#{i}", f"{stem}:{i}", base_dir, fmt, file=path, index=i)
        i += 1


# File readers by extension. New formats register here (see data/sources/formats.py).
FILE_READERS: dict[str, FileReader] = {
    ".jsonl": read_jsonl, ".json": read_json, ".parquet": read_parquet, ".arrow": read_arrow,
}


def _reader_for(path: str) -> FileReader | None:
    for ext, reader in FILE_READERS.items():
        if path.endswith(ext):
            return reader
    return None


def _read_path(path: str, base_dir: str | None, fmt: RecordFormat, split: str | None = None,
               ids_only: bool = False) -> Iterator[RawRecord | Problem]:
    if os.path.isdir(path):
        if _is_datasets_folder(path):
            parent = os.path.dirname(os.path.abspath(path.rstrip("/\\") or path))
            yield from _table(formats.iter_datasets_folder(path, split, ids_only=ids_only), base_dir or parent, fmt)
            return
        if formats.table_files_in(path):  # the Hub layout: data/train-00000-of-00002.parquet, ...
            found = formats.split_files(path, split)
            if isinstance(found, Problem):
                yield found
                return
            for name in found[0]:
                yield from _read_path(name, base_dir or path, fmt, ids_only=ids_only)
            return
        try:
            names = sorted(
                n for n in os.listdir(path) if _reader_for(n) is not None and n != "dataset_info.json"
            )
        except OSError as e:
            yield file_problem(path, "data_not_found", f"cannot list the folder: {e.strerror or e}", _FIX_FILE)
            return
        for n in names:  # a FIFO or device named like a data file: reported, never opened
            full = os.path.join(path, n)
            if os.path.exists(full) and not os.path.isfile(full) and not os.path.isdir(full):
                yield file_problem(full, "data_not_found", "is not a regular file (a FIFO, device or socket)",
                                   "point the dataset at a regular data file")
        names = [n for n in names if os.path.isfile(os.path.join(path, n))]
        if not names:
            yield file_problem(
                path,
                "data_not_found",
                "the folder holds no .json or .jsonl files",
                "point `data` at a data file, a folder of .json/.jsonl files or a `save_to_disk` folder",
            )
            return
        for n in names:
            yield from _read_path(os.path.join(path, n), base_dir or path, fmt, ids_only=ids_only)
        return
    folder = base_dir or os.path.dirname(path) or "."
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO, a device (/dev/zero), a socket: never opened
        yield file_problem(path, "data_not_found", "is not a regular file (a FIFO, device or socket)",
                           "point the dataset at a regular data file")
        return
    reader = _reader_for(path)
    if reader is None:
        yield file_problem(
            path,
            "data_not_found",
            f"unsupported data file type {Path(path).suffix or '(no extension)'!r}",
            "use a .json, .jsonl, .parquet or .arrow file, a folder of them (the Hub layout), "
            "a `save_to_disk` folder or a Hub dataset id",
        )
        return
    yield from reader(path, folder, fmt, ids_only=ids_only)


def reading(read: ReadArgs | str | os.PathLike) -> ReadArgs:
    """The read section; a bare path (or comma-separated paths, Hub ids) is read under ReadArgs' defaults, with
    no dataset_dir (no dataset_info.json to look names up in), as `vlmtune inspect` reads it."""
    return read if isinstance(read, ReadArgs) else ReadArgs(dataset=os.fspath(read), dataset_dir=None)


def iter_raw(read: ReadArgs | str | os.PathLike, *, ids_only: bool = False,
             mix: Mix | None = None) -> Iterator[RawRecord | Problem]:
    """Every record the read section names (`dataset`, found through `dataset_dir`; images under `media_dir`), in
    input order (or as `mix` interleaves the datasets), as a RawRecord or the Problem of an unreadable record or input.

    `ids_only`: the same records, whose values may hold only their own "id" (the id plan's pass)."""
    read = reading(read)
    data, dataset_dir, media_dir = read.dataset, read.dataset_dir, read.media_dir
    if os.path.exists(data):
        yield from _read_given_path(data, read, ids_only)
        return
    items = [x.strip() for x in data.split(",") if x.strip()]
    sources: list[tuple[str, Callable[[], Iterator]]] = []
    if items and all(os.path.exists(x) for x in items):
        sources = [(x, lambda x=x: _read_given_path(x, read, ids_only)) for x in items]
    elif items and (dataset_dir is not None or all(_looks_like_hub_id(x) for x in items)):
        for name, entry in zip(items, dataset_entries(items, dataset_dir or ".", media_dir, hub_ids=True)):
            if isinstance(entry, Problem):
                yield entry
            else:
                sources.append((name, lambda e=entry: _read_entry(e, ids_only)))
    else:
        yield file_problem(
            data,
            "data_not_found",
            f"{data!r} is not a file or folder"
            + ("" if dataset_dir else " (and no dataset_dir was given to look up dataset names)"),
            "point `data` at a .json/.jsonl file, a folder of them or a `save_to_disk` folder, "
            "or give dataset names with dataset_dir",
        )
    if mix is None or mix.strategy == "concat" or len(sources) < 2:
        for _, records in sources:
            yield from records()
    else:
        yield from interleave(sources, mix, count_left_out=not ids_only)


def _read_given_path(path: str, read: ReadArgs, ids_only: bool = False) -> Iterator[RawRecord | Problem]:
    """A path given directly: a dataset_info.json entry naming it still applies (columns, tags, split)."""
    entry = entry_for_path(path, read.dataset_dir)
    if entry is None:
        yield from _read_path(path, read.media_dir, AUTO_FORMAT, ids_only=ids_only)
    else:
        yield from _read_entry(DatasetEntry(path, read.media_dir or "", entry.fmt, entry.split, entry.subset, None,
                                            entry.num_samples), ids_only)


def _read_entry(entry: DatasetEntry, ids_only: bool = False) -> Iterator[RawRecord | Problem]:
    if entry.hub_id is not None:
        items = _table(formats.iter_hub(entry.hub_id, entry.subset, entry.split, ids_only=ids_only), entry.root or ".",
                       entry.fmt)
    else:
        items = _read_path(entry.path, entry.root or None, entry.fmt, entry.split, ids_only)
    if entry.num_samples is None:
        yield from items
    else:  # a random draw needs the entry's records at hand: num_samples holds that one dataset in memory
        yield from _sample(list(items), entry.num_samples)


def _sample(items: list, k: int) -> list:
    """LLaMA-Factory's `num_samples`: k records drawn at random (all of them, then repeats, when k > n).

    Seeded, so that the same config prepares the same data (and every pass over the input, e.g. the id
    plan's, sees the same draw); problems of unreadable inputs are kept.
    """
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


def layout_notes(layouts: Counter) -> list[str]:
    """One line per record layout recognised, with how many records had it."""
    from .records import LAYOUTS

    counts = Counter(layouts)
    specific = [k for k in counts if k != "sharegpt"]
    if len(specific) == 1 and "sharegpt" in counts:  # records without images cannot tell the layouts apart
        counts = Counter({specific[0]: sum(counts.values())})
    return [f"recognised {LAYOUTS.get(k, k)}: {n} record(s)" for k, n in counts.most_common()]


REMOTE_CHUNK = 256  # conversations whose http(s) images are fetched together (in parallel)


def iter_samples(
    read: ReadArgs | str | os.PathLike,
    *,
    layouts: Counter | None = None,
    preference: bool = False,
    mix: Mix | None = None,
) -> Iterator[Conversation | Problem]:
    """Every record the read section names in input order, as a `Conversation` or the one `Problem` why it yields
    none. A bare path is read under ReadArgs' defaults (`reading`). The section says where the data and its media
    are, which image paths and URLs are allowed and how remote images are fetched (data/media/remote.py
    `fetch_options`); `mix` (default: the section's mix_strategy and interleave_probs, seed 0) how datasets mix.
    max_samples is applied by the driver (data/drivers/pipeline.py), which counts what it leaves out.

    `preference` (the dpo and kto stages): ranking and KTO records become preference samples
    (data/sources/preference_records.py); without it they are refused, so that SFT never trains their answers.

    Reads the input twice (three times when own ids repeat): once to plan the ids, then to convert. Memory
    stays bounded by one record (REMOTE_CHUNK records with allow_remote_images) plus 16 bytes per record
    for the id plan. `layouts`, when given, counts the record layouts recognised (for `layout_notes`).
    """
    read = reading(read)
    mix = Mix.of(read) if mix is None else mix

    def raws(ids_only: bool = False) -> Iterator[RawRecord | Problem]:
        return iter_raw(read, ids_only=ids_only, mix=mix)

    def ids() -> Iterator[RawRecord | Problem]:
        return raws(ids_only=True)

    plan = IdPlan(ids(), ids)
    rules = MediaRules.of(read)

    def converted() -> Iterator[Conversation | Problem]:
        for item in raws():
            if isinstance(item, Problem):
                yield item
                continue
            # preference records (ranking pairs, KTO tags) have their own converters: data/sources/preference_records.py
            convert = (preference_to_conversation if preference and preference_kind(item.value, item.fmt)
                       else record_to_conversation)
            conv = convert(
                item.value,
                sample_id=plan.next_id(item),
                source=item.source,
                base_dir=item.base_dir,
                fmt=item.fmt,
                rules=rules,
                origin=item.origin,
            )
            if isinstance(conv, Conversation):
                conv.origin = Origin(item.file, item.index)
                if layouts is not None:
                    layouts[conv.layout] += 1
            else:  # where, as data (DataError groups a per-file problem by its file; the fit report's line)
                conv = replace(conv, file=item.file, index=item.index)
            yield conv

    if not read.allow_remote_images:
        yield from converted()
        return
    from ..media.remote import fetch_options, fetch_remote_images

    options = fetch_options(read)
    chunk: list = []
    for item in converted():
        chunk.append(item)
        if len(chunk) == REMOTE_CHUNK:
            fetch_remote_images([c for c in chunk if isinstance(c, Conversation)], options)
            yield from chunk
            chunk = []
    fetch_remote_images([c for c in chunk if isinstance(c, Conversation)], options)
    yield from chunk


def read_samples(read: ReadArgs | str | os.PathLike, *, preference: bool = False) -> ReadResult:
    """Read every record the read section names into conversations, accounting for each record (a list of
    `iter_samples`; a bare path: ReadArgs' defaults).

    `dataset` is a .json/.jsonl file, a folder of them, a `save_to_disk` folder, comma-separated
    paths, or comma-separated dataset names from `dataset_dir/dataset_info.json`. Image paths are
    resolved against `media_dir`, else the data file's folder (dataset_dir for dataset names).
    Never raises on bad data: see the module docstring for what goes where.
    """
    # Reading builds millions of small acyclic objects; the cyclic GC would rescan them over and
    # over (about 3x the reading time on 100k records), so it is paused while reading.
    conversations: list[Conversation] = []
    problems: list[Problem] = []
    layouts: Counter = Counter()
    with _gc_paused():
        for item in iter_samples(read, layouts=layouts, preference=preference):
            (problems if isinstance(item, Problem) else conversations).append(item)
    return ReadResult(conversations=conversations, problems=problems, records=len(conversations) + len(problems),
                      notes=layout_notes(layouts))


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
