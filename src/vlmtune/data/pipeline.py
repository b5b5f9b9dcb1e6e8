"""THE data driver: read → validate → account (header-only) → encode, used by inspect, doctor and prepare.

`account()` gives every valid sample's exact token cost (images counted from their headers) and every problem;
`summarize()` turns it into length percentiles per image count and the cutoff_len that keeps 95/99/100% whole.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from ..errors import Problem
from ..models.load import Loaded
from .encode import Encoded, Encoder
from .readers import read_samples
from .validate import validate

CHUNK = 256


@dataclass(frozen=True)
class SampleStats:
    id: str
    source: str
    tokens: int
    image_tokens: int
    text_tokens: int
    images: int

    @classmethod
    def of(cls, enc: Encoded) -> "SampleStats":
        return cls(enc.id, enc.source, enc.length, enc.image_tokens, enc.text_tokens, len(enc.images))


@dataclass
class Accounting:
    """Everything `inspect` knows about a dataset: the encoded samples and every problem."""

    records: int
    encoded: list[Encoded]
    problems: list[Problem]
    invalid_ids: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # the record layouts recognised

    @property
    def stats(self) -> list[SampleStats]:
        return [SampleStats.of(e) for e in self.encoded]


def account(
    data: str,
    loaded: Loaded,
    *,
    dataset_dir: str | None = None,
    media_dir: str | None = None,
    train_on_prompt: bool = False,
    progress: bool = True,
    **read_kwargs,
) -> Accounting:
    """Read, validate and encode a dataset with header-only image sizes."""
    spec = loaded.spec
    read = read_samples(data, dataset_dir=dataset_dir, media_dir=media_dir, progress=progress, **read_kwargs)
    checked = validate(
        read.conversations,
        min_pixels=spec.min_pixels,
        max_pixels=spec.max_pixels,
        patch_size=spec.patch_size,
        merge_size=spec.merge_size,
        progress=progress,
    )
    encoder = Encoder(loaded.processor, spec, train_on_prompt=train_on_prompt)
    encoded: list[Encoded] = []
    valid = checked.valid
    with tqdm(total=len(valid), desc="accounting", unit="sample", disable=not progress or None) as bar:
        for i in range(0, len(valid), CHUNK):
            chunk = valid[i : i + CHUNK]
            encoded.extend(encoder.encode_many(chunk, checked.headers))
            bar.update(len(chunk))
    valid_ids = {c.id for c in valid}
    # Records rejected while reading are invalid samples too (records == valid + invalid).
    invalid = [p.sample_id or p.source for p in read.problems]
    invalid += [c.id for c in read.conversations if c.id not in valid_ids]
    return Accounting(read.records, encoded, list(read.problems) + list(checked.problems), invalid, read.notes)


def nearest_rank(sorted_values: list[int], q: float) -> int:
    """The smallest value v such that at least a fraction q of the values are ≤ v."""
    if not sorted_values:
        return 0
    k = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[k - 1]


def _dist(values: list[int]) -> dict:
    v = sorted(values)
    return {
        "samples": len(v),
        "p50": nearest_rank(v, 0.50),
        "p95": nearest_rank(v, 0.95),
        "p99": nearest_rank(v, 0.99),
        "max": v[-1] if v else 0,
    }


def summarize(acc: Accounting, cutoff_len: int | None = None) -> dict:
    """The JSON summary printed by `inspect --json`."""
    stats = acc.stats
    lengths = [s.tokens for s in stats]
    by_count: dict[int, list[int]] = defaultdict(list)
    for s in stats:
        by_count[s.images].append(s.tokens)
    overall = _dist(lengths)
    return {
        "records": acc.records,
        "samples": len(stats),
        "invalid_samples": len(acc.invalid_ids),
        "images": sum(s.images for s in stats),
        "tokens": sum(lengths),
        "image_tokens": sum(s.image_tokens for s in stats),
        "text_tokens": sum(s.text_tokens for s in stats),
        "lengths": overall,
        "by_image_count": {str(k): _dist(by_count[k]) for k in sorted(by_count)},
        "recommended_cutoff_len": {"p95": overall["p95"], "p99": overall["p99"], "max": overall["max"]},
        "cutoff_len": cutoff_len,
        "over_cutoff": None if cutoff_len is None else sum(1 for n in lengths if n > cutoff_len),
        "problems": [p.to_dict() for p in acc.problems],
        "notes": list(acc.notes),
    }
