"""Batches for the model, and the guard that re-checks every sample before the forward.

The guard turns what would be `Image features and image tokens do not match` (or `Video features and
video tokens do not match`, or a broadcast error) deep inside the model into an error that names the
sample and its source line.

Runs: an image is one `<|vision_start|> <|image_pad|>×n <|vision_end|>` run. A video is one run of
`<|video_pad|>` × t·h·w/merge² for Qwen2-VL and Qwen2.5-VL; for Qwen3-VL it is t runs of h·w/merge²
pads, one per temporal patch, each after its `<T seconds>` timestamp text (docs/video.md).
"""

from __future__ import annotations

import numpy as np
import torch

from ...errors import SampleError
from ...models.spec import ModelSpec
from ..media.images import open_rgb
from ..media.paths import shorten
from ..schema import VIDEO_COLUMNS, RowView  # rows without videos may lack the video columns
from ..sources.formats import EmbeddedError, image_source
from .encode import IGNORE_INDEX


def frames_apart(spec) -> bool:
    """Whether the family writes a video as one run per temporal patch (Qwen3-VL's timestamps)."""
    return spec.video_timestamps


def scan_runs(input_ids: list[int], spec: ModelSpec):
    """(image runs, video runs, errors): each run (first pad position, pad count), in order of appearance.

    A run is `<|vision_start|> pad×n <|vision_end|>` with pads of one kind; an empty
    `<|vision_start|><|vision_end|>` pair counts as an image run of 0 pads (as it always has)."""
    image_runs, video_runs, errors = [], [], []
    i, n = 0, len(input_ids)
    ipad, vpad = spec.image_token_id, spec.video_token_id
    start, end = spec.vision_start_token_id, spec.vision_end_token_id
    while i < n:
        t = input_ids[i]
        if t == start:
            j = i + 1
            pad = input_ids[j] if j < n and input_ids[j] in (ipad, vpad) else ipad
            what = "video" if pad == vpad else "image"
            while j < n and input_ids[j] == pad:
                j += 1
            count = j - i - 1
            if j < n and input_ids[j] == end:
                (video_runs if pad == vpad else image_runs).append((i + 1, count))
                i = j + 1
                continue
            if j < n and count > 0 and input_ids[j] in (ipad, vpad):
                errors.append(f"{what} run at position {i} mixes image and video pad tokens")
                while j < n and input_ids[j] in (ipad, vpad):
                    j += 1
            elif count > 0:
                errors.append(f"{what} run at position {i} has {count} pad tokens and no {spec.vision_end_token}")
            i = j
            continue
        if t == ipad or t == vpad:
            what = "image" if t == ipad else "video"
            errors.append(f"{what} pad token at position {i} is outside any "
                          f"{spec.vision_start_token}…{spec.vision_end_token} run")
            while i < n and input_ids[i] == t:
                i += 1
            continue
        i += 1
    return image_runs, video_runs, errors


def find_runs(input_ids: list[int], spec: ModelSpec) -> tuple[list[tuple[int, int]], list[str]]:
    """Image runs `<|vision_start|> pad×n <|vision_end|>` and any malformation found on the way
    (video runs: `scan_runs`)."""
    image_runs, _, errors = scan_runs(input_ids, spec)
    return image_runs, errors


def check_row(row: dict, spec: ModelSpec, cutoff_len: int | None) -> list[str]:
    """Every integrity problem of one row (empty list when it is safe to feed to the model)."""
    problems = []
    r = RowView(row)
    ids, labels = row["input_ids"], row["labels"]
    segments = r.segments
    if segments and sum(segments) != len(ids):
        problems.append(f"packed segments {segments} add up to {sum(segments)}, not {len(ids)} tokens")
    grids = r.image_grid_thw
    images = r.images
    if cutoff_len is not None and len(ids) > cutoff_len:
        problems.append(f"{len(ids)} tokens exceed cutoff_len={cutoff_len}")
    if len(labels) != len(ids):
        problems.append(f"{len(labels)} labels for {len(ids)} input ids")
    runs, video_runs, errors = scan_runs(ids, spec)
    problems += errors
    if not (len(runs) == len(images) == len(grids)):
        problems.append(f"{len(runs)} image runs, {len(images)} images and {len(grids)} grids (must be equal)")
    merge2 = spec.merge_size ** 2
    for k, ((_, n), g) in enumerate(zip(runs, grids)):
        want = g[0] * g[1] * g[2] // merge2
        if n != want:
            problems.append(f"image {k} has a run of {n} pad tokens but its grid {list(g)} needs {want}")
    problems += _check_videos(r, video_runs, spec)
    return problems


