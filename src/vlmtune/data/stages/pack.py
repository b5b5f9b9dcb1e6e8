"""Packing fitted samples into cutoff_len sequences, each sample positioned as if it stood alone.

A packed row concatenates whole samples (so whole image runs); `segments` records each sample's
length. The collator gives every segment its own M-RoPE positions (text positions restart at 0)
and passes `position_ids` of shape (4, batch, length) with no attention mask: transformers then
derives a block-diagonal causal mask from the restarts in the text positions (and flash-attention
uses them as varlen boundaries), so no token attends across samples.
"""

from __future__ import annotations

import bisect
import os

import numpy as np

from ...models.spec import ModelSpec
from ..schema import PackedRow, Row, features, packed_columns, required_columns

# the list columns a pack concatenates (declared in data/schema.Row). The optional ones (the video columns) are
# packed when the dataset (or any row) has them, a row without them adding [].
PACKED_COLUMNS = packed_columns(Row)
REQUIRED_COLUMNS = required_columns(Row)


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each item (longest first) goes into the fullest bin it still fits."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # (remaining capacity, bin index), kept sorted so the tightest fitting bin is found by bisection
    free: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item {i} has length {n} > capacity {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
            room -= n
        else:
            bins.append([i])
            b, room = len(bins) - 1, capacity - n
        bisect.insort(free, (room, b))
    return [sorted(b) for b in bins]


def pack_rows(rows: list[dict], cutoff_len: int) -> list[dict]:
    """Combine rows into packed rows of at most cutoff_len tokens (order inside a pack: input order)."""
    bins = best_fit([len(r["input_ids"]) for r in rows], cutoff_len)
    return pack_rows_in_bins([[rows[i] for i in members] for members in sorted(bins, key=lambda b: b[0])])


def pack_dataset(ds, cutoff_len: int, path: str | None = None, batch: int = 1024):
    """A `datasets.Dataset` of packed rows from a prepared one, planned from its `length` column alone.

    The bins come from the lengths (4 bytes per row, memory-mapped column); the packed rows are then built a
    batch of packs at a time and written to `path` (an Arrow file, written next to it and renamed; a temporary
    folder when None), so memory holds one batch of rows, not the dataset."""
    import tempfile

    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter

    from ..schema import table

    lengths = ds.with_format("numpy")["length"] if "length" in ds.column_names else None
    if lengths is None:
        lengths = [len(x) for x in ds["input_ids"]]
    bins = sorted(best_fit([int(n) for n in lengths], cutoff_len), key=lambda b: b[0])
    columns = tuple(c for c in PACKED_COLUMNS if c in REQUIRED_COLUMNS or c in ds.column_names)
    feats = features(PackedRow, [*columns, "id", "source", "segments", "length"])
    if path is None:
        path = os.path.join(tempfile.mkdtemp(prefix="vlmtune-packed-"), "packed.arrow")
    tmp = f"{path}.tmp-{os.getpid()}"
    with ArrowWriter(features=feats, path=tmp) as writer:
        for i in range(0, len(bins), batch):
            group = bins[i : i + batch]
            flat = [k for b in group for k in b]
            rows = ds.select(flat).to_list()
            it = iter(rows)
            packed = pack_rows_in_bins([[next(it) for _ in b] for b in group], columns)
            writer.write_table(table(packed, feats))
        writer.finalize()
    os.replace(tmp, path)
    return Dataset.from_file(path)


def pack_rows_in_bins(groups: list[list[dict]], columns: tuple[str, ...] | None = None) -> list[dict]:
    """One packed row per group of rows (in the group's order). `columns`: the list columns to concatenate
    (default: PACKED_COLUMNS, the video ones only when any row has them; a row without one adds [])."""
    if columns is None:
        present = {c for g in groups for r in g for c in r}
        columns = tuple(c for c in PACKED_COLUMNS if c in REQUIRED_COLUMNS or c in present)
    packed = []
    for group in groups:
        out = {c: [x for r in group for x in (r.get(c) or [])] for c in columns}
        out["id"] = "+".join(r["id"] for r in group)
        out["source"] = "; ".join(r["source"] for r in group)
        out["segments"] = [len(r["input_ids"]) for r in group]
        out["length"] = sum(out["segments"])
        packed.append(out)
    return packed


def mrope_positions(
    input_ids: list[int],
    grids: list[list[int]],
    image_token_id: int,
    merge_size: int,
    *,
    video_token_id: int | None = None,
    video_grids: list[list[int]] | None = None,
    video_seconds: list[float] | None = None,
    tokens_per_second: float | None = None,
    frames_apart: bool = False,
) -> np.ndarray:
    """(3, L) M-RoPE positions of one sample alone, as Qwen-VL's `get_rope_index` (transformers 5.24) computes
    them: text advances all three axes together; a vision run spans its (t, h/merge, w/merge) grid from the
    current position, and the text after it continues at the current position + max(h, w)/merge (not past
    the time axis: the model does not advance by t).

    Images and videos are consumed in order of appearance. Videos: the time axis is arange(t) + start, except
    Qwen2.5-VL (`video_seconds` given: its second_per_grid_ts) where it is
    (arange(t) · tokens_per_second · second_per_grid).long() + start, in float32 as the model computes it;
    Qwen3-VL (`frames_apart`) splits each video into t runs of t=1 (each temporal patch positioned like an
    image, its timestamp text between them)."""
    ids = np.asarray(input_ids)
    pos = np.zeros((3, len(ids)), dtype=np.int64)
    kind = (ids == image_token_id).astype(np.int8)
    if video_token_id is not None:
        kind[ids == video_token_id] = 2
    # the model's sequence of video grids (Qwen3-VL: one t=1 grid per temporal patch) and time intervals
    vgrids: list[tuple[list[int], object]] = []
    for v, g in enumerate(video_grids or []):
        t, h, w = (int(x) for x in g)
        if frames_apart:
            vgrids += [([1, h, w], None)] * t
        else:
            vgrids.append(([t, h, w], None if video_seconds is None else video_seconds[v]))
    cur, i, k, v = 0, 0, 0, 0
    n = len(ids)
    while i < n:
        j = i
        while j < n and kind[j] == kind[i]:
            j += 1
        if kind[i] == 0:
            pos[:, i:j] = np.arange(cur, cur + j - i)
            cur += j - i
        else:
            if kind[i] == 1:
                (t, h, w), seconds = grids[k], None
                k += 1
            else:
                (t, h, w), seconds = vgrids[v]
                v += 1
            gh, gw = h // merge_size, w // merge_size
            if j - i != t * gh * gw:
                raise ValueError(f"a run of {j - i} vision tokens at position {i} does not match its grid {[t, h, w]}")
            times = np.arange(t)
            if seconds is not None:
                import torch

                interval = tokens_per_second * torch.tensor(float(seconds), dtype=torch.float32)
                times = (torch.arange(t) * interval).long().numpy()
            tt, hh, ww = np.meshgrid(times, np.arange(gh), np.arange(gw), indexing="ij")
            pos[0, i:j] = tt.reshape(-1) + cur
            pos[1, i:j] = hh.reshape(-1) + cur
            pos[2, i:j] = ww.reshape(-1) + cur
            cur += max(gh, gw)
        i = j
    return pos


def packed_position_ids(row: dict, spec: ModelSpec, length: int, *,
                        tokens_per_second: float | None = None) -> np.ndarray:
    """(4, length): text positions restarting per segment, then the three M-RoPE axes; padding
    after the last segment forms a segment of its own. `spec` gives the image and video pad tokens, the merge
    size and the family's traits (video_timestamps: one run per temporal patch; video_absolute_time: Qwen2.5-VL's
    time axis, which needs `tokens_per_second`: the model config's, read into models/video_grid.VideoSpec,
    not a processor fact the spec holds)."""
    out = np.zeros((4, length), dtype=np.int64)
    start, g, v = 0, 0, 0
    grids = row["image_grid_thw"]
    vgrids = row.get("video_grid_thw") or []
    seconds = row.get("video_second_per_grid") or []
    apart, timed = spec.video_timestamps, spec.video_absolute_time
    ids = row["input_ids"]
    for seg in row["segments"]:
        seg_ids = ids[start : start + seg]
        n_img = _count_runs(seg_ids, spec.image_token_id)
        n_vid = 0
        if vgrids:
            runs = _count_runs(seg_ids, spec.video_token_id)
            if apart:  # a Qwen3-VL / Qwen3.5 video is one run per temporal patch
                while runs > 0 and v + n_vid < len(vgrids):
                    runs -= int(vgrids[v + n_vid][0])
                    n_vid += 1
            else:
                n_vid = runs
        if timed and n_vid and tokens_per_second is None:
            raise ValueError("Qwen2.5-VL video positions need the config's vision_config.tokens_per_second")
        out[0, start : start + seg] = np.arange(seg)
        out[1:, start : start + seg] = mrope_positions(
            seg_ids, grids[g : g + n_img], spec.image_token_id, spec.merge_size,
            video_token_id=spec.video_token_id, video_grids=vgrids[v : v + n_vid],
            video_seconds=seconds[v : v + n_vid] if timed else None,
            tokens_per_second=tokens_per_second, frames_apart=apart,
        )
        g += n_img
        v += n_vid
        start += seg
    if start < length:
        out[:, start:] = np.arange(length - start)
    return out


def _count_runs(ids: list[int], pad: int) -> int:
    runs, prev = 0, False
    for t in ids:
        cur = t == pad
        runs += cur and not prev
        prev = cur
    return runs
