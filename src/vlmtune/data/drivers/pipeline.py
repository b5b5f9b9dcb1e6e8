"""THE data driver: read → validate → account (header-only) → encode → fit → emit, used by prepare, inspect and doctor.

`run_pipeline()` streams: records are read incrementally (`readers.iter_samples`), cut into chunks of
`chunk` conversations, and each chunk goes through validate → encode → [fit → emit] in a worker process
(`workers` of them; in this process when 1). Chunk results come back in input order, at most
`2 * workers` chunks in flight, so memory is bounded by the chunk size and the worker count, not the
dataset. prepare writes the rows and the fit report from the results as they come; inspect and doctor
keep only per-sample numbers (`SampleStats`, fates, row lengths).

What a pass adds up to is counted by data/drivers/tally.py (`Tally`, `account()`, `summarize()`).
"""

from __future__ import annotations

import os
import sys
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator

from tqdm.auto import tqdm

from ...config import FitArgs, ReadArgs
from ...errors import Problem, SampleError
from ...models.load import Loaded
from ..schema import SampleStats, arrow_types, table
from ..sources.mix import Mix
from ..sources.readers import iter_samples, layout_notes
from ..stages.encode import Encoded, Encoder
from ..stages.fit import FitOutcome, Fitter
from ..stages.pairs import emit_row, encode_samples, fit_sample, stage_problems
from ..stages.validate import CONTROL_TOKENS, validate
from ..types import Conversation, Origin

CHUNK = 256


@dataclass(frozen=True)
class Stages:
    """How far each sample goes: encode always (labels, system prompt and thinking blocks as the fit section says);
    fit to `fit.cutoff_len` with its policies when `fitting`; emit rows when `emit`."""

    fit: FitArgs = field(default_factory=FitArgs)
    fitting: bool = False
    emit: bool = False
    keep_ids: frozenset = frozenset()  # samples whose Encoded (and fit) comes back whole (inspect --show)
    # the run's stage (sft, dpo, kto): a sample of another kind is invalid (data/stages/pairs.stage_problems); None: any
    stage: str | None = None
    # control_tokens_in_text: text (validate.CONTROL_TOKENS as plain text); run_pipeline sets it from the read section
    control_tokens_as_text: bool = False


@dataclass
class ChunkResult:
    """One chunk's worth of results, in input order within the chunk."""

    problems: list[Problem]  # validation problems
    stats: list[SampleStats]  # valid samples, before fitting
    invalid: list[Conversation]  # read but not valid (ids, sources)
    lines: list[dict] = field(default_factory=list)  # fit report lines, one per conversation (fit only)
    pieces: list[tuple[int, int]] = field(default_factory=list)  # (tokens, vision tokens) per row (fit only)
    errors: list[SampleError] = field(default_factory=list)  # samples that reached the 'error' policy
    split_rows: int = 0
    table: object = None  # emitted rows as a pyarrow Table in schema.features() (emit only): built in the worker,
    # it travels as Arrow buffers, so the main process only writes it
    encoded: list[Encoded] = field(default_factory=list)  # the keep_ids samples
    fitted: list[FitOutcome | SampleError] = field(default_factory=list)  # the keep_ids samples' fits (fitting)


@dataclass
class Stream:
    """The driver's output: chunk results in order; read problems and counts once it is exhausted."""

    chunks: Iterator[ChunkResult]
    unread: list[Problem] = field(default_factory=list)  # records that yielded no conversation
    records: int = 0  # every record read (conversations + unread), before max_samples
    limited: bool = False  # max_samples left some conversations out
    layouts: Counter = field(default_factory=Counter)  # record layouts recognised (readers.layout_notes)
    mix: Mix | None = None  # the datasets' mix, with what interleave_under left out

    @property
    def notes(self) -> list[str]:
        return layout_notes(self.layouts) + (self.mix.notes() if self.mix else [])


# -- one chunk, in a worker process (or this one) ---------------------------------------------
_WORKER: dict = {}


def _set_worker(loaded: Loaded, stages: Stages) -> None:
    _WORKER["spec"] = loaded.spec
    _WORKER["stages"] = stages
    _WORKER["video"] = loaded.video
    fit = stages.fit
    encoder = _WORKER["encoder"] = Encoder(loaded.data_processor, loaded.spec, train_on_prompt=fit.train_on_prompt,
                                           mask_history=fit.mask_history, default_system=fit.default_system,
                                           enable_thinking=fit.enable_thinking,
                                           plain_tokens=CONTROL_TOKENS if stages.control_tokens_as_text else ())
    _WORKER["fitter"] = Fitter(loaded.spec, fit, encoder) if stages.fitting else None


def invalid_line(sample_id: str, source: str, reason: str, origin: Origin | None = None) -> dict:
    return FitOutcome(sample_id, source, "invalid", reason, None, None, origin=origin).report()


def unread_line(p: Problem) -> dict:
    """The fit report line of a record that yielded no conversation."""
    where = Origin(p.file, p.index) if p.file is not None and p.index is not None else None
    return invalid_line(p.sample_id or p.source, p.source, f"{p.what}; {p.fix}", where)


