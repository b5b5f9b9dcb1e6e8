"""LLaMA-Factory `dataset_info.json`: dataset names → the files behind them and their columns and tags."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

from ...errors import Problem
from ..media.paths import shorten as _short
from .records import (
    AUTO_FORMAT,
    SHAREGPT_DEFAULTS,
    RecordFormat,
    file_problem,
    type_name,
)


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of dataset_info.json: a local path or a Hub id, with its split, subset and sample count."""

    path: str | None  # the local file or folder (None for a Hub dataset)
    root: str  # the folder its images resolve against
    fmt: RecordFormat
    split: str | None = None
    subset: str | None = None
    hub_id: str | None = None
    num_samples: int | None = None


# dataset_info.json `columns` and `tags` keys vlmtune reads (LLaMA-Factory's), and what each names.
_COLUMNS = ("messages", "images", "videos", "system", "tools", "prompt", "query", "response", "history",
            "kto_tag", "chosen", "rejected")
_TAGS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag", "observation_tag", "function_tag")
_FORMATTINGS = ("sharegpt", "alpaca", "openai")


def _format_from_entry(entry: dict, name: str, info_path: str) -> RecordFormat | Problem:
    """The entry's record format; a mapped column or tag vlmtune cannot use is a Problem, never ignored."""
    def bad(what: str, fix: str) -> Problem:
        return file_problem(f"{info_path}#{name}", "bad_dataset_info", what, fix)

    formatting = entry.get("formatting")
    if formatting is not None and formatting not in _FORMATTINGS:
        return bad(f"dataset {name!r} has formatting {formatting!r}; vlmtune reads " + ", ".join(_FORMATTINGS),
                   "set formatting to sharegpt, alpaca or openai (or leave it out: each record's layout is detected)")
    columns = entry.get("columns") or {}
    tags = entry.get("tags") or {}
    if not isinstance(columns, dict) or not isinstance(tags, dict):
        return bad(f"`columns` and `tags` of dataset {name!r} must be objects", "fix dataset_info.json")
    for key, value in [*columns.items(), *tags.items()]:
        if not isinstance(value, str):
            what = f"`{key}` of dataset {name!r} is {type_name(value)}, expected a string"
            return bad(what, "fix dataset_info.json")
    unknown = [f"columns.{k}" for k in columns if k not in _COLUMNS] + [f"tags.{k}" for k in tags if k not in _TAGS]
    if unknown:
        audio = any(u.startswith("columns.audio") for u in unknown)
        return bad(f"dataset {name!r} maps {', '.join(unknown)}, which vlmtune cannot use"
                   + (" (audio is not supported)" if audio else ""),
                   "remove the mapping (vlmtune reads columns " + ", ".join(_COLUMNS) + ")")
    ranking = entry.get("ranking", False)
    if not isinstance(ranking, bool):
        return bad(f"`ranking` of dataset {name!r} is {type_name(ranking)}, expected true or false",
                   "fix dataset_info.json")
    # LLaMA-Factory's sharegpt and openai entries default to its sharegpt column and tag names
    base = SHAREGPT_DEFAULTS if formatting == "sharegpt" else AUTO_FORMAT
    if formatting == "openai":
        base = RecordFormat(messages="messages", role_tag="role", content_tag="content", formatting="openai")
    fields = {**{k: columns[k] for k in _COLUMNS if k in columns}, **{k: tags[k] for k in _TAGS if k in tags}}
    return replace(base, **fields, formatting=formatting, ranking=ranking)


def _load_info(info_path: str, names: list[str], out: list) -> dict | None:
    try:
        with open(info_path, "rb") as f:
            info = json.loads(f.read().decode("utf-8-sig"))
    except OSError:
        out.append(
            file_problem(
                info_path,
                "data_not_found",
                f"{', '.join(names)} is not a file or folder, and {info_path} does not exist",
                "point `data` at a data file or folder, or set dataset_dir to the folder holding dataset_info.json",
            )
        )
        return None
    except (ValueError, RecursionError) as e:
        what = f"dataset_info.json is not valid JSON: {_short(str(e), 200)}"
        out.append(file_problem(info_path, "bad_dataset_info", what, "fix dataset_info.json"))
        return None
    if not isinstance(info, dict):
        what = "dataset_info.json does not hold an object"
        out.append(file_problem(info_path, "bad_dataset_info", what, "fix dataset_info.json"))
        return None
    return info


def _entry_extras(entry: dict, name: str, info_path: str) -> tuple[str | None, str | None, int | None] | Problem:
    """`split`, `subset` and `num_samples` of an entry, checked."""
    split, subset, num = entry.get("split"), entry.get("subset"), entry.get("num_samples")
    for key, value in (("split", split), ("subset", subset)):
        if value is not None and not isinstance(value, str):
            return file_problem(f"{info_path}#{name}", "bad_dataset_info",
                                f"`{key}` of dataset {name!r} is {type_name(value)}, expected a string",
                                "fix dataset_info.json")
    if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 1):
        return file_problem(f"{info_path}#{name}", "bad_dataset_info",
                            f"`num_samples` of dataset {name!r} is {num!r}, expected a positive integer",
                            "fix dataset_info.json")
    return split, subset, num


