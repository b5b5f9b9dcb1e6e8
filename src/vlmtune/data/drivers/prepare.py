"""`vlmtune prepare`: read → validate → account → encode → fit → a cached prepared dataset, streamed.

Writes `<prepared_dir>/` (an Arrow file written by datasets' ArrowWriter as rows come, one row per
emitted sample, memory-mapped by `Prepared.dataset()`) and `<output_dir>/fit_report.jsonl` (one line
per input record, whatever happened to it: the records that could not be read first, then every
conversation in input order). Both are written next to their targets and swapped in at the end, the
prepared folder last with its fingerprint inside, so a prepare that is killed never leaves a cache
that a later run takes as complete. The result is cached by a fingerprint of the data files, the
data-related config and the model's processor, so a second run with nothing changed loads it instantly.
The folder's handling on disk (ownership marker, lock, fingerprint, swap, stale cleanup) is data/drivers/cache.py;
the counting of the pass, and the verdict on invalid samples, data/drivers/tally.py (the doctor's too);
`streaming: true` (rows fitted on the fly, no prepared copy) data/drivers/streaming.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field

import numpy as np

from ...config import DataSections
from ...errors import DataError, Problem, disk_full_is_an_error
from ...models.load import Loaded, load_spec
from ..schema import SampleStats, features, stats_from_columns, stats_table
from . import cache
from .cache import FINGERPRINT_FILE, Target, data_files, fingerprint, prepared_dir
from .pipeline import Stages, Stream, run_pipeline
from .tally import FATES, Accounting, Tally, Verdict, sample_fates, verdict

CHUNK = 256
DATA_FILE = "data.arrow"
SAMPLES_FILE = "samples.arrow"  # per valid sample: tokens before fitting (the doctor's and inspect's numbers)
PROBLEMS_FILE = "problems.jsonl"
REPORT_FILE, EVAL_REPORT_FILE = "fit_report.jsonl", "eval_fit_report.jsonl"  # in output_dir
PIECES_FILE = "pieces.npy"  # (tokens, vision tokens: image + video pads) of each emitted row


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


def prepare_stages(data: DataSections) -> Stages:
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


def prepare_facts(data: DataSections, loaded: Loaded, *, progress: bool = True,
                  report_name: str = REPORT_FILE) -> Accounting:
    """The doctor's view: a complete, matching cache is read instead of fitting again; else the data goes
    through prepare's driver, every 'error'-policy sample is counted instead of stopping at the first, and
    the cache is written when nothing would stop prepare (so the `train` that follows loads it)."""
    prep, facts = _prepare(data, loaded, progress, collect=True, report_name=report_name)
    return facts if facts is not None else _facts_from_cache(prep)


def _prepare(data: DataSections, loaded: Loaded | None, progress: bool, collect: bool,
             report_name: str = REPORT_FILE) -> tuple[Prepared | None, Accounting | None]:
    """`collect` (the doctor): count every sample that would stop prepare, and return the facts with no cache
    when one would; else stop as prepare does."""
    cache.check_folders(data)
    loaded = loaded or load_spec(data.model, data.fit)
    out_dir = prepared_dir(data)
    target = Target(out_dir, os.path.join(data.output_dir, report_name), fingerprint(data, loaded,
                                                                                      data_files(data.read)))
    cached = None if data.prepare.overwrite_cache else load_cached(target)
    if cached is not None:
        return cached, None
    cache.check_replaceable(out_dir)  # before any work: a folder that is not ours is never replaced
    cache.claim_output_dir(data)  # new or vlmtune's (check_folders): created if needed and marked
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    with cache.exclusive(out_dir.rstrip("/") + ".lock", data.wait_s) as waited:
        if waited:  # another process (another node on a shared output_dir) held it: its cache may be ours
            cached = load_cached(target)
            if cached is not None:
                return cached, None
        cache.remove_stale(out_dir, target.report_path)
        try:
            with disk_full_is_an_error(f"the prepared dataset into {target.tmp_dir} and the fit report "
                                       f"{target.tmp_report}", "free space there (nothing half-written is kept), "
                                       "or set prepared_dir and output_dir to a disk with room"):
                return _prepare_into(data, loaded, target, progress, collect)
        finally:  # whatever happened, nothing half-written stays behind
            cache.discard(target.tmp_dir, target.tmp_files)


def _prepare_into(data: DataSections, loaded: Loaded, target: Target, progress: bool,
                  collect: bool) -> tuple[Prepared | None, Accounting | None]:
    tally = Tally(keep_stats=collect, stop_on_error=not collect)
    stream = _write_rows(data, loaded, target, tally, progress)
    _write_report(target, tally.add_unread(stream.unread))
    stop = verdict(data.read, tally.table["invalid"][0], tally.records)
    facts = tally.accounting(stream, fitted_all=True) if collect else None
    if facts is not None and (facts.errors or stop is not None):
        return None, facts  # prepare would stop here: no cache
    if stop is not None:
        raise _stopped(stop, tally.bad, target.report_path)
    prep = _commit(target, tally, stream)
    if facts is not None:
        facts.prepared = prep
    return prep, facts


def _write_rows(data: DataSections, loaded: Loaded, target: Target, tally: Tally, progress: bool) -> Stream:
    """Drive the pipeline, writing as results come: rows to the Arrow file, the valid samples' numbers to the
    samples file, the conversations' fit report lines to the report's body file."""
    from datasets.arrow_writer import ArrowWriter

    cache.make_temp(target.tmp_dir, target.tmp_files)
    stream = run_pipeline(data.read, loaded, prepare_stages(data), seed=data.seed,
                          workers=data.prepare.preprocessing_num_workers or 1, chunk=CHUNK, progress=progress)
    with open(target.tmp_body, "w", encoding="utf-8") as body, \
            ArrowWriter(features=features(), path=os.path.join(target.tmp_dir, DATA_FILE),
                        writer_batch_size=1000) as writer, \
            ArrowWriter(features=features(SampleStats), path=os.path.join(target.tmp_dir, SAMPLES_FILE)) as samples, \
            contextlib.closing(stream.chunks) as chunks:  # closed on an error: the workers stop at once
        for res in chunks:
            tally.add(res)
            if res.stats:
                samples.write_table(stats_table(res.stats))
            body.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in res.lines)
            if res.table is not None:
                writer.write_table(res.table)
        writer.finalize()
        samples.finalize()
    return stream


def _write_report(target: Target, unread: list[dict]) -> None:
    """The fit report: the unread records' lines (known only once reading is done) first, then the body."""
    with open(target.tmp_report, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in unread)
        with open(target.tmp_body, encoding="utf-8") as b:
            shutil.copyfileobj(b, f, 1 << 20)
    os.replace(target.tmp_report, target.report_path)


