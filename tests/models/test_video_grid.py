"""Video accounting (models/video_grid.py) == what the real transformers video processors do.

For the three families (the tiny checkpoints' own processors, with their video settings varied per example):

1. on decoded clips (frames + VideoMetadata, no torchcodec needed): the processor's own sampling
   (`do_sample_frames=True`) picks exactly our indices and makes exactly our grid; handed exactly our
   frames (`do_sample_frames=False`, what the collator will do), the full processor call produces exactly
   our `video_grid_thw`, `second_per_grid_ts` and `input_ids` (Qwen3-VL's timestamp text included), and
   `prompt_tokens` is its length; odd cases: variable frame rate, one frame, rotated frames, clips shorter
   than one temporal patch, frames smaller than a patch;
2. without pixels, for realistic sizes (long clips, real checkpoints' budgets): the processors'
   `sample_frames` on metadata and `get_num_of_video_patches`;
3. `shrink_video`: within the budget, the pixel budget before the frame count, never below min_frames;
4. up to 2 clips and 2 images in one processor call (the collator's call for one sample): `input_ids`,
   `video_grid_thw`, `second_per_grid_ts` and the video tokens of `mm_token_type_ids` all as planned.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, Qwen2VLVideoProcessor, Qwen3VLVideoProcessor
from transformers.video_utils import VideoMetadata

from vlmtune.models.video_grid import (
    DEFAULT_VIDEO_FPS,
    QWEN2_RULE,
    QWEN3_RULE,
    VideoSampleError,
    VideoSpec,
    plan_video,
    sample_indices,
    shrink_video,
)

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
PAD, START, END = "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
PROMPT = f"<|im_start|>user\nWhat moves?{START}{PAD}{END}Answer.<|im_end|>\n<|im_start|>assistant\nleft<|im_end|>\n"

# (shortest_edge, longest_edge) pairs: the tiny checkpoint's, the real checkpoints', and small ones so that
# the budget binds. Qwen2/2.5-VL read them per frame, Qwen3-VL for the whole sampled clip.
SIZES = {
    QWEN2_RULE: [(3136, 802816), (128 * 28 * 28, 768 * 28 * 28), (3136, 12845056), (28 * 28 * 4, 28 * 28 * 24), (3136, 3136)],
    QWEN3_RULE: [(4096, 1048576), (128 * 32 * 32, 768 * 32 * 32), (4096, 25165824), (32 * 32 * 8, 32 * 32 * 96), (4096, 4096 * 3)],
}


@pytest.fixture(scope="module")
def base(tiny_ckpt, tiny_processor):
    """`base(arch) -> (processor, config)` of the tiny checkpoint (shared: never mutated)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = (tiny_processor(arch), AutoConfig.from_pretrained(tiny_ckpt(arch)))
        return cache[arch]

    return get


def with_video_processor(processor, **settings):
    """A shallow copy of `processor` whose video processor is built with `settings` (the tiny one's otherwise)."""
    vp = processor.video_processor
    kwargs = dict(
        size=dict(vp.size),
        patch_size=vp.patch_size,
        merge_size=vp.merge_size,
        temporal_patch_size=vp.temporal_patch_size,
        image_mean=vp.image_mean,
        image_std=vp.image_std,
        cap_pixels_per_frame=False,
    )
    kwargs.update(settings)
    q = copy.copy(processor)
    q.video_processor = type(vp)(**kwargs)
    return q


def video_settings(rule):
    return st.fixed_dictionaries(
        {
            "fps": st.sampled_from([0.5, 1.0, 2.0, 3.3, 8.0]),
            "min_frames": st.integers(1, 8),
            "max_frames": st.integers(1, 24),
            "size": st.sampled_from(SIZES[rule]).map(lambda s: {"shortest_edge": s[0], "longest_edge": s[1]}),
            "cap_pixels_per_frame": st.booleans(),
            "max_video_tokens": st.sampled_from([128000, 768, 64, 12, 3]),
        }
    )


