"""LLaMA-Factory `dataset_info.json`: dataset names → the files behind them and their columns and tags."""

from __future__ import annotations

import json
import os

from ..errors import Problem
from .paths import _short
from .records import (
    AUTO_FORMAT,
    SHAREGPT_DEFAULTS,
    RecordFormat,
    _type_name,
    file_problem,
)


def _format_from_entry(entry: dict, name: str, info_path: str) -> RecordFormat | Problem:
    def bad(what: str, fix: str) -> Problem:
        return file_problem(f"{info_path}#{name}", "bad_dataset_info", what, fix)

    formatting = entry.get("formatting")
    if formatting not in (None, "sharegpt"):
        return bad(
            f"dataset {name!r} has formatting {formatting!r}; only sharegpt is supported",
            "convert the data to sharegpt (messages with <image> placeholders and an `images` list)",
        )
    if entry.get("ranking"):
        return bad(f"dataset {name!r} is a ranking (preference) dataset", "use a supervised (sharegpt) dataset")
    columns = entry.get("columns") or {}
    tags = entry.get("tags") or {}
    if not isinstance(columns, dict) or not isinstance(tags, dict):
        return bad(f"`columns` and `tags` of dataset {name!r} must be objects", "fix dataset_info.json")
    for key, value in [*columns.items(), *tags.items()]:
        if not isinstance(value, str):
            what = f"`{key}` of dataset {name!r} is {_type_name(value)}, expected a string"
            return bad(what, "fix dataset_info.json")
    base = SHAREGPT_DEFAULTS if formatting == "sharegpt" else AUTO_FORMAT
    return RecordFormat(
        messages=columns.get("messages", base.messages),
        images=columns.get("images", base.images),
        system=columns.get("system", base.system),
        role_tag=tags.get("role_tag", base.role_tag),
        content_tag=tags.get("content_tag", base.content_tag),
        user_tag=tags.get("user_tag", base.user_tag),
        assistant_tag=tags.get("assistant_tag", base.assistant_tag),
        system_tag=tags.get("system_tag", base.system_tag),
        observation_tag=tags.get("observation_tag", base.observation_tag),
        function_tag=tags.get("function_tag", base.function_tag),
    )


def dataset_files(names: list[str], dataset_dir: str, media_dir: str | None) -> list[tuple[str, str, RecordFormat] | Problem]:
    """Each name's (data path, folder its images resolve against, record format), or the Problem with it."""
    out: list = []
    info_path = os.path.join(dataset_dir, "dataset_info.json")
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
        return out
    except (ValueError, RecursionError) as e:
        what = f"dataset_info.json is not valid JSON: {_short(str(e), 200)}"
        out.append(file_problem(info_path, "bad_dataset_info", what, "fix dataset_info.json"))
        return out
    if not isinstance(info, dict):
        what = "dataset_info.json does not hold an object"
        out.append(file_problem(info_path, "bad_dataset_info", what, "fix dataset_info.json"))
        return out
    root = media_dir or dataset_dir
    for name in names:
        entry = info.get(name)
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
        file_name = entry.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            out.append(
                file_problem(
                    f"{info_path}#{name}",
                    "bad_dataset_info",
                    f"dataset {name!r} has no `file_name`; "
                    "only local files are supported (not hub or script datasets)",
                    "download the dataset and point `file_name` at the local file",
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
        out.append((path, root, fmt))
    return out