def process_chunk(convs: list[Conversation]) -> ChunkResult:
    """One chunk of samples from validation to (fitted, emitted) rows."""
    w = _WORKER
    spec, stages, fitter = w["spec"], w["stages"], w["fitter"]
    for conv in convs:
        conv.read_problems += stage_problems(conv, stages.stage)
    # Rows that will be trained on (emit: prepare, doctor, streaming) have every image decoded here, so that a
    # pixel that cannot be decoded is a skippable bad sample now, not a crash mid-training (issue 21).
    checked = validate(convs, spec, video_spec=w["video"], verify_images=stages.emit,
                       control_tokens_as_text=stages.control_tokens_as_text)
    valid = {c.id for c in checked.valid}
    out = ChunkResult(list(checked.problems), [], [c for c in convs if c.id not in valid])
    lines: dict[str, dict] = {}
    rows: list[dict] = []
    if fitter is not None:
        by_id: dict[str, list[Problem]] = {}
        for p in checked.problems:
            by_id.setdefault(p.sample_id, []).append(p)
        for c in out.invalid:
            reason = " | ".join(f"{p.what}; {p.fix}" for p in by_id.get(c.id, [])) or "invalid"
            lines[c.id] = invalid_line(c.id, c.source, reason, c.origin)
    for enc in encode_samples(w["encoder"], checked.valid, checked.headers, checked.videos):
        out.stats.append(enc.stats())
        if enc.id in stages.keep_ids:
            out.encoded.append(enc)
        if fitter is None:
            continue
        try:
            fitted = fit_sample(fitter, enc)
        except SampleError as e:
            out.errors.append(e)
            if enc.id in stages.keep_ids:
                out.fitted.append(e)
            continue
        if enc.id in stages.keep_ids:
            out.fitted.append(fitted)
        lines[enc.id] = fitted.report()
        out.pieces += [(p.length, p.image_tokens + sum(v.pad_tokens for v in p.videos)) for p in fitted.pieces]
        out.split_rows += len(fitted.pieces) if fitted.fate == "split" else 0
        if stages.emit:
            rows += [emit_row(p, spec) for p in fitted.pieces]
    if fitter is not None:
        out.lines = [lines[c.id] for c in convs if c.id in lines]
    if stages.emit and rows:
        out.table = table(rows, arrow_types())
    return out


def _init_worker(loaded: Loaded, stages: Stages) -> None:
    # a worker is one core's worth of work: no thread pool of the Rust tokenizer (read at each batch call),
    # nor of torch where a transformers processor (models/checkpoint.py's fallback) brought it in
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    _set_worker(loaded, stages)


def worker_pool(workers: int, loaded: Loaded, stages: Stages) -> ProcessPoolExecutor:
    """`workers` processes forked from a fresh server process that has imported only this module.

    Not forked from this process, which may hold torch and a model (`train` prepares before it trains) and
    whose Rust tokenizer may have started threads; not spawned, which would import everything again per
    worker. Each worker gets the Loaded once (the checkpoint's files, a few MB) and then only chunks."""
    import multiprocessing as mp

    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload([__name__])  # not __main__: the CLI's entry module would run again
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(loaded, stages))


# -- the driver --------------------------------------------------------------------------------
def _chunks(read: ReadArgs, stream: Stream, chunk: int, preference: bool) -> Iterator[list[Conversation]]:
    seen: Counter = Counter()
    buf: list[Conversation] = []
    for item in iter_samples(read, layouts=stream.layouts, mix=stream.mix, preference=preference):
        stream.records += 1
        if isinstance(item, Problem):
            stream.unread.append(item)
            continue
        if read.max_samples:  # the first n samples of each data file (LLaMA-Factory: per dataset)
            key = item.origin.file
            seen[key] += 1
            if seen[key] > read.max_samples:
                stream.limited = True
                continue
        buf.append(item)
        if len(buf) >= chunk:
            yield buf
            buf = []
    if buf:
        yield buf


def _ordered(fn: Callable, items: Iterable, pool: ProcessPoolExecutor | None, window: int) -> Iterator:
    """fn over items, results in order, at most `window` submitted ahead (bounded memory)."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def run_pipeline(read: ReadArgs, loaded: Loaded, stages: Stages, *, seed: int = 0, workers: int = 1,
                 chunk: int = CHUNK, progress: bool = True, desc: str = "preparing") -> Stream:
    """Stream what the read section names through the stages (`seed`: the run's, for interleaved datasets);
    iterate `.chunks` (to the end) to drive it. A preference stage (dpo, kto) reads ranking / KTO records as
    preference samples."""
    stream = Stream(iter(()), mix=Mix.of(read, seed))
    stages = replace(stages, control_tokens_as_text=read.control_tokens_in_text == "text")
    preference = stages.stage not in (None, "sft")

    def drive() -> Iterator[ChunkResult]:
        n = max(1, int(workers or 1))
        bar = tqdm(desc=desc, unit="sample", disable=not progress or None)
        pool = None
        if n == 1:
            _set_worker(loaded, stages)
        else:
            pool = worker_pool(n, loaded, stages)
        try:
            for res in _ordered(process_chunk, _chunks(read, stream, chunk, preference), pool, 2 * n):
                bar.update(len(res.stats) + len(res.invalid))
                yield res
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    stream.chunks = drive()
    return stream