clip_fps = st.one_of(st.sampled_from([23.976, 24.0, 25.0, 29.97, 30.0, 60.0, 1.0, 0.5]), st.floats(0.25, 120.0))
sides = st.one_of(st.integers(1, 320), st.integers(8, 64), st.integers(1, 6))


def processor_samples(processor, frames, metadata):
    """The video processor's own sampling on a decoded clip: (indices, grid), or the exception it raises."""
    out = processor.video_processor(
        videos=[frames], video_metadata=[metadata], do_sample_frames=True, return_metadata=True,
        input_data_format="channels_last",
    )
    md = out["video_metadata"][0]
    return [int(i) for i in list(md.frames_indices)], out["video_grid_thw"][0].tolist()


def processor_handed(processor, frames, metadata):
    """The full processor call on exactly the frames we sampled (the collator's call)."""
    out = processor(
        text=[PROMPT], videos=[frames], video_metadata=[metadata], do_sample_frames=False, input_data_format="channels_last"
    )
    return out


def check_clip(processor, config, settings_, total, fps, height, width, duration=None):
    spec = VideoSpec.from_processor(processor, config)
    frames = np.zeros((total, height, width, 3), np.uint8)
    try:
        grid = plan_video(total, fps, height, width, spec)
    except VideoSampleError:
        grid = None

    # 1. the processor's own sampler on the whole decoded clip
    own_md = VideoMetadata(total_num_frames=total, fps=fps, duration=duration, height=height, width=width)
    try:
        own = processor_samples(processor, frames, own_md)
    except (ValueError, ZeroDivisionError, IndexError):  # IndexError: its arange can step past the last frame
        own = None
    if grid is None:
        assert own is None, (spec, total, fps, height, width)
        return None
    if own is None:
        # the one case we keep and the processor's sampler cannot: Qwen2's clip shorter than a temporal patch
        assert spec.rule == QWEN2_RULE and total < spec.temporal_patch_size
    else:
        assert own == (list(grid.indices), grid.thw)

    # 2. the collator's call: exactly our frames, do_sample_frames=False
    md = VideoMetadata(
        total_num_frames=total, fps=fps, duration=duration, height=height, width=width, frames_indices=list(grid.indices)
    )
    out = processor_handed(processor, frames[list(grid.indices)], md)
    assert out["video_grid_thw"][0].tolist() == grid.thw
    tok = processor.tokenizer
    expanded = PROMPT.replace(PAD, grid.replacement(PAD, START, END))
    ids = out["input_ids"][0]
    assert list(ids) == tok(expanded, add_special_tokens=False)["input_ids"]
    compact = len(tok(PROMPT, add_special_tokens=False)["input_ids"])
    count = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert len(ids) == compact - 1 + grid.prompt_tokens(count)
    assert sum(1 for i in ids if i == tok.convert_tokens_to_ids(PAD)) == grid.tokens
    if spec.second_per_grid:
        assert list(out["second_per_grid_ts"]) == [grid.second_per_grid]
    else:
        assert grid.second_per_grid is None and "second_per_grid_ts" not in out
    return grid


@pytest.mark.parametrize("arch", FAMILIES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data(), total=st.integers(1, 90), fps=clip_fps, height=sides, width=sides)
def test_decoded_clips_match_processor(arch, base, data, total, fps, height, width):
    processor, config = base(arch)
    rule = QWEN3_RULE if arch == "qwen3_vl" else QWEN2_RULE
    s = data.draw(video_settings(rule))
    check_clip(with_video_processor(processor, **s), config, s, total, fps, height, width)


