"""The collator and its guard, against the real models of the three families."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlmtune.data.stages.collate import Collator, check_row
from vlmtune.data.stages.encode import Encoder, emit
from vlmtune.data.stages.fit import FitOptions, Fitter
from vlmtune.data.media.images import read_header
from vlmtune.data.types import Conversation, ImagePart, Message, TextPart
from vlmtune.errors import SampleError
from vlmtune.models.families import FAMILIES
from vlmtune.models.load import load_spec

ARCHS = list(FAMILIES)  # every family of the table: fitted rows run whole, and plain truncation crashes each


def _dataset(tmp_path, make_image):
    """Multi-image samples with images at the start, the middle and the end of the sequence."""
    paths = [
        make_image(tmp_path / f"im{k}.png", w, h, color=(40 * k, 255 - 30 * k, 90))
        for k, (w, h) in enumerate([(300, 200), (120, 480), (640, 360), (64, 64), (250, 250)])
    ]
    img = [ImagePart(str(p), str(p)) for p in paths]
    T = lambda s: TextPart(s)  # noqa: E731
    convs = [
        Conversation("start", "d.jsonl:1", [Message("user", [img[0], img[1], T("Which one is larger?")]),
                                            Message("assistant", [T("The first one is larger.")])]),
        Conversation("middle", "d.jsonl:2", [Message("user", [T("Look at this: "), img[2], T(" and this "), img[3],
                                                              T(" then tell me the colours.")]),
                                             Message("assistant", [T("Red and blue.")])]),
        Conversation("end", "d.jsonl:3", [Message("user", [T("What is in the picture?"), img[4], img[2]]),
                                          Message("assistant", [T("A circle and a square.")])]),
        Conversation("turns", "d.jsonl:4", [Message("user", [img[2], T("first?")]), Message("assistant", [T("one")]),
                                            Message("user", [img[0], T("second?")]), Message("assistant", [T("two")]),
                                            Message("user", [T("third?"), img[1]]), Message("assistant", [T("three")])]),
        Conversation("text", "d.jsonl:5", [Message("user", [T("No picture here.")]),
                                           Message("assistant", [T("Fine.")])]),
    ]
    headers = {str(p): read_header(str(p)) for p in paths}
    return convs, headers


@pytest.fixture(scope="module", params=ARCHS)
def family(request, tiny_ckpt):
    path = str(tiny_ckpt(request.param))
    loaded = load_spec(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    return loaded, model


def _rows(loaded, convs, headers, cutoff, overflow=("shrink_images", "truncate_text", "split", "drop")):
    enc = Encoder(loaded.processor, loaded.spec)
    encoded = enc.encode_many(convs, headers)
    fitter = Fitter(loaded.spec, FitOptions(cutoff_len=cutoff, overflow=overflow))
    outcomes = [fitter.fit(e) for e in encoded]
    return encoded, outcomes, [emit(p, loaded.spec).to_dict() for o in outcomes for p in o.pieces]


def test_every_prepared_row_runs_forward_and_backward(family, tmp_path, make_image):
    loaded, model = family
    convs, headers = _dataset(tmp_path, make_image)
    encoded, outcomes, rows = _rows(loaded, convs, headers, cutoff=160)
    _, outcomes2, rows2 = _rows(loaded, convs, headers, cutoff=160, overflow=("split", "truncate_text", "shrink_images"))
    assert max(e.length for e in encoded) > 160  # plain truncation would cut runs here
    assert "shrunk" in [o.fate for o in outcomes]
    assert [o.fate for o in outcomes2][3:] == ["split", "kept"]
    rows += rows2
    collate = Collator(loaded.processor, loaded.spec, cutoff_len=160)
    for row in rows:
        batch = collate([row])
        out = model(**batch)
        out.loss.backward()
        assert torch.isfinite(out.loss)
    # and in batches of mixed image counts
    batch = collate(rows[:4])
    model(**batch).loss.backward()


def truncate_plainly(row: dict, cutoff: int) -> dict:
    """What every popular trainer does: expand, then cut at cutoff_len (test helper only)."""
    return {**row, "input_ids": row["input_ids"][:cutoff], "labels": row["labels"][:cutoff]}


def test_plain_truncation_crashes_the_model(family, tmp_path, make_image):
    loaded, model = family
    convs, headers = _dataset(tmp_path, make_image)
    _, _, rows = _rows(loaded, convs[:1], headers, cutoff=100_000)
    row = rows[0]
    cut = truncate_plainly(row, len(row["input_ids"]) - 40)  # lands inside the second run
    collate = Collator(loaded.processor, loaded.spec, cutoff_len=None)
    batch = collate._pad([cut])
    pixels = collate([row])
    batch["pixel_values"], batch["image_grid_thw"] = pixels["pixel_values"], pixels["image_grid_thw"]
    with pytest.raises((ValueError, RuntimeError), match="(?i)image features and image tokens do not match|shape mismatch"):
        model(**batch)
    # the guard catches the same row before the model, naming it
    with pytest.raises(SampleError, match=re.escape("sample start (d.jsonl:1)")):
        collate([cut])


def test_guard_names_corrupted_sample(tiny_ckpt, tmp_path, make_image):
    loaded = load_spec(str(tiny_ckpt("qwen2_vl")))
    convs, headers = _dataset(tmp_path, make_image)
    _, _, rows = _rows(loaded, convs[:1], headers, cutoff=100_000)
    row = dict(rows[0])
    pad = loaded.spec.image_token_id
    k = row["input_ids"].index(pad)
    row["input_ids"] = row["input_ids"][:k] + row["input_ids"][k + 1 :]
    row["labels"] = row["labels"][:k] + row["labels"][k + 1 :]
    g = row["image_grid_thw"][0]
    want = g[0] * g[1] * g[2] // 4
    assert check_row(row, loaded.spec, None) == [f"image 0 has a run of {want - 1} pad tokens but its grid {g} needs {want}"]
    with pytest.raises(SampleError) as err:
        Collator(loaded.processor, loaded.spec)([row])
    assert str(err.value).startswith(
        f"sample start (d.jsonl:1): image 0 has a run of {want - 1} pad tokens but its grid {g} needs {want}; "
    )


def test_guard_checks_length_and_counts(tiny_ckpt, tmp_path, make_image):
    loaded = load_spec(str(tiny_ckpt("qwen2_vl")))
    convs, headers = _dataset(tmp_path, make_image)
    _, _, rows = _rows(loaded, convs[:1], headers, cutoff=100_000)
    row = rows[0]
    n = len(row["input_ids"])
    assert check_row(row, loaded.spec, n - 1) == [f"{n} tokens exceed cutoff_len={n - 1}"]
    fewer = {**row, "images": row["images"][:1]}
    assert check_row(fewer, loaded.spec, None) == ["2 image runs, 1 images and 2 grids (must be equal)"]


def test_missing_image_at_training_time_names_sample(tiny_ckpt, tmp_path, make_image):
    loaded = load_spec(str(tiny_ckpt("qwen2_vl")))
    convs, headers = _dataset(tmp_path, make_image)
    _, _, rows = _rows(loaded, convs[:1], headers, cutoff=100_000)
    (tmp_path / "im1.png").unlink()
    with pytest.raises(SampleError, match=r"^sample start \(d.jsonl:1\): image 1 \(.*im1.png\) could not be read"):
        Collator(loaded.processor, loaded.spec)(rows)


def test_changed_image_is_detected(tiny_ckpt, tmp_path, make_image):
    loaded = load_spec(str(tiny_ckpt("qwen2_vl")))
    convs, headers = _dataset(tmp_path, make_image)
    _, _, rows = _rows(loaded, convs[:1], headers, cutoff=100_000)
    make_image(tmp_path / "im0.png", 600, 600)
    assert loaded.spec.grid(600, 600).thw == [1, 30, 30]
    with pytest.raises(SampleError, match=r"now gives grid \[1, 30, 30\] but was prepared as \[1, 14, 22\]"):
        Collator(loaded.processor, loaded.spec)(rows)


def test_batch_fields(tiny_ckpt, tmp_path, make_image):
    loaded = load_spec(str(tiny_ckpt("qwen2_vl")))
    convs, headers = _dataset(tmp_path, make_image)
    _, _, rows = _rows(loaded, [convs[0], convs[4]], headers, cutoff=100_000)
    batch = Collator(loaded.processor, loaded.spec)(rows)
    assert batch["input_ids"].shape == (2, max(len(r["input_ids"]) for r in rows))
    assert batch["image_grid_thw"].tolist() == rows[0]["image_grid_thw"]
    assert int(batch["mm_token_type_ids"].sum()) == sum(g[0] * g[1] * g[2] // 4 for g in rows[0]["image_grid_thw"])
    assert batch["attention_mask"].sum(1).tolist() == [len(r["input_ids"]) for r in rows]
    assert batch["pixel_values"].shape[0] == sum(g[0] * g[1] * g[2] for g in rows[0]["image_grid_thw"])


def test_embedded_bytes_give_the_same_pixel_values_as_files_on_disk(tiny_ckpt, tmp_path):
    """The rows the collator builds from embedded bytes (a reference to the Parquet rows) equal those from files."""
    import io
    import json as _json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image as PILImage

    from vlmtune.data.sources.readers import read_samples
    from vlmtune.data.stages.validate import validate

    loaded = load_spec(str(tiny_ckpt("qwen2_vl")))
    spec = loaded.spec
    blobs = []
    for i, (w, h, mode) in enumerate([(60, 40, "RGB"), (33, 90, "RGBA"), (80, 80, "P"), (50, 70, "I;16")]):
        im = PILImage.new("RGB", (w, h), (30 * i, 200, 90))
        if mode == "RGBA":
            im = im.convert("RGBA")
            im.putalpha(PILImage.linear_gradient("L").resize((w, h)))
        elif mode == "P":
            im = im.convert("P")
            im.info["transparency"] = 0
        elif mode == "I;16":
            im = PILImage.fromarray(np.arange(w * h, dtype=np.uint16).reshape(h, w) * 17)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        blobs.append(buf.getvalue())
    media = tmp_path / "media"
    media.mkdir()
    on_disk, embedded = [], []
    for i, b in enumerate(blobs):
        (media / f"{i}.png").write_bytes(b)
        turns = [{"role": "user", "content": "<image>" * 2 + "what?"}, {"role": "assistant", "content": "x"}]
        on_disk.append({"messages": turns, "images": [f"media/{i}.png", f"media/{(i + 1) % 4}.png"]})
        embedded.append({"messages": turns, "images": [{"bytes": blobs[i], "path": None},
                                                       {"bytes": blobs[(i + 1) % 4], "path": None}]})
    (tmp_path / "d.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in on_disk))
    pq.write_table(pa.Table.from_pylist(embedded), tmp_path / "e.parquet", row_group_size=2)

    def batch(data):
        read = read_samples(str(data))
        checked = validate(read.conversations, spec)
        assert read.problems == [] and checked.problems == []
        rows = [emit(e, spec).to_dict() for e in Encoder(loaded.processor, spec).encode_many(checked.valid, checked.headers)]
        return rows, Collator(loaded.processor, spec)(rows)

    rows_d, files = batch(tmp_path / "d.jsonl")
    rows_e, inline = batch(tmp_path / "e.parquet")
    assert all(p.startswith("embedded:") for r in rows_e for p in r["images"])
    assert [r["image_grid_thw"] for r in rows_e] == [r["image_grid_thw"] for r in rows_d]
    assert torch.equal(files["pixel_values"], inline["pixel_values"])
    assert torch.equal(files["image_grid_thw"], inline["image_grid_thw"])
    assert torch.equal(files["input_ids"], inline["input_ids"])


def test_guard_names_the_piece_of_a_split_sample(tiny_ckpt, tmp_path, make_image):
    from vlmtune.data.stages.fit import exchanges_of

    loaded = load_spec(str(tiny_ckpt("qwen2_vl")))
    convs, headers = _dataset(tmp_path, make_image)
    (e,) = Encoder(loaded.processor, loaded.spec).encode_many(convs[3:4], headers)
    system, exchanges = exchanges_of(e)
    cut = sum(b.length for b in system) + max(sum(b.length for b in ex) for ex in exchanges)
    _, (out,), rows = _rows(loaded, convs[3:4], headers, cutoff=cut, overflow=("split",))
    # the id names the exchanges a piece holds; `piece` numbers the pieces
    assert out.fate == "split" and [(r["id"], r["piece"]) for r in rows] == [("turns#1", 1), ("turns#2-3", 2)]
    row = dict(rows[1])
    k = row["input_ids"].index(loaded.spec.image_token_id)
    row["input_ids"], row["labels"] = row["input_ids"][:k] + row["input_ids"][k + 1:], row["labels"][:k] + row["labels"][k + 1:]
    with pytest.raises(SampleError, match=r"^sample turns#2-3 \(d.jsonl:4, piece 2\): image 0 has a run of"):
        Collator(loaded.processor, loaded.spec)([row])
