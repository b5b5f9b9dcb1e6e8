"""Header facts of a video clip, and decoding exactly the frames accounting sampled.

`read_facts` gives what video accounting needs (frame count, average frame rate, duration, the displayed
size, the rotation) from the container, through PyAV, without decoding the clip: the count is the number of
video packets the demuxer delivers, which reads packet headers only (a container's own count, where it keeps
one, can include frames an MP4 edit list discards, and WebM/Matroska keep none). One exception: PyAV 18 does not expose
a stream's display matrix, so the first frame is decoded to read its rotation side data (which also
proves that the codec can be decoded before training starts, not hours in).

`decode_frames` decodes a clip once, front to back, keeping only the frames at the given indices (memory:
the kept frames), rotated upright as `read_facts` reported the size. The collator hands exactly these
frames to the processor with `do_sample_frames=False` (docs/video.md).

Why PyAV and not torchcodec: PyAV's wheels bundle FFmpeg, while torchcodec needs the system's FFmpeg
libraries (this machine, and many training images, have none); transformers' own torchcodec path would
decode whole clips inside the processor.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

# FFmpeg's AV_TIME_BASE: container durations are in microseconds.
_AV_TIME_BASE = 1_000_000


class VideoReadError(ValueError):
    """A clip that cannot be accounted for or decoded; `kind` says why, `fix` what to do."""

    def __init__(self, path: str, kind: str, what: str, fix: str):
        self.path, self.kind, self.what, self.fix = str(path), kind, what, fix
        super().__init__(f"{path}: {what}; {fix}")

    def __reduce__(self):  # survive pickling across worker processes
        return (type(self), (self.path, self.kind, self.what, self.fix))


@dataclass(frozen=True)
class VideoFacts:
    """One clip as the collator will decode it. `width` × `height` is the displayed size (rotation
    applied, as `decode_frames` returns the frames); `rotation` is counter-clockwise degrees (0, 90, 180,
    270). `frames` is the number of video packets the demuxer delivers (what the decoder gets);
    `header_frames` the container's own count (0 where it keeps none, as WebM and Matroska), for reports."""

    frames: int
    fps: float
    duration: float
    width: int
    height: int
    rotation: int
    codec: str
    header_frames: int = 0

    @property
    def stored_size(self) -> tuple[int, int]:
        """(width, height) as stored in the stream, before rotation."""
        return (self.height, self.width) if self.rotation in (90, 270) else (self.width, self.height)


def decoder_version() -> str | None:
    """'PyAV 18.1.0 (FFmpeg 8.1.2)', or None when PyAV is not installed (doctor reports it)."""
    try:
        import av
    except ImportError:
        return None
    return f"PyAV {av.__version__} (FFmpeg {getattr(av, 'ffmpeg_version_info', '?')})"


def read_facts(path: str) -> VideoFacts:
    """Frame count, frame rate, duration, displayed size and rotation of the clip's first video stream."""
    av = _av(path)
    container = _open(av, path)
    try:
        stream = _video_stream(container, path)
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
        if width <= 0 or height <= 0:
            raise VideoReadError(path, "no_size", f"the video stream has no frame size ({width}x{height})",
                                 "re-encode the clip")
        header_frames = int(stream.frames or 0)
        frames = _count_packets(container, stream)
        if frames <= 0:
            raise VideoReadError(path, "no_frames", "the video stream has no frames", "remove the clip or re-encode it")
        rotation = _first_frame_rotation(av, path)
        duration = _duration(container, stream)
        fps = _frame_rate(stream, frames, duration)
        if fps is None:
            raise VideoReadError(path, "no_frame_rate", "the container gives no frame rate and no duration",
                                 "re-encode the clip (e.g. ffmpeg -i IN -r 30 OUT.mp4)")
        if duration is None:
            duration = frames / fps
        return VideoFacts(
            frames=frames,
            fps=fps,
            duration=float(duration),
            width=height if rotation in (90, 270) else width,
            height=width if rotation in (90, 270) else height,
            rotation=rotation,
            codec=str(stream.codec_context.name),
            header_frames=header_frames,
        )
    finally:
        container.close()


def decode_frames(path: str, indices, rotation: int | None = None):
    """The frames at `indices` (repeats allowed) as one uint8 array (n, height, width, 3), RGB, upright.

    `rotation` is the clip's (from read_facts); None reads it from the frames. An index past the last
    decodable frame raises VideoReadError, naming how many frames there were.
    """
    import numpy as np

    av = _av(path)
    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        raise ValueError("decode_frames needs at least one frame index")
    if wanted[0] < 0:
        raise ValueError(f"frame index {wanted[0]} is negative")
    container = _open(av, path)
    kept: dict[int, object] = {}
    try:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        want, last, i = set(wanted), wanted[-1], -1
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i in want:
                    turn = _right_angle(frame.rotation, path) if rotation is None else rotation
                    kept[i] = _upright(frame.to_ndarray(format="rgb24"), turn)
                if i >= last:
                    break
        except av.error.FFmpegError as e:
            raise VideoReadError(path, "undecodable", f"decoding failed after frame {i}: {e}",
                                 "re-encode the clip or remove it") from None
    finally:
        container.close()
    missing = [j for j in wanted if j not in kept]
    if missing:
        raise VideoReadError(path, "short", f"frame {missing[0]} was asked for but the clip decodes to {i + 1} frame(s)",
                             "the clip is corrupt or its frame count is wrong: re-encode it")
    return np.stack([kept[int(j)] for j in indices])