ODD = [
    # (total, fps, height, width, duration): one frame; shorter than one temporal patch; a variable-frame-rate
    # clip (duration not total/fps: only the frame count and average rate count); frames below one patch;
    # a rotated phone clip (decoded 1080x1920 frames, scaled down) and its unrotated twin.
    (1, 30.0, 64, 80, None),
    (1, 0.5, 300, 20, None),
    (3, 29.97, 70, 70, 0.5),
    (41, 24.0, 96, 128, 3.7),
    (17, 60.0, 5, 300, None),
    (25, 30.0, 192, 108, None),
    (25, 30.0, 108, 192, None),
    (120, 2.0, 33, 47, None),
]


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("total,fps,height,width,duration", ODD)
def test_odd_clips_match_processor(arch, base, total, fps, height, width, duration):
    processor, config = base(arch)
    s = {"fps": 2.0, "min_frames": 4, "max_frames": 8}
    grid = check_clip(with_video_processor(processor, **s), config, s, total, fps, height, width, duration)
    if total == 1:
        if arch == "qwen3_vl":
            assert grid is None  # Qwen3-VL's resize refuses fewer frames than one temporal patch
        else:
            assert grid.indices == (0,) and grid.t == 1  # padded to one patch by repeating the frame
    else:
        assert grid is not None


def test_rotated_clip_is_planned_on_its_displayed_size(base):
    processor, config = base("qwen2_vl")
    spec = VideoSpec.from_processor(processor, config)
    upright, sideways = spec.plan(25, 30.0, 192, 108), spec.plan(25, 30.0, 108, 192)
    assert (upright.h, upright.w) == (sideways.w, sideways.h)


@pytest.mark.parametrize("arch", FAMILIES)
def test_spec_reads_the_loaded_processor(arch, base):
    processor, config = base(arch)
    spec = VideoSpec.from_processor(processor, config)
    vp = processor.video_processor
    assert spec.model_type == arch
    assert spec.rule == (QWEN3_RULE if arch == "qwen3_vl" else QWEN2_RULE)
    assert (spec.patch_size, spec.merge_size, spec.temporal_patch_size) == (vp.patch_size, vp.merge_size, 2)
    assert (spec.min_pixels, spec.max_pixels) == (vp.size["shortest_edge"], vp.size["longest_edge"])
    assert (spec.min_frames, spec.max_frames) == (4, 8)
    assert spec.cap_pixels_per_frame is False
    if arch == "qwen3_vl":
        assert (spec.fps, spec.processor_samples, spec.timestamps, spec.second_per_grid) == (2.0, True, True, False)
    else:
        # Qwen2/2.5-VL processors have no fps and do not sample: vlmtune samples at DEFAULT_VIDEO_FPS
        assert vp.fps is None and (spec.fps, spec.processor_samples, spec.timestamps) == (DEFAULT_VIDEO_FPS, False, False)
        assert spec.second_per_grid is (arch == "qwen2_5_vl")
    assert spec.tokens_per_second == (2.0 if arch == "qwen2_5_vl" else None)


def test_overrides_take_the_config_keys(base):
    processor, config = base("qwen2_vl")
    spec = VideoSpec.from_processor(processor, config).with_overrides(fps=1.0, max_frames=6, min_pixels=784, max_pixels=9999)
    assert (spec.fps, spec.num_frames, spec.max_frames, spec.min_pixels, spec.max_pixels) == (1.0, None, 6, 784, 9999)
    with pytest.raises(VideoSampleError, match="video_maxlen"):
        plan_video(100, 30.0, 64, 64, spec.with_overrides(max_frames=1))


# ---------------------------------------------------------------------------------------------
# 2. Without pixels: realistic clips and budgets against the processors' own arithmetic


def real_video_processor(rule, **kw):
    """A video processor with a real checkpoint's defaults (the class defaults) and `kw`."""
    if rule == QWEN3_RULE:
        return Qwen3VLVideoProcessor(cap_pixels_per_frame=kw.pop("cap_pixels_per_frame", False), **kw)
    return Qwen2VLVideoProcessor(cap_pixels_per_frame=kw.pop("cap_pixels_per_frame", False), fps=kw.pop("fps", 2.0), **kw)


