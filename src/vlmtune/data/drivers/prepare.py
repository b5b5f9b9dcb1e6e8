"""`vlmtune prepare`: read → validate → account → encode → fit → a cached prepared dataset, streamed.

Writes `<prepared_dir>/` (an Arrow file written by datasets' ArrowWriter as rows come, one row per
emitted sample, memory-mapped by `Prepared.dataset()`) and `<output_dir>/fit_report.jsonl` (one line
per input record, whatever happened to it: the records that could not be read first, then every
conversation in input order). Both are written next to their targets and swapped in at the end, the
prepared folder last with its fingerprint inside, so a prepare that is killed never leaves a cache
that a later run takes as complete. The result is cached by a fingerprint of the data files, the
data-related config and the model's processor, so a second run with nothing changed loads it instantly.
The folder's handling on disk (ownership marker, lock, fingerprint, swap, stale cleanup) is data/drivers/cache.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections import Counter
from array import array
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ...config import DataSections, ReadArgs
from ...errors import DataError, Problem, disk_full_is_an_error
from ...models.load import Loaded, load_spec
from . import cache
from .cache import FINGERPRINT_FILE, data_files, fingerprint, prepared_dir  # noqa: F401  (re-exported)
from .pipeline import Accounting, Stages, run_pipeline, unread_line
from ..schema import SampleStats, features, stats_from_columns, stats_table

CHUNK = 256
DATA_FILE = "data.arrow"
SAMPLES_FILE = "samples.arrow"  # per valid sample: tokens before fitting (the doctor's and inspect's numbers)
PROBLEMS_FILE = "problems.jsonl"
REPORT_FILE, EVAL_REPORT_FILE = "fit_report.jsonl", "eval_fit_report.jsonl"  # in output_dir
PIECES_FILE = "pieces.npy"  # (tokens, vision tokens: image + video pads) of each emitted row
FATES = ("kept", "shrunk", "truncated", "split", "dropped", "invalid")


@dataclass
class Prepared:
    """What `prepare` produced: the dataset folder, the report and its counts.

    `table[fate] = [samples, rows, tokens before, tokens after]`, summed over the fit report."""

    path: str
    report_path: str
    rows: int
    fates: dict[str, int]
    records: int
    cached: bool
    table: dict[str, list[int]] = field(default_factory=dict, repr=False)
    notes: list[str] = field(default_factory=list, repr=False)  # what reading found (layouts, the datasets' mix)

    def dataset(self):
        return load_prepared(self.path)


def load_prepared(path: str):
    """The prepared rows as a memory-mapped `datasets.Dataset`."""
    from datasets import Dataset

    return Dataset.from_file(os.path.join(path, DATA_FILE))


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


def _stages(data: DataSections) -> Stages:
    """Prepare's stages: labels as the fit section asks, fitted, rows emitted; the run's stage (sft, dpo, kto)
    refuses the samples of another kind (data/stages/pairs.stage_problems)."""
    return Stages(data.fit, fitting=True, emit=True, stage=data.preference.stage)


def prepare(data: DataSections, loaded: Loaded | None = None, *, progress: bool = True,
            report_name: str = REPORT_FILE) -> Prepared:
    """Prepare (or load the cached) dataset; stops on the first sample that reaches the 'error' policy,
    and, with on_bad_sample=error, on invalid samples once the fit report is written. `report_name`: the fit
    report's file in output_dir (eval_dataset's is EVAL_REPORT_FILE)."""
    return _prepare(data, loaded, progress, collect=False, report_name=report_name)[0]


def eval_config(data: DataSections) -> DataSections:
    """The sections that prepare eval_dataset: the same keys, its datasets, its own prepared folder."""
    read = dataclasses.replace(data.read, dataset=data.read.eval_dataset, eval_dataset=None, val_size=0,
                               mix_strategy="concat", interleave_probs=None)
    prep = dataclasses.replace(data.prepare, prepared_dir=prepared_dir(data).rstrip("/\\") + "-eval")
    return dataclasses.replace(data, read=read, prepare=prep)


def prepare_facts(data: DataSections, loaded: Loaded, *, progress: bool = True) -> Accounting:
    """The doctor's view: a complete, matching cache is read instead of fitting again; else the data goes
    through prepare's driver, every 'error'-policy sample is counted instead of stopping at the first, and
    the cache is written when nothing would stop prepare (so the `train` that follows loads it)."""
    prep, facts = _prepare(data, loaded, progress, collect=True)
    return facts if facts is not None else _facts_from_cache(prep)


def _prepare(data: DataSections, loaded: Loaded | None, progress: bool, collect: bool,
             report_name: str = REPORT_FILE):
    cache.check_folders(data)
    loaded = loaded or load_spec(data.model, data.fit)
    out_dir = prepared_dir(data)
    report_path = os.path.join(data.output_dir, report_name)
    fp = fingerprint(data, loaded, data_files(data.read))
    cached = load_cached(out_dir, report_path, fp) if not data.prepare.overwrite_cache else None
    if cached is not None:
        return cached, None
    cache.check_replaceable(out_dir)  # before any work: a folder that is not ours is never replaced
    cache.claim_output_dir(data)  # new or vlmtune's (check_folders): created if needed and marked
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    with cache.exclusive(out_dir.rstrip("/") + ".lock", data.wait_s) as waited:
        if waited:  # another process (another node on a shared output_dir) held it: its cache may be ours
            cached = load_cached(out_dir, report_path, fp)
            if cached is not None:
                return cached, None
        return _prepare_locked(data, loaded, fp, out_dir, report_path, progress, collect)


def _prepare_locked(data: DataSections, loaded: Loaded, fp, out_dir, report_path, progress, collect):
    tmp_dir, tmp_report, tmp_body = cache.temp_names(out_dir, report_path)
    cache.remove_stale(out_dir, report_path)
    try:
        with disk_full_is_an_error(f"the prepared dataset into {tmp_dir} and the fit report {tmp_report}",
                                   "free space there (nothing half-written is kept), or set prepared_dir and "
                                   "output_dir to a disk with room"):
            return _prepare_into(data, loaded, fp, out_dir, report_path, tmp_dir, tmp_report, tmp_body, progress,
                                 collect)
    finally:  # whatever happened, nothing half-written stays behind
        cache.discard(tmp_dir, tmp_report, tmp_body)


def _prepare_into(data: DataSections, loaded: Loaded, fp, out_dir, report_path, tmp_dir, tmp_report, tmp_body,
                  progress, collect):
    from datasets.arrow_writer import ArrowWriter

    cache.make_temp(tmp_dir)
    stream = run_pipeline(data.read, loaded, _stages(data), seed=data.seed,
                          workers=data.prepare.preprocessing_num_workers or 1, chunk=CHUNK, progress=progress)
    table = {f: [0, 0, 0, 0] for f in FATES}
    problems: list[Problem] = []
    errors: list[str] = []
    stats: list[SampleStats] = []
    invalid: list[str] = []
    pieces = array("i")
    split_rows = 0
    rows = 0
    feats = features()
    # The conversations' lines go to a body file as they come; the unread records' lines (known only
    # once reading is done) are written first, and the body is appended to them, in blocks.
    with open(tmp_body, "w", encoding="utf-8") as body, \
            ArrowWriter(features=feats, path=os.path.join(tmp_dir, DATA_FILE), writer_batch_size=1000) as writer, \
            ArrowWriter(features=features(SampleStats), path=os.path.join(tmp_dir, SAMPLES_FILE)) as samples:
        for res in _closing(stream.chunks):  # closed on an error: the workers stop at once
            if res.errors and not collect:
                raise res.errors[0]
            errors += [e.sample_id for e in res.errors]
            problems += res.problems
            invalid += [c.id for c in res.invalid]
            split_rows += res.split_rows
            for n, k in res.pieces:
                pieces += array("i", (n, k))
            if collect:
                stats += res.stats
            if res.stats:
                samples.write_table(stats_table(res.stats))
            _tally(table, res.lines)
            body.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in res.lines)
            if res.table is not None:
                writer.write_table(res.table)
                rows += res.table.num_rows
        writer.finalize()
        samples.finalize()
    unread = [unread_line(p) for p in stream.unread]
    _tally(table, unread)
    with open(tmp_report, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in unread)
        with open(tmp_body, encoding="utf-8") as b:
            shutil.copyfileobj(b, f, 1 << 20)
    os.replace(tmp_report, report_path)
    bad = list(stream.unread) + problems
    fates = {f: table[f][0] for f in FATES if table[f][0]}
    records = sum(a[0] for a in table.values())
    stop = verdict(data.read, table["invalid"][0], records)
    facts = None
    if collect:
        counted = Counter({f: table[f][0] - (len(unread) if f == "invalid" else 0) for f in FATES})
        counted["error"] = len(errors)
        unread_ids = [p.sample_id or p.source for p in stream.unread]  # invalid too: records == valid + invalid
        facts = Accounting(stream.records, stats, bad, unread_ids + invalid, notes=stream.notes, fates=counted,
                           rows=list(zip(pieces[::2], pieces[1::2])), errors=errors, split_rows=split_rows,
                           limited=stream.limited)
        if errors or stop is not None:
            return None, facts  # prepare would stop here: no cache
    elif stop is not None and stop.kind == "invalid":
        raise DataError(bad, header=f"{len(bad)} problem(s) in the data (the fit report is in {report_path}); "
                                    "fix them, or set on_bad_sample: skip to leave those samples out")
    elif stop is not None:
        raise DataError(bad, header=f"{stop.what} (the fit report is in {report_path}); fix them, or set "
                                    "confirm_skipped_share: true to train on the rest")
    with open(os.path.join(tmp_dir, PROBLEMS_FILE), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in bad)
    np.save(os.path.join(tmp_dir, PIECES_FILE), np.frombuffer(pieces, dtype=np.int32).reshape(-1, 2))
    meta = {"fingerprint": fp, "rows": rows, "records": records, "fates": fates, "table": table,
            "read_records": stream.records, "unread": len(unread), "errors": 0, "split_rows": split_rows,
            "limited": stream.limited, "notes": stream.notes}
    cache.write_meta(tmp_dir, meta)
    cache.swap_in(tmp_dir, out_dir)
    prep = Prepared(out_dir, report_path, rows, fates, records, False, table, stream.notes)
    if facts is not None:
        facts.prepared = prep
    return prep, facts


def _facts_from_cache(prep: Prepared) -> Accounting:
    """The accounting of a complete cache: its per-sample numbers, problems, row sizes and the report's fates."""
    from datasets import Dataset

    with open(os.path.join(prep.path, FINGERPRINT_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    cols = Dataset.from_file(os.path.join(prep.path, SAMPLES_FILE)).with_format("arrow")[:]
    stats = stats_from_columns({c: cols[c].to_pylist() for c in cols.column_names})
    with open(os.path.join(prep.path, PROBLEMS_FILE), encoding="utf-8") as f:
        problems = [Problem(**json.loads(line)) for line in f]
    invalid: list[str] = []
    with open(prep.report_path, encoding="utf-8") as f:
        for line in f:  # the unread records' lines come first: they are invalid samples too
            r = json.loads(line)
            if r["fate"] == "invalid":
                invalid.append(r["id"])
    fates = Counter({f: prep.table.get(f, [0])[0] - (meta["unread"] if f == "invalid" else 0) for f in FATES})
    fates["error"] = 0
    pieces = np.load(os.path.join(prep.path, PIECES_FILE))
    rows = [(int(n), int(k)) for n, k in pieces]
    return Accounting(meta["read_records"], stats, problems, invalid, notes=meta.get("notes", []), fates=fates,
                      rows=rows, errors=[], split_rows=meta["split_rows"], limited=meta["limited"], prepared=prep)


def _closing(gen):
    """Iterate a generator, closing it (its finally: the worker pool shuts down) however the loop ends."""
    with contextlib.closing(gen):
        yield from gen


def _tally(table: dict, lines: list[dict]) -> None:
    for r in lines:
        a = table.setdefault(r["fate"], [0, 0, 0, 0])
        after = r["tokens_after"]
        pieces = after if isinstance(after, list) else ([after] if after is not None else [])
        a[0] += 1
        a[1] += len(pieces)
        a[2] += r["tokens_before"] or 0
        a[3] += sum(pieces)


def format_report_summary(prep: Prepared) -> str:
    """The fit report as a table: samples, emitted rows and tokens per fate."""
    agg = {f: list(prep.table.get(f, [0, 0, 0, 0])) for f in FATES}
    agg.update({f: a for f, a in prep.table.items() if f not in agg})
    rows = [(f, *agg[f]) for f in agg]
    rows.append(("total", *(sum(a[k] for a in agg.values()) for k in range(4))))
    head = ("fate", "samples", "rows", "tokens before", "tokens after")
    lines = [f"{head[0]:<9}  {head[1]:>7}  {head[2]:>6}  {head[3]:>13}  {head[4]:>12}"]
    lines += [f"{f:<9}  {n:>7}  {k:>6}  {b:>13}  {a:>12}" for f, n, k, b, a in rows]
    lines += [n for n in prep.notes if n.startswith("mix_strategy=")]  # records the mix never drew
    lines.append(f"prepared: {prep.path}" + (" (cached)" if prep.cached else ""))
    lines.append(f"fit report: {prep.report_path}")
    return "\n".join(lines)


def load_cached(out_dir: str, report_path: str, fp: str) -> Prepared | None:
    """The cache in out_dir when it is complete and made for fingerprint `fp`, else None."""
    meta = cache.read_meta(out_dir, fp)
    if meta is None or not os.path.exists(report_path) or not os.path.exists(os.path.join(out_dir, DATA_FILE)):
        return None
    try:
        return Prepared(out_dir, report_path, meta["rows"], meta["fates"], meta["records"], True, meta["table"],
                        meta.get("notes", []))
    except (KeyError, TypeError):
        return None


# -- streaming: true ---------------------------------------------------------------------------
class StreamedRows:
    """`streaming: true`: rows straight from the pipeline (fit on the fly, no prepared copy), for a
    `torch.utils.data.IterableDataset`. The first pass over the data writes the fit report as it goes, one
    line per record read (unreadable records as they are met, then each chunk's samples in input order),
    flushed after every chunk, so a run stopped by max_steps has a report of exactly the records it read.
    Later passes (epochs) read the data again without rewriting the report."""

    def __init__(self, data: DataSections, loaded: Loaded):
        self.data, self.loaded = data, loaded
        self.report_path = os.path.join(data.output_dir, REPORT_FILE)
        self.passes = 0
        self.table = {f: [0, 0, 0, 0] for f in FATES}

    def __iter__(self):
        data = self.data
        self.passes += 1
        first = self.passes == 1
        stream = run_pipeline(data.read, self.loaded, _stages(data), seed=data.seed,
                              workers=data.prepare.preprocessing_num_workers or 1,
                              chunk=CHUNK, progress=False)
        cache.claim_output_dir(data)  # checked by check_folders before the run started
        report = open(self.report_path, "w", encoding="utf-8") if first else None
        written = 0
        try:
            for res in _closing(stream.chunks):
                if res.errors:
                    raise res.errors[0]
                if report is not None:
                    unread = [unread_line(p) for p in stream.unread[written:]]
                    written = len(stream.unread)
                    _tally(self.table, unread + res.lines)
                    report.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in unread + res.lines)
                    report.flush()
                if res.table is not None:
                    yield from res.table.to_pylist()
            if report is not None:
                unread = [unread_line(p) for p in stream.unread[written:]]
                _tally(self.table, unread)
                report.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in unread)
        finally:
            if report is not None:
                report.close()


def streamed_dataset(data: DataSections, loaded: Loaded):
    """A torch IterableDataset over StreamedRows (the Trainer needs max_steps with it)."""
    import torch.utils.data

    rows = StreamedRows(data, loaded)

    class _Iterable(torch.utils.data.IterableDataset):
        stream = rows

        def __iter__(self):
            return iter(rows)

    return _Iterable()