def _check_videos(row: RowView, runs: list[tuple[int, int]], spec: ModelSpec) -> list[str]:
    problems = []
    videos = row.videos
    grids = row.video_grid_thw
    for name in VIDEO_COLUMNS[2:]:
        col = getattr(row, name) if row.has(name) else None
        if col is not None and len(col) != len(videos) and (videos or col):
            problems.append(f"{len(col)} entries in {name} for {len(videos)} videos (must be equal)")
    merge2 = spec.merge_size ** 2
    if not frames_apart(spec):
        if not (len(runs) == len(videos) == len(grids)):
            problems.append(f"{len(runs)} video runs, {len(videos)} videos and {len(grids)} grids (must be equal)")
        for k, ((_, n), g) in enumerate(zip(runs, grids)):
            want = g[0] * g[1] * g[2] // merge2
            if n != want:
                problems.append(f"video {k} has a run of {n} pad tokens but its grid {list(g)} needs {want}")
        return problems
    # Qwen3-VL: video k is t_k runs (one per temporal patch) of h·w/merge² pads each
    need = sum(int(g[0]) for g in grids)
    if not (len(videos) == len(grids)) or len(runs) != need:
        problems.append(f"{len(runs)} video runs, {len(videos)} videos and {len(grids)} grids needing {need} runs "
                        "(one per temporal patch; must agree)")
    r = 0
    for k, g in enumerate(grids):
        want = g[1] * g[2] // merge2
        for f in range(int(g[0])):
            if r >= len(runs):
                return problems
            n = runs[r][1]
            if n != want:
                problems.append(f"video {k} temporal patch {f} has a run of {n} pad tokens but its grid {list(g)} "
                                f"needs {want} per patch")
            r += 1
    return problems