def _stopped(stop: Verdict, bad: list[Problem], report_path: str) -> DataError:
    if stop.kind == "invalid":
        return DataError(bad, header=f"{len(bad)} problem(s) in the data (the fit report is in {report_path}); "
                                     "fix them, or set on_bad_sample: skip to leave those samples out")
    return DataError(bad, header=f"{stop.what} (the fit report is in {report_path}); fix them, or set "
                                 "confirm_skipped_share: true to train on the rest")


def _commit(target: Target, tally: Tally, stream: Stream) -> Prepared:
    """The problems, row sizes and meta into the finished folder, which is then swapped in."""
    with open(os.path.join(target.tmp_dir, PROBLEMS_FILE), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in tally.bad)
    np.save(os.path.join(target.tmp_dir, PIECES_FILE), np.frombuffer(tally.pieces, dtype=np.int32).reshape(-1, 2))
    meta = {"fingerprint": target.fingerprint, "rows": tally.rows, "records": tally.records, "fates": tally.fates,
            "table": tally.table, "read_records": stream.records, "unread": len(tally.unread), "errors": 0,
            "split_rows": tally.split_rows, "limited": stream.limited, "notes": stream.notes}
    cache.write_meta(target.tmp_dir, meta)
    cache.swap_in(target.tmp_dir, target.out_dir)
    return Prepared(target.out_dir, target.report_path, tally.rows, tally.fates, tally.records, False, tally.table,
                    stream.notes)


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
    fates = sample_fates(prep.table, meta["unread"])
    fates["error"] = 0
    pieces = np.load(os.path.join(prep.path, PIECES_FILE))
    rows = [(int(n), int(k)) for n, k in pieces]
    return Accounting(meta["read_records"], stats, problems, invalid, notes=meta.get("notes", []), fates=fates,
                      rows=rows, errors=[], split_rows=meta["split_rows"], limited=meta["limited"], prepared=prep)


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


def load_cached(target: Target) -> Prepared | None:
    """The cache at the target when it is complete and made for its fingerprint, else None."""
    meta = cache.read_meta(target.out_dir, target.fingerprint)
    if meta is None or not os.path.exists(target.report_path) or \
            not os.path.exists(os.path.join(target.out_dir, DATA_FILE)):
        return None
    try:
        return Prepared(target.out_dir, target.report_path, meta["rows"], meta["fates"], meta["records"], True,
                        meta["table"], meta.get("notes", []))
    except (KeyError, TypeError):
        return None
