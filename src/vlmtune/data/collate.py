"""Batches for the model, and the guard that re-checks every sample before the forward.

The guard turns what would be `Image features and image tokens do not match` (or a broadcast
error) deep inside the model into an error that names the sample and its source line.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import SampleError
from ..models.spec import ModelSpec
from .encode import IGNORE_INDEX
from .formats import EmbeddedError, image_source
from .images import open_rgb


def find_runs(input_ids: list[int], spec: ModelSpec) -> tuple[list[tuple[int, int]], list[str]]:
    """Image runs `<|vision_start|> pad×n <|vision_end|>` and any malformation found on the way."""
    runs, errors = [], []
    i, n = 0, len(input_ids)
    pad, start, end = spec.image_token_id, spec.vision_start_token_id, spec.vision_end_token_id
    while i < n:
        t = input_ids[i]
        if t == start:
            j = i + 1
            while j < n and input_ids[j] == pad:
                j += 1
            if j < n and input_ids[j] == end:
                runs.append((i + 1, j - i - 1))
            elif j < n and input_ids[j] == spec.video_token_id:
                errors.append(f"video run at position {i}: videos are not supported")
            elif j - i - 1 > 0:
                errors.append(f"image run at position {i} has {j - i - 1} pad tokens and no {spec.vision_end_token}")
            i = j + 1 if j < n and input_ids[j] == end else j
            continue
        if t == pad:
            errors.append(f"image pad token at position {i} is outside any {spec.vision_start_token}…{spec.vision_end_token} run")
            while i < n and input_ids[i] == pad:
                i += 1
            continue
        i += 1
    return runs, errors


def check_row(row: dict, spec: ModelSpec, cutoff_len: int | None) -> list[str]:
    """Every integrity problem of one row (empty list when it is safe to feed to the model)."""
    problems = []
    ids, labels = row["input_ids"], row["labels"]
    segments = row.get("segments")
    if segments and sum(segments) != len(ids):
        problems.append(f"packed segments {segments} add up to {sum(segments)}, not {len(ids)} tokens")
    grids = row.get("image_grid_thw") or []
    images = row.get("images") or []
    if cutoff_len is not None and len(ids) > cutoff_len:
        problems.append(f"{len(ids)} tokens exceed cutoff_len={cutoff_len}")
    if len(labels) != len(ids):
        problems.append(f"{len(labels)} labels for {len(ids)} input ids")
    runs, errors = find_runs(ids, spec)
    problems += errors
    if not (len(runs) == len(images) == len(grids)):
        problems.append(f"{len(runs)} image runs, {len(images)} images and {len(grids)} grids (must be equal)")
    merge2 = spec.merge_size ** 2
    for k, ((_, n), g) in enumerate(zip(runs, grids)):
        want = g[0] * g[1] * g[2] // merge2
        if n != want:
            problems.append(f"image {k} has a run of {n} pad tokens but its grid {list(g)} needs {want}")
    return problems


class Collator:
    """Pads rows, produces pixels for exactly the recorded grids, and guards the forward."""

    def __init__(self, processor, spec: ModelSpec, cutoff_len: int | None = None):
        self.image_processor = processor.image_processor
        self.spec = spec
        self.cutoff_len = cutoff_len

    def __call__(self, rows: list[dict]) -> dict:
        for row in rows:
            self.guard(row)
        batch = self._pad(rows)
        if any(r.get("segments") for r in rows):
            batch = self._packed(rows, batch)
        pixels, grids = [], []
        for row in rows:
            for k, path in enumerate(row.get("images") or []):
                pv, grid = self._pixels(row, k, path)
                pixels.append(pv)
                grids.append(grid)
        if pixels:
            batch["pixel_values"] = torch.cat(pixels, dim=0)
            batch["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        return batch

    def guard(self, row: dict) -> None:
        problems = check_row(row, self.spec, self.cutoff_len)
        if problems:
            raise SampleError(
                str(row.get("id")), str(row.get("source")), "; ".join(problems),
                "this row would crash the model's forward; run `vlmtune prepare` again with overwrite_cache=true",
            )

    def _pixels(self, row: dict, k: int, path: str):
        shown = path if len(path) <= 300 else path[:297] + "..."
        try:
            im = open_rgb(image_source(path))
        except (OSError, ValueError, EmbeddedError) as e:
            raise SampleError(str(row.get("id")), str(row.get("source")),
                              f"image {k} ({shown}) could not be read at training time: {e}",
                              "restore the file, or run `vlmtune prepare` again so the sample is re-validated") from e
        size = {"shortest_edge": int(row["image_min_pixels"][k]), "longest_edge": int(row["image_max_pixels"][k])}
        out = self.image_processor(images=[im], size=size, return_tensors="pt")
        grid = [int(x) for x in out["image_grid_thw"][0].tolist()]
        want = [int(x) for x in row["image_grid_thw"][k]]
        if grid != want:
            raise SampleError(str(row.get("id")), str(row.get("source")),
                              f"image {k} ({shown}) now gives grid {grid} but was prepared as {want}; the file changed",
                              "run `vlmtune prepare` again with overwrite_cache=true")
        return out["pixel_values"], grid

    def _packed(self, rows: list[dict], batch: dict) -> dict:
        """Packed rows: per-segment positions and no attention mask (transformers then builds the
        block-diagonal mask from where the text positions restart)."""
        from .pack import packed_position_ids

        length = batch["input_ids"].shape[1]
        pos = [packed_position_ids(r if r.get("segments") else {**r, "segments": [len(r["input_ids"])]},
                                   self.spec.image_token_id, self.spec.merge_size, length) for r in rows]
        batch["position_ids"] = torch.from_numpy(np.stack(pos, axis=1))
        del batch["attention_mask"]
        # transformers only derives the packed mask without a KV cache; training never needs one.
        batch["use_cache"] = False
        return batch

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
        mm = (input_ids == self.spec.image_token_id).to(torch.int32) * attention.to(torch.int32)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "mm_token_type_ids": mm}
