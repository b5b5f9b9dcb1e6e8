"""The one place that decides a record's layout: `detect(record, fmt)` names it, `CONVERTERS` converts it.

A new layout is a converter module (its row shape in its docstring), one entry in `LAYOUTS` and
`CONVERTERS`, one rule in `detect`, and a fixture in tests/data/sources/test_records.py.
"""

from __future__ import annotations

from typing import Any, Callable

from .alpaca import convert_alpaca
from .cauldron import convert_cauldron
from .chat import convert_chat
from .common import BadRecord, Context, Converted, RecordFormat, type_name
from .preference import is_kto, is_ranking, refuse_kto, refuse_ranking
from .prompt_completion import convert_prompt_completion
from .swift import convert_swift
from .v1 import convert_v1

Converter = Callable[[dict, RecordFormat, Context], Converted]

# The layouts recognised (`Conversation.layout`), with what gives each away, and their converters.
LAYOUTS = {
    "sharegpt": "LLaMA-Factory sharegpt / HF chat (`messages` or `conversations`, `images`)",
    "trl": "TRL / llava-instruct-mix (`messages` with image parts without a path, `images` column in order)",
    "llava": "LLaVA / ShareGPT4V (`image`, `conversations` from/value human/gpt)",
    "cauldron": "the_cauldron (`images`, `texts` of {user, assistant})",
    "openai": "OpenAI chat fine-tuning (`image_url` parts, `data:` URIs, `weight`, `tool_calls`)",
    "alpaca": "LLaMA-Factory alpaca (`instruction`, `input`, `output`, `system`, `history`)",
    "v1": "LLaMA-Factory v1 (`messages` of {\"type\", \"value\"} parts, `loss_weight`)",
    "prompt_completion": "TRL prompt / completion (`prompt`, `completion`, `image` or `images`)",
    "swift": "ms-swift query / response (`query`, `response`, `history`, `<img>` tags)",
    "kto": "KTO-tagged answers (LLaMA-Factory `kto_tag`, TRL `label`)",
    "ranking": "preference pairs (LLaMA-Factory ranking, TRL / ms-swift chosen and rejected)",
}

CONVERTERS: dict[str, Converter] = {
    "sharegpt": convert_chat, "trl": convert_chat, "openai": convert_chat, "llava": convert_chat,
    "cauldron": convert_cauldron, "alpaca": convert_alpaca, "v1": convert_v1,
    "prompt_completion": convert_prompt_completion, "swift": convert_swift,
    "kto": refuse_kto, "ranking": refuse_ranking,
}


def detect(record: Any, fmt: RecordFormat) -> str:
    """The record's layout: the dataset_info.json entry's `formatting` when it has one, else what the record holds."""
    if not isinstance(record, dict):
        raise BadRecord(f"record is {type_name(record)}, expected an object with a `messages` list",
                        "write each record as {\"messages\": [...], \"images\": [...]}")
    if is_kto(record, fmt):
        return "kto"
    if is_ranking(record, fmt):
        return "ranking"
    if fmt.formatting == "alpaca":
        return "alpaca"
    turns = _turns(record, fmt)
    if turns is not None:
        return _chat_kind(record, fmt, turns)
    if fmt.formatting is None:
        for layout, keys in _BY_KEYS:
            if all(k in record for k in keys(fmt)):
                return layout
    raise BadRecord("record has no `messages` (or `conversations`) list, nor the columns of another layout "
                    f"vlmtune reads (its keys: {', '.join(map(str, list(record)[:8])) or 'none'})",
                    "add the turns as a `messages` list of {\"role\", \"content\"} objects "
                    "(docs/datasets.md lists every layout read)")


_BY_KEYS: list[tuple[str, Callable[[RecordFormat], tuple]]] = [
    ("cauldron", lambda f: ("texts",)),
    ("alpaca", lambda f: (f.prompt, f.response)),
    ("alpaca", lambda f: (f.query, f.response)),
    ("prompt_completion", lambda f: ("prompt", "completion")),
    ("swift", lambda f: ("query", "response")),
]


def _turns(record: dict, fmt: RecordFormat) -> Any:
    if fmt.messages is not None:
        return record.get(fmt.messages, [])
    return record.get("messages", record.get("conversations"))


def _chat_kind(record: dict, fmt: RecordFormat, turns: Any) -> str:
    """Which chat layout: the images' and flags' spelling tells them apart (all read by one converter)."""
    msgs = [t for t in turns if isinstance(t, dict)] if isinstance(turns, list) else []
    parts = [p for t in msgs if isinstance(t.get("content"), list) for p in t["content"] if isinstance(p, dict)]
    if any("loss_weight" in t for t in msgs) or any("value" in p and "type" in p for p in parts):
        return "v1"
    if fmt.images not in record and "image" in record:
        return "llava"
    if any(p.get("type") == "image_url" for p in parts) or any("weight" in t or "tool_calls" in t for t in msgs):
        return "openai"
    if any(p.get("type") == "image" and not any(p.get(k) is not None for k in ("image", "path", "url"))
           for p in parts):
        return "trl"
    return "sharegpt"
