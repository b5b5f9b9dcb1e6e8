"""The columns the data path writes, declared once: every consumer derives its view from these declarations.

- `Row`: one emitted training sample, what `prepare` stores and the collator consumes. Its fields give the
  Arrow features (`features()`), the columns a pack concatenates (`packed_columns()`), the per-video columns
  (`VIDEO_COLUMNS`) and the typed accessor the collator reads a row through (`RowView`).
- `PackedRow`: a row after packing: a Row's columns plus `segments`.
- `SampleStats`: one valid sample's token counts before fitting (prepare's samples file, inspect, the doctor).

A field is declared with `column(arrow, ...)`: `arrow` is the Arrow value type with one `[` per list level
("string", "[int32]", "[[int32]]"), `packed` says whether a pack concatenates it and `optional` whether a
row may lack it (a row without videos, a cache from before the column). The types are strings, not pyarrow
objects, so that importing this module stays cheap (datasets and pyarrow load only when a table is built).
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Iterable


def column(arrow: str, *, packed: bool = False, optional: bool = False, video: bool = False,
           default: Any = MISSING) -> Any:
    """A declared column: its Arrow type, whether packing concatenates it, whether a row may lack it (then it
    reads as its empty value), and whether it is one of the per-video columns."""
    meta = {"arrow": arrow, "packed": packed, "optional": optional, "video": video}
    if arrow.startswith("["):
        return field(default_factory=list, metadata=meta) if optional else field(metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Row:
    """An emitted training sample (one piece of one input sample)."""

    id: str = column("string")
    source: str = column("string")
    input_ids: list[int] = column("[int32]", packed=True)
    labels: list[int] = column("[int32]", packed=True)
    images: list[str] = column("[string]", packed=True)
    image_grid_thw: list[list[int]] = column("[[int32]]", packed=True)
    image_min_pixels: list[int] = column("[int64]", packed=True)
    image_max_pixels: list[int] = column("[int64]", packed=True)
    # one entry per video, in order (docs/video.md: what the collator hands the video processor)
    videos: list[str] = column("[string]", packed=True, optional=True, video=True)
    video_grid_thw: list[list[int]] = column("[[int32]]", packed=True, optional=True, video=True)
    video_frames: list[list[int]] = column("[[int32]]", packed=True, optional=True, video=True)
    video_total_frames: list[int] = column("[int32]", packed=True, optional=True, video=True)
    video_fps: list[float] = column("[float64]", packed=True, optional=True, video=True)
    video_rotation: list[int] = column("[int32]", packed=True, optional=True, video=True)
    video_min_pixels: list[int] = column("[int64]", packed=True, optional=True, video=True)
    video_max_pixels: list[int] = column("[int64]", packed=True, optional=True, video=True)
    video_second_per_grid: list[float] = column("[float64]", packed=True, optional=True, video=True)
    # preference rows (data/stages/pairs.py): a pair's rejected side (its chosen side is input_ids / labels; both share
    # the images), and a KTO row's tag (1 desirable, 0 undesirable; -1: not a KTO row). Never packed.
    rejected_input_ids: list[int] = column("[int32]", optional=True)
    rejected_labels: list[int] = column("[int32]", optional=True)
    kto_tag: int = column("int8", optional=True, default=-1)
    # the input sample's id, shared by the pieces split cuts from it (the validation split keeps them together)
    sample_id: str = column("string", optional=True, default="")
    # where the input sample is, as data (data/types.Origin; nothing parses it back from `id` or `source`): the data
    # file (or the dataset folder / Hub id of table rows), the record's index there (a JSON Lines file: its 1-based
    # line, else the 0-based position; -1: not read from a file), and the piece (0: the whole sample; 1..n: the
    # k-th piece split cut from it, in order). Per sample, like sample_id and kto_tag: a packed row, which holds
    # several samples, does not carry them (its `id` and `source` join its samples', in `segments` order).
    file: str = column("string", optional=True, default="")
    index: int = column("int64", optional=True, default=-1)
    piece: int = column("int32", optional=True, default=0)
    # len(input_ids) (a pair: its longer side): the Trainer's group_by_length and packing plan from this column alone
    length: int = column("int32", default=0)

    def __post_init__(self) -> None:
        self.length = max(len(self.input_ids), len(self.rejected_input_ids))
        self.sample_id = self.sample_id or self.id

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PackedRow(Row):
    """Several rows in one sequence: the packed columns concatenated, ids and sources joined, and each
    row's length in `segments` (the collator restarts positions there)."""

    segments: list[int] = column("[int32]", optional=True)


@dataclass(frozen=True)
class SampleStats:
    """One valid sample's token counts before fitting (prepare writes them; inspect and the doctor read them)."""

    id: str = column("string")
    source: str = column("string")
    tokens: int = column("int32")
    image_tokens: int = column("int32")
    text_tokens: int = column("int32")
    images: int = column("int32")
    videos: int = column("int32", default=0)
    video_tokens: int = column("int32", default=0)
    # tokens of the sample's largest video (the doctor's clips over cutoff_len)
    longest_video: int = column("int32", default=0)


