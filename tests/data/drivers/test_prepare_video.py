"""Samples with videos through `prepare` (the real pipeline: read → validate → encode → fit → emit) for each
family: every emitted row is ≤ cutoff_len, its video runs whole and equal to their grids, the collator's
pixels match the recorded grids, and the tiny model runs forward + backward on every fitted row; plainly
truncating the same samples to cutoff_len (what other trainers do) makes transformers raise its mismatch.
"""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch
from transformers import AutoModelForImageTextToText

from clips import write_clip
from vlmtune.config import load_config
from vlmtune.data.stages.collate import Collator, check_row
from vlmtune.data.stages.encode import emit
from vlmtune.config import ReadArgs
from vlmtune.data.drivers.pipeline import Stages, run_pipeline
from vlmtune.data.drivers.prepare import prepare
from vlmtune.models.families import FAMILIES
from vlmtune.models.load import load_spec

CUTOFF = 150


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vdata")
    write_clip(root / "long.mp4", 60, 224, 160, rate=Fraction(15))  # 4 s: 8 frames sampled, hundreds of tokens
    write_clip(root / "short.mp4", 8, 64, 48, rate=Fraction(4))
    from PIL import Image

    Image.new("RGB", (90, 60), (10, 200, 30)).save(root / "im.png")
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    bot = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    records = [
        {"messages": [user("<video>Which way does it move?"), bot("left")], "videos": ["long.mp4"]},
        {"messages": [user("<image>and<video>the same colour?"), bot("no")], "videos": ["long.mp4"],
         "images": ["im.png"]},
        {"messages": [user("<video>first?"), bot("up"), user("<video>second?"), bot("down")],
         "videos": ["long.mp4", "short.mp4"]},
        {"messages": [user("<video>what is it?"), bot("a square")], "videos": ["short.mp4"]},
        {"messages": [user("no video here"), bot("fine")]},
    ]
    (root / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return root


def config(root, tiny_ckpt, arch, *more):
    return load_config(None, [f"model_name_or_path={tiny_ckpt(arch)}", f"dataset={root / 'd.jsonl'}",
                              f"output_dir={root / arch}", f"cutoff_len={CUTOFF}", *more])


@pytest.mark.parametrize("arch", list(FAMILIES))  # every family of the table
def test_fitted_video_rows_train_and_plain_truncation_crashes(data, tiny_ckpt, arch):
    cfg = config(data, tiny_ckpt, arch)
    loaded = load_spec(cfg.model, cfg.fit)
    prep = prepare(cfg.for_data(), loaded=loaded, progress=False)
    report = [json.loads(line) for line in open(prep.report_path)]
    assert [r["fate"] for r in report][:2] == ["shrunk", "shrunk"] and report[4]["fate"] == "kept"
    assert len(report) == 5
    assert "shrank video 1:" in report[0]["reason"]
    rows = prep.dataset().to_list()
    assert sum(len(r["videos"]) for r in rows) >= 4
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_ckpt(arch)), dtype=torch.float32)
    collate = Collator(loaded.processor, loaded.spec, cutoff_len=CUTOFF, video=loaded.video)
    for row in rows:
        assert len(row["input_ids"]) <= CUTOFF and check_row(row, loaded.spec, CUTOFF) == []
        batch = collate([row])  # the collator re-checks each video's grid against the decoded frames
        if row["videos"]:
            assert batch["video_grid_thw"].tolist() == row["video_grid_thw"]
        loss = model(**batch).loss
        loss.backward()
        assert torch.isfinite(loss)
    # the same long sample, expanded unfitted and cut at cutoff_len as other trainers do
    stream = run_pipeline(ReadArgs(dataset=str(data / "d.jsonl"), dataset_dir=None), loaded,
                          Stages(keep_ids=frozenset({"d:1"})), progress=False)
    (enc,) = [e for res in stream.chunks for e in res.encoded]
    assert enc.length > CUTOFF
    full = emit(enc, loaded.spec).to_dict()
    cut = {**full, "input_ids": full["input_ids"][:CUTOFF], "labels": full["labels"][:CUTOFF]}
    batch = collate._pad([cut])
    pixels = Collator(loaded.processor, loaded.spec, video=loaded.video)([full])  # the clip's own pixels
    for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        if key in pixels:
            batch[key] = pixels[key]
    with pytest.raises((ValueError, RuntimeError), match="Video features and video tokens do not match"):
        model(**batch)


@pytest.mark.parametrize("arch", ["qwen2_vl"])
def test_video_keys_change_the_plan_and_the_cache(data, tiny_ckpt, arch):
    small = prepare(config(data, tiny_ckpt, arch, "video_max_pixels=3136", "video_maxlen=4", "cutoff_len=4096").for_data(),
                    progress=False)
    rows = small.dataset().to_list()
    grids = [g for r in rows for g in r["video_grid_thw"]]
    assert all(len(f) <= 4 for r in rows for f in r["video_frames"])
    assert all(g[1] * g[2] * 14 * 14 <= 3136 for g in grids)
    assert all(r["video_max_pixels"] == [3136] * len(r["videos"]) for r in rows)


def test_two_workers_prepare_the_same_video_rows(data, tiny_ckpt):
    one = prepare(config(data, tiny_ckpt, "qwen3_vl", "preprocessing_num_workers=1").for_data(), progress=False)
    rows = one.dataset().to_list()
    two = prepare(config(data, tiny_ckpt, "qwen3_vl", "preprocessing_num_workers=2", f"output_dir={data / 'w2'}").for_data(),
                  progress=False)
    assert two.dataset().to_list() == rows and sum(len(r["videos"]) for r in rows) >= 4
    assert open(two.report_path).read() == open(one.report_path).read()