def _key(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


class Collator:
    """Pads rows, produces pixels for exactly the recorded grids, and guards the forward.

    `video` is the run's VideoSpec (models/video_grid.py, with the config applied); packing Qwen2.5-VL rows
    with videos needs its `tokens_per_second` (the config's vision_config.tokens_per_second)."""

    def __init__(self, processor, spec: ModelSpec, cutoff_len: int | None = None, video=None):
        self.image_processor = processor.image_processor
        self.video_processor = getattr(processor, "video_processor", None)
        self.spec = spec
        self.cutoff_len = cutoff_len
        self.video = video

    def __call__(self, rows: list[dict]) -> dict:
        for row in rows:
            self.guard(row)
        return self.collate(rows)

    def collate(self, rows: list[dict]) -> dict:
        """The batch of rows already guarded (`guard`; pair_collate guards both sides of a pair itself)."""
        batch = self._pad(rows)
        if any(RowView(r).segments for r in rows):
            batch = self._packed(rows, batch)
        views = [RowView(r) for r in rows]
        # An image or clip the batch holds twice (a preference pair's two sides share the prompt's) is decoded and
        # processed once: the same file at the same bounds and grid gives the same pixels.
        seen: dict[tuple, tuple] = {}
        pixels, grids = [], []
        for row in views:
            for k, path in enumerate(row.images):
                key = (path, int(row.image_min_pixels[k]), int(row.image_max_pixels[k]), _key(row.image_grid_thw[k]))
                if key not in seen:
                    seen[key] = self._pixels(row, k, path)
                pv, grid = seen[key]
                pixels.append(pv)
                grids.append(grid)
        if pixels:
            batch["pixel_values"] = torch.cat(pixels, dim=0)
            batch["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        vpixels, vgrids, seconds = [], [], []
        for row in views:
            for k, path in enumerate(row.videos):
                key = ("video", path, _key(row.video_frames[k]), int(row.video_min_pixels[k]),
                       int(row.video_max_pixels[k]), _key(row.video_grid_thw[k]))
                if key not in seen:
                    seen[key] = self._video_pixels(row, k, path)
                pv, grid, second = seen[key]
                vpixels.append(pv)
                vgrids.append(grid)
                seconds.append(second)
        if vpixels:
            batch["pixel_values_videos"] = torch.cat(vpixels, dim=0)
            batch["video_grid_thw"] = torch.tensor(vgrids, dtype=torch.long)
            if self.spec.video_absolute_time:
                # float32, as the processor returns it: the model's M-RoPE time axis is
                # (arange(t) * tokens_per_second * second_per_grid_ts).long(), computed in this dtype
                batch["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
        return batch

    def guard(self, row: dict) -> None:
        problems = check_row(row, self.spec, self.cutoff_len)
        if problems:
            raise SampleError(
                *RowView(row).named(), "; ".join(problems),
                "this row would crash the model's forward; run `vlmtune prepare` again with overwrite_cache=true",
            )

    def _pixels(self, row: RowView, k: int, path: str):
        shown = shorten(path, 300)
        try:
            im = open_rgb(image_source(path))
        except (OSError, ValueError, EmbeddedError) as e:
            raise SampleError(*row.named(),
                              f"image {k} ({shown}) could not be read at training time: {e}",
                              "restore the file, or run `vlmtune prepare` again so the sample is re-validated") from e
        size = {"shortest_edge": int(row.image_min_pixels[k]), "longest_edge": int(row.image_max_pixels[k])}
        out = self.image_processor(images=[im], size=size, return_tensors="pt")
        grid = [int(x) for x in out["image_grid_thw"][0].tolist()]
        want = [int(x) for x in row.image_grid_thw[k]]
        if grid != want:
            raise SampleError(*row.named(),
                              f"image {k} ({shown}) now gives grid {grid} but was prepared as {want}; the file changed",
                              "run `vlmtune prepare` again with overwrite_cache=true")
        return out["pixel_values"], grid

    def _video_pixels(self, row: RowView, k: int, path: str):
        """Decode exactly the planned frames and hand them to the video processor unsampled (data/media/video.clip_inputs)."""
        from ..media.video import VideoReadError, clip_inputs

        shown = shorten(path, 300)
        sample, source = row.named()
        if self.video_processor is None:
            raise SampleError(sample, source, f"video {k} ({shown}): the processor has no video_processor",
                              "train a Qwen-VL checkpoint whose processor handles videos")
        try:
            clip = clip_inputs(path, row.video_frames[k], rotation=int(row.video_rotation[k]),
                               total_frames=int(row.video_total_frames[k]), fps=float(row.video_fps[k]),
                               min_pixels=int(row.video_min_pixels[k]), max_pixels=int(row.video_max_pixels[k]),
                               cap_pixels_per_frame=bool(getattr(self.video_processor, "cap_pixels_per_frame", None)))
        except VideoReadError as e:
            raise SampleError(sample, source, f"video {k} ({shown}) could not be decoded at training time: {e.what}",
                              f"{e.fix}, or run `vlmtune prepare` again so the sample is re-validated") from e
        metadata = clip.metadata
        out = self.video_processor(videos=[clip.frames], video_metadata=[metadata], **clip.kwargs, return_tensors="pt")
        grid = [int(x) for x in out["video_grid_thw"][0].tolist()]
        want = [int(x) for x in row.video_grid_thw[k]]
        if grid != want:
            raise SampleError(sample, source,
                              f"video {k} ({shown}) now gives grid {grid} but was prepared as {want}; the file changed",
                              "run `vlmtune prepare` again with overwrite_cache=true")
        second = 0.0
        if self.spec.video_absolute_time:
            # what Qwen2_5_VLProcessor computes (temporal_patch_size / the sampled fps), checked against the row
            second = self.video_processor.temporal_patch_size / metadata.sampled_fps
            recorded = float((row.video_second_per_grid or [0.0] * (k + 1))[k])
            if abs(recorded - second) > 1e-9 * second:
                raise SampleError(sample, source,
                                  f"video {k} ({shown}) has second_per_grid {recorded} but its frames give {second}",
                                  "run `vlmtune prepare` again with overwrite_cache=true")
        return out["pixel_values_videos"], grid, second

    def _packed(self, rows: list[dict], batch: dict) -> dict:
        """Packed rows: per-segment positions and no attention mask (transformers then builds the
        block-diagonal mask from where the text positions restart)."""
        from .pack import packed_position_ids

        length = batch["input_ids"].shape[1]
        tps = self._tokens_per_second(rows)
        pos = [packed_position_ids(r if r.get("segments") else {**r, "segments": [len(r["input_ids"])]},
                                   self.spec, length, tokens_per_second=tps) for r in rows]
        batch["position_ids"] = torch.from_numpy(np.stack(pos, axis=1))
        del batch["attention_mask"]
        # transformers only derives the packed mask without a KV cache; training never needs one.
        batch["use_cache"] = False
        return batch

    def _tokens_per_second(self, rows: list[dict]) -> float | None:
        if not self.spec.video_absolute_time or not any(r.get("videos") for r in rows):
            return None
        tps = getattr(self.video, "tokens_per_second", None)
        if tps is None:
            raise ValueError("packing Qwen2.5-VL rows with videos needs the config's vision_config.tokens_per_second: "
                             "pass Collator(..., video=VideoSpec.from_processor(processor, config))")
        return tps

    def _pad(self, rows: list[dict]) -> dict:
        longest = max(len(r["input_ids"]) for r in rows)
        n = len(rows)
        input_ids = torch.full((n, longest), self.spec.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, longest), dtype=torch.long)
        for i, r in enumerate(rows):
            L = len(r["input_ids"])
            input_ids[i, :L] = torch.tensor(r["input_ids"], dtype=torch.long)
            labels[i, :L] = torch.tensor(r["labels"], dtype=torch.long)
            attention[i, :L] = 1
        mm = ((input_ids == self.spec.image_token_id).to(torch.int32)
              + 2 * (input_ids == self.spec.video_token_id).to(torch.int32)) * attention.to(torch.int32)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "mm_token_type_ids": mm}