# -- what derives from a declaration ---------------------------------------------------------------------
def columns(decl: type = Row) -> tuple[str, ...]:
    """Every declared column, in declaration order (the Arrow schema's order)."""
    return tuple(f.name for f in fields(decl))


def signature(decl: type = Row) -> list[list]:
    """The declaration as data, each column's name and Arrow type in order: the prepared cache's fingerprint
    hashes it, so a cache written under another row schema is never taken as complete."""
    return [[f.name, f.metadata["arrow"]] for f in fields(decl)]


def packed_columns(decl: type = Row) -> tuple[str, ...]:
    """The list columns a pack concatenates."""
    return tuple(f.name for f in fields(decl) if f.metadata.get("packed"))


def required_columns(decl: type = Row) -> tuple[str, ...]:
    """The columns every row has (the rest may be missing: they read as empty)."""
    return tuple(f.name for f in fields(decl) if not f.metadata.get("optional"))


def video_columns_of(decl: type = Row) -> tuple[str, ...]:
    return tuple(f.name for f in fields(decl) if f.metadata.get("video"))


# A row's per-video columns (one entry per video, in order of appearance; encode.video_columns fills them).
VIDEO_COLUMNS = video_columns_of(Row)


def _value(arrow: str):
    from datasets import Sequence, Value

    return Sequence(_value(arrow[1:-1])) if arrow.startswith("[") else Value(arrow)


def features(decl: type = Row, names: Iterable[str] | None = None):
    """The `datasets.Features` of a declaration (of the given columns only, in declaration order)."""
    from datasets import Features

    wanted = None if names is None else set(names)
    return Features({f.name: _value(f.metadata["arrow"]) for f in fields(decl)
                     if wanted is None or f.name in wanted})


def _arrow_type(arrow: str):
    import pyarrow as pa

    return pa.list_(_arrow_type(arrow[1:-1])) if arrow.startswith("[") else pa.type_for_alias(arrow)


def arrow_types(decl: type = Row) -> dict:
    """{column: pyarrow type} of a declaration, the same types as `features(decl)` without importing `datasets`
    (a worker process builds its chunk's table with these: `datasets` would add ~100 MB to each worker)."""
    return {f.name: _arrow_type(f.metadata["arrow"]) for f in fields(decl)}


def table(items: list[dict], feats):
    """Rows (dicts) as one Arrow table in `feats` (Features or `arrow_types`), column by column (datasets'
    per-example encoding is slow)."""
    import pyarrow as pa

    return pa.table({k: pa.array([r[k] for r in items], type=getattr(t, "pa_type", t)) for k, t in feats.items()})


def stats_table(stats: list[SampleStats]):
    """SampleStats as an Arrow table in their declared features."""
    return table([dataclasses.asdict(s) for s in stats], features(SampleStats))


def stats_from_columns(cols: dict[str, list]) -> list[SampleStats]:
    """SampleStats back from their columns; a column missing (a cache from before it) takes its default."""
    names = [c for c in columns(SampleStats) if c in cols]
    return [SampleStats(**dict(zip(names, t))) for t in zip(*(cols[c] for c in names))]


class RowView:
    """Typed read access to a row dict as the collator gets it (prepared or packed): `RowView(row).video_fps`.

    Every declared column reads by its name; a list column the row lacks (a row without videos, an unpacked
    row's `segments`) reads as empty, a scalar one as None. A name that is not declared raises AttributeError,
    so a typo cannot read as an empty column."""

    __slots__ = ("_row", "_lists")

    def __init__(self, row: dict, decl: type = PackedRow):
        self._row = row
        self._lists = _declared(decl)

    def __getattr__(self, name: str) -> Any:
        is_list = self._lists.get(name)
        if is_list is None:
            raise AttributeError(f"{name!r} is not a declared column of a row")
        value = self._row.get(name)
        return ([] if is_list else None) if value is None else value

    def has(self, name: str) -> bool:
        """Whether the row carries the column at all (an optional one may be absent)."""
        return self._row.get(name) is not None

    @property
    def row(self) -> dict:
        return self._row

    def named(self) -> tuple[str, str]:
        """(id, where) that name the row's sample in an error: its source and, for a piece of a split sample,
        which piece (read from the `piece` column)."""
        where, piece = str(self._row.get("source")), self._row.get("piece")
        return str(self._row.get("id")), f"{where}, piece {piece}" if piece else where


_DECLARED: dict[type, dict[str, bool]] = {}


def _declared(decl: type) -> dict[str, bool]:
    """column -> whether it is a list, per declaration (cached: the collator builds a view per row)."""
    got = _DECLARED.get(decl)
    if got is None:
        got = _DECLARED[decl] = {f.name: f.metadata["arrow"].startswith("[") for f in fields(decl)}
    return got
