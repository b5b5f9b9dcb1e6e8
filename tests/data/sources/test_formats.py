"""Tabular formats (Parquet, Hub-layout folders, Arrow, save_to_disk, Hub ids) and the record layouts
users bring (TRL, the_cauldron, LLaVA, OpenAI), each checked against the real processor sample by sample."""

from __future__ import annotations

import base64
import io
import json
import os
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vlmtune.commands import cli
from vlmtune.data.sources.formats import embedded_bytes, image_source
from vlmtune.config import ReadArgs
from vlmtune.data.sources.readers import read_samples
from vlmtune.errors import Problem
from vlmtune.models.load import load_spec

from _spec import pixel_spec


def _png(w: int, h: int, color=(200, 40, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(w: int, h: int, color=(20, 140, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="JPEG")
    return buf.getvalue()


def _samples(seed: int, n: int = 10):
    """n samples with 0-4 images (cycled): (question, answer, [image bytes])."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        images = [(_png if rnd.random() < 0.5 else _jpeg)(rnd.randint(12, 300), rnd.randint(12, 300),
                                                          (rnd.randint(0, 255), 7 * i % 256, 90))
                  for _ in range(i % 5)]
        out.append((f"Question {i} about {' '.join('word' for _ in range(rnd.randint(1, 8)))}?", f"Answer {i}.", images))
    return out


def _processor_counts(loaded, hf_messages: list[list[dict]], images: list[list[bytes]]) -> list[tuple[int, int]]:
    """(len(input_ids), image pad tokens) of each sample from the real processor on the decoded images."""
    proc, out = loaded.processor, []
    for msgs, imgs in zip(hf_messages, images):
        text = proc.apply_chat_template(msgs, tokenize=False)
        decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in imgs] or None
        ids = proc(text=[text], images=decoded, return_tensors="pt")["input_ids"][0]
        out.append((len(ids), int((ids == loaded.spec.image_token_id).sum())))
    return out


def _image_first(q: str, n: int) -> list[dict]:
    return [*({"type": "image"} for _ in range(n)), {"type": "text", "text": q}]


def _trl_records(samples):
    """TRL / llava-instruct-mix-vsft: `messages` with image parts without a path + an `images` column."""
    return [{"messages": [{"role": "user", "content": _image_first(q, len(imgs))},
                          {"role": "assistant", "content": [{"type": "text", "text": a}]}],
             "images": [{"bytes": b, "path": None} for b in imgs]} for q, a, imgs in samples]


def _write_parquet_shards(folder: Path, records: list[dict], shards: int = 2) -> None:
    (folder / "data").mkdir(parents=True)
    k = -(-len(records) // shards)
    for s in range(shards):
        part = records[s * k:(s + 1) * k]
        table = pa.Table.from_pylist(part, schema=_TRL_SCHEMA)
        pq.write_table(table, folder / "data" / f"train-{s:05d}-of-{shards:05d}.parquet", row_group_size=3)
    pq.write_table(pa.Table.from_pylist(records[:1], schema=_TRL_SCHEMA), folder / "data" / "test-00000-of-00001.parquet")


_PART = pa.struct([("type", pa.string()), ("text", pa.string())])
_TRL_SCHEMA = pa.schema([
    ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(_PART))]))),
    ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
])


def _inspect(tmp_path, model, data, capsys, *extra) -> tuple[dict, list[dict]]:
    per = tmp_path / "per_sample.jsonl"
    rc = cli.main(["inspect", "--model", str(model), "--data", str(data), "--per-sample", str(per), "--json", *extra])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0, summary["problems"]
    return summary, [json.loads(line) for line in per.read_text().splitlines()]


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    return load_spec(str(tiny_ckpt("qwen2_vl")))


def _check_against_processor(rows, loaded, hf_messages, images):
    want = _processor_counts(loaded, hf_messages, images)
    assert [(r["tokens"], r["image_tokens"]) for r in rows] == want
    assert [r["images"] for r in rows] == [len(i) for i in images]
    assert {len(i) for i in images} == {0, 1, 2, 3, 4}


# -- TRL layout in a two-shard Hub-layout Parquet folder, embedded bytes ---------------------------


def test_parquet_hub_folder_with_embedded_images_equals_the_processor(tmp_path, tiny_ckpt, loaded, capsys):
    samples = _samples(1)
    folder = tmp_path / "hub"
    records = _trl_records(samples)
    _write_parquet_shards(folder, records)
    summary, rows = _inspect(tmp_path, tiny_ckpt("qwen2_vl"), folder, capsys)
    assert summary["records"] == 10 and summary["problems"] == []  # the test split is not read
    assert [r["id"] for r in rows] == [f"train-00000-of-00002:{i}" for i in range(5)] + [
        f"train-00001-of-00002:{i}" for i in range(5)]
    hf = [[{"role": "user", "content": _image_first(q, len(imgs))}, {"role": "assistant", "content": [{"type": "text", "text": a}]}]
          for q, a, imgs in samples]
    _check_against_processor(rows, loaded, hf, [s[2] for s in samples])


def test_parquet_rows_keep_a_reference_to_the_bytes_not_a_copy(tmp_path):
    samples = _samples(2, n=5)
    folder = tmp_path / "hub"
    _write_parquet_shards(folder, _trl_records(samples))
    res = read_samples(str(folder))
    assert res.problems == [] and res.records == 5
    assert res.notes == ["recognised TRL / llava-instruct-mix (`messages` with image parts without a path, "
                         "`images` column in order): 5 record(s)"]
    shard1 = os.path.abspath(folder / "data" / "train-00001-of-00002.parquet")
    img = res.conversations[3].images[1]  # row 0 of the second shard, its second image
    assert img.path == "embedded:" + json.dumps(["parquet", shard1, 0, ["images", 1, "bytes"]], separators=(",", ":"))
    assert embedded_bytes(img.path) == samples[3][2][1] == img.data
    assert image_source(img.path) == samples[3][2][1]


def test_split_and_single_parquet_and_arrow_and_save_to_disk(tmp_path, write_json):
    from datasets import Dataset, DatasetDict

    samples = _samples(3, n=5)
    records = _trl_records(samples)
    folder = tmp_path / "hub"
    _write_parquet_shards(folder, records)
    write_json(tmp_path / "dataset_info.json", {
        "t": {"file_name": "hub", "split": "test"},
        "few": {"file_name": "hub", "num_samples": 3},
        "many": {"file_name": "hub", "num_samples": 7},
        "nosplit": {"file_name": "hub", "split": "validation"},
    })
    test = read_samples(ReadArgs(dataset="t", dataset_dir=str(tmp_path)))
    assert test.records == 1 and [c.source for c in test.conversations] == [
        f"{folder}/data/test-00000-of-00001.parquet#0"]
    few = read_samples(ReadArgs(dataset="few", dataset_dir=str(tmp_path)))
    many = read_samples(ReadArgs(dataset="many", dataset_dir=str(tmp_path)))
    assert few.records == 3 and len({c.source for c in few.conversations}) == 3
    assert many.records == 7 and len({c.source for c in many.conversations}) == 5  # all, then repeats
    assert len({c.id for c in many.conversations}) == 7
    bad = read_samples(ReadArgs(dataset="nosplit", dataset_dir=str(tmp_path)))
    assert [(p.kind, p.what) for p in bad.problems] == [
        ("data_not_found", "the folder has no split 'validation' (splits: test, train)")]
    # the mapping applies when the folder is passed as a path, too
    assert read_samples(ReadArgs(dataset=str(folder), dataset_dir=str(tmp_path))).records == 5
    assert read_samples(ReadArgs(dataset=str(folder), dataset_dir=str(tmp_path / "elsewhere"))).records == 5

    one = tmp_path / "one.parquet"
    pq.write_table(pa.Table.from_pylist(records, schema=_TRL_SCHEMA), one)
    res = read_samples(str(one))
    assert res.problems == [] and [c.id for c in res.conversations] == [f"one:{i}" for i in range(5)]

    ds = Dataset(pa.Table.from_pylist(records, schema=_TRL_SCHEMA))
    DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "disk"))
    res = read_samples(str(tmp_path / "disk"))
    assert res.problems == [] and res.records == 5
    img = res.conversations[4].images[3]
    assert embedded_bytes(img.path) == samples[4][2][3]

    arrow = tmp_path / "t.arrow"
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_file(sink, _TRL_SCHEMA) as w:
        w.write_table(pa.Table.from_pylist(records, schema=_TRL_SCHEMA))
    res = read_samples(str(arrow))
    assert res.problems == [] and res.records == 5
    assert embedded_bytes(res.conversations[2].images[0].path) == samples[2][2][0]


def test_hub_ids_load_through_load_dataset(tmp_path, write_json, monkeypatch):
    records = _trl_records(_samples(4, n=3))
    folder = tmp_path / "repo"
    _write_parquet_shards(folder, records, shards=1)
    # `load_dataset` takes a local folder exactly as a downloaded Hub repo (no network here)
    write_json(tmp_path / "dataset_info.json", {"mine": {"hf_hub_url": str(folder), "split": "train"}})
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    res = read_samples(ReadArgs(dataset="mine", dataset_dir=str(tmp_path)))
    assert res.problems == [] and res.records == 3
    img = res.conversations[1].images[0]
    assert json.loads(img.path[len("embedded:"):])[:5] == ["hub", str(folder), None, "train", 1]
    assert embedded_bytes(img.path) == img.data
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gone = read_samples("nobody/nothing-here")
    assert [(p.kind, p.source) for p in gone.problems] == [("data_not_found", "nobody/nothing-here")]
    assert "HF_HUB_OFFLINE is set" in gone.problems[0].fix and gone.records == 1


# -- the_cauldron, LLaVA, OpenAI ----------------------------------------------------------------


def test_cauldron_layout_equals_the_processor(tmp_path, tiny_ckpt, loaded, capsys):
    samples = _samples(5)
    records = [{"images": [{"bytes": b, "path": None} for b in imgs],
                "texts": [{"user": q, "assistant": a, "source": "x"}, {"user": "And then?", "assistant": "Done."}]}
               for q, a, imgs in samples]
    schema = pa.schema([("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
                        ("texts", pa.list_(pa.struct([("user", pa.string()), ("assistant", pa.string()),
                                                       ("source", pa.string())])))])
    pq.write_table(pa.Table.from_pylist(records, schema=schema), tmp_path / "c.parquet")
    summary, rows = _inspect(tmp_path, tiny_ckpt("qwen2_vl"), tmp_path / "c.parquet", capsys)
    hf = [[{"role": "user", "content": _image_first(q, len(imgs))}, {"role": "assistant", "content": [{"type": "text", "text": a}]},
           {"role": "user", "content": [{"type": "text", "text": "And then?"}]}, {"role": "assistant", "content": [{"type": "text", "text": "Done."}]}]
          for q, a, imgs in samples]
    _check_against_processor(rows, loaded, hf, [s[2] for s in samples])


def test_llava_layout_equals_the_processor(tmp_path, tiny_ckpt, loaded, capsys):
    samples = _samples(6)
    (tmp_path / "coco").mkdir()
    records = []
    for i, (q, a, imgs) in enumerate(samples):
        names = []
        for k, b in enumerate(imgs):
            (tmp_path / "coco" / f"{i}_{k}.img").write_bytes(b)
            names.append(f"coco/{i}_{k}.img")
        rec = {"id": f"l{i}", "conversations": [{"from": "human", "value": "<image>\n" * len(imgs) + q},
                                               {"from": "gpt", "value": a}]}
        if names:
            rec["image"] = names[0] if len(names) == 1 else names
        if i == 3:
            rec["system"] = "Be brief."
        records.append(rec)
    (tmp_path / "llava.json").write_text(json.dumps(records))
    summary, rows = _inspect(tmp_path, tiny_ckpt("qwen2_vl"), tmp_path / "llava.json", capsys)
    hf = []
    for i, (q, a, imgs) in enumerate(samples):
        user = []
        for _ in imgs:
            user += [{"type": "image"}, {"type": "text", "text": "\n"}]
        user.append({"type": "text", "text": q})
        msgs = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}] if i == 3 else []
        hf.append(msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": a}]}])
    _check_against_processor(rows, loaded, hf, [s[2] for s in samples])
    assert read_samples(str(tmp_path / "llava.json")).notes == [
        "recognised LLaVA / ShareGPT4V (`image`, `conversations` from/value human/gpt): 10 record(s)"]


def test_openai_layout_with_data_uris_equals_the_processor(tmp_path, tiny_ckpt, loaded, capsys):
    samples = _samples(7)
    records = []
    for i, (q, a, imgs) in enumerate(samples):
        parts = [{"type": "text", "text": q}]
        for k, b in enumerate(imgs):
            kind = "png" if b.startswith(b"\x89PNG") else "jpeg"
            uri = f"data:image/{kind};base64," + base64.b64encode(b).decode()
            parts.append({"type": "image_url", "image_url": {"url": uri} if k % 2 else uri})
        records.append({"messages": [{"role": "system", "content": "You see images."}, {"role": "user", "content": parts},
                                     {"role": "assistant", "content": "Earlier.", "weight": 0},
                                     {"role": "user", "content": "Again?"}, {"role": "assistant", "content": a, "weight": 1}]})
    (tmp_path / "oa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary, rows = _inspect(tmp_path, tiny_ckpt("qwen2_vl"), tmp_path / "oa.jsonl", capsys)
    hf = [[{"role": "system", "content": [{"type": "text", "text": "You see images."}]},
           {"role": "user", "content": [{"type": "text", "text": q}, *({"type": "image"} for _ in imgs)]},
           {"role": "assistant", "content": [{"type": "text", "text": "Earlier."}]},
           {"role": "user", "content": [{"type": "text", "text": "Again?"}]},
           {"role": "assistant", "content": [{"type": "text", "text": a}]}] for q, a, imgs in samples]
    _check_against_processor(rows, loaded, hf, [s[2] for s in samples])


def test_openai_weight_0_turns_are_masked(tmp_path, loaded):
    from vlmtune.data.stages.encode import Encoder

    rec = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "weight": 0},
                        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}
    (tmp_path / "w.jsonl").write_text(json.dumps(rec) + "\n")
    (conv,) = read_samples(str(tmp_path / "w.jsonl")).conversations
    assert [m.weight for m in conv.messages] == [1, 0, 1, 1]
    enc = Encoder(loaded.processor, loaded.spec).encode(conv, {})
    assert [(b.role, b.trained) for b in enc.blocks if b.message_index is not None] == [
        ("user", False), ("assistant", False), ("user", False), ("assistant", True)]
    rec["messages"][3]["weight"] = 0
    (tmp_path / "w0.jsonl").write_text(json.dumps(rec) + "\n")
    from vlmtune.data.stages.validate import validate

    out = validate(read_samples(str(tmp_path / "w0.jsonl")).conversations, pixel_spec(1, 10**7, 14, 2))
    assert [p.kind for p in out.problems] == ["no_trained_turn"]
    rec["messages"][3]["weight"] = 0.5
    (tmp_path / "w5.jsonl").write_text(json.dumps(rec) + "\n")
    assert read_samples(str(tmp_path / "w5.jsonl")).problems == [Problem(
        source=f"{tmp_path}/w5.jsonl:1", what="the `weight` of message 4 is 0.5, expected 0 or 1",
        fix="set weight to 0 (not trained) or 1 (trained), as in OpenAI fine-tuning files", sample_id="w5:1",
        kind="bad_record")]


def test_a_mapping_applies_when_the_file_is_passed_directly(tmp_path, write_json, write_image):
    write_image(tmp_path / "a.png", 8, 8)
    rec = {"talk": [{"speaker": "me", "said": "<image>hi"}, {"speaker": "bot", "said": "yo"}], "pics": ["a.png"]}
    (tmp_path / "d.json").write_text(json.dumps([rec]))
    write_json(tmp_path / "dataset_info.json", {"d": {
        "file_name": "d.json", "formatting": "sharegpt", "columns": {"messages": "talk", "images": "pics"},
        "tags": {"role_tag": "speaker", "content_tag": "said", "user_tag": "me", "assistant_tag": "bot"}}})
    named = read_samples(ReadArgs(dataset="d", dataset_dir=str(tmp_path)))
    passed = read_samples(str(tmp_path / "d.json"))  # dataset_info.json next to the file
    assert named.problems == passed.problems == []
    assert [m.role for m in passed.conversations[0].messages] == ["user", "assistant"]
    assert passed.conversations[0].messages == named.conversations[0].messages


def test_inspect_exits_non_zero_and_counts_read_rejects_when_nothing_is_valid(tmp_path, tiny_ckpt, capsys):
    (tmp_path / "v.jsonl").write_text(json.dumps({"messages": [], "audio": "a.wav"}) + "\n" + "{not json\n")
    rc = cli.main(["inspect", "--model", str(tiny_ckpt("qwen2_vl")), "--data", str(tmp_path / "v.jsonl"), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert rc != 0
    assert summary["samples"] == 0 and summary["invalid_samples"] == 2 and summary["records"] == 2
    assert [p["kind"] for p in summary["problems"]] == ["unsupported_media", "invalid_json"]


@pytest.mark.slow
def test_two_shard_parquet_with_embedded_images_prepares_and_trains(tmp_path, tiny_ckpt):
    from vlmtune.config import load_config
    from vlmtune.data.drivers.prepare import prepare
    from vlmtune.train import recipe

    samples = [(q, a, [_png(40 + 8 * k, 56, (60 * k, 90, 200)) for k in range(len(imgs[:2]))])
               for q, a, imgs in _samples(8, n=6)]
    folder = tmp_path / "hub"
    _write_parquet_shards(folder, _trl_records(samples))
    cfg = load_config(None, base={
        "model_name_or_path": str(tiny_ckpt("qwen2_vl")), "dataset": str(folder), "output_dir": str(tmp_path / "out"),
        "cutoff_len": 300, "per_device_train_batch_size": 2, "max_steps": 2, "logging_steps": 1, "save_steps": 1000,
        "report_to": "none", "seed": 0})
    prep = prepare(cfg.for_data(), progress=False)
    assert prep.fates == {"kept": 6} and prep.rows == 6
    rows = prep.dataset()
    images = [p for r in rows for p in r["images"]]
    assert len(images) == sum(len(s[2]) for s in samples) and all(p.startswith("embedded:") for p in images)
    stored = b"".join(Path(prep.path, f).read_bytes() for f in os.listdir(prep.path))
    assert not any(b in stored for s in samples for b in s[2])  # a reference to the rows, not a copy of the bytes
    result = recipe.run(cfg, progress=False)
    assert [h["step"] for h in result.log_history if "loss" in h] == [1, 2]


def test_the_id_pass_reads_no_image_column(tmp_path):
    """The id plan reads every input once more: for tables, only the "id" column (image pages stay unread)."""
    from vlmtune.data.sources import formats

    rows = [{"id": f"s{i % 2}", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                            {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}],
             "images": [{"bytes": b"x" * 100, "path": None}]} for i in range(3)]
    with_id = tmp_path / "with_id.parquet"
    pq.write_table(pa.Table.from_pylist(rows), with_id)
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "id"} for r in rows]),
                   tmp_path / "no_id.parquet")
    assert [r.value for r in formats.iter_parquet(str(with_id), ids_only=True)] == [{"id": "s0"}, {"id": "s1"},
                                                                                   {"id": "s0"}]
    no_id = list(formats.iter_parquet(str(tmp_path / "no_id.parquet"), ids_only=True))
    assert [(r.value, r.fallback_id, r.origin[2]) for r in no_id] == [({}, "no_id:0", 0), ({}, "no_id:1", 1),
                                                                      ({}, "no_id:2", 2)]
    # s0 repeats, so those records take their fallback ids; s1 is unique and kept
    assert [c.id for c in read_samples(str(with_id)).conversations] == ["with_id:0", "s1", "with_id:2"]


# -- embedded bytes are read in place (issue 26) -------------------------------------------------------------
_BIN = st.one_of(st.none(), st.binary(max_size=6))
_IMAGE = st.one_of(st.none(), st.fixed_dictionaries({"bytes": _BIN, "path": st.one_of(st.none(), st.text(max_size=3))}))


def _plain(v):
    if isinstance(v, memoryview):
        return bytes(v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.fixed_dictionaries({"images": st.one_of(st.none(), st.lists(_IMAGE, max_size=3)),
                                            "image": _IMAGE, "raw": _BIN, "n": st.integers(0, 9)}),
                     min_size=1, max_size=8),
       cut=st.tuples(st.integers(0, 7), st.integers(0, 8)))
def test_rows_of_is_to_pylist_with_binary_cells_as_views(rows, cut):
    """rows_of gives to_pylist's rows (of any slice: batches are slices of the file's pages), every binary
    cell a memoryview of the batch's own buffer instead of a copy."""
    from vlmtune.data.sources.formats import rows_of

    table = pa.Table.from_pylist(rows).slice(*cut)
    got = rows_of(table)
    assert _plain(got) == table.to_pylist()
    views = [r["raw"] for r in got if r["raw"] is not None]
    assert all(isinstance(v, memoryview) and v.format == "B" and v == bytes(v) for v in views)


def test_embedded_parquet_images_are_views_of_the_mapped_file(tmp_path):
    from vlmtune.data.sources.formats import iter_parquet

    png = _png(40, 30)
    pq.write_table(pa.table({"images": [[{"bytes": png, "path": "a.png"}]], "text": ["hi"]}), tmp_path / "t.parquet")
    (row,) = list(iter_parquet(str(tmp_path / "t.parquet")))
    data = row.value["images"][0]["bytes"]
    assert isinstance(data, memoryview) and bytes(data) == png