@dataclass(frozen=True)
class ClipInputs:
    """A planned clip as the video processor takes it: the decoded frames, their metadata and the keyword
    arguments that keep the processor from sampling or resizing differently than the plan."""

    frames: object  # uint8 array (n, height, width, 3), RGB, upright
    metadata: object  # transformers' VideoMetadata(total_num_frames, fps, frames_indices)
    kwargs: dict  # the video processor's kwargs: do_sample_frames=False, size, input_data_format, cap

    @property
    def indices(self) -> list[int]:
        return list(self.metadata.frames_indices)


def clip_inputs(path: str, indices, *, rotation: int, total_frames: int, fps: float, min_pixels: int,
                max_pixels: int, cap_pixels_per_frame: bool) -> ClipInputs:
    """Decode exactly the planned frames of a clip and say how to hand them to the video processor.

    The one place a planned clip (models/video_grid.plan_video, or a prepared row's video columns) becomes
    processor inputs, for the collator and for `vlmtune chat`: the processor gets exactly these frames with
    `do_sample_frames=False` (it neither samples nor decodes), the clip's own `size` bounds, and
    `input_data_format="channels_last"` (frames with a side of 3 px or less would have their channel axis
    guessed wrong). Raises VideoReadError as `decode_frames` does.
    """
    from transformers.video_utils import VideoMetadata

    indices = [int(i) for i in indices]
    frames = decode_frames(path, indices, int(rotation))
    metadata = VideoMetadata(total_num_frames=int(total_frames), fps=float(fps), frames_indices=indices)
    kwargs = {"do_sample_frames": False, "size": {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)},
              "input_data_format": "channels_last", "cap_pixels_per_frame": bool(cap_pixels_per_frame)}
    return ClipInputs(frames, metadata, kwargs)


@dataclass(frozen=True)
class PlannedClip:
    """A clip's header facts and what a VideoSpec makes of it: the clip's own spec (`VideoSpec.for_clip`: the
    processor bounds it is resized under) and its plan (sampled frames, grid, tokens)."""

    facts: VideoFacts
    spec: object  # models.video_grid.VideoSpec, for this clip
    grid: object  # models.video_grid.VideoGrid


def plan_clip(path: str, spec, facts: VideoFacts | None = None) -> PlannedClip:
    """The clip at `path` (its facts read here unless given) planned under the run's VideoSpec. Raises
    VideoReadError for an unreadable clip and models.video_grid.VideoSampleError for one the processor refuses."""
    facts = read_facts(path) if facts is None else facts
    clip_spec = spec.for_clip(facts.frames, facts.fps)
    return PlannedClip(facts, clip_spec, clip_spec.plan(facts.frames, facts.fps, facts.height, facts.width))


def planned_inputs(path: str, planned: PlannedClip) -> ClipInputs:
    """`clip_inputs` for a planned clip: its sampled frames decoded, with its own bounds."""
    f, s = planned.facts, planned.spec
    return clip_inputs(path, planned.grid.indices, rotation=f.rotation, total_frames=f.frames, fps=f.fps,
                       min_pixels=s.min_pixels, max_pixels=s.max_pixels, cap_pixels_per_frame=s.cap_pixels_per_frame)


def _av(path):
    try:
        import av
    except ImportError:
        raise VideoReadError(path, "no_decoder", "PyAV is not installed", "pip install av (vlmtune[video])") from None
    return av


def _open(av, path):
    try:
        return av.open(str(path), mode="r")
    except FileNotFoundError:
        raise VideoReadError(path, "missing", "the file does not exist", "fix the path or media_dir") from None
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoReadError(path, "unreadable", f"not a readable video container ({e})",
                             "remove the file or re-encode it (mp4/webm/mkv)") from None


def _video_stream(container, path):
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        container.close()
        if not kinds:  # e.g. an MP4 cut before its index (moov), which is written last
            raise VideoReadError(path, "unreadable", "the container holds no stream (truncated?)",
                                 "re-encode or re-download the clip, or remove it")
        raise VideoReadError(path, "no_video_stream", f"the file has no video stream (streams: {', '.join(kinds)})",
                             "pass a video clip, or remove it from the sample's videos")
    return container.streams.video[0]


def _first_frame_rotation(av, path) -> int:
    # a fresh container: seeking back after demuxing to the end fails on some files (EPERM)
    container = _open(av, path)
    try:
        for frame in container.decode(_video_stream(container, path)):
            return _right_angle(frame.rotation, path)
    except av.error.FFmpegError as e:
        raise VideoReadError(path, "undecodable", f"its first frame cannot be decoded ({e})",
                             "re-encode the clip or remove it") from None
    finally:
        container.close()
    raise VideoReadError(path, "no_frames", "the video stream has no decodable frame", "remove the clip or re-encode it")


def _right_angle(rotation, path) -> int:
    r = float(rotation or 0)
    if r % 90:
        raise VideoReadError(path, "rotation", f"its display matrix rotates by {r:g} degrees, not a right angle",
                             "re-encode the clip upright (ffmpeg applies the rotation by default)")
    return int(r) % 360


def _upright(array, rotation: int):
    """Rotate a stored frame counter-clockwise by `rotation` degrees, as players display it."""
    import numpy as np

    return np.ascontiguousarray(np.rot90(array, k=rotation // 90)) if rotation else array


def _count_packets(container, stream) -> int:
    # Demuxing reads packet headers only. Empty packets are the demuxer's end-of-stream flush; packets
    # flagged discard (outside an MP4 edit list) are dropped by the decoder, so a header's sample count
    # can be higher than what decodes.
    return sum(1 for p in container.demux(stream) if p.size > 0 and not p.is_discard)


def _duration(container, stream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / _AV_TIME_BASE
    return None


def _frame_rate(stream, frames: int, duration: float | None) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate):
        if isinstance(rate, Fraction) and rate > 0:
            return float(rate)
    if duration:
        return frames / duration
    return None
