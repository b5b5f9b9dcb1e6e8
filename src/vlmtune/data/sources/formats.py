"""Tabular data formats: Parquet files, Hub-layout folders, Arrow files, `save_to_disk` folders, Hub ids.

Each reader is a generator of `TableRow`s (or `Problem`s for inputs that cannot be read), a batch
at a time (pyarrow `iter_batches`, `datasets` arrow-format iteration), so memory is bounded by the
batch, never by the dataset. Rows are read as Arrow values: an `Image()` column stays
`{"bytes", "path"}` and is never decoded here.

Every row carries its `origin`, a JSON list naming it: `["parquet", file, row]`, `["arrow", file,
row]`, `["disk", folder, split, row]` or `["hub", id, subset, split, row]`. An embedded image's
`ImagePart.path` is `embedded:` + that list + the pointer to the bytes inside the row, and
`embedded_bytes` reads those bytes again at training time: the prepared dataset holds a reference
to the source rows, not a second copy of the images.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ...errors import Problem
from ..media.paths import shorten as _short
from ..types import EMBEDDED_PREFIX
from .records import file_problem

BATCH_ROWS = 256
TABLE_EXTS = (".parquet", ".arrow")


@dataclass
class TableRow:
    value: Any
    source: str
    fallback_id: str
    origin: list
    file: str = ""  # the table's path (or shown name) and the row's index: the sample's Origin
    index: int = 0


def _cannot(path: str, what: str, fix: str) -> Problem:
    return file_problem(path, "data_not_found", what, fix)


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {_short(str(e), 200)}"


# -- detection ------------------------------------------------------------------------------------


def is_datasets_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def table_files_in(folder: str) -> bool:
    """Whether a folder holds Parquet/Arrow files in the Hub layout (`data/train-*.parquet`, `*.parquet`)."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(f.endswith(TABLE_EXTS) for f in files):
            return True
    return False


def split_files(folder: str, split: str | None) -> tuple[list[str], str] | Problem:
    """The files of one split of a Hub-layout folder, resolved the way the Hub resolves them."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        files = DataFilesDict.from_patterns(get_data_patterns(folder), base_path=folder)
    except Exception as e:  # no pattern matched, unreadable folder ...
        return _cannot(folder, f"cannot find the data files of the folder: {_err(e)}",
                       "lay the folder out as on the Hub (data/train-00000-of-00001.parquet) or point at one file")
    chosen = _pick_split(files, split)
    if chosen is None:
        return _cannot(folder, f"the folder has no split {split or 'train'!r} (splits: {', '.join(sorted(files))})",
                       "set `split` in dataset_info.json to one of those splits")
    names = [str(f) for f in files[chosen] if str(f).endswith(TABLE_EXTS)]
    if not names:
        return _cannot(folder, f"split {chosen!r} of the folder holds no .parquet or .arrow files",
                       "convert the split to Parquet, or point `dataset` at its JSON/JSONL files")
    return sorted(names), chosen


def _pick_split(splits, split: str | None) -> str | None:
    if split is not None:
        return split if split in splits else None
    if "train" in splits:
        return "train"
    return next(iter(splits)) if len(splits) == 1 else None


# -- readers --------------------------------------------------------------------------------------


def rows_of(batch) -> list[dict]:
    """A record batch (or table) as Python rows, `to_pylist` but with binary cells (embedded image bytes) left
    as memoryviews of the batch's buffers: a memory-mapped file's image pages are then never copied, nor even
    read, beyond the few kilobytes of each image's header (data/media/images.read_header)."""
    import pyarrow as pa

    if not any(_has_binary(f.type) for f in batch.schema):
        return batch.to_pylist()
    batches = batch.to_batches() if isinstance(batch, pa.Table) else [batch]
    rows: list[dict] = []
    for b in batches:
        columns = {name: _values(b.column(i)) for i, name in enumerate(b.schema.names)}
        rows += [{k: v[i] for k, v in columns.items()} for i in range(b.num_rows)]
    return rows


