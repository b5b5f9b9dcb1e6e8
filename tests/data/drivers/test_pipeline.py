"""The data driver: streamed prepare equals the whole-list prepare it replaced; one pipeline for every command."""

from __future__ import annotations

import json

import pytest

from _golden import CONFIGS, GOLDEN, build_dataset, produce


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_reproduces_the_golden_rows_and_report(tmp_path, tiny_ckpt, make_image, name, workers):
    root = tmp_path.resolve()
    data = build_dataset(root, make_image)
    got = produce(root, data, tiny_ckpt("qwen2_vl"), name, f"preprocessing_num_workers={workers}")
    want = json.loads((GOLDEN / f"{name}.json").read_text())
    assert len(got["report"]) == len(want["report"]) == 55
    # file, index, piece (added after the golden was made): where each record is, as data, the same place as the
    # golden's source text (`path:line` of a JSON Lines file, `path#row` of a JSON array); nothing here is split
    where = ("file", "index", "piece")
    assert [{k: v for k, v in r.items() if k not in where} for r in got["report"]] == want["report"]
    assert [f"{r['file']}{':' if r['file'].endswith('.jsonl') else '#'}{r['index']}" for r in got["report"]] == \
        [r["source"] for r in want["report"]]
    assert {r["piece"] for r in got["report"]} == {0}
    # image-only data: the video columns (added after the golden was made) are empty in every row
    video_columns = {k for k in got["rows"][0] if k.startswith("video")}
    assert len(video_columns) == 9 and all(r[k] == [] for r in got["rows"] for k in video_columns)
    # SFT rows: the preference columns (added later too) are empty, the KTO tag is -1 (not KTO)
    pref = {"rejected_input_ids": [], "rejected_labels": [], "kto_tag": -1}
    assert all(r[k] == v for r in got["rows"] for k, v in pref.items())
    # sample_id (added after the golden was made): the input sample's id, shared by the pieces split cuts from it
    # (no own id in this data holds a '#', so it is the piece id up to its '#')
    assert [r["sample_id"] for r in got["rows"]] == [r["id"].split("#")[0] for r in want["rows"]]
    # the rows' origin columns: their report line's file and index, piece 0
    line = {r["id"]: r for r in got["report"]}
    assert [(r["file"], r["index"], r["piece"]) for r in got["rows"]] == [
        (line[r["sample_id"]]["file"], line[r["sample_id"]]["index"], 0) for r in got["rows"]]
    added = video_columns | set(pref) | {"sample_id", "file", "index", "piece"}
    assert [{k: v for k, v in r.items() if k not in added} for r in got["rows"]] == want["rows"]


def test_inspect_doctor_and_prepare_give_the_same_fates_and_token_counts(tmp_path, tiny_ckpt, make_image):
    from collections import Counter

    from _golden import config_args

    from vlmtune.config import load_config
    from vlmtune.data.drivers.tally import account
    from vlmtune.data.drivers.prepare import prepare, prepare_facts
    from vlmtune.models.load import load_spec

    root = tmp_path.resolve()
    data = build_dataset(root, make_image)
    ckpt = tiny_ckpt("qwen2_vl")
    loaded = load_spec(str(ckpt))
    inspected = account(str(data), loaded, progress=False)
    doctor_cfg = load_config(None, config_args(root, data, ckpt, "default", f"output_dir={root / 'doc'}"))
    doctor = prepare_facts(doctor_cfg.for_data(), loaded, progress=False)  # no cache yet: runs the driver
    prep = prepare(load_config(None, config_args(root, data, ckpt, "default")).for_data(), loaded, progress=False)
    report = [json.loads(line) for line in open(prep.report_path)]

    tokens = {r["id"]: r["tokens_before"] for r in report if r["fate"] != "invalid"}
    assert len(tokens) == 43
    assert {s.id: s.tokens for s in inspected.stats} == tokens
    assert {s.id: s.tokens for s in doctor.stats} == tokens
    fates = Counter(r["fate"] for r in report)
    assert fates == {"invalid": 12, "kept": 21, "shrunk": 22}
    # Rejected while reading: a.jsonl:5 (not JSON), a:18 (a list), b:15 (a string). They are invalid samples
    # for inspect and doctor too, but the doctor's fates count the conversations' fates only.
    unread = 3
    assert len(inspected.invalid_ids) == 12 and len(inspected.stats) == 43 and inspected.records == 55
    assert {f: n for f, n in doctor.fates.items() if n} == fates - Counter(invalid=unread)
    assert sorted(doctor.rows) == sorted(zip(prep.dataset()["length"], doctor_image_tokens(prep, loaded)))
    assert doctor.prepared is not None and doctor.prepared.fates == prep.fates
    assert [p.to_dict() for p in doctor.problems] == [p.to_dict() for p in inspected.problems]
    assert sorted(doctor.invalid_ids) == sorted(inspected.invalid_ids)
    # and the doctor run after prepare reads prepare's cache instead of fitting again
    again = prepare_facts(load_config(None, config_args(root, data, ckpt, "default")).for_data(), loaded, progress=False)
    assert again.prepared.cached is True
    assert (again.fates, again.rows, again.split_rows) == (doctor.fates, doctor.rows, doctor.split_rows)
    assert again.stats == doctor.stats
    assert [p.to_dict() for p in again.problems] == [p.to_dict() for p in doctor.problems]
    assert again.invalid_ids == doctor.invalid_ids


def doctor_image_tokens(prep, loaded):
    merge = loaded.spec.merge_size ** 2
    return [sum(t * h * w for t, h, w in grids) // merge for grids in prep.dataset()["image_grid_thw"]]
