"""Error types that carry what a user needs to fix a problem: the sample, its source and a fix."""

from __future__ import annotations

import contextlib
import errno
from dataclasses import asdict, dataclass, field
from typing import Iterator

# The longest line an error prints for one problem: a value echoed back (a 4 MB string in a config, a line of a
# data file) is cut here, whatever the message was built from.
MAX_LINE = 2000


def bounded(text: str, limit: int = MAX_LINE) -> str:
    """text, or its start and end around a note of how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[: limit // 2]} ... [{len(text) - limit:,} characters cut] ... {text[-limit // 2:]}"


# Problems of this kind are about a whole file (a layout that cannot be trained: every record has it), so an
# error shows them once per file instead of once per record.
PER_FILE_KINDS = ("untrainable_layout",)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one sample (or one line of a data file).

    `sample_id` is None when the line could not even be parsed into a sample.
    """

    source: str
    what: str
    fix: str
    sample_id: str | None = None
    kind: str = "invalid"
    # where it is, as data (set by the readers; data/types.Origin): the data file (DataError groups PER_FILE_KINDS
    # by it, never by parsing `source`) and the record's index there (None: the whole file, or not known)
    file: str | None = field(default=None, compare=False)
    index: int | None = field(default=None, compare=False)

    def __str__(self) -> str:
        who = f"sample {self.sample_id} ({self.source})" if self.sample_id is not None else self.source
        return f"{who}: {self.what}; {self.fix}"

    def to_dict(self) -> dict:
        return asdict(self)


# An error lists at most this many problems (each bounded), then how many more there are.
MAX_LISTED = 50


def _listing(problems: list) -> str:
    """The problems as the lines of an error: the first MAX_LISTED, each bounded, then "... and N more"."""
    lines = "\n".join(f"  - {bounded(str(p))}" for p in problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return lines + more


class VlmtuneError(Exception):
    """Base class: a user-facing error whose message already says what to do."""


class ConfigError(VlmtuneError):
    """One or more configuration problems, all reported together."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"{len(self.problems)} problem(s) in the configuration:\n{_listing(self.problems)}")

    def __reduce__(self):  # survive pickling across worker processes
        return (type(self), (self.problems,))


class DataError(VlmtuneError):
    """One or more data problems, all reported together."""

    def __init__(self, problems: list[Problem], header: str | None = None):
        self.problems = list(problems)
        head = header or f"{len(self.problems)} problem(s) in the data"
        self.header = header
        super().__init__(f"{head}:\n{_listing(_per_file(self.problems))}")

    def __reduce__(self):
        return (type(self), (self.problems, self.header))


class SampleError(VlmtuneError):
    """A problem with one specific sample, found at a stage boundary (fit, collate)."""

    def __init__(self, sample_id: str, source: str, what: str, fix: str):
        self.sample_id, self.source, self.what, self.fix = sample_id, source, what, fix
        super().__init__(bounded(f"sample {sample_id} ({source}): {what}; {fix}"))

    def __reduce__(self):
        return (type(self), (self.sample_id, self.source, self.what, self.fix))


def _per_file(problems: list[Problem]) -> list:
    """The lines to show: one per file for PER_FILE_KINDS (with its record count), the other problems as they are."""
    out: list = []
    counts: dict[tuple, int] = {}
    for p in problems:
        if p.kind not in PER_FILE_KINDS:
            out.append(p)
            continue
        key = (p.file or p.source, p.what, p.fix)
        if key not in counts:
            out.append(key)
        counts[key] = counts.get(key, 0) + 1
    return [x if isinstance(x, Problem) else f"{x[0]} ({counts[x]} record(s)): {x[1]}; {x[2]}" for x in out]


# What torch's zip writer raises when a write fails part-way (a full disk under torch.save): the OSError is lost.
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "unexpected pos", "file write failed")


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _TORCH_WRITE_FAILURES)


@contextlib.contextmanager
def disk_full_is_an_error(writing: str, fix: str) -> Iterator[None]:
    """Turn a full disk (or quota) met while `writing` into a VlmtuneError that says what was being written and
    `fix`, instead of an OSError or torch's "unexpected pos" from deep inside a save."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not _is_disk_full(e):
            raise
        raise VlmtuneError(f"no space left on the device while writing {writing} ({type(e).__name__}: "
                           f"{str(e)[:200]}); {fix}") from None
