"""The bad-input battery: every case is found before training, reported, and accounted for."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlmtune.config import load_config
from vlmtune.data.drivers.prepare import prepare
from vlmtune.errors import DataError

U, A = "user", "assistant"


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


@pytest.fixture
def battery(tmp_path, make_image):
    make_image(tmp_path / "ok.png", 120, 90)
    make_image(tmp_path / "tiny.png", 5, 5)
    make_image(tmp_path / "thin.png", 1, 2000)
    make_image(tmp_path / "wide.png", 402, 2)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not a picture")
    full = tmp_path / "full.jpg"
    Image.effect_noise((64, 64), 40).convert("RGB").save(full)
    (tmp_path / "trunc.jpg").write_bytes(full.read_bytes()[:300])
    bomb = Image.new("1", (30000, 30000))
    bomb.save(tmp_path / "bomb.png", optimize=True)
    q = [(U, "<image>What is it?"), (A, "a shape")]
    cases = {  # expected fate on the right; one JSON line each, in this order
        "good": ({"messages": msgs(*q), "images": ["ok.png"]}, "kept"),
        "small": ({"messages": msgs(*q), "images": ["tiny.png"]}, "kept"),
        "missing": ({"messages": msgs(*q), "images": ["nope.png"]}, "missing_file"),
        "zero_bytes": ({"messages": msgs(*q), "images": ["empty.png"]}, "not_an_image"),
        "truncated": ({"messages": msgs(*q), "images": ["trunc.jpg"]}, "corrupt_image"),
        "text_as_jpg": ({"messages": msgs(*q), "images": ["text.jpg"]}, "not_an_image"),
        "bomb": ({"messages": msgs(*q), "images": ["bomb.png"]}, "too_many_pixels"),
        "thin": ({"messages": msgs(*q), "images": ["thin.png"]}, "aspect_ratio"),
        "wide": ({"messages": msgs(*q), "images": ["wide.png"]}, "aspect_ratio"),
        "more_placeholders": ({"messages": msgs((U, "<image><image>Two?"), (A, "no")), "images": ["ok.png"]},
                              "placeholder_mismatch"),
        "more_images": ({"messages": msgs(*q), "images": ["ok.png", "ok.png"]}, "placeholder_mismatch"),
        "empty": ({"messages": []}, "empty_conversation"),
        "assistant_first": ({"messages": msgs((A, "hi"), (U, "hello"))}, "turn_order"),
        "same_roles": ({"messages": msgs((U, "a"), (U, "b"), (A, "c"))}, "turn_order"),
        "unknown_role": ({"messages": msgs((U, "a"), ("robot", "b"), (A, "c"))}, "unknown_role"),
    }
    lines = [json.dumps({"id": k, **rec}).encode() for k, (rec, _) in cases.items()]
    lines.append(b"{this is not json")
    lines.append(b'{"id": "latin1", "messages": "caf\xe9"}')
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    expected = {k: fate for k, (_, fate) in cases.items()}
    return tmp_path, expected


def _cfg(tmp_path, ckpt, *more):
    return load_config(None, [f"model_name_or_path={ckpt}", f"dataset={tmp_path / 'd.jsonl'}",
                              f"output_dir={tmp_path / 'out'}", "cutoff_len=1024", *more])


def test_skip_reports_every_case_and_accounts_for_every_line(tiny_ckpt, battery):
    tmp_path, expected = battery
    prep = prepare(_cfg(tmp_path, tiny_ckpt("qwen2_vl"), "on_bad_sample=skip", "confirm_skipped_share=true").for_data(),
                   progress=False)
    report = [json.loads(line) for line in open(prep.report_path)]
    assert len(report) == prep.records == len(expected) + 2
    by_id = {r["id"]: r for r in report}
    for sid, want in expected.items():
        if want == "kept":
            assert by_id[sid]["fate"] == "kept", by_id[sid]
        else:
            assert by_id[sid]["fate"] == "invalid", sid
            assert by_id[sid]["reason"], sid
    src = str(tmp_path / "d.jsonl")
    unread = sorted(r["source"] for r in report if r["id"] not in expected)
    assert unread == [f"{src}:{len(expected) + 1}", f"{src}:{len(expected) + 2}"]
    assert prep.rows == 2


def test_default_stops_before_training_naming_every_bad_sample(tiny_ckpt, battery):
    tmp_path, expected = battery
    with pytest.raises(DataError) as err:
        prepare(_cfg(tmp_path, tiny_ckpt("qwen2_vl")).for_data(), progress=False)
    kinds = {(p.sample_id, p.kind) for p in err.value.problems}
    for sid, want in expected.items():
        if want != "kept":
            assert (sid, want) in kinds, sid
    assert {p.kind for p in err.value.problems if p.sample_id is None} == {"invalid_json", "invalid_utf8"}
    assert "set on_bad_sample: skip" in str(err.value)