def dataset_entries(
    names: list[str], dataset_dir: str, media_dir: str | None, *, hub_ids: bool = False
) -> list[DatasetEntry | Problem]:
    """Each name's DatasetEntry, or the Problem with it.

    With `hub_ids`, a name that is not in dataset_info.json (or when there is none) but looks like
    a Hub id (`owner/name`) is a Hub dataset, as `load_dataset` would take it.
    """
    out: list = []
    info_path = os.path.join(dataset_dir, "dataset_info.json")
    root = media_dir or dataset_dir
    if hub_ids and not os.path.isfile(info_path) and all(looks_like_hub_id(n) for n in names):
        return [DatasetEntry(None, root, AUTO_FORMAT, hub_id=n) for n in names]
    info = _load_info(info_path, names, out)
    if info is None:
        return out
    for name in names:
        entry = info.get(name)
        if entry is None and hub_ids and looks_like_hub_id(name):
            out.append(DatasetEntry(None, root, AUTO_FORMAT, hub_id=name))
            continue
        if not isinstance(entry, dict):
            known = ", ".join(sorted(info)) or "(none)"
            out.append(
                file_problem(
                    f"{info_path}#{name}",
                    "data_not_found",
                    f"dataset {name!r} is not in dataset_info.json (it lists: {known})",
                    "add the dataset to dataset_info.json or fix its name",
                )
            )
            continue
        extras = _entry_extras(entry, name, info_path)
        if isinstance(extras, Problem):
            out.append(extras)
            continue
        split, subset, num = extras
        file_name = entry.get("file_name")
        hub = entry.get("hf_hub_url")
        if (not isinstance(file_name, str) or not file_name) and isinstance(hub, str) and hub:
            fmt = _format_from_entry(entry, name, info_path)
            out.append(fmt if isinstance(fmt, Problem) else
                       DatasetEntry(None, root, fmt, split=split, subset=subset, hub_id=hub, num_samples=num))
            continue
        if not isinstance(file_name, str) or not file_name:
            out.append(
                file_problem(
                    f"{info_path}#{name}",
                    "bad_dataset_info",
                    f"dataset {name!r} has neither `file_name` nor `hf_hub_url`; "
                    "only local files and Hugging Face Hub datasets are supported (not script or ModelScope ones)",
                    "point `file_name` at the local file, or `hf_hub_url` at the Hub dataset id",
                )
            )
            continue
        fmt = _format_from_entry(entry, name, info_path)
        if isinstance(fmt, Problem):
            out.append(fmt)
            continue
        path = os.path.join(dataset_dir, file_name)
        if not os.path.exists(path):
            out.append(
                file_problem(
                    path,
                    "data_not_found",
                    f"file {file_name!r} of dataset {name!r} does not exist in {dataset_dir}",
                    "fix `file_name` in dataset_info.json or add the file",
                )
            )
            continue
        out.append(DatasetEntry(path, root, fmt, split=split, subset=subset, num_samples=num))
    return out


def entry_for_path(path: str, dataset_dir: str | None) -> DatasetEntry | None:
    """The dataset_info.json entry whose `file_name` is `path`, looked up in dataset_dir and the path's folder.

    So that a mapping (columns, tags, split) applies whether the dataset is named or passed as a path.
    Only an entry that is the one naming the path applies; with several, name the dataset instead.
    """
    real = os.path.realpath(path)
    folders = [d for d in (dataset_dir, os.path.dirname(real), os.path.dirname(os.path.dirname(real))) if d]
    for folder in dict.fromkeys(os.path.realpath(d) for d in folders):
        info_path = os.path.join(folder, "dataset_info.json")
        if not os.path.isfile(info_path):
            continue
        try:
            with open(info_path, "rb") as f:
                info = json.loads(f.read().decode("utf-8-sig"))
        except (OSError, ValueError, RecursionError):
            continue  # reported when the dataset is named; a path alone does not need the file
        if not isinstance(info, dict):
            continue
        named = [(name, entry) for name, entry in info.items()
                 if isinstance(entry, dict) and isinstance(entry.get("file_name"), str)
                 and os.path.realpath(os.path.join(folder, entry["file_name"])) == real]
        if len(named) != 1:  # none, or several views of one file (splits, samples): name the one you mean
            continue
        for name, entry in named:
            fmt = _format_from_entry(entry, name, info_path)
            extras = _entry_extras(entry, name, info_path)
            if isinstance(fmt, Problem) or isinstance(extras, Problem):
                return None
            split, subset, num = extras
            return DatasetEntry(path, "", fmt, split=split, subset=subset, num_samples=num)
    return None


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    ok = all(p and p not in (".", "..") and all(c.isalnum() or c in "-_." for c in p) for p in parts)
    return ok and len(parts) == 2 and not name.endswith((".json", ".jsonl", ".parquet", ".arrow"))
