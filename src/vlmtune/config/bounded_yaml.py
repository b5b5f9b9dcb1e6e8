"""Reading YAML within bounds: a repeated key is reported (never silently the last value), merge keys
(`<<: *base`) are understood, and a text over MAX_YAML_BYTES or whose aliases expand beyond MAX_YAML_NODES values
(a "billion laughs") is refused before its value is built. Used for config files, `key=value` overrides and the
YAML that commands read on their own (`vlmtune export`)."""

from __future__ import annotations

import os
import typing
from typing import Any, Iterable

import yaml

from ..errors import ConfigError
from .values import shown

# A config has a few hundred YAML nodes; aliases may repeat a node any number of times without costing memory
# while parsing, but anything that walks the value (conversion, an error message) pays for every repetition, so
# a document whose aliases expand beyond this many nodes (a "billion laughs") is refused before it is built.
MAX_YAML_NODES = 100_000
# The longest text of one file read as a config: far above any real config, far below what would hurt to read.
MAX_YAML_BYTES = 4 * 1024 * 1024


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that reports a repeated key instead of silently keeping the last value, understands merge keys
    (`<<: *base`) and refuses a document whose aliases expand beyond MAX_YAML_NODES nodes."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.repeated: list[str] = []


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *base`: its keys are defaults that the mapping's own keys override, not repeats
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if not isinstance(key, typing.Hashable):
            continue  # construct_mapping below reports it
        if key in seen:
            loader.repeated.append(f"key {shown(key)} appears twice (lines {seen[key]} and {line}); keep one")
        seen.setdefault(key, line)
    loader.flatten_mapping(node)  # merge keys, as SafeConstructor.construct_mapping does before building
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str) -> dict:
    """A YAML mapping file (duplicate keys refused), for commands that read their own YAML (`vlmtune export`)."""
    problems: list[str] = []
    data = read_mapping(path, problems)
    if problems:
        raise ConfigError(problems)
    return data


class _TooBig(Exception):
    pass


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """How many nodes the document has with every alias expanded, counted on the composed graph (each distinct
    node once, memoized), stopping as soon as the count passes `limit`."""
    sizes: dict[int, int] = {}
    order, stack = [], [root]
    while stack:  # post-order without recursion: a deep document cannot overflow Python's stack
        node = stack.pop()
        if id(node) in sizes:
            continue
        sizes[id(node)] = -1
        order.append(node)
        stack.extend(_children(node))
    for node in reversed(order):
        total = 1 + sum(sizes[id(c)] for c in _children(node))
        if total > limit:
            raise _TooBig
        sizes[id(node)] = total
    return sizes[id(root)]


def _children(node: yaml.Node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _bounded(text: str, where: str) -> Any:
    """YAML text -> (its value, the repeated keys), with the bounds above; raises yaml.YAMLError, or ValueError
    saying which bound."""
    if len(text) > MAX_YAML_BYTES:
        raise ValueError(f"{where} is {len(text):,} characters, more than a config can be ({MAX_YAML_BYTES:,})")
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, loader.repeated
        try:
            _expanded_size(node, MAX_YAML_NODES)
        except _TooBig:
            raise ValueError(f"{where} expands, through its aliases (*name), to more than {MAX_YAML_NODES:,} values; "
                             "write the values out instead of nesting aliases") from None
        return loader.construct_document(node), loader.repeated
    finally:
        loader.dispose()


def read_mapping(path: str, problems: list[str]) -> dict:
    """The mapping a YAML file holds, or {} after adding to `problems` why it cannot be read as one."""
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO or a device is never opened
        problems.append(f"cannot read config file {path}: it is not a regular file; check the path")
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(MAX_YAML_BYTES + 1)
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "it is not UTF-8 text"
        problems.append(f"cannot read config file {path}: {why}; check the path")
        return {}
    try:
        data, repeated = _bounded(text, path)
    except yaml.YAMLError as e:
        problems.append(f"{path} is not valid YAML: {_yaml_error(e)}; fix the syntax there")
        return {}
    except ValueError as e:
        problems.append(str(e))
        return {}
    problems.extend(f"{path}: {r}" for r in repeated)
    if not isinstance(data, dict):
        what = "empty" if data is None else f"a {type(data).__name__}, not a mapping"
        problems.append(f"{path} is {what}; write one `key: value` per line, such as `cutoff_len: 2048`")
        return {}
    return data


def _yaml_error(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e)
    return f"{what} at line {mark.line + 1}, column {mark.column + 1}" if mark else what


def parse_overrides(overrides: Iterable[str], problems: list[str]) -> tuple[dict, dict]:
    """`key=value` strings -> ({key: value}, {key: the text}); values read as YAML, so `bf16=true` is a bool."""
    parsed, texts = {}, {}
    for text in overrides:
        key, eq, value = text.partition("=")
        key = key.strip()
        if not eq or not key:
            problems.append(f"override {shown(text)} is not key=value; write it like cutoff_len=1024")
            continue
        try:
            parsed[key] = _bounded(value, f"override {shown(key)}")[0] if value.strip() else None
        except yaml.YAMLError as e:
            problems.append(f"override {shown(text)} has a value that is not valid YAML ({_yaml_error(e)}); quote it")
            continue
        except ValueError as e:
            problems.append(str(e))
            continue
        texts[key] = text
    return parsed, texts
