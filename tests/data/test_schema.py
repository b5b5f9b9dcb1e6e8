"""One declaration of the row: the Arrow schema, the packed columns, the video columns and the collator's accessor
all follow it, so a column added there reaches every one of them."""

from __future__ import annotations

import dataclasses

import pytest

from vlmtune.data import schema
from vlmtune.data.stages.pack import PACKED_COLUMNS, pack_rows_in_bins
from vlmtune.data.schema import (
    VIDEO_COLUMNS,
    PackedRow,
    Row,
    RowView,
    SampleStats,
    column,
    features,
    packed_columns,
    stats_from_columns,
    stats_table,
)


@dataclasses.dataclass
class WeightedRow(Row):
    """A row with one more packed list column, as a new feature would declare it."""

    token_weights: list[float] = column("[float32]", packed=True, optional=True)


def _row(**extra) -> dict:
    return {**Row("a", "f.jsonl:1", [1, 2, 3], [-100, 2, 3], [], [], [], []).to_dict(), **extra}


def test_a_declared_column_reaches_the_arrow_schema_the_packed_columns_and_the_accessor():
    feats = features(WeightedRow)
    assert str(feats.arrow_schema.field("token_weights").type) == "list<item: float>"
    assert list(feats)[-1] == "token_weights"
    assert packed_columns(WeightedRow) == (*PACKED_COLUMNS, "token_weights")
    assert RowView(_row(token_weights=[0.5, 1.0, 1.0]), WeightedRow).token_weights == [0.5, 1.0, 1.0]
    assert RowView(_row(), WeightedRow).token_weights == []  # optional: a row without it reads as empty
    packed = pack_rows_in_bins([[_row(token_weights=[1.0] * 3), _row(token_weights=[2.0] * 3)]],
                               packed_columns(WeightedRow))
    assert packed[0]["token_weights"] == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    assert packed[0]["segments"] == [3, 3]


def test_the_row_declaration_gives_the_prepared_schema_in_order():
    feats = features(Row)
    assert list(feats) == ["id", "source", "input_ids", "labels", "images", "image_grid_thw", "image_min_pixels",
                           "image_max_pixels", *VIDEO_COLUMNS, "rejected_input_ids", "rejected_labels", "kto_tag",
                           "sample_id", "file", "index", "piece", "length"]
    arrow = feats.arrow_schema
    assert [str(arrow.field(c).type) for c in ("file", "index", "piece")] == ["string", "int64", "int32"]
    assert str(arrow.field("image_grid_thw").type) == "list<item: list<item: int32>>"
    assert str(arrow.field("image_min_pixels").type) == "list<item: int64>"
    assert str(arrow.field("length").type) == "int32"
    assert str(arrow.field("kto_tag").type) == "int8"  # preference rows: data/stages/pairs.py
    assert VIDEO_COLUMNS == ("videos", "video_grid_thw", "video_frames", "video_total_frames", "video_fps",
                             "video_rotation", "video_min_pixels", "video_max_pixels", "video_second_per_grid")
    assert list(features(PackedRow))[-1] == "segments"


def test_a_row_knows_its_length_and_every_row_writes_to_its_table():
    row = Row("a", "f.jsonl:1", [1, 2, 3, 4], [-100] * 4, ["x.png"], [[1, 2, 2]], [4], [16])
    assert row.length == 4 and row.sample_id == "a"  # a whole sample is its own sample
    piece = Row("a#2", "f.jsonl:1", [1], [1], [], [], [], [], sample_id="a")
    assert (piece.id, piece.sample_id) == ("a#2", "a")
    t = schema.table([row.to_dict()], features(Row))
    assert t.column_names == list(features(Row))
    assert t.column("videos").to_pylist() == [[]]


def test_a_row_carries_its_origin_and_a_pack_leaves_the_per_sample_columns_out():
    whole = Row("a", "f.jsonl:3", [1, 2], [-100, 2], [], [], [], [], file="f.jsonl", index=3)
    assert (whole.file, whole.index, whole.piece) == ("f.jsonl", 3, 0)
    assert (Row("b", "x", [1], [1], [], [], [], []).index, Row("b", "x", [1], [1], [], [], [], []).file) == (-1, "")
    piece = _row(id="a#2", sample_id="a", file="f.jsonl", index=3, piece=2)
    assert RowView(piece).named() == ("a#2", "f.jsonl:1, piece 2") and RowView(whole.to_dict()).named() == ("a", "f.jsonl:3")
    packed = pack_rows_in_bins([[whole.to_dict(), piece]])[0]
    assert not {"sample_id", "file", "index", "piece", "kto_tag"} & set(packed)  # per sample: a pack holds two
    assert (packed["id"], packed["segments"]) == ("a+a#2", [2, 3])
    assert RowView(packed).piece is None and RowView(packed).named() == ("a+a#2", "f.jsonl:3; f.jsonl:1")


def test_the_signature_is_each_column_with_its_type_and_changes_with_the_declaration():
    assert schema.signature(Row)[:2] == [["id", "string"], ["source", "string"]]
    assert schema.signature(Row)[-4:] == [["file", "string"], ["index", "int64"], ["piece", "int32"], ["length", "int32"]]
    assert schema.signature(WeightedRow) == [*schema.signature(Row), ["token_weights", "[float32]"]]


def test_the_accessor_refuses_an_undeclared_name():
    view = RowView({k: v for k, v in _row().items() if k not in VIDEO_COLUMNS})
    assert view.segments == [] and view.videos == [] and view.input_ids == [1, 2, 3]
    assert not view.has("videos") and view.has("input_ids")
    with pytest.raises(AttributeError, match="image_grids"):
        view.image_grids  # noqa: B018


def test_sample_stats_round_trip_through_their_table_and_an_old_cache_reads_defaults():
    stats = [SampleStats("a", "f:1", 10, 4, 6, 1, 1, 8, 8), SampleStats("b", "f:2", 5, 0, 5, 0)]
    t = stats_table(stats)
    assert t.column_names == [f.name for f in dataclasses.fields(SampleStats)]
    cols = {c: t.column(c).to_pylist() for c in t.column_names}
    assert stats_from_columns(cols) == stats
    old = {c: v for c, v in cols.items() if c not in ("videos", "video_tokens", "longest_video")}
    assert stats_from_columns(old) == [SampleStats("a", "f:1", 10, 4, 6, 1), SampleStats("b", "f:2", 5, 0, 5, 0)]


def test_arrow_types_are_the_features_types_without_datasets():
    """Workers build their tables with arrow_types (no `datasets` import): the same types as the features."""
    from vlmtune.data.schema import PackedRow, Row, SampleStats, arrow_types, features

    for decl in (Row, PackedRow, SampleStats):
        schema = features(decl).arrow_schema
        assert arrow_types(decl) == {name: schema.field(name).type for name in schema.names}
