"""`vlmtune prepare`: read → validate → account → encode → fit → a cached `datasets` folder.

Writes `<prepared_dir>/` (datasets `save_to_disk`, one row per emitted sample) and
`<output_dir>/fit_report.jsonl` (one line per input record, whatever happened to it). The result is
cached by a fingerprint of the data files, the data-related config and the model's processor, so a
second run with nothing changed loads it instantly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from .. import __version__
from ..errors import DataError, Problem
from ..models.load import Loaded, load_spec
from .encode import Encoder, emit
from .fit import FitOptions, FitOutcome, Fitter
from .readers import read_samples
from .validate import validate

CHUNK = 256
FINGERPRINT_FILE = "vlmtune_fingerprint.json"
# Config keys that change what `prepare` emits; anything else (learning rate, ...) does not.
DATA_KEYS = (
    "model_name_or_path", "dataset", "dataset_dir", "media_dir", "cutoff_len", "image_max_pixels",
    "image_min_pixels", "max_samples", "allow_paths_outside_media_dir", "allow_remote_images",
    "on_bad_sample", "train_on_prompt", "overflow", "min_image_tokens", "max_image_token_share",
    "split_keep_context", "remote_image_max_bytes",
)


@dataclass
class Prepared:
    """What `prepare` produced: the dataset folder, the report and its counts."""

    path: str
    report_path: str
    rows: int
    fates: dict[str, int]
    records: int
    cached: bool
    report: list[dict] = field(default_factory=list, repr=False)

    def dataset(self):
        from datasets import load_from_disk

        return load_from_disk(self.path)


def fit_options(cfg) -> FitOptions:
    return FitOptions(
        cutoff_len=cfg.cutoff_len,
        overflow=tuple(cfg.overflow),
        min_image_tokens=cfg.min_image_tokens,
        max_image_token_share=cfg.max_image_token_share,
        split_keep_context=cfg.split_keep_context,
    )


def remote_options(cfg):
    from .remote import FetchOptions

    return FetchOptions(max_bytes=cfg.remote_image_max_bytes, connect_timeout=cfg.remote_image_timeout,
                        read_timeout=cfg.remote_image_timeout)


def media_dir_of(cfg) -> str | None:
    """media_dir as set by the user; when it was only derived from dataset_dir, let the reader
    resolve images against each data file's folder (a dataset given as a path) or dataset_dir."""
    return None if "media_dir" in getattr(cfg, "derived", ()) else cfg.media_dir


def prepared_dir(cfg) -> str:
    return cfg.prepared_dir or os.path.join(cfg.output_dir, "prepared")


def prepare(cfg, loaded: Loaded | None = None, *, progress: bool = True) -> Prepared:
    loaded = loaded or load_spec(
        cfg.model_name_or_path, image_min_pixels=cfg.image_min_pixels, image_max_pixels=cfg.image_max_pixels,
        trust_remote_code=cfg.trust_remote_code,
    )
    out_dir = prepared_dir(cfg)
    report_path = os.path.join(cfg.output_dir, "fit_report.jsonl")
    fp = fingerprint(cfg, loaded, _data_files(cfg))
    cached = _load_cached(out_dir, report_path, fp) if not cfg.overwrite_cache else None
    if cached is not None:
        return cached
    read = read_samples(
        cfg.dataset, dataset_dir=cfg.dataset_dir, media_dir=media_dir_of(cfg),
        allow_paths_outside_media_dir=cfg.allow_paths_outside_media_dir,
        allow_remote_images=cfg.allow_remote_images, remote_options=remote_options(cfg), progress=progress,
    )

    convs = first_of_each_file(read.conversations, cfg.max_samples) if cfg.max_samples else read.conversations
    problems, fitted, rows = _process_all(cfg, loaded, convs, progress)
    report: list[dict] = [_unread_line(p) for p in read.problems] + fitted
    bad = list(read.problems) + problems

    os.makedirs(cfg.output_dir, exist_ok=True)
    _write_report(report_path, report)
    if bad and cfg.on_bad_sample == "error":
        raise DataError(bad, header=f"{len(bad)} problem(s) in the data (the fit report is in {report_path}); "
                                    "fix them, or set on_bad_sample: skip to leave those samples out")
    invalid = sum(1 for line in report if line["fate"] == "invalid")
    if invalid > cfg.max_skipped_share * len(report) and not cfg.confirm_skipped_share:
        raise DataError(bad, header=(
            f"on_bad_sample=skip would leave out {invalid} of {len(report)} records "
            f"({100 * invalid / max(1, len(report)):.1f}%) as invalid, more than max_skipped_share="
            f"{cfg.max_skipped_share:g} (the fit report is in {report_path}); fix them, or set "
            "confirm_skipped_share: true to train on the rest"))
    _save_rows(rows, out_dir, fp)
    fates = Counter(r["fate"] for r in report)
    return Prepared(out_dir, report_path, len(rows), dict(fates), len(report), False, report)


