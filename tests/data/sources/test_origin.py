"""A sample's origin is data, not a string parsed back: the reader records (file, index) of every conversation,
and every piece `split` cuts keeps its input sample's id in its own column."""

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
