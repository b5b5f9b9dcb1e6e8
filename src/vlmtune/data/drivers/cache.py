"""The prepared dataset's folder on disk: ownership, the lock, the fingerprint, the atomic swap, stale cleanup.

vlmtune replaces or deletes a folder only when it made it: every folder it creates for a cache holds MARKER_FILE,
whose content names vlmtune and what the folder is (`OWNER`). A folder in the way that lacks it (a user's own
`prepared/`, a dataset folder, an output_dir with checkpoints) is refused with the path and the key to change;
it is never moved aside or removed. `check_folders` refuses, before any work, a config whose output_dir,
prepared_dir and data overlap so that one would be written into, read from or replaced as the other.

A prepare writes into `<prepared_dir>.tmp-<host>-<pid>` (marked first) and swaps it in at the end: the rename is
the commit point, and the fingerprint file, written last, says the folder is a complete cache. Leftovers of a
killed prepare on this node (its pid gone, the folder marked) are removed by the next one.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass
from typing import Iterator

from ... import __version__
from ...config import DataSections, ReadArgs, folders, prepared_values
from ...config.folders import MARKER_FILE  # noqa: F401  (re-exported: the cache's marker is every folder's)
from ...errors import ConfigError, Problem, VlmtuneError

FINGERPRINT_FILE = "vlmtune_fingerprint.json"
OWNER = "vlmtune prepared-dataset cache"  # what MARKER_FILE says: vlmtune's own id for this kind of folder


# -- ownership (the marker and its rule are config/folders.py's; this is the cache's kind of folder) ----------------
def mark(folder: str) -> None:
    """Say that vlmtune made `folder` (so that it may later replace or remove it)."""
    folders.mark(folder, OWNER)


def is_ours(folder: str) -> bool:
    """Whether `folder` is a directory vlmtune made: marked, or a cache written before markers existed (it
    holds vlmtune's fingerprint file, a name nothing else writes)."""
    owner = folders.owner_of(folder)
    if owner is not None or os.path.isfile(os.path.join(folder, MARKER_FILE)):
        return owner == OWNER
    return not os.path.islink(folder) and os.path.isfile(os.path.join(folder, FINGERPRINT_FILE))


def replace_problem(folder: str, key: str = "prepared_dir") -> str | None:
    """Why `folder` may not be replaced by a prepared cache: something that vlmtune did not make is there (a
    file, a link, or a folder with content and no marker). Nothing there, an empty folder or a marked one: None."""
    if not os.path.lexists(folder):
        return None
    if os.path.isdir(folder) and not os.path.islink(folder):
        if is_ours(folder) or folders.is_empty(folder):
            return None
        other = folders.owner_of(folder)
        what = (f"a folder vlmtune made for something else ({other}, says its {MARKER_FILE})" if other else
                "a folder that vlmtune did not create (it has no " + MARKER_FILE + ")")
    else:
        what = "a link" if os.path.islink(folder) else "a file"
    return (f"{key}={folder!r} is {what}; vlmtune replaces only its own prepared folders and never "
            f"deletes yours: set {key} to a new folder (or move that one away)")


def check_replaceable(folder: str, key: str = "prepared_dir") -> None:
    """Refuse (ConfigError) what replace_problem names."""
    problem = replace_problem(folder, key)
    if problem:
        raise ConfigError([problem])


# -- where things go: folders that must not overlap ---------------------------------------------
def _named(read: ReadArgs) -> list[str]:
    """What `dataset` may name: each entry as a path, under dataset_dir, and the file its dataset_info.json entry
    names (read by data/sources/dataset_info, the one parser of that file)."""
    from ..sources.dataset_info import dataset_entries

    root = read.dataset_dir or "."
    names = [n.strip() for n in str(read.dataset).split(",") if n.strip()]
    entries = [e.path for e in dataset_entries(names, root, None) if not isinstance(e, Problem) and e.path]
    return [*names, *(os.path.join(root, n) for n in names), *entries]


def data_locations(read: ReadArgs) -> tuple[list[str], list[str]]:
    """(every file or folder the data is read from, the folders among them read whole), as real paths."""
    root = read.dataset_dir or "."
    places, whole = [], []
    if os.path.isfile(os.path.join(root, "dataset_info.json")):
        places.append(root)
    if read.media_dir:
        places.append(read.media_dir)
    for c in _named(read):
        if os.path.exists(c):
            places.append(c)
            if os.path.isdir(c):
                whole.append(c)
    real = lambda ps: sorted({os.path.realpath(p) for p in ps})  # noqa: E731
    return real(places), real(whole)


def check_folders(data: DataSections) -> None:
    """Refuse (ConfigError, every problem at once) what folder_problems finds, before any work."""
    problems = folder_problems(data)
    if problems:
        raise ConfigError(problems)


def folder_problems(data: DataSections) -> list[str]:
    """output_dir / prepared_dir / data that overlap, and folders vlmtune may not write. The prepared folder is
    replaced on a re-prepare (so it must not be, or hold, the output or the data, nor be a folder vlmtune did not
    make), neither written folder may be a data folder or lie inside a folder read whole as data (the run would
    read its own output), and output_dir must be new, empty or vlmtune's (config/folders.py). With
    `streaming: true` no prepared folder is written, so only output_dir's rules apply."""
    out = os.path.realpath(data.output_dir)
    places, whole = data_locations(data.read)
    problems = []
    for p in places:
        folder = p if os.path.isdir(p) else os.path.dirname(p)
        if folder == out:
            problems.append(f"output_dir={data.output_dir!r} is the data folder {folder!r}: the run would write its "
                            "checkpoints, README and reports among the data; set output_dir to a folder of its own")
    written = [("output_dir", out)]
    if not data.prepare.streaming:
        prep = os.path.realpath(prepared_dir(data))
        problems += _prepared_problems(data, out, prep, places)
        written.append(("prepared_dir", prep))
    problems += [f"{key}={mine!r} is inside {w!r}, which is read whole as data: the run would read its own output "
                 f"as data; set {key} to a folder outside it" for w in whole for key, mine in written if _inside(mine, w)]
    problems.append(folders.refusal(data.output_dir, folders.OUTPUT, "output_dir"))
    if not data.prepare.streaming:  # never a cache, so never replaced: refused now, not after the model loads
        problems.append(replace_problem(prepared_dir(data)))
    return list(dict.fromkeys(p for p in problems if p))


def claim_output_dir(data: DataSections) -> None:
    """Create output_dir if needed and mark it as vlmtune's (after folder_problems found nothing)."""
    folders.claim(data.output_dir, folders.OUTPUT)


def _prepared_problems(data: DataSections, out: str, prep: str, places: list[str]) -> list[str]:
    given = data.prepare.prepared_dir
    problems = []
    if prep == out:
        problems.append(f"prepared_dir={given!r} is output_dir: a new prepare would replace the adapter, "
                        "checkpoints and fit report; set prepared_dir to a folder of its own (or null for "
                        "<output_dir>/prepared)")
    elif _inside(out, prep):
        problems.append(f"prepared_dir={given!r} holds output_dir={data.output_dir!r}: a new prepare "
                        "would replace it; set prepared_dir to a folder of its own (or null)")
    for p in places:
        if p == prep or _inside(p, prep):
            problems.append(f"prepared_dir={prepared_dir(data)!r} is or holds the data at {p!r}: a new prepare would "
                            "replace it; set prepared_dir to a folder of its own (or null for <output_dir>/prepared)")
    return problems


def _inside(path: str, folder: str) -> bool:
    """Whether real path `path` lies strictly inside real path `folder`."""
    return path != folder and path.startswith(folder.rstrip(os.sep) + os.sep)


def prepared_dir(data: DataSections) -> str:
    return data.prepare.prepared_dir or os.path.join(data.output_dir, "prepared")


# -- the lock ------------------------------------------------------------------------------------
@contextlib.contextmanager
def exclusive(path: str, timeout_s: float) -> Iterator[bool]:
    """An exclusive lock on `path` (filelock: flock, held by one process across the nodes that share the
    filesystem, released by the kernel if its holder dies), waiting at most timeout_s; yields whether it
    had to wait."""
    from filelock import FileLock, Timeout

    lock = FileLock(path)
    waited = False
    try:
        lock.acquire(timeout=0)
    except Timeout:
        waited = True
        try:
            lock.acquire(timeout=timeout_s)
        except Timeout:
            raise VlmtuneError(f"waited {timeout_s:.0f} s (ddp_timeout) for another process to finish preparing "
                               f"into {path[:-5]}; raise ddp_timeout, or, if no prepare is running, delete {path}") from None
    try:
        yield waited
    finally:
        lock.release()


# -- writing and swapping ------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """Where one prepare writes: the cache folder and the fit report, made for `fingerprint`, and this process's
    temporary names for them until the swap (named so that stale ones are found: `remove_stale`)."""

    out_dir: str
    report_path: str
    fingerprint: str

    @property
    def _tag(self) -> str:
        return f".tmp-{os.uname().nodename}-{os.getpid()}"

    @property
    def tmp_dir(self) -> str:
        return self.out_dir.rstrip("/") + self._tag

    @property
    def tmp_files(self) -> str:
        """A folder beside the report, marked like tmp_dir, for the report's temp files: what a killed prepare
        leaves is then only marked folders, and cleanup never removes a file because of its name."""
        return self.report_path + self._tag

    @property
    def tmp_report(self) -> str:
        return os.path.join(self.tmp_files, os.path.basename(self.report_path))

    @property
    def tmp_body(self) -> str:
        return self.tmp_report + ".body"


def make_temp(*tmp_dirs: str) -> None:
    for d in tmp_dirs:
        os.makedirs(d)
        mark(d)


def discard(*tmp_dirs: str) -> None:
    """Remove this process's temp folders (marked by make_temp), whatever is left of them."""
    for d in tmp_dirs:
        if is_ours(d):
            shutil.rmtree(d, ignore_errors=True)


def swap_in(tmp_dir: str, out_dir: str) -> None:
    """Replace out_dir by the finished tmp_dir (the rename is the commit point); the old folder is removed only
    when vlmtune made it, checked again here in case something appeared in the way while preparing."""
    check_replaceable(out_dir)
    old = out_dir.rstrip("/") + ".old" + tmp_dir[len(out_dir.rstrip("/")):]
    if os.path.lexists(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp_dir, out_dir)
    if is_ours(old):
        shutil.rmtree(old, ignore_errors=True)
    else:  # an empty folder that was in the way
        with contextlib.suppress(OSError):
            os.rmdir(old)


def remove_stale(out_dir: str, report_path: str) -> None:
    """Leftovers of a killed prepare on this node (its pid is gone): never read, removed here when they are
    folders a prepare marked (make_temp); anything else of a matching name is not vlmtune's and is left alone."""
    node = os.uname().nodename
    for p in glob.glob(glob.escape(out_dir.rstrip("/")) + ".*tmp-*") + glob.glob(glob.escape(report_path) + ".tmp-*"):
        host, _, pid = p.rsplit(".tmp-", 1)[1].rpartition("-")
        if host == node and pid.isdigit() and not _alive(int(pid)) and is_ours(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the fingerprint -----------------------------------------------------------------------------
def data_files(read: ReadArgs) -> list[str]:
    """The files that `dataset` names (paths, or names in dataset_info.json), for the fingerprint."""
    info_path = os.path.join(read.dataset_dir or ".", "dataset_info.json")
    files: list[str] = [info_path] if os.path.isfile(info_path) else []
    for c in _named(read):
        if os.path.isfile(c):
            files.append(c)
        elif os.path.isdir(c):
            files += sorted(os.path.join(r, f) for r, _, fs in os.walk(c) for f in fs)
    return sorted(set(files))


def fingerprint(data: DataSections, loaded, files: list[str]) -> str:
    """What decides the prepared rows: vlmtune's version, the keys declared `prepared=True` (and the seed when it
    interleaves datasets), the row's declared columns and their types, the model's specs and chat template, and the
    data files' bytes."""
    from ..schema import Row, signature

    h = hashlib.sha256()
    h.update(__version__.encode())
    keys = prepared_values(data.model, data.read, data.fit, data.preference)
    h.update(json.dumps(keys, sort_keys=True, default=str).encode())
    if data.read.mix_strategy != "concat":  # the run's seed draws the interleaved order
        h.update(f"seed={data.seed}".encode())
    h.update(json.dumps(signature(Row)).encode())  # a cache written under another row schema is stale
    h.update(json.dumps(loaded.spec.to_dict(), sort_keys=True).encode())
    h.update(json.dumps(loaded.video.to_dict() if loaded.video else None, sort_keys=True).encode())
    h.update(str(getattr(loaded.data_processor, "chat_template", "")).encode())
    # `train` asks twice in one process (the doctor's data check, then prepare): the data's bytes are read once
    # while no file has changed (same size, mtime and inode).
    key = (h.copy().hexdigest(), tuple(_stamp(path) for path in files))
    if key not in _FINGERPRINTS:
        for path in files:
            h.update(path.encode())
            if not os.path.isfile(path):  # a FIFO or device named like a data file is never opened
                continue
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        if len(_FINGERPRINTS) >= 64:
            _FINGERPRINTS.clear()
        _FINGERPRINTS[key] = h.hexdigest()
    return _FINGERPRINTS[key]


_FINGERPRINTS: dict[tuple, str] = {}


def _stamp(path: str) -> tuple:
    """What tells that a data file changed since it was hashed: its size, mtime and inode (None: not a file)."""
    try:
        st = os.stat(path)
    except OSError:
        return (path, None)
    return (path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev) if stat.S_ISREG(st.st_mode) else (path, None)


def read_meta(out_dir: str, fp: str) -> dict | None:
    """The fingerprint file's content when out_dir is a complete cache made for `fp`, else None."""
    try:
        with open(os.path.join(out_dir, FINGERPRINT_FILE), encoding="utf-8") as f:
            meta = json.load(f)
        return meta if isinstance(meta, dict) and meta.get("fingerprint") == fp else None
    except (OSError, ValueError):
        return None


def write_meta(tmp_dir: str, meta: dict) -> None:
    with open(os.path.join(tmp_dir, FINGERPRINT_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f)  # written last: a folder without it is not a cache
