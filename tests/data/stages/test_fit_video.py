"""Fitting samples with videos: a video's run is atomic like an image's, shrink_images lowers a video's pixel
budget and then its frame count, and the invariants hold over random conversations with videos and images.

Videos here exist only as header facts (frames, frame rate, size): fitting never decodes a frame.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmtune.data.stages.collate import check_row
from vlmtune.data.stages.encode import IGNORE_INDEX, Encoder, emit
from vlmtune.data.stages.fit import FitOptions, Fitter
from vlmtune.data.media.images import ImageHeader
from vlmtune.data.types import Conversation, ImagePart, Message, TextPart, VideoPart
from vlmtune.data.media.video import VideoFacts, plan_clip
from vlmtune.models.load import load_spec
from vlmtune.models.video_grid import VideoSampleError

WORDS = "red green blue circle square moves left right up down the a which way does it go and".split()


@pytest.fixture(scope="module")
def envs(tiny_ckpt):
    out = {}
    for arch in ("qwen2_vl", "qwen3_vl"):
        loaded = load_spec(str(tiny_ckpt(arch)))
        out[arch] = (loaded, Encoder(loaded.processor, loaded.spec))
    return out


def conv_of(turns, sid="s"):
    """turns: list of (role, [str | ("img", w, h) | ("vid", frames, fps, w, h)]) → Conversation, headers, facts."""
    msgs, headers, facts, k = [], {}, {}, 0
    for role, parts in turns:
        ps = []
        for p in parts:
            if isinstance(p, str):
                ps.append(TextPart(p))
                continue
            k += 1
            if p[0] == "img":
                path = f"/m/{sid}_{k}.png"
                headers[path] = ImageHeader(width=p[1], height=p[2], format="PNG")
                ps.append(ImagePart(ref=path, path=path))
            else:
                path = f"/m/{sid}_{k}.mp4"
                facts[path] = VideoFacts(frames=p[1], fps=p[2], duration=p[1] / p[2], width=p[3], height=p[4],
                                         rotation=0, codec="mpeg4")
                ps.append(VideoPart(ref=path, path=path))
        msgs.append(Message(role, ps))
    return Conversation(sid, f"data.jsonl:{sid}", msgs), headers, facts


def planned(loaded, facts):
    """The clips as validation hands them to the encoder: read (here: made up) and planned."""
    return {path: plan_clip(path, loaded.video, f) for path, f in facts.items()}


def video_runs(ids, spec):
    """Lengths of the `<|vision_start|> video_pad×n <|vision_end|>` runs, in order."""
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == spec.video_token_id:
            j = i
            while j < len(ids) and ids[j] == spec.video_token_id:
                j += 1
            assert ids[i - 1] == spec.vision_start_token_id and ids[j] == spec.vision_end_token_id
            runs.append(j - i)
            i = j
        else:
            i += 1
    return runs


def expected_runs(row, arch):
    if arch == "qwen3_vl":  # one run per temporal patch
        return [h * w // 4 for t, h, w in row["video_grid_thw"] for _ in range(t)]
    return [t * h * w // 4 for t, h, w in row["video_grid_thw"]]


def test_a_video_is_one_pad_until_emitted_and_then_the_processors_text(envs):
    loaded, enc = envs["qwen3_vl"]
    conv, headers, facts = conv_of([("user", [("vid", 24, 6.0, 64, 48), "Which way?"]), ("assistant", ["left"])])
    e = enc.encode(conv, headers, videos=planned(loaded, facts))
    (v,) = e.videos
    assert v.grid.indices == (0, 3, 7, 10, 13, 16, 20, 23)  # int(24 / 6 * 2) = 8 frames, linspace
    assert v.grid.thw == [4, 4, 4]
    stamps = [enc.tokenizer.decode(s) for s in v.stamp_ids]
    assert stamps == ["<0.2 seconds>", "<1.4 seconds>", "<2.4 seconds>", "<3.6 seconds>"]
    row = emit(e, loaded.spec).to_dict()
    assert len(row["input_ids"]) == e.length
    assert video_runs(row["input_ids"], loaded.spec) == [4, 4, 4, 4]
    assert row["video_frames"] == [list(v.grid.indices)] and row["video_total_frames"] == [24]
    assert row["video_fps"] == [6.0] and row["video_second_per_grid"] == [0.0]


def test_shrink_lowers_the_pixel_budget_before_the_frame_count(envs):
    loaded, enc = envs["qwen2_vl"]
    conv, headers, facts = conv_of([("user", [("vid", 40, 10.0, 448, 448), "Which way?"]), ("assistant", ["up"])])
    e = enc.encode(conv, headers, videos=planned(loaded, facts))
    (v,) = e.videos
    assert (v.frames, v.grid.thw, v.tokens) == (8, [4, 32, 32], 1024)
    # room for half the tokens: the budget falls, the frames stay
    out = Fitter(loaded.spec, FitOptions(cutoff_len=e.text_tokens + 512), enc).fit(e)
    (w,) = out.pieces[0].videos
    assert out.fate == "shrunk" and w.frames == 8 and w.tokens <= 512 and w.max_pixels < v.max_pixels
    assert out.reason.startswith(f"shrank video 1: 1024 -> {w.tokens} tokens, 8 -> 8 frames, 448x448 -> ")
    # room for less than the smallest frame at all 8 frames: the frame count falls, never below min_frames (4)
    floor = Fitter(loaded.spec, FitOptions(cutoff_len=e.text_tokens + 8, overflow=("shrink_images",)), enc).fit(e)
    assert floor.fate == "shrunk"
    (f,) = floor.pieces[0].videos
    assert f.frames == 4 and f.tokens == 8 and f.grid.thw == [2, 4, 4]
    none = Fitter(loaded.spec, FitOptions(cutoff_len=e.text_tokens + 7, overflow=("shrink_images", "drop")), enc).fit(e)
    assert none.fate == "dropped"


def test_a_clip_at_its_floor_leaves_its_share_to_the_others(envs):
    loaded, enc = envs["qwen2_vl"]
    turns = [("user", [("vid", 40, 10.0, 448, 448), ("vid", 8, 4.0, 56, 56), "Same way?"]), ("assistant", ["no"])]
    conv, headers, facts = conv_of(turns)
    e = enc.encode(conv, headers, videos=planned(loaded, facts))
    assert [v.tokens for v in e.videos] == [1024, 8]  # the short clip is already at its smallest plan
    # room for 40 video tokens: proportional shares 39 and 0; the short clip cannot go below 8, so the long one
    # must take at most 32: 16 (8 frames of 2x2 merged patches; 3x3 would be 36). A proportional split alone left
    # the sample over and dropped it.
    cut = e.text_tokens + 40
    out = Fitter(loaded.spec, FitOptions(cutoff_len=cut, overflow=("shrink_images", "drop")), enc).fit(e)
    assert out.fate == "shrunk" and out.tokens_after <= cut
    assert [v.tokens for v in out.pieces[0].videos] == [16, 8]


def test_truncate_text_and_split_move_whole_videos(envs):
    loaded, enc = envs["qwen2_vl"]
    turns = [("user", [("vid", 8, 4.0, 56, 56), "first " * 30]), ("assistant", ["left"]),
             ("user", ["second " * 30]), ("assistant", ["right"]),
             ("user", [("vid", 8, 4.0, 56, 56), "third"]), ("assistant", ["up"])]
    conv, headers, facts = conv_of(turns)
    e = enc.encode(conv, headers, videos=planned(loaded, facts))
    cut = e.length - 40
    out = Fitter(loaded.spec, FitOptions(cutoff_len=cut, overflow=("truncate_text", "drop")), enc).fit(e)
    assert out.fate == "truncated" and out.reason == "dropped 1 oldest text-only exchange(s)"
    assert len(out.pieces[0].videos) == 2
    out = Fitter(loaded.spec, FitOptions(cutoff_len=e.length // 2, overflow=("split", "drop")), enc).fit(e)
    assert out.fate == "split"
    rows = [emit(p, loaded.spec).to_dict() for p in out.pieces]
    assert sum(len(r["videos"]) for r in rows) == 2
    for r in rows:
        assert len(r["input_ids"]) <= e.length // 2
        assert video_runs(r["input_ids"], loaded.spec) == expected_runs(r, "qwen2_vl")


# -- invariants over random conversations with videos and images ------------------------------
image = st.tuples(st.just("img"), st.integers(8, 900), st.integers(8, 900))
video = st.tuples(st.just("vid"), st.integers(2, 90), st.sampled_from([1.0, 4.0, 12.5, 24.0, 29.97]),
                  st.integers(16, 700), st.integers(16, 700))
text = st.lists(st.sampled_from(WORDS), min_size=0, max_size=40).map(" ".join)


@st.composite
def conversations(draw):
    n_ex = draw(st.integers(1, 4))
    media = draw(st.lists(st.one_of(image, video), max_size=4))
    slots = [draw(st.integers(0, n_ex - 1)) for _ in media]
    turns = []
    for k in range(n_ex):
        parts = [draw(text)]
        for m, slot in zip(media, slots):
            if slot == k:
                parts.insert(draw(st.integers(0, len(parts))), m)
        turns.append(("user", parts))
        turns.append(("assistant", [draw(text) or "ok"]))
    return turns


policy_lists = st.permutations(["shrink_images", "truncate_text", "split", "drop"]).flatmap(
    lambda p: st.integers(0, 4).map(lambda n: tuple(p[:n])))


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=conversations(), cutoff=st.integers(16, 2500), overflow=policy_lists, share=st.sampled_from([1.0, 0.5]))
def test_fit_invariants_with_videos(envs, arch, turns, cutoff, overflow, share):
    loaded, enc = envs[arch]
    conv, headers, facts = conv_of(turns)
    try:
        e = enc.encode(conv, headers, videos=planned(loaded, facts))
    except VideoSampleError:  # validation refuses such a clip before encoding (e.g. Qwen3-VL: under 2 frames)
        return
    out = Fitter(loaded.spec, FitOptions(cutoff, overflow, 4, share, True), enc).fit(e)
    assert out.tokens_before == e.length
    if out.fate == "kept":
        assert e.length <= cutoff
    if out.fate == "dropped":
        assert e.length > cutoff and out.pieces == []
    videos_in = [v.path for v in e.videos]
    for piece in out.pieces:
        row = emit(piece, loaded.spec).to_dict()
        assert len(row["input_ids"]) == piece.length <= cutoff
        assert video_runs(row["input_ids"], loaded.spec) == expected_runs(row, arch)
        assert check_row(row, loaded.spec, cutoff) == []  # the collator's guard agrees
        assert len(row["videos"]) == len(row["video_grid_thw"]) == len(row["video_frames"])
        for thw, frames in zip(row["video_grid_thw"], row["video_frames"]):
            assert thw[0] == -(-len(frames) // 2)  # the grid is the sampled frames, padded to whole patches
        positions = [videos_in.index(p) for p in row["videos"]]
        assert positions == sorted(positions)
        assert all(lab == IGNORE_INDEX for tok, lab in zip(row["input_ids"], row["labels"])
                   if tok in (loaded.spec.video_token_id, loaded.spec.vision_start_token_id))