def their_sampler(vp, metadata):
    """The processor's sample_frames, called as its preprocess calls it: fps and num_frames from the instance
    (Qwen3VLVideoProcessor.sample_frames does not default num_frames itself)."""
    indices = [int(i) for i in list(vp.sample_frames(metadata, num_frames=vp.num_frames, fps=vp.fps))]
    if indices and indices[-1] >= metadata.total_num_frames:  # what indexing the decoded clip with them raises
        raise IndexError(f"index {indices[-1]} is out of bounds for a clip of {metadata.total_num_frames} frames")
    return indices


class _Holder:
    def __init__(self, vp):
        self.video_processor = vp


@pytest.mark.parametrize("rule", [QWEN2_RULE, QWEN3_RULE])
@settings(max_examples=400, deadline=None)
@given(
    total=st.integers(1, 200_000),
    fps=clip_fps,
    height=st.integers(16, 4096),
    width=st.integers(16, 4096),
    max_frames=st.sampled_from([768, 128, 64, 16]),
    target=st.sampled_from([2.0, 1.0, 0.5, 4.0]),
)
@example(total=36_000, fps=30.0, height=1080, width=1920, max_frames=768, target=2.0)
@example(total=18_000, fps=29.97, height=1920, width=1080, max_frames=128, target=2.0)
def test_long_clips_match_processor_arithmetic(rule, total, fps, height, width, max_frames, target):
    vp = real_video_processor(rule, max_frames=max_frames, fps=target)
    spec = VideoSpec.from_processor(_Holder(vp))
    md = VideoMetadata(total_num_frames=total, fps=fps)
    try:
        theirs = their_sampler(vp, md)
    except (ValueError, ZeroDivisionError, IndexError):
        theirs = None
    try:
        ours = list(sample_indices(total, fps, spec))
    except VideoSampleError:
        ours = None
    if theirs is None:
        assert ours is None or (rule == QWEN2_RULE and total < 2)
        return
    assert ours == theirs
    n = len(ours)
    if rule == QWEN3_RULE and n < 2:
        return
    try:
        grid = plan_video(total, fps, height, width, spec)
    except VideoSampleError:  # an aspect ratio above 200: the processor refuses it too
        with pytest.raises(ValueError, match="aspect ratio"):
            vp.get_num_of_video_patches(n, height, width, {})
        return
    patches = vp.get_num_of_video_patches(n, height, width, {})
    assert grid.t * grid.h * grid.w == patches
    assert grid.tokens == patches // vp.merge_size**2


# ---------------------------------------------------------------------------------------------
# 3. shrink_video


