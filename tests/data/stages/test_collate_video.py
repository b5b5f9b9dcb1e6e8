"""Videos through the collator, the guard and packing, against the real processors and tiny models of the
three families (transformers 5.24).

Rows are built by hand as the video contract lays them out (docs/video.md, the integrator's emit): a clip is
written with PyAV, read with `read_facts`, planned with `plan_video`, and its `<|video_pad|>` expanded with
`VideoGrid.replacement`. Each family shows:

* the row's input_ids == the real processor's for the same text and frames, and the batch's video_grid_thw,
  second_per_grid_ts, mm_token_type_ids and pixel_values_videos == the processor's;
* forward + backward of the tiny model on videos, alone, mixed with an image, and batched, give a finite loss;
* a row whose video run is cut by plain truncation: the guard names the sample, and the same row without the
  guard makes transformers raise its own `Video features and video tokens do not match`;
* packed == unpacked loss and gradients with videos, each segment positioned exactly as `get_rope_index`,
  also on synthetic samples (hypothesis: any order of images and videos, 1-3 segments, Qwen2.5-VL intervals
  whose float32 truncation differs from float64's).
"""

from __future__ import annotations

import re
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForImageTextToText
from transformers.video_utils import VideoMetadata

import clips
from _packing import assert_same_loss_and_grads
from vlmtune.data.stages.collate import Collator, check_row, scan_runs
from vlmtune.data.stages.encode import IGNORE_INDEX
from vlmtune.data.stages.pack import pack_dataset, pack_rows, packed_position_ids
from vlmtune.data.media.video import decode_frames, read_facts
from vlmtune.errors import SampleError
from vlmtune.models.hybrid import keep_packed_samples_apart
from vlmtune.models.load import load_spec
from vlmtune.models.video_grid import VideoSpec, plan_video

av = pytest.importorskip("av")

ARCHS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"]  # Qwen3.5: Qwen3-VL's video processor, hybrid layers
VS, VE, IPAD, VPAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"


def write_clip(path, n: int, width: int, height: int, rate) -> str:
    """n frames of a moving diagonal gradient (mpeg4 in MP4)."""
    return clips.write_clip(path, n, width, height, rate=rate, moving=True)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("video-media")
    # A: 12 frames at 4 fps (3 s) -> 6 frames sampled at 2 fps, t=3; B: 10 frames at 3 fps -> 6 frames at a
    # sampled 1.8 fps, so Qwen2.5-VL's second_per_grid is 1.111... and its M-RoPE time axis truncates (0, 2, 4)
    a = write_clip(d / "a.mp4", 12, 64, 48, Fraction(4))
    b = write_clip(d / "b.mp4", 10, 40, 56, Fraction(3))
    im = d / "im.png"
    Image.new("RGB", (60, 90), (200, 40, 90)).save(im)
    return {"a": a, "b": b, "im": str(im)}


