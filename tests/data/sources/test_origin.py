"""A sample's origin is data, not a string parsed back: the reader records (file, index) of every conversation and
every row carries it in columns (file, index, piece): the pieces `split` cuts are numbered 1..n, with their input's
id in `sample_id`."""

from __future__ import annotations

import json

from vlmtune.data.sources.readers import read_samples
from vlmtune.data.types import Origin


def _rec(i: int) -> dict:
    return {"id": f"s{i}", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def test_the_reader_records_file_and_index_of_each_conversation(tmp_path):
    jsonl, array = tmp_path / "a.jsonl", tmp_path / "b.json"
    jsonl.write_text("\n".join(json.dumps(_rec(i)) for i in range(2)) + "\n\n" + json.dumps(_rec(2)) + "\n")
    array.write_text(json.dumps([_rec(3), _rec(4)]))
    res = read_samples(f"{jsonl},{array}")
    assert [(c.id, c.origin) for c in res.conversations] == [
        ("s0", Origin(str(jsonl), 1)), ("s1", Origin(str(jsonl), 2)), ("s2", Origin(str(jsonl), 4)),
        ("s3", Origin(str(array), 0)), ("s4", Origin(str(array), 1)),
    ]
    assert [c.source for c in res.conversations][2:4] == [f"{jsonl}:4", f"{array}#0"]  # the same place, as text


def test_max_samples_counts_per_file_by_origin(tmp_path, tiny_ckpt):
    from vlmtune.config import ReadArgs
    from vlmtune.data.drivers.pipeline import Stages, run_pipeline
    from vlmtune.models.load import load_spec

    a, b = tmp_path / "x:1.jsonl", tmp_path / "x#1.jsonl"
    a.write_text("\n".join(json.dumps(_rec(i)) for i in range(3)) + "\n")
    b.write_text("\n".join(json.dumps(_rec(10 + i)) for i in range(3)) + "\n")
    stream = run_pipeline(ReadArgs(dataset=f"{a},{b}", dataset_dir=None, max_samples=2),
                          load_spec(str(tiny_ckpt("qwen2_vl"))), Stages(), progress=False)
    ids = [s.id for res in stream.chunks for s in res.stats]
    assert ids == ["s0", "s1", "s10", "s11"] and stream.limited and stream.records == 6


def _rows(read, loaded, cutoff_len: int) -> list[dict]:
    """The rows the pipeline emits for `read` under cutoff_len with overflow: [split]."""
    from vlmtune.config import FitArgs
    from vlmtune.data.drivers.pipeline import Stages, run_pipeline

    stream = run_pipeline(read, loaded, Stages(FitArgs(cutoff_len=cutoff_len, overflow=["split"]), fitting=True,
                                               emit=True), progress=False)
    return [row for res in stream.chunks if res.table is not None for row in res.table.to_pylist()]


def _chat(i: int, exchanges: int) -> dict:
    turns = [m for k in range(exchanges) for m in ({"role": "user", "content": f"question {k} " + "why " * 30},
                                                   {"role": "assistant", "content": f"answer {k}"})]
    return {"id": f"r{i}", "messages": turns}


def test_rows_from_jsonl_and_parquet_carry_file_index_and_piece(tmp_path, tiny_ckpt):
    """JSON Lines: the 1-based line; Parquet: the 0-based row; a split sample's rows are pieces 1..n of it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlmtune.config import ReadArgs
    from vlmtune.models.load import load_spec

    loaded = load_spec(str(tiny_ckpt("qwen2_vl")))
    records = [_chat(0, 1), _chat(1, 3), _chat(2, 1)]  # the middle one is three exchanges: split cuts it in three
    jsonl, parquet = tmp_path / "d.jsonl", tmp_path / "d.parquet"
    jsonl.write_text("\n\n".join(json.dumps(r) for r in records) + "\n")  # blank lines: lines 1, 3, 5
    pq.write_table(pa.Table.from_pylist(records), parquet)
    for path, index in ((jsonl, [1, 3, 3, 3, 5]), (parquet, [0, 1, 1, 1, 2])):
        rows = _rows(ReadArgs(dataset=str(path), dataset_dir=None), loaded, cutoff_len=70)
        assert [(r["file"], r["index"], r["piece"], r["sample_id"]) for r in rows] == [
            (str(path), index[0], 0, "r0"), (str(path), index[1], 1, "r1"), (str(path), index[2], 2, "r1"),
            (str(path), index[3], 3, "r1"), (str(path), index[4], 0, "r2")]
        assert [r["id"] for r in rows] == ["r0", "r1#1", "r1#2", "r1#3", "r2"]  # the ids users see are unchanged