# -- validate, encode, fit and emit: in worker processes when asked ------------------------------
_WORKER: dict = {}


def _process_chunk(convs) -> tuple[list[Problem], list[dict], list[dict]]:
    """One chunk of samples from validation to emitted rows; report lines in input order."""
    w = _WORKER
    spec = w["spec"]
    checked = validate(convs, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels,
                       patch_size=spec.patch_size, merge_size=spec.merge_size)
    lines = {line["id"]: line for line in _invalid_lines(convs, checked)}
    rows = []
    for enc in w["encoder"].encode_many(checked.valid, checked.headers):
        out = w["fitter"].fit(enc)
        lines[enc.id] = out.report()
        rows += [emit(p, spec).to_dict() for p in out.pieces]
    return list(checked.problems), [lines[c.id] for c in convs], rows


def _init_worker(model, min_px, max_px, trust, train_on_prompt, options) -> None:
    loaded = load_spec(model, image_min_pixels=min_px, image_max_pixels=max_px, trust_remote_code=trust)
    _set_worker(loaded, train_on_prompt, options)


def _set_worker(loaded: Loaded, train_on_prompt: bool, options: FitOptions) -> None:
    _WORKER["spec"] = loaded.spec
    _WORKER["encoder"] = Encoder(loaded.processor, loaded.spec, train_on_prompt=train_on_prompt)
    _WORKER["fitter"] = Fitter(loaded.spec, options)


def _process_all(cfg, loaded: Loaded, convs, progress: bool) -> tuple[list[Problem], list[dict], list[dict]]:
    options = fit_options(cfg)
    chunks = [convs[i : i + CHUNK] for i in range(0, len(convs), CHUNK)]
    workers = max(1, int(cfg.preprocessing_num_workers or 1))
    problems: list[Problem] = []
    report: list[dict] = []
    rows: list[dict] = []
    bar = tqdm(total=len(convs), desc="preparing", unit="sample", disable=not progress or None)

    def gather(results) -> None:
        for chunk_problems, chunk_report, chunk_rows in results:
            problems.extend(chunk_problems)
            report.extend(chunk_report)
            rows.extend(chunk_rows)
            bar.update(len(chunk_report))

    if workers == 1 or len(chunks) < 2:
        _set_worker(loaded, cfg.train_on_prompt, options)
        gather(map(_process_chunk, chunks))
    else:
        init = (cfg.model_name_or_path, cfg.image_min_pixels, cfg.image_max_pixels, cfg.trust_remote_code,
                cfg.train_on_prompt, options)
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=init) as pool:
            gather(pool.map(_process_chunk, chunks))
    bar.close()
    return problems, report, rows


# -- report ----------------------------------------------------------------------------------
def first_of_each_file(convs, n: int):
    """max_samples: the first n samples of each data file (LLaMA-Factory applies it per dataset)."""
    seen: Counter = Counter()
    out = []
    for c in convs:
        key = re.sub(r"[:#]\d+$", "", c.source)
        seen[key] += 1
        if seen[key] <= n:
            out.append(c)
    return out


def _invalid(sample_id: str, source: str, reason: str) -> dict:
    return FitOutcome(sample_id, source, "invalid", reason, None, None).report()


def _unread_line(p: Problem) -> dict:
    return _invalid(p.sample_id or p.source, p.source, f"{p.what}; {p.fix}")


def _invalid_lines(convs, checked) -> list[dict]:
    valid = {c.id for c in checked.valid}
    by_id: dict[str, list[Problem]] = {}
    for p in checked.problems:
        by_id.setdefault(p.sample_id, []).append(p)
    lines = []
    for c in convs:
        if c.id in valid:
            continue
        reason = " | ".join(f"{p.what}; {p.fix}" for p in by_id.get(c.id, [])) or "invalid"
        lines.append(_invalid(c.id, c.source, reason))
    return lines


