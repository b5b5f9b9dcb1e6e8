"""data/media/video.py: the container's facts == what decoding the clip finds; decode_frames keeps exactly the
asked frames, upright; odd and broken containers raise a typed VideoReadError; and the whole chain
(read_facts → plan_video → decode_frames → the real processor) gives the accounted grid for each family.

Clips are encoded here with PyAV (mpeg4 in MP4 and Matroska, VP8 in WebM), each frame one flat grey level
so that a decoded frame can be told apart from its neighbours despite lossy coding.
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.video_utils import VideoMetadata

from clips import CONTAINERS, level, write_clip
from vlmtune.data.media.video import VideoReadError, decode_frames, decoder_version, read_facts
from vlmtune.models.video_grid import VideoSpec, plan_video

def decode_all(path):
    """Every frame the decoder finds, upright by its own rotation side data (the reference)."""
    with av.open(path) as c:
        frames = []
        for f in c.decode(video=0):
            frames.append(np.rot90(f.to_ndarray(format="rgb24"), k=int(f.rotation) // 90))
        return frames


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ext=st.sampled_from(sorted(CONTAINERS)),
    n=st.integers(1, 14),
    width=st.integers(8, 48).map(lambda x: 2 * x),
    height=st.integers(8, 48).map(lambda x: 2 * x),
    rate=st.sampled_from([Fraction(1), Fraction(10), Fraction(24), Fraction(25), Fraction(30000, 1001), Fraction(60)]),
    rotation=st.sampled_from([0, 90, 180, 270]),
)
def test_facts_equal_what_decoding_finds(tmp_path, ext, n, width, height, rate, rotation):
    path = write_clip(tmp_path / f"clip.{ext}", n, width, height, rate, rotation)
    facts = read_facts(path)
    decoded = decode_all(path)
    assert facts.frames == len(decoded) == n
    assert (facts.height, facts.width) == decoded[0].shape[:2]
    assert facts.rotation == rotation
    assert facts.stored_size == (width, height)
    assert facts.fps == pytest.approx(float(rate), rel=1e-3)
    assert facts.duration == pytest.approx(n / float(rate), abs=1.01 / float(rate) + 1e-3)
    assert facts.header_frames == (n if ext == "mp4" else 0)  # only MP4 keeps a frame count in its header
    # decode_frames keeps exactly the asked frames, in the asked order, repeats included
    want = [n - 1, 0, n // 2, n // 2]
    got = decode_frames(path, want, facts.rotation)
    assert got.shape == (4, facts.height, facts.width, 3) and got.dtype == np.uint8
    for k, i in enumerate(want):
        assert abs(int(np.median(got[k])) - level(i)) < 12  # levels are 24 apart
        np.testing.assert_array_equal(got[k], decoded[i])


def test_variable_frame_rate_clip(tmp_path):
    pts = [0, 40, 80, 200, 210, 220, 600, 1000, 1010, 1500]
    path = write_clip(tmp_path / "vfr.mp4", len(pts), 64, 48, Fraction(25), pts_ms=pts)
    facts = read_facts(path)
    assert facts.frames == len(decode_all(path)) == 10
    with av.open(path) as c:
        assert facts.fps == float(c.streams.video[0].average_rate)
    assert facts.duration == pytest.approx(1.5, abs=0.6)  # the last frame's own duration is the muxer's guess
    assert facts.fps == pytest.approx(facts.frames / facts.duration, rel=0.01)


def test_edit_list_hides_frames_the_header_counts(tmp_path):
    """Frames before presentation time 0 go into the MP4's sample table but an edit list hides them:
    the header says 10, the decoder sees 7, and the facts say 7 (the processor must get 7)."""
    path = str(tmp_path / "trimmed.mp4")
    out = av.open(path, "w")
    s = out.add_stream("mpeg4", rate=Fraction(25))
    s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
    s.codec_context.time_base = Fraction(1, 25)
    for i in range(10):
        frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), level(i), np.uint8), format="rgb24")
        frame.pts, frame.time_base = i - 3, Fraction(1, 25)
        for p in s.encode(frame):
            out.mux(p)
    for p in s.encode():
        out.mux(p)
    out.close()
    facts = read_facts(path)
    assert (facts.header_frames, facts.frames, len(decode_all(path))) == (10, 7, 7)
    last = decode_frames(path, [facts.frames - 1])[0]
    assert abs(int(np.median(last)) - level(9)) < 12
    with pytest.raises(VideoReadError) as e:
        decode_frames(path, [9])  # where the header's count would have sent the collator
    assert e.value.kind == "short"


def test_rotation_turns_counter_clockwise(tmp_path):
    path = write_clip(tmp_path / "phone.mp4", 2, 64, 32, rotation=90, marker=True)
    facts = read_facts(path)
    assert (facts.width, facts.height, facts.rotation) == (32, 64, 90)
    frame = decode_frames(path, [0])[0]
    assert frame.shape == (64, 32, 3)
    # the stored top-left quadrant ends bottom-left after a quarter turn counter-clockwise
    assert frame[48, 8].min() > 200 and frame[8, 8].max() < 150 and frame[48, 24].max() < 150


def test_one_frame_clip(tmp_path):
    path = write_clip(tmp_path / "still.webm", 1, 32, 32)
    facts = read_facts(path)
    assert (facts.frames, facts.header_frames) == (1, 0)
    assert decode_frames(path, [0, 0]).shape == (2, 32, 32, 3)


# ---------------------------------------------------------------------------------------------
# Odd and broken containers


def _mux_silence(out) -> None:
    """A tenth of a second of silent mono audio muxed into `out`, then closed."""
    s = out.add_stream("pcm_s16le", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
    frame.sample_rate = 8000
    for p in s.encode(frame):
        out.mux(p)
    for p in s.encode():
        out.mux(p)
    out.close()


def write_audio_only(path):
    _mux_silence(av.open(str(path), "w"))
    return str(path)


def write_no_frames(path):
    """A Matroska file with a video track that never got a frame (only its audio track has packets)."""
    out = av.open(str(path), "w")
    v = out.add_stream("mpeg4", rate=25)
    v.width, v.height, v.pix_fmt = 32, 32, "yuv420p"
    _mux_silence(out)
    return str(path)


def write_header_only(path):
    """An MP4 with a header and no track at all (the encoder never ran)."""
    out = av.open(str(path), "w")
    s = out.add_stream("mpeg4", rate=25)
    s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
    out.start_encoding()
    out.close()
    return str(path)


@pytest.mark.parametrize(
    "make,kind",
    [
        (lambda d: write_audio_only(d / "sound.wav"), "no_video_stream"),
        (lambda d: write_audio_only(d / "sound.mkv"), "no_video_stream"),
        (lambda d: write_no_frames(d / "silent-video.mkv"), "no_frames"),
        (lambda d: write_header_only(d / "empty.mp4"), "unreadable"),
        (lambda d: (d / "notes.mp4").write_text("not a video\n") and str(d / "notes.mp4"), "unreadable"),
        (lambda d: (d / "zero.webm").write_bytes(b"") or str(d / "zero.webm"), "unreadable"),
        (lambda d: str(d / "missing.mp4"), "missing"),
    ],
    ids=["wav", "audio-mkv", "frameless-track", "header-only", "text", "zero-bytes", "missing"],
)
def test_odd_containers_raise_typed_errors(tmp_path, make, kind):
    path = make(tmp_path)
    with pytest.raises(VideoReadError) as e:
        read_facts(path)
    assert e.value.kind == kind and e.value.path == str(path) and e.value.fix


def test_truncated_clip(tmp_path):
    path = write_clip(tmp_path / "cut.mp4", 12, 64, 48)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])  # the MP4 index (moov) is written last: now gone
    with pytest.raises(VideoReadError) as e:
        read_facts(path)
    assert e.value.kind == "unreadable"


def test_frames_past_the_end(tmp_path):
    path = write_clip(tmp_path / "short.mkv", 5, 32, 32)
    with pytest.raises(VideoReadError) as e:
        decode_frames(path, [0, 5])
    assert e.value.kind == "short" and "5 frame(s)" in e.value.what


def test_errors_survive_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(VideoReadError("a.mp4", "no_frames", "no frames", "re-encode")))
    assert (err.path, err.kind, err.what, err.fix) == ("a.mp4", "no_frames", "no frames", "re-encode")


def test_decoder_version():
    assert decoder_version() == f"PyAV {av.__version__} (FFmpeg {av.ffmpeg_version_info})"


# ---------------------------------------------------------------------------------------------
# The whole chain on an encoded clip, for each family


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("ext,n,rate,rotation", [("mp4", 40, Fraction(30000, 1001), 90), ("webm", 9, Fraction(4), 0)])
def test_facts_plan_decode_processor(tmp_path, tiny_processor, arch, ext, n, rate, rotation):
    processor = tiny_processor(arch)
    spec = VideoSpec.from_processor(processor)
    path = write_clip(tmp_path / f"clip.{ext}", n, 80, 48, rate, rotation)
    facts = read_facts(path)
    grid = plan_video(facts.frames, facts.fps, facts.height, facts.width, spec)
    frames = decode_frames(path, grid.indices, facts.rotation)
    md = VideoMetadata(total_num_frames=facts.frames, fps=facts.fps, frames_indices=list(grid.indices))
    text = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Where?<|im_end|>\n"
    out = processor(text=[text], videos=[frames], video_metadata=[md], do_sample_frames=False,
                    input_data_format="channels_last")
    assert out["video_grid_thw"][0].tolist() == grid.thw
    expanded = text.replace("<|video_pad|>", grid.replacement("<|video_pad|>", "<|vision_start|>", "<|vision_end|>"))
    assert list(out["input_ids"][0]) == processor.tokenizer(expanded, add_special_tokens=False)["input_ids"]
    if arch == "qwen2_5_vl":
        assert list(out["second_per_grid_ts"]) == [grid.second_per_grid]