@pytest.fixture(scope="module", params=ARCHS)
def family(request, tiny_ckpt):
    path = str(tiny_ckpt(request.param))
    loaded = load_spec(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    model.eval()
    keep_packed_samples_apart(model)  # Qwen3.5: packed samples keep their linear-attention state apart
    vspec = VideoSpec.from_processor(loaded.processor, loaded.config)
    return loaded, vspec, model


def build(loaded, vspec, sid: str, parts: list, answer: str):
    """(row, processor call kwargs) for one user turn of `parts` (("text", s) / ("image", path) /
    ("video", path)) and an assistant answer, laid out per the video contract."""
    from PIL import Image

    spec, tok = loaded.spec, loaded.processor.tokenizer
    compact = expanded = "<|im_start|>user\n"
    row = {"id": sid, "source": f"v.jsonl:{sid}", "images": [], "image_grid_thw": [], "image_min_pixels": [],
           "image_max_pixels": []}
    images, videos, metadata = [], [], []
    for kind, x in parts:
        if kind == "text":
            compact += x
            expanded += x
        elif kind == "image":
            im = Image.open(x).convert("RGB")
            g = spec.grid(im.height, im.width)
            images.append(im)
            row["images"].append(x)
            row["image_grid_thw"].append(g.thw)
            row["image_min_pixels"].append(spec.min_pixels)
            row["image_max_pixels"].append(spec.max_pixels)
            compact += VS + IPAD + VE
            expanded += VS + IPAD * g.tokens + VE
        else:
            facts = read_facts(x)
            grid = plan_video(facts.frames, facts.fps, facts.height, facts.width, vspec)
            videos.append(decode_frames(x, grid.indices, facts.rotation))
            metadata.append(VideoMetadata(total_num_frames=facts.frames, fps=facts.fps,
                                          frames_indices=list(grid.indices)))
            for col, val in [("videos", x), ("video_grid_thw", grid.thw), ("video_frames", list(grid.indices)),
                             ("video_total_frames", facts.frames), ("video_fps", facts.fps),
                             ("video_rotation", facts.rotation), ("video_min_pixels", vspec.min_pixels),
                             ("video_max_pixels", vspec.max_pixels),
                             ("video_second_per_grid", grid.second_per_grid or 0.0)]:
                row.setdefault(col, []).append(val)
            compact += VS + VPAD + VE
            expanded += VS + grid.replacement(VPAD, VS, VE) + VE
    tail = "<|im_end|>\n<|im_start|>assistant\n"
    prompt = tok(expanded + tail, add_special_tokens=False)["input_ids"]
    ids = tok(expanded + tail + answer + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt)] == prompt
    row["input_ids"] = ids
    row["labels"] = [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]
    call = {"text": [compact + tail + answer + "<|im_end|>\n"], "return_tensors": "pt"}
    if images:
        call["images"] = images
    if videos:
        call.update(videos=videos, video_metadata=metadata, do_sample_frames=False, input_data_format="channels_last")
    return row, call


def samples(loaded, vspec, media):
    """vid: one clip; mix: an image and a clip; two: two clips; txt: no media (and no video columns)."""
    T = lambda s: ("text", s)  # noqa: E731
    specs = [
        ("vid", [T("What moves here? "), ("video", media["a"]), T(" Say it.")], "the stripes, to the left"),
        ("mix", [("image", media["im"]), T("Is this picture "), ("video", media["b"]), T(" in the clip?")], "no"),
        ("txt", [T("Just text.")], "fine"),
        ("two", [("video", media["b"]), T("then"), ("video", media["a"])], "b then a"),
    ]
    return {sid: build(loaded, vspec, sid, parts, answer) for sid, parts, answer in specs}


def test_rows_and_batch_equal_the_processor(family, media):
    loaded, vspec, _ = family
    collate = Collator(loaded.processor, loaded.spec, video=vspec)
    for sid, (row, call) in samples(loaded, vspec, media).items():
        out = loaded.processor(**call)
        assert row["input_ids"] == out["input_ids"][0].tolist(), sid
        assert check_row(row, loaded.spec, None) == [], sid
        batch = collate([row])
        assert torch.equal(batch["mm_token_type_ids"], out["mm_token_type_ids"].to(torch.int32)), sid
        assert set(out["mm_token_type_ids"][0].tolist()) <= {0, 1, 2}
        if "videos" not in row:
            assert "pixel_values_videos" not in batch and "video_grid_thw" not in batch
            continue
        assert batch["video_grid_thw"].dtype == torch.long
        assert torch.equal(batch["video_grid_thw"], out["video_grid_thw"]), sid
        assert torch.equal(batch["pixel_values_videos"], out["pixel_values_videos"]), sid
        if "images" in call:
            assert torch.equal(batch["pixel_values"], out["pixel_values"]), sid
        if loaded.spec.model_type == "qwen2_5_vl":
            assert batch["second_per_grid_ts"].dtype == out["second_per_grid_ts"].dtype == torch.float32
            assert torch.equal(batch["second_per_grid_ts"], out["second_per_grid_ts"]), sid
        else:
            assert "second_per_grid_ts" not in batch and "second_per_grid_ts" not in out
        # the processor's keys are the model's inputs: the collator gives every one of them
        assert set(out.keys()) - {"attention_mask"} <= set(batch.keys())