def _has_binary(t) -> bool:
    import pyarrow as pa

    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    if pa.types.is_struct(t):
        return any(_has_binary(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _has_binary(t.value_type)
    return False


def _values(arr) -> list:
    """`arr.to_pylist()`, binary leaves as memoryviews (see rows_of); other leaves through pyarrow."""
    import numpy as np
    import pyarrow as pa

    t = arr.type
    if not _has_binary(t):
        return arr.to_pylist()
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        _, offsets_buf, data_buf = arr.buffers()
        wide = np.int64 if pa.types.is_large_binary(t) else np.int32
        offsets = np.frombuffer(offsets_buf, dtype=wide)[arr.offset: arr.offset + len(arr) + 1].tolist()
        data = memoryview(data_buf).cast("B") if data_buf is not None else memoryview(b"")  # bytes, not signed
        return [data[offsets[i]:offsets[i + 1]] if valid[i] else None for i in range(len(arr))]
    if pa.types.is_struct(t):
        children = {t.field(j).name: _values(child) for j, child in enumerate(arr.flatten())}
        return [{k: v[i] for k, v in children.items()} if valid[i] else None for i in range(len(arr))]
    flat = _values(arr.flatten())  # a list array: flatten() starts at this (sliced) array's first value
    offsets = arr.offsets.to_numpy().tolist()
    base = offsets[0]
    return [flat[offsets[i] - base:offsets[i + 1] - base] if valid[i] else None for i in range(len(arr))]


def iter_parquet(path: str, *, ids_only: bool = False) -> Iterator[TableRow | Problem]:
    """`ids_only`: the rows with only their "id" column (or none), for the id plan: no image page is read."""
    import pyarrow.parquet as pq

    real = os.path.abspath(path)
    stem = Path(path).stem
    row = 0
    try:
        pf = pq.ParquetFile(real, memory_map=True)  # no read copy of the (image-heavy) pages
        if ids_only and "id" not in pf.schema_arrow.names:
            for row in range(pf.metadata.num_rows):
                yield TableRow({}, f"{path}#{row}", f"{stem}:{row}", ["parquet", real, row], path, row)
            return
        columns = ["id"] if ids_only else None
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns, use_threads=False):
            for value in rows_of(batch):
                yield TableRow(value, f"{path}#{row}", f"{stem}:{row}", ["parquet", real, row], path, row)
                row += 1
    except Exception as e:  # a broken file is reported (after the rows read so far), not a crash
        yield _cannot(path if row == 0 else f"{path}#{row}", f"cannot read the Parquet file: {_err(e)}",
                      "check that the file is a complete Parquet file")


def iter_arrow(path: str, *, ids_only: bool = False) -> Iterator[TableRow | Problem]:
    real = os.path.abspath(path)
    try:
        ds = _arrow_dataset(real)
    except Exception as e:
        yield _cannot(path, f"cannot read the Arrow file: {_err(e)}",
                      "check that the file was written by `datasets` (an Arrow stream) or is an Arrow IPC file")
        return
    yield from _iter_dataset(ds, path, Path(path).stem, ["arrow", real], ids_only)


def iter_datasets_folder(path: str, split: str | None = None, *,
                         ids_only: bool = False) -> Iterator[TableRow | Problem]:
    import datasets

    real = os.path.abspath(path)
    try:
        ds = datasets.load_from_disk(real)
    except Exception as e:  # a broken folder must be reported, not crash the run
        yield _cannot(path, f"cannot load the datasets folder: {_err(e)}",
                      "check that the folder was written by `Dataset.save_to_disk`")
        return
    chosen = None
    if isinstance(ds, datasets.DatasetDict):
        chosen = _pick_split(ds, split)
        if chosen is None:
            yield _cannot(path, f"the DatasetDict has no {split or 'train'!r} split (splits: {', '.join(sorted(ds))})",
                          "save the training split as \"train\", set `split`, or point `data` at the split's folder")
            return
        ds = ds[chosen]
    name = Path(path.rstrip("/\\") or path).name
    yield from _iter_dataset(ds, path, name, ["disk", real, chosen], ids_only)


def iter_hub(repo_id: str, subset: str | None = None, split: str | None = None, *,
             ids_only: bool = False) -> Iterator[TableRow | Problem]:
    """A Hub dataset through `datasets.load_dataset` (its cache; HF_HUB_OFFLINE=1 reads only the cache)."""
    try:
        ds = _hub_dataset(repo_id, subset, split or "train")
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        hint = ("HF_HUB_OFFLINE is set, so only the datasets cache is read: load it once online, or "
                if offline else "check the id, subset and split, your network and login, or ")
        yield _cannot(repo_id, f"cannot load Hub dataset {repo_id!r} (subset {subset!r}, split {split or 'train'!r}): "
                               f"{_err(e)}", hint + "download it and point `dataset` at the files")
        return
    where = f"{repo_id}[{split or 'train'}]"
    origin = ["hub", repo_id, subset, split or "train"]
    yield from _iter_dataset(ds, where, repo_id.rsplit("/", 1)[-1], origin, ids_only)


def _iter_dataset(ds, shown: str, stem: str, origin: list, ids_only: bool = False) -> Iterator[TableRow | Problem]:
    row = 0
    if ids_only:  # the id plan's pass: no image column is read
        if "id" not in ds.column_names:
            for row in range(len(ds)):
                yield TableRow({}, f"{shown}#{row}", f"{stem}:{row}", [*origin, row], shown, row)
            return
        ds = ds.select_columns(["id"])
    try:
        # Arrow rows: Image features are not decoded (they come back as {"bytes", "path"}).
        for batch in ds.with_format("arrow").iter(batch_size=BATCH_ROWS):
            for value in rows_of(batch):
                yield TableRow(value, f"{shown}#{row}", f"{stem}:{row}", [*origin, row], shown, row)
                row += 1
    except Exception as e:
        yield _cannot(f"{shown}#{row}", f"cannot read the dataset: {_err(e)}", "check the dataset's files")


def _arrow_dataset(path: str):
    import datasets

    try:
        return datasets.Dataset.from_file(path)  # the streaming format `datasets` writes (memory-mapped)
    except Exception:
        import pyarrow as pa

        with pa.memory_map(path) as source:  # an Arrow IPC file written by pyarrow
            table = pa.ipc.open_file(source).read_all()
        return datasets.Dataset(table)


def _hub_dataset(repo_id: str, subset: str | None, split: str):
    import datasets

    return datasets.load_dataset(repo_id, name=subset, split=split)


# -- embedded bytes at training time -------------------------------------------------------------


class EmbeddedError(Exception):
    """The bytes behind an `embedded:` locator cannot be read (the source changed or moved)."""


def embedded_bytes(locator: str) -> bytes:
    """The image bytes an `embedded:` path points at, read from the source row."""
    try:
        where = json.loads(locator[len(EMBEDDED_PREFIX):])
        *origin, row, pointer = where
        value = _SOURCES.get(tuple(origin)).cell(int(row), pointer[0])
        for key in pointer[1:]:
            value = value[key]
    except EmbeddedError:
        raise
    except Exception as e:
        raise EmbeddedError(f"cannot read the embedded image {_short(locator, 200)}: {_err(e)}") from e
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray)):
        raise EmbeddedError(f"the embedded image {_short(locator, 200)} is no longer bytes in its source row")
    return bytes(value)