@pytest.mark.parametrize("arch", FAMILIES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(total=st.integers(2, 400), fps=clip_fps, height=st.integers(16, 720), width=st.integers(16, 720), frac=st.floats(0.0, 1.0))
# 272 frames at 23.976 fps: 14 frames hit Qwen2-VL's arange edge; the search went on to 4 frames (8 tokens)
@example(total=272, fps=23.976, height=16, width=16, frac=0.5)
def test_shrink_video_fits_and_is_maximal(arch, base, total, fps, height, width, frac):
    processor, config = base(arch)
    tok = processor.tokenizer
    count = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    spec = VideoSpec.from_processor(processor, config).with_overrides(max_frames=16)
    try:
        full = plan_video(total, fps, height, width, spec)
    except VideoSampleError:
        return
    budget = int(full.prompt_tokens(count) * frac)
    found = shrink_video(total, fps, height, width, spec, budget, count)
    if found is None:
        floor = spec.with_overrides(max_pixels=spec.min_pixels, max_frames=min(spec.min_frames, full.frames))
        assert plan_video(total, fps, height, width, floor).prompt_tokens(count) > budget
        return
    s, grid = found
    assert grid.prompt_tokens(count) <= budget
    assert grid.frames >= min(spec.min_frames, full.frames)
    assert spec.min_pixels <= s.max_pixels <= spec.max_pixels
    if s.max_frames >= full.frames:  # the frame count is untouched while a pixel budget still fits
        assert grid.frames == full.frames
    if s.max_pixels < spec.max_pixels:  # and the pixel budget is the largest that fits
        bigger = plan_video(total, fps, height, width, s.with_overrides(max_pixels=s.max_pixels + 1))
        assert bigger.prompt_tokens(count) > budget
    if budget >= full.prompt_tokens(count):
        assert grid == full


@pytest.mark.parametrize("rule", [QWEN2_RULE, QWEN3_RULE])
@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 5000), fps=clip_fps, num_frames=st.integers(1, 64))
def test_fixed_frame_count_matches_processor_sampler(rule, total, fps, num_frames):
    """A processor config with num_frames (and no fps) samples a fixed count; ours follows it."""
    vp = real_video_processor(rule, num_frames=num_frames, fps=None)
    assert vp.fps is None and vp.num_frames == num_frames
    spec = VideoSpec.from_processor(_Holder(vp))
    assert (spec.fps, spec.num_frames) == (None, num_frames)
    try:
        theirs = their_sampler(vp, VideoMetadata(total_num_frames=total, fps=fps))
    except (ValueError, ZeroDivisionError, IndexError):
        theirs = None
    try:
        ours = list(sample_indices(total, fps, spec))
    except VideoSampleError:
        ours = None
    if theirs is None:
        assert ours is None or (rule == QWEN2_RULE and total < 2)
    else:
        assert ours == theirs


def test_specs_and_grids_cross_worker_processes(base):
    import pickle

    processor, config = base("qwen3_vl")
    spec = VideoSpec.from_processor(processor, config)
    grid = spec.plan(90, 30.0, 120, 160)
    assert pickle.loads(pickle.dumps(spec)) == spec and pickle.loads(pickle.dumps(grid)) == grid
    assert VideoSpec(**spec.to_dict()) == spec
    with pytest.raises(ValueError, match="count_text"):
        grid.prompt_tokens()  # Qwen3-VL's timestamps need the tokenizer
    assert grid.timestamp_texts() == [f"<{t:.1f} seconds>" for t in grid.timestamps]
    assert len(grid.timestamps) == grid.t


# ---------------------------------------------------------------------------------------------
# 4. Several clips and images in one processor call (what the collator does for one sample)


@pytest.mark.parametrize("arch", FAMILIES)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    media=st.lists(
        st.one_of(
            st.tuples(st.just("image"), st.integers(20, 300), st.integers(20, 300)),
            st.tuples(st.just("video"), st.integers(1, 60), st.integers(8, 200), st.integers(8, 200), clip_fps),
        ),
        max_size=4,
    ).filter(lambda m: sum(x[0] == "image" for x in m) <= 2 and sum(x[0] == "video" for x in m) <= 2)
)
def test_videos_and_images_in_one_call(arch, base, media):
    from PIL import Image

    from vlmtune.models.spec import ModelSpec

    processor, config = base(arch)
    image_spec = ModelSpec.from_processor(processor, config)
    spec = VideoSpec.from_processor(processor, config)
    tok = processor.tokenizer
    text, expanded, images, videos, metadata, grids = "<|im_start|>user\n", "<|im_start|>user\n", [], [], [], []
    for k, item in enumerate(media):
        if item[0] == "image":
            _, h, w = item
            images.append(Image.new("RGB", (w, h), (k * 40, 90, 200)))
            run = f"{START}<|image_pad|>{END}"
            expanded += f"Picture {k}:" + run.replace("<|image_pad|>", "<|image_pad|>" * image_spec.grid(h, w).tokens)
        else:
            _, total, h, w, fps = item
            try:
                grid = plan_video(total, fps, h, w, spec)
            except VideoSampleError:
                continue
            videos.append(np.zeros((grid.frames, h, w, 3), np.uint8))
            metadata.append(VideoMetadata(total_num_frames=total, fps=fps, frames_indices=list(grid.indices)))
            grids.append(grid)
            run = f"{START}{PAD}{END}"
            expanded += f"Picture {k}:" + run.replace(PAD, grid.replacement(PAD, START, END))
        text += f"Picture {k}:" + run
    text += "Which one moves?<|im_end|>\n"
    expanded += "Which one moves?<|im_end|>\n"
    kwargs = {"images": images} if images else {}
    if videos:
        kwargs.update(videos=videos, video_metadata=metadata, do_sample_frames=False, input_data_format="channels_last")
    out = processor(text=[text], **kwargs)
    assert list(out["input_ids"][0]) == tok(expanded, add_special_tokens=False)["input_ids"]
    if videos:
        assert out["video_grid_thw"].tolist() == [g.thw for g in grids]
        if spec.second_per_grid:
            assert list(out["second_per_grid_ts"]) == [g.second_per_grid for g in grids]
        types = np.asarray(out["mm_token_type_ids"][0])
        assert int((types == 2).sum()) == sum(g.tokens for g in grids)