def test_forward_and_backward_with_videos(family, media):
    loaded, vspec, model = family
    rows = {sid: row for sid, (row, _) in samples(loaded, vspec, media).items()}
    collate = Collator(loaded.processor, loaded.spec, video=vspec)
    for sid in ("vid", "mix", "two"):
        model.zero_grad(set_to_none=True)
        out = model(**collate([rows[sid]]))
        out.loss.backward()
        assert torch.isfinite(out.loss), sid
        assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0, sid  # the video reached the loss
    batch = collate([rows["vid"], rows["txt"], rows["mix"], rows["two"]])
    assert batch["video_grid_thw"].shape == (4, 3)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_a_cut_video_run_crashes_the_model_and_the_guard_names_the_sample(family, media):
    loaded, vspec, model = family
    row, _ = samples(loaded, vspec, media)["vid"]
    vpad = loaded.spec.video_token_id
    first = row["input_ids"].index(vpad)
    cut = {**row, "input_ids": row["input_ids"][: first + 3], "labels": row["labels"][: first + 3]}  # plain truncation
    collate = Collator(loaded.processor, loaded.spec, video=vspec)
    # without the guard: the cut row's ids with the clip's pixels, as a trainer that truncates would feed them
    batch = collate._pad([cut])
    full = collate([row])
    batch["pixel_values_videos"], batch["video_grid_thw"] = full["pixel_values_videos"], full["video_grid_thw"]
    if "second_per_grid_ts" in full:
        batch["second_per_grid_ts"] = full["second_per_grid_ts"]
    with pytest.raises((ValueError, RuntimeError), match="Video features and video tokens do not match, tokens: 3"):
        model(**batch)
    # with it: the sample is named before the model runs
    problems = check_row(cut, loaded.spec, None)
    assert problems[0] == f"video run at position {first - 1} has 3 pad tokens and no <|vision_end|>"
    with pytest.raises(SampleError, match=re.escape("sample vid (v.jsonl:vid): video run at position")):
        collate([cut])