class _ParquetCells:
    """Random access to one column of a Parquet file, one row group (the last one used) in memory."""

    def __init__(self, path: str):
        import pyarrow.parquet as pq

        self.file = pq.ParquetFile(path, memory_map=True)
        meta = self.file.metadata
        self.starts = []
        start = 0
        for g in range(meta.num_row_groups):
            self.starts.append(start)
            start += meta.row_group(g).num_rows
        self.rows = start
        self.last: tuple[int, str, Any] | None = None

    def cell(self, row: int, column: str):
        import bisect

        if not 0 <= row < self.rows:
            raise EmbeddedError(f"row {row} is past the end of the Parquet file ({self.rows} rows)")
        g = bisect.bisect_right(self.starts, row) - 1
        if self.last is None or self.last[:2] != (g, column):
            self.last = (g, column, self.file.read_row_group(g, columns=[column]).column(0))
        return self.last[2][row - self.starts[g]].as_py()


class _DatasetCells:
    def __init__(self, ds):
        self.ds = ds.with_format("arrow")

    def cell(self, row: int, column: str):
        return self.ds[row][column][0].as_py()


class _Sources:
    """The opened sources of embedded images, a few at a time (one per Parquet shard in use)."""

    def __init__(self, keep: int = 8):
        self.keep = keep
        self.open: OrderedDict[tuple, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, origin: tuple):
        with self.lock:
            src = self.open.get(origin)
            if src is not None:
                self.open.move_to_end(origin)
                return src
        src = self._open(origin)
        with self.lock:
            self.open[origin] = src
            while len(self.open) > self.keep:
                self.open.popitem(last=False)
        return src

    @staticmethod
    def _open(origin: tuple):
        import datasets

        kind = origin[0]
        if kind == "parquet":
            return _ParquetCells(origin[1])
        if kind == "arrow":
            return _DatasetCells(_arrow_dataset(origin[1]))
        if kind == "disk":
            ds = datasets.load_from_disk(origin[1])
            return _DatasetCells(ds[origin[2]] if origin[2] is not None else ds)
        if kind == "hub":
            return _DatasetCells(_hub_dataset(origin[1], origin[2], origin[3]))
        raise EmbeddedError(f"unknown embedded source kind {kind!r}")


_SOURCES = _Sources()


def image_source(path: str):
    """What to open for a prepared row's image: the file path, or the bytes of an embedded/inline image."""
    if path.startswith(EMBEDDED_PREFIX):
        return embedded_bytes(path)
    if path.startswith("data:"):
        import base64

        return base64.b64decode(path.split(",", 1)[1])
    return path
