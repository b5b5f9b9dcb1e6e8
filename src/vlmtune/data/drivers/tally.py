"""One pass over a dataset, counted: the one tally behind prepare's fit report table, the doctor's data check,
inspect's numbers and the streamed fit report, and the one verdict on invalid samples that prepare raises and
the doctor reports.

`Tally` takes the pipeline's chunk results as they come (and the unreadable records once reading is done) and
keeps per-sample numbers only: counts per fate, the ids of invalid and 'error'-policy samples, each emitted row's
(tokens, vision tokens), and, when asked, every valid sample's `SampleStats`. `Tally.accounting()` is the pass as
one `Accounting`; `summarize()` turns that into length percentiles per image count and the cutoff_len that keeps
95/99/100% of the samples whole (`inspect --json`).
"""

from __future__ import annotations

import math
import os
from array import array
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable

from ...config import FitArgs, PreferenceArgs, ReadArgs
from ...errors import Problem, SampleError
from ...models.load import Loaded
from ..schema import SampleStats
from ..sources.readers import reading
from ..stages.encode import Encoded
from ..stages.fit import FitOutcome
from .pipeline import ChunkResult, Stages, Stream, run_pipeline, unread_line

FATES = ("kept", "shrunk", "truncated", "split", "dropped", "invalid")


@dataclass(frozen=True)
class Verdict:
    """Why the invalid samples stop a run before training (prepare raises it; the doctor's data check reports it).

    kind: "invalid" (on_bad_sample=error and some sample is invalid) or "skipped_share" (on_bad_sample=skip
    would leave out more than max_skipped_share of the records, not confirmed)."""

    kind: str
    what: str


def verdict(read: ReadArgs, invalid: int, records: int) -> Verdict | None:
    """The one decision on invalid samples: `invalid` of `records` read (unreadable records included)."""
    if invalid and read.on_bad_sample == "error":
        return Verdict("invalid", f"{invalid} invalid sample(s) stop prepare because on_bad_sample=error")
    if invalid > read.max_skipped_share * records and not read.confirm_skipped_share:
        return Verdict("skipped_share", (
            f"on_bad_sample=skip would leave out {invalid} of {records} records "
            f"({100 * invalid / max(1, records):.1f}%) as invalid, more than max_skipped_share="
            f"{read.max_skipped_share:g}"))
    return None


@dataclass
class Accounting:
    """One pass over a dataset, counted: per-sample numbers and every problem (inspect's `account`), and, when
    the pass fitted every sample (prepare's driver for the doctor, `prepare_facts`), the fates and rows.

    `encoded` holds the whole Encoded of the samples asked for (`keep_ids`), not of every sample."""

    records: int
    stats: list[SampleStats]
    problems: list[Problem]
    invalid_ids: list[str] = field(default_factory=list)
    encoded: list[Encoded] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # the record layouts recognised
    fitted: list[FitOutcome | SampleError] = field(default_factory=list)  # the kept samples' fits (fitting)
    # -- when every sample was fitted (prepare_facts) --
    fates: Counter = field(default_factory=Counter)  # samples per fate, 'error' (the policy) included
    rows: list[tuple[int, int]] = field(default_factory=list)  # (tokens, vision tokens) of each emitted row
    errors: list[str] = field(default_factory=list)  # ids of samples that reach the 'error' policy
    split_rows: int = 0
    limited: bool = False  # max_samples left some samples out
    prepared: object = None  # data/drivers/prepare.Prepared: the cache written or found (None when prepare would stop)
    stage: str | None = None  # the stage the samples were read for (account's); dpo / kto: stats are PrefStats


def count_lines(table: dict[str, list[int]], lines: Iterable[dict]) -> None:
    """Add fit report lines to `table[fate] = [samples, rows, tokens before, tokens after]`."""
    for r in lines:
        a = table.setdefault(r["fate"], [0, 0, 0, 0])
        after = r["tokens_after"]
        pieces = after if isinstance(after, list) else ([after] if after is not None else [])
        a[0] += 1
        a[1] += len(pieces)
        a[2] += r["tokens_before"] or 0
        a[3] += sum(pieces)


def sample_fates(table: dict[str, list[int]], unread: int) -> Counter:
    """Conversations per fate from a fit report table: every fate in FATES, 'invalid' without the `unread`
    records (they yielded no conversation)."""
    return Counter({f: table.get(f, [0])[0] - (unread if f == "invalid" else 0) for f in FATES})


