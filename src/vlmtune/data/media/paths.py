"""Where an image reference points: resolved against media_dir, symlinks followed, kept inside it unless allowed.

Nothing is fetched or opened here; `validate` checks that files exist and are images. With
allow_remote_images an http(s) URL resolves to no path and no problem: data/media/remote.py fetches it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ...config import ReadArgs


def shorten(value: str, limit: int = 80) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def quoted(value: str) -> str:
    return repr(shorten(value))


MAX_PATH_CHARS = 4096


HTTP_RE = re.compile(r"^https?://", re.ASCII | re.IGNORECASE)
URL_RE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.\-]*://|data:)", re.ASCII)


class PathCache:
    """`os.path.realpath` with the folders' real paths remembered, for one read of a dataset.

    realpath(dir/name) == realpath(dir)/name unless `name` is a symlink (then it is followed) or
    `.`/`..`; that saves the per-component lstat calls of realpath for every image of a dataset.
    Make a new one per read: it does not notice files changing under it.
    """

    def __init__(self) -> None:
        self._dirs: dict[str, str] = {}

    def folder(self, folder: str) -> str:
        real = self._dirs.get(folder)
        if real is None:
            real = self._dirs[folder] = os.path.realpath(folder or ".")
        return real

    def realpath(self, path: str) -> str:
        folder, sep, name = path.rpartition(os.sep)
        if name in ("", ".", ".."):
            return os.path.realpath(path)
        if sep and not folder:
            folder = os.sep
        real_folder = self.folder(folder)
        real = (real_folder if real_folder.endswith(os.sep) else real_folder + os.sep) + name
        if os.path.islink(real):
            real = os.path.realpath(real)
        return real


@dataclass(frozen=True)
class MediaRules:
    """Which media references one read accepts: the read section's allow_paths_outside_media_dir and
    allow_remote_images, made once per read (`of`) with the PathCache all its records share."""

    allow_outside: bool = False
    allow_remote: bool = False
    cache: PathCache = field(default_factory=PathCache, compare=False)

    @classmethod
    def of(cls, read: ReadArgs) -> "MediaRules":
        return cls(read.allow_paths_outside_media_dir, read.allow_remote_images)


def _inside(path: str, root: str) -> bool:
    if path == root:
        return True
    prefix = root if root.endswith(os.sep) else root + os.sep
    return path.startswith(prefix)


def resolve_image(ref: str, base_dir: str, rules: MediaRules | None = None, *,
                  media: str = "image") -> tuple[str | None, tuple[str, str, str] | None]:
    """The resolved path of one image (or, with media="video", video) reference under `rules` (default: the
    safe ones), or None and (kind, what, fix) saying why not. Videos are local files only: a URL is refused
    whatever allow_remote_images says."""
    rules = rules or MediaRules()
    if URL_RE.match(ref):
        if media != "image":
            what = f"{media} {quoted(ref)} is a URL; remote {media}s are not fetched"
            return None, ("remote_image", what, f"download the {media} and reference the local file instead")
        if rules.allow_remote and HTTP_RE.match(ref):
            return None, None  # fetched after reading (data/media/remote.py), which sets the path or the problem
        if rules.allow_remote:
            what = f"image {quoted(ref)} is a URL of a scheme that is not fetched (only http, https and file)"
            return None, ("remote_image", what, "download the image and reference the local file instead")
        what = f"image {quoted(ref)} is a URL; remote images are refused"
        return None, ("remote_image", what,
                      "set allow_remote_images: true to fetch http(s) images, or download the image and "
                      "reference the local file instead")
    real = rules.cache.realpath(os.path.join(base_dir, ref))
    if rules.allow_outside:
        return real, None
    root = rules.cache.folder(base_dir)
    if not _inside(real, root):
        return None, (
            "path_outside_media_dir",
            f"{media} {quoted(ref)} resolves to {real}, outside the media folder {root}",
            f"move the {media} under the media folder, set media_dir to a folder that contains it, "
            "or pass allow_paths_outside_media_dir=True if you trust this dataset",
        )
    return real, None