def _write_report(path: str, report: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for line in report:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def format_report_summary(prep: Prepared) -> str:
    """The fit report as a table: samples, emitted rows and tokens per fate."""
    order = ["kept", "shrunk", "truncated", "split", "dropped", "invalid"]
    agg = {f: [0, 0, 0, 0] for f in order}  # samples, rows, tokens before, tokens after
    for r in prep.report:
        a = agg.setdefault(r["fate"], [0, 0, 0, 0])
        after = r["tokens_after"]
        pieces = after if isinstance(after, list) else ([after] if after is not None else [])
        a[0] += 1
        a[1] += len(pieces)
        a[2] += r["tokens_before"] or 0
        a[3] += sum(pieces)
    rows = [(f, *agg[f]) for f in agg]
    rows.append(("total", *(sum(a[k] for a in agg.values()) for k in range(4))))
    head = ("fate", "samples", "rows", "tokens before", "tokens after")
    lines = [f"{head[0]:<9}  {head[1]:>7}  {head[2]:>6}  {head[3]:>13}  {head[4]:>12}"]
    lines += [f"{f:<9}  {n:>7}  {k:>6}  {b:>13}  {a:>12}" for f, n, k, b, a in rows]
    lines.append(f"prepared: {prep.path}" + (" (cached)" if prep.cached else ""))
    lines.append(f"fit report: {prep.report_path}")
    return "\n".join(lines)


# -- cache -----------------------------------------------------------------------------------
def _data_files(cfg) -> list[str]:
    """The files that `dataset` names (paths, or names in dataset_info.json), for the fingerprint."""
    root = cfg.dataset_dir or "."
    info_path = os.path.join(root, "dataset_info.json")
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        info = None
    files: list[str] = [info_path] if info is not None else []
    for name in (n.strip() for n in str(cfg.dataset).split(",")):
        candidates = [name, os.path.join(root, name)]
        entry = info.get(name) if isinstance(info, dict) else None
        if isinstance(entry, dict) and isinstance(entry.get("file_name"), str):
            candidates.append(os.path.join(root, entry["file_name"]))
        for c in candidates:
            if os.path.isfile(c):
                files.append(c)
            elif os.path.isdir(c):
                files += sorted(os.path.join(r, f) for r, _, fs in os.walk(c) for f in fs)
    return sorted(set(files))


def fingerprint(cfg, loaded: Loaded, files: list[str]) -> str:
    h = hashlib.sha256()
    h.update(__version__.encode())
    h.update(json.dumps({k: getattr(cfg, k, None) for k in DATA_KEYS}, sort_keys=True, default=str).encode())
    h.update(json.dumps(loaded.spec.to_dict(), sort_keys=True).encode())
    h.update(str(getattr(loaded.processor, "chat_template", "")).encode())
    for path in files:
        h.update(path.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _load_cached(out_dir: str, report_path: str, fp: str) -> Prepared | None:
    try:
        with open(os.path.join(out_dir, FINGERPRINT_FILE), encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("fingerprint") != fp or not os.path.exists(report_path):
            return None
        with open(report_path, encoding="utf-8") as f:
            report = [json.loads(line) for line in f]
    except (OSError, ValueError):
        return None
    fates = Counter(r["fate"] for r in report)
    return Prepared(out_dir, report_path, meta["rows"], dict(fates), len(report), True, report)


def _save_rows(rows: list[dict], out_dir: str, fp: str) -> None:
    from datasets import Dataset, DatasetInfo, Features, Sequence, Value

    features = Features({
        "id": Value("string"),
        "source": Value("string"),
        "input_ids": Sequence(Value("int32")),
        "labels": Sequence(Value("int32")),
        "images": Sequence(Value("string")),
        "image_grid_thw": Sequence(Sequence(Value("int32"))),
        "image_min_pixels": Sequence(Value("int64")),
        "image_max_pixels": Sequence(Value("int64")),
        "length": Value("int32"),
    })
    import pyarrow as pa

    for r in rows:
        r["length"] = len(r["input_ids"])
    # Columns straight to Arrow: datasets' per-example feature encoding is the slow part of from_list.
    table = pa.table({k: pa.array([r[k] for r in rows], type=features[k].pa_type) for k in features})
    ds = Dataset(table.cast(features.arrow_schema), info=DatasetInfo(features=features))
    # Write next to the target and swap, so an interrupted prepare never leaves a half cache.
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(tmp)
    with open(os.path.join(tmp, FINGERPRINT_FILE), "w", encoding="utf-8") as f:
        json.dump({"fingerprint": fp, "rows": len(rows)}, f)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