def test_a_sampler_rounding_past_the_last_frame_is_refused_like_the_processor(base):
    # 82 frames at 23.976 fps sampled at 8 fps, at most 14 frames: transformers' float32 arange steps to index 82,
    # so its own sampler raises IndexError; vlmtune refuses the clip instead of planning a frame that is not there.
    processor, config = base("qwen2_vl")
    s = {"fps": 8.0, "min_frames": 1, "max_frames": 14}
    assert check_clip(with_video_processor(processor, **s), config, s, 82, 23.976, 1, 1) is None
    with pytest.raises(VideoSampleError, match="would pick frame 82 of a clip of 82 frames"):
        plan_video(82, 23.976, 1, 1, VideoSpec.from_processor(with_video_processor(processor, **s), config))


def test_config_pixel_keys_are_per_frame_for_every_family(base):
    """video_max_pixels / video_min_pixels mean one frame, as in LLaMA-Factory: Qwen2/2.5-VL's processor reads
    its `size` per frame, Qwen3-VL's per clip, so there each clip's bound is the per-frame key × its frames."""
    processor, config = base("qwen2_vl")
    spec = VideoSpec.from_processor(processor, config).with_config(video_max_pixels=50_000, video_min_pixels=4_000)
    assert (spec.min_pixels, spec.max_pixels) == (4_000, 50_000)
    assert spec.for_clip(40, 10.0) is spec
    processor, config = base("qwen3_vl")
    proc = VideoSpec.from_processor(processor, config)
    spec = proc.with_config(video_fps=1.0, video_maxlen=6, video_max_pixels=50_000, video_min_pixels=4_000)
    assert (spec.min_pixels, spec.max_pixels, spec.fps, spec.max_frames) == (proc.min_pixels, proc.max_pixels, 1.0, 6)
    clip = spec.for_clip(40, 10.0)  # 4 s at 1 fps: 4 frames
    assert len(clip.plan(40, 10.0, 480, 640).indices) == 4
    assert (clip.min_pixels, clip.max_pixels) == (16_000, 200_000)
    assert clip.frame_max_pixels is None and clip.frame_min_pixels is None


def test_float32_arange_ints_is_torchs():
    """Qwen2-VL's frame picks without torch equal `torch.arange(0, total, total / n).int()` (float32)."""
    import torch

    from vlmtune.models.video_grid import float32_arange_ints

    cases = [(total, n) for total in range(1, 2400, 13) for n in range(2, min(total, 300) + 1, 2)]
    cases += [(10, 3), (7, 3), (1000, 999), (99991, 768), (3001, 600)]
    for total, n in cases:
        want = tuple(int(i) for i in torch.arange(0, total, total / n).int().tolist())
        assert float32_arange_ints(total, total / n) == want, (total, n)
