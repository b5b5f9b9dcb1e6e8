"""Folders vlmtune writes: the ownership marker, and the one rule for writing into or replacing a folder.

vlmtune writes into a folder it created and marked, or into a new or empty one (which it then marks); it replaces
or removes a folder only when that folder carries its marker, MARKER_FILE, whose content names vlmtune and the
kind of folder (`owner`: a training output, a prepared-dataset cache, an export, a tiny checkpoint, a demo). A
folder of one kind is never replaced as another (`export --force` never replaces a training output). Anything
else in the way (a folder with content and no marker, a file, a link) is refused with the path, the key or flag
that named it and the fix; nothing is moved aside or removed. It sits here, below models, data, train and
commands, because each of them writes folders (the layers import downwards only).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets

from .. import __version__
from ..errors import VlmtuneError

MARKER_FILE = ".vlmtune-owned"

# The kinds of folders vlmtune makes (the marker's `owner`); data/drivers/cache.py adds its prepared-dataset cache.
OUTPUT = "vlmtune training output"  # output_dir of prepare / train
EXPORT = "vlmtune export"  # vlmtune export --out / export_dir
TINY = "vlmtune tiny checkpoint"  # vlmtune tiny-model OUT
DEMO = "vlmtune demo"  # vlmtune demo --out


def owner_of(folder: str | os.PathLike) -> str | None:
    """The `owner` the marker in `folder` names, or None (no marker, not a plain folder, unreadable)."""
    folder = os.fspath(folder)
    if os.path.islink(folder) or not os.path.isdir(folder):
        return None
    try:
        with open(os.path.join(folder, MARKER_FILE), encoding="utf-8") as f:
            owner = json.load(f).get("owner")
    except (OSError, ValueError, AttributeError):
        return None
    return owner if isinstance(owner, str) else None


def is_marked(folder: str | os.PathLike, owner: str) -> bool:
    return owner_of(folder) == owner


def mark(folder: str | os.PathLike, owner: str) -> None:
    """Say that vlmtune made `folder` as `owner` (so that it may later write into, replace or remove it). Written
    aside and renamed, so that another process (a rank of the same run) never reads half a marker."""
    folder = os.fspath(folder)
    if is_marked(folder, owner):
        return
    with replacing(os.path.join(folder, MARKER_FILE), "w", encoding="utf-8") as f:
        json.dump({"owner": owner, "version": __version__}, f)


@contextlib.contextmanager
def replacing(path: str | os.PathLike, mode: str = "w", **kw):
    """Write the file `path` whole or not at all: yields a new file beside it, renamed over `path` when the block
    ends and removed on an error. The temp file is created exclusively (O_EXCL) under a fresh name, so whatever
    already lies beside `path` is never opened, truncated or removed."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, mode, **kw) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def is_empty(folder: str | os.PathLike) -> bool:
    """A plain folder (not a link) with nothing in it but, maybe, a marker being written (another rank of the
    same run claiming it this instant)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder) or os.path.islink(folder):
        return False
    return all(n.startswith(MARKER_FILE + ".tmp-") for n in os.listdir(folder))


# An output_dir written before markers existed is recognised by what only vlmtune writes there: its config copy,
# a checkpoint it marked complete, or its prepared cache.
_LEGACY_OUTPUT = ("vlmtune_config.yaml", "checkpoint-*/vlmtune_complete", "prepared/" + MARKER_FILE,
                  "prepared/vlmtune_fingerprint.json")


def is_legacy_output(folder: str | os.PathLike) -> bool:
    import glob

    folder = os.fspath(folder)
    return (os.path.isdir(folder) and not os.path.islink(folder) and owner_of(folder) is None
            and any(glob.glob(os.path.join(glob.escape(folder), name)) for name in _LEGACY_OUTPUT))


def named(key: str, folder: str | os.PathLike) -> str:
    """How an error names the folder: `key=value` for a config key, `--flag value` for a command-line flag."""
    return f"{key} {os.fspath(folder)}" if key.startswith("-") or key.isupper() else f"{key}={os.fspath(folder)!r}"


def refusal(folder: str | os.PathLike, owner: str, key: str) -> str | None:
    """Why vlmtune may not write `owner`'s files into `folder` (named by `key`), or None when it may: nothing is
    there, an empty folder, or a folder marked as `owner` (for OUTPUT, also one an earlier vlmtune wrote)."""
    folder = os.fspath(folder)
    if not os.path.lexists(folder) or is_empty(folder) or is_marked(folder, owner):
        return None
    if owner == OUTPUT and is_legacy_output(folder):
        return None
    if os.path.islink(folder):
        what = "a link"
    elif not os.path.isdir(folder):
        what = "a file"
    elif owner_of(folder) is not None:
        what = f"a folder vlmtune made for something else ({owner_of(folder)}, says its {MARKER_FILE})"
    else:
        what = f"a folder with content that vlmtune did not create (it has no {MARKER_FILE})"
    return (f"{named(key, folder)} is {what}; vlmtune writes into or replaces only folders it created and never "
            f"deletes or overwrites yours: set {key} to a new folder, or empty that one yourself")


def check(folder: str | os.PathLike, owner: str, key: str) -> None:
    """Raise VlmtuneError with what `refusal` says, if anything (a command's one folder; a config's folders are
    collected with the other problems instead)."""
    why = refusal(folder, owner, key)
    if why:
        raise VlmtuneError(why)


def claim(folder: str | os.PathLike, owner: str) -> None:
    """Create `folder` (and its parents) if needed and mark it as `owner`; call it after `refusal` said None."""
    os.makedirs(folder, exist_ok=True)
    mark(folder, owner)


def check_and_claim(folder: str | os.PathLike, owner: str, key: str) -> None:
    """`check`, then `claim`: a command that writes its files into `folder` (named by `key`)."""
    check(folder, owner, key)
    claim(folder, owner)


def remove_marked(folder: str | os.PathLike, owner: str) -> bool:
    """Remove `folder` when it carries `owner`'s marker (an empty folder too); True if it is gone."""
    import shutil

    folder = os.fspath(folder)
    if is_marked(folder, owner):
        shutil.rmtree(folder, ignore_errors=True)
    elif is_empty(folder):
        with contextlib.suppress(OSError):
            os.rmdir(folder)
    return not os.path.lexists(folder)