def test_packed_videos_equal_unpacked(family, media):
    loaded, vspec, model = family
    made = samples(loaded, vspec, media)
    rows = [made[k][0] for k in ("vid", "txt", "mix", "two")]
    cutoff = sum(len(r["input_ids"]) for r in rows)
    packed = pack_rows(rows, cutoff)
    assert len(packed) == 1 and packed[0]["segments"] == [len(r["input_ids"]) for r in rows]
    assert packed[0]["video_grid_thw"] == [g for r in rows for g in r.get("video_grid_thw", [])]
    collate = Collator(loaded.processor, loaded.spec, cutoff_len=cutoff, video=vspec)
    pb, ub = collate(packed), collate(rows)
    assert "attention_mask" not in pb and pb["position_ids"].shape == (4, 1, cutoff)
    assert torch.equal(pb["video_grid_thw"], ub["video_grid_thw"])
    assert torch.equal(pb["pixel_values_videos"], ub["pixel_values_videos"])

    # each segment's positions == the model's own get_rope_index on that sample alone
    start = 0
    for r in rows:
        n = len(r["input_ids"])
        alone = collate([r])
        if "video_grid_thw" in alone or "image_grid_thw" in alone:
            kw = {k: alone[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in alone}
            want, _ = model.model.get_rope_index(alone["input_ids"], alone["mm_token_type_ids"], **kw)
            want = want[:, 0].numpy()
        else:
            want = np.tile(np.arange(n), (3, 1))
        assert np.array_equal(pb["position_ids"][1:, 0, start : start + n].numpy(), want), r["id"]
        assert pb["position_ids"][0, 0, start : start + n].tolist() == list(range(n))
        start += n

    assert_same_loss_and_grads(model, pb, ub)


# ---------------------------------------------------------------------------------------------
# Exact M-RoPE details, the guard's messages, failures at training time (one family where one suffices)


def test_mrope_video_details_per_family(family, media):
    """What get_rope_index does with a video, spelled out: Qwen2-VL's time axis is the temporal patch index,
    Qwen2.5-VL's is (index · tokens_per_second · second_per_grid) truncated, Qwen3-VL's is 0 for every patch
    (each patch is its own t=1 run); the text after a video continues at start + max(h, w)/merge."""
    loaded, vspec, model = family
    row, _ = samples(loaded, vspec, media)["mix"]  # image, then clip B
    batch = Collator(loaded.processor, loaded.spec, video=vspec)([row])
    kw = {k: batch[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in batch}
    want, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], **kw)
    got = packed_position_ids({**row, "segments": [len(row["input_ids"])]}, loaded.spec, len(row["input_ids"]),
                              tokens_per_second=vspec.tokens_per_second)
    assert np.array_equal(got[1:], want[:, 0].numpy())
    t, h, w = row["video_grid_thw"][0]
    ids = np.asarray(row["input_ids"])
    at = np.flatnonzero(ids == loaded.spec.video_token_id)
    times = sorted(set(got[1, at].tolist()))
    start = int(got[1, at[0]])
    if loaded.spec.model_type == "qwen2_vl":
        assert [x - start for x in times] == list(range(t))
    elif loaded.spec.model_type == "qwen2_5_vl":
        assert row["video_second_per_grid"] == [pytest.approx(2 / 1.8)] and vspec.tokens_per_second == 2.0
        assert [x - start for x in times] == [0, 2, 4]  # 0, 2.22, 4.44 truncated
    else:
        assert len(times) == t  # t runs, each at its own start (timestamps are text between them)
        runs = [(i, n) for i, n in scan_runs(row["input_ids"], loaded.spec)[1]]
        assert len(runs) == t and all(n == h * w // 4 for _, n in runs)
        assert all(np.all(got[1, i : i + n] == got[1, i]) for i, n in runs)
    last = at[-1] + 1 if not loaded.spec.video_timestamps else None
    if last is not None:  # the token after the run (<|vision_end|>) continues at start + max(h, w)/merge
        assert got[1:, last].tolist() == [start + max(h, w) // 2] * 3


def test_guard_names_the_video(tiny_ckpt, media):
    for arch in ("qwen2_vl", "qwen3_vl"):
        loaded = load_spec(str(tiny_ckpt(arch)))
        vspec = VideoSpec.from_processor(loaded.processor, loaded.config)
        row, _ = samples(loaded, vspec, media)["two"]
        vpad = loaded.spec.video_token_id
        ids = row["input_ids"]
        k = len(ids) - 1 - ids[::-1].index(vpad)  # the last pad of the last video
        bad = {**row, "input_ids": ids[:k] + ids[k + 1 :], "labels": row["labels"][:k] + row["labels"][k + 1 :]}
        g = row["video_grid_thw"][1]
        if arch == "qwen2_vl":
            want = g[0] * g[1] * g[2] // 4
            assert check_row(bad, loaded.spec, None) == [
                f"video 1 has a run of {want - 1} pad tokens but its grid {g} needs {want}"]
        else:
            want = g[1] * g[2] // 4
            assert check_row(bad, loaded.spec, None) == [
                f"video 1 temporal patch {g[0] - 1} has a run of {want - 1} pad tokens but its grid {g} "
                f"needs {want} per patch"]
        with pytest.raises(SampleError, match=re.escape("sample two (v.jsonl:two): video 1 ")):
            Collator(loaded.processor, loaded.spec)([bad])
        # counts: a grid without its video, a pad outside any run
        fewer = {**row, "videos": row["videos"][:1]}
        expected = "2 video runs, 1 videos and 2 grids" if arch == "qwen2_vl" else "6 video runs, 1 videos"
        assert any(p.startswith(expected) for p in check_row(fewer, loaded.spec, None))
        stray = {**row, "input_ids": [vpad] + ids, "labels": [IGNORE_INDEX] + row["labels"]}
        assert check_row(stray, loaded.spec, None)[0] == (
            "video pad token at position 0 is outside any <|vision_start|>…<|vision_end|> run")


def test_unreadable_or_changed_clip_names_the_sample(tiny_ckpt, media, tmp_path):
    import shutil

    loaded = load_spec(str(tiny_ckpt("qwen2_vl")))
    vspec = VideoSpec.from_processor(loaded.processor, loaded.config)
    clip = shutil.copy(media["b"], tmp_path / "b.mp4")
    row, _ = build(loaded, vspec, "m", [("video", str(clip))], "x")
    collate = Collator(loaded.processor, loaded.spec)
    (tmp_path / "b.mp4").write_bytes(b"not a video")
    with pytest.raises(SampleError, match=r"^sample m \(v.jsonl:m\): video 0 \(.*b.mp4\) could not be decoded at "
                                          r"training time: not a readable video container.*re-encode it"):
        collate([row])
    write_clip(tmp_path / "b.mp4", 10, 200, 120, Fraction(3))  # same frames, another size
    with pytest.raises(SampleError, match=r"video 0 \(.*b.mp4\) now gives grid \[3, 8, 14\] but was prepared as "
                                          r"\[3, 6, 4\]; the file changed"):
        collate([row])


def test_pack_columns_with_and_without_videos(tiny_ckpt, media, tmp_path):
    from datasets import Dataset

    loaded = load_spec(str(tiny_ckpt("qwen2_vl")))
    vspec = VideoSpec.from_processor(loaded.processor, loaded.config)
    made = samples(loaded, vspec, media)
    rows = [made[k][0] for k in ("txt", "vid", "mix")]
    assert "videos" not in rows[0]
    packed = pack_rows(rows, 10_000)[0]
    assert packed["videos"] == [media["a"], media["b"]]
    assert packed["video_grid_thw"] == rows[1]["video_grid_thw"] + rows[2]["video_grid_thw"]
    assert check_row(packed, loaded.spec, 10_000) == []
    # image-only rows pack as before (no video columns)
    assert "videos" not in pack_rows([rows[0]], 10_000)[0]
    # a prepared dataset with the video columns keeps them
    full = [{**r, **{c: r.get(c, []) for c in rows[1] if c.startswith("video")}, "length": len(r["input_ids"])}
            for r in rows]
    ds = Dataset.from_list(full)
    out = pack_dataset(ds, 10_000, str(tmp_path / "p.arrow"))
    assert out[0]["video_frames"] == packed["video_frames"] and out[0]["segments"] == packed["segments"]
    assert out[0]["video_second_per_grid"] == [0.0, 0.0]


def test_scan_runs_on_synthetic_ids():
    from vlmtune.models.spec import ModelSpec

    spec = ModelSpec("qwen2_vl", "<|image_pad|>", 9, "<|video_pad|>", 10, "<|vision_start|>", 7, "<|vision_end|>", 8,
                     "<|im_start|>", 1, "<|im_end|>", 2, 0, 2, 14, 2, 2, 3136, 200704, 100)
    ids = [1, 7, 9, 9, 8, 5, 7, 10, 10, 10, 10, 8, 5, 7, 8]
    assert scan_runs(ids, spec) == ([(2, 2), (14, 0)], [(7, 4)], [])
    assert scan_runs([7, 9, 10, 8, 5, 7, 10, 10, 5, 10], spec) == ([], [], [
        "image run at position 0 mixes image and video pad tokens",
        "video run at position 5 has 2 pad tokens and no <|vision_end|>",
        "video pad token at position 9 is outside any <|vision_start|>…<|vision_end|> run",
    ])


def test_qwen2_5_second_per_grid_is_checked_and_packing_needs_tokens_per_second(tiny_ckpt, media):
    loaded = load_spec(str(tiny_ckpt("qwen2_5_vl")))
    vspec = VideoSpec.from_processor(loaded.processor, loaded.config)
    row, _ = samples(loaded, vspec, media)["vid"]
    assert row["video_second_per_grid"] == [1.0]  # 6 of 12 frames at 4 fps: sampled at 2 fps, 2 frames per patch
    wrong = {**row, "video_second_per_grid": [0.0]}
    with pytest.raises(SampleError, match=r"video 0 \(.*a.mp4\) has second_per_grid 0.0 but its frames give 1.0"):
        Collator(loaded.processor, loaded.spec)([wrong])
    packed = pack_rows([row], 10_000)
    with pytest.raises(ValueError, match="tokens_per_second"):
        Collator(loaded.processor, loaded.spec)(packed)  # no VideoSpec read with the config
    assert Collator(loaded.processor, loaded.spec, video=vspec)(packed)["position_ids"].shape[0] == 4


def synthetic_sample(spec, items):
    """(ids, image grids, video grids, seconds) of text/image/video items laid out as the family's processor does."""
    vs, ve, ipad, vpad = spec.vision_start_token_id, spec.vision_end_token_id, spec.image_token_id, spec.video_token_id
    ids, igrids, vgrids, seconds = [5], [], [], []
    for kind, n, t, h, w, sec in items:
        if kind == "text":
            ids += [5] * n
        elif kind == "image":
            igrids.append([1, 2 * h, 2 * w])
            ids += [vs] + [ipad] * (h * w) + [ve]
        else:
            vgrids.append([t, 2 * h, 2 * w])
            seconds.append(sec)
            if spec.video_timestamps:  # per patch: timestamp text, its own vision start/end pair
                ids += [vs] + [x for _ in range(t) for x in [5, 6, 5, vs] + [vpad] * (h * w) + [ve]] + [ve]
            else:
                ids += [vs] + [vpad] * (t * h * w) + [ve]
    return ids + [2], igrids, vgrids, seconds


# Qwen2.5-VL's second_per_grid of 2 frames out of 5 at 3 fps: 1.6666666666666665; the model's float32 gives time
# (9 · 2 · s).long() = 30 where float64 gives 29, so the packer must compute it as the model does
SECONDS = [0.5, 1.0, 2 / 1.8, 2 / 3, 2 / 7, 4.0, 0.3, 2 / (2 / 5 * 3)]
item = st.tuples(st.sampled_from(["text", "image", "video"]), st.integers(1, 4), st.integers(1, 10), st.integers(1, 3),
                 st.integers(1, 3), st.sampled_from(SECONDS))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments=st.lists(st.lists(item, max_size=5), min_size=1, max_size=3))
@example(segments=[[("text", 2, 1, 1, 1, 1.0), ("video", 1, 10, 1, 1, 2 / (2 / 5 * 3))], [("image", 1, 1, 2, 1, 1.0)]])
def test_packed_positions_equal_get_rope_index_on_synthetic_samples(family, segments):
    """Any order of images and videos (all grids, Qwen2.5-VL intervals that truncate), in 1-3 packed segments:
    each segment's positions == the model's get_rope_index on that segment alone."""
    loaded, vspec, model = family
    spec = loaded.spec
    made = [synthetic_sample(spec, items) for items in segments]
    row = {"input_ids": [x for m in made for x in m[0]], "image_grid_thw": [g for m in made for g in m[1]],
           "video_grid_thw": [g for m in made for g in m[2]], "video_second_per_grid": [s for m in made for s in m[3]],
           "segments": [len(m[0]) for m in made]}
    got = packed_position_ids(row, spec, len(row["input_ids"]) + 3, tokens_per_second=vspec.tokens_per_second)
    start = 0
    for ids, igrids, vgrids, seconds in made:
        t_ids = torch.tensor([ids])
        mm = ((t_ids == spec.image_token_id).int() + 2 * (t_ids == spec.video_token_id).int())
        kw = {}
        if igrids:
            kw["image_grid_thw"] = torch.tensor(igrids)
        if vgrids:
            kw["video_grid_thw"] = torch.tensor(vgrids)
            if spec.model_type == "qwen2_5_vl":
                kw["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
        if kw:
            want = model.model.get_rope_index(t_ids, mm, **kw)[0][:, 0].numpy()
        else:
            want = np.tile(np.arange(len(ids)), (3, 1))
        assert np.array_equal(got[1:, start : start + len(ids)], want)
        start += len(ids)
    assert got[:, start:].tolist() == [[0, 1, 2]] * 4