class Tally:
    """Counts a pass as its chunks come. `keep_stats`: keep every valid sample's SampleStats (the doctor,
    inspect; prepare writes them to a file instead); `stop_on_error`: the first sample that reaches the 'error'
    policy is raised (prepare, streaming) instead of counted (the doctor)."""

    def __init__(self, *, keep_stats: bool = True, stop_on_error: bool = False):
        self.keep_stats, self.stop_on_error = keep_stats, stop_on_error
        self.table: dict[str, list[int]] = {f: [0, 0, 0, 0] for f in FATES}
        self.stats: list[SampleStats] = []
        self.problems: list[Problem] = []  # validation problems; the unread records' come with `unread`
        self.invalid: list[str] = []
        self.errors: list[str] = []
        self.encoded: list[Encoded] = []
        self.fitted: list[FitOutcome | SampleError] = []
        self.pieces = array("i")  # (tokens, vision tokens) of each emitted row, flat: memory of two ints a row
        self.split_rows = 0
        self.unread: list[Problem] = []

    def add(self, res: ChunkResult) -> None:
        if res.errors and self.stop_on_error:
            raise res.errors[0]
        self.errors += [e.sample_id for e in res.errors]
        self.problems += res.problems
        self.invalid += [c.id for c in res.invalid]
        self.encoded += res.encoded
        self.fitted += res.fitted
        self.split_rows += res.split_rows
        for n, k in res.pieces:
            self.pieces += array("i", (n, k))
        if self.keep_stats:
            self.stats += res.stats
        count_lines(self.table, res.lines)

    def add_unread(self, problems: list[Problem]) -> list[dict]:
        """The records that yielded no conversation (invalid samples too: records == valid + invalid); returns
        their fit report lines."""
        self.unread += problems
        lines = [unread_line(p) for p in problems]
        count_lines(self.table, lines)
        return lines

    @property
    def records(self) -> int:
        """Records in the fit report (every read record, after max_samples)."""
        return sum(a[0] for a in self.table.values())

    @property
    def rows(self) -> int:
        """Rows emitted (one per fitted piece)."""
        return len(self.pieces) // 2

    @property
    def fates(self) -> dict[str, int]:
        """Samples per fate, the fates that occurred only."""
        return {f: a[0] for f, a in self.table.items() if a[0]}

    @property
    def bad(self) -> list[Problem]:
        return self.unread + self.problems

    def accounting(self, stream: Stream, *, fitted_all: bool) -> Accounting:
        """The pass as one Accounting; `fitted_all`: every sample was fitted, so the fates and rows count."""
        unread_ids = [p.sample_id or p.source for p in self.unread]
        acc = Accounting(stream.records, self.stats, self.bad, unread_ids + self.invalid, self.encoded, stream.notes,
                         self.fitted)
        if fitted_all:
            acc.fates = sample_fates(self.table, len(self.unread))
            acc.fates["error"] = len(self.errors)
            acc.rows = list(zip(self.pieces[::2], self.pieces[1::2]))
            acc.errors, acc.split_rows, acc.limited = self.errors, self.split_rows, stream.limited
        return acc


def account(
    read: ReadArgs | str | os.PathLike,
    loaded: Loaded,
    fit: FitArgs | None = None,
    *,
    fitting: bool = False,
    progress: bool = True,
    workers: int = 1,
    keep_ids: Iterable[str] = (),
    preference: PreferenceArgs | None = None,
) -> Accounting:
    """Read, validate and encode a dataset with header-only image sizes (a bare path: ReadArgs' defaults
    otherwise, no dataset_dir); `fitting`: the samples in `keep_ids` come back fitted too (inspect --show
    --cutoff-len). `preference.stage` dpo / kto reads ranking / KTO records as preference samples (a pair is
    counted as its longer side, data/stages/pairs.PrefStats) and refuses samples of another kind, as prepare
    does; sft (or None) refuses preference records."""
    read = reading(read)
    stage = preference.stage if preference is not None else None
    stages = Stages(fit or FitArgs(), fitting=fitting, keep_ids=frozenset(keep_ids), stage=stage)
    stream = run_pipeline(read, loaded, stages, workers=workers, progress=progress, desc="accounting")
    tally = Tally()
    for res in stream.chunks:
        tally.add(res)
    tally.add_unread(stream.unread)
    acc = tally.accounting(stream, fitted_all=False)
    acc.stage = stage
    return acc


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
    by_videos: dict[int, list[int]] = defaultdict(list)
    for s in stats:
        by_count[s.images].append(s.tokens)
        by_videos[s.videos].append(s.tokens)
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
        "videos": sum(s.videos for s in stats),
        "video_tokens": sum(s.video_tokens for s in stats),
        "by_video_count": {str(k): _dist(by_videos[k]) for k in sorted(by_videos)},
        "recommended_cutoff_len": {"p95": overall["p95"], "p99": overall["p99"], "max": overall["max"]},
        "cutoff_len": cutoff_len,
        "over_cutoff": None if cutoff_len is None else sum(1 for n in lengths if n > cutoff_len),
        "problems": [p.to_dict() for p in acc.problems],
        "notes": list(acc.notes),
        "stage": acc.stage or "sft",
        **_preference_summary(acc),
    }


def _preference_summary(acc: Accounting) -> dict:
    """Stage dpo: each side's length distribution (prompt + chosen, prompt + rejected; the pair's `lengths` are
    its longer side, the one cutoff_len must hold); stage kto: how many answers are desirable."""
    if acc.stage == "dpo":
        return {"pairs": len(acc.stats), "chosen_lengths": _dist([s.chosen_tokens for s in acc.stats]),
                "rejected_lengths": _dist([s.rejected_tokens for s in acc.stats]),
                "longer_side": {"chosen": sum(s.chosen_tokens > s.rejected_tokens for s in acc.stats),
                                "rejected": sum(s.rejected_tokens > s.chosen_tokens for s in acc.stats),
                                "equal": sum(s.rejected_tokens == s.chosen_tokens for s in acc.stats)}}
    if acc.stage == "kto":
        return {"desirable": sum(bool(s.kto_tag) for s in acc.stats),
                "undesirable": sum(not s.kto_tag for s in acc.stats)}
    return {}
