"""`streaming: true`: rows fitted on the fly from the pipeline, with no prepared copy, and the fit report
written as the records are read (the Trainer needs max_steps with it)."""

from __future__ import annotations

import contextlib
import json
import os

from ...config import DataSections
from ...models.load import Loaded
from . import cache
from .pipeline import run_pipeline, unread_line
from .prepare import CHUNK, REPORT_FILE, prepare_stages


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

    def __iter__(self):
        data = self.data
        self.passes += 1
        first = self.passes == 1
        stream = run_pipeline(data.read, self.loaded, prepare_stages(data), seed=data.seed,
                              workers=data.prepare.preprocessing_num_workers or 1,
                              chunk=CHUNK, progress=False)
        cache.claim_output_dir(data)  # checked by check_folders before the run started
        report = open(self.report_path, "w", encoding="utf-8") if first else None
        written = 0

        def write(lines: list[dict]) -> None:  # the unreadable records met so far, then these lines
            nonlocal written
            lines = [unread_line(p) for p in stream.unread[written:]] + lines
            written = len(stream.unread)
            report.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in lines)
            report.flush()

        try:
            with contextlib.closing(stream.chunks) as chunks:  # closed on an error: the workers stop at once
                for res in chunks:
                    if res.errors:
                        raise res.errors[0]
                    if report is not None:
                        write(res.lines)
                    if res.table is not None:
                        yield from res.table.to_pylist()
            if report is not None:
                write([])
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
