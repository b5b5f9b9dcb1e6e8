"""Preference records → `Conversation` with a `Preference`: one function per layout.

Layouts (docs/preference.md has one example of each):

- LLaMA-Factory ranking, sharegpt: the prompt turns in `conversations` / `messages`, `chosen` and `rejected`
  each one answer turn (`{"from": "gpt", "value": ...}`) or a string; `images` for the prompt's `<image>`s.
- LLaMA-Factory ranking, alpaca: `instruction` (+ `input`), optional `system`, `chosen` / `rejected` strings.
- TRL preference: `prompt` / `chosen` / `rejected`, strings or message lists (explicit prompt), or only
  `chosen` / `rejected` full conversations whose shared leading turns are the prompt (implicit prompt);
  the images in `images`, in order of the prompt's image parts.
- KTO: LLaMA-Factory sharegpt with a `kto_tag` column (true: desirable); TRL unpaired `prompt` /
  `completion` / `label`.

Each side is converted by data/sources/records.record_to_conversation (so paths, placeholders and embedded images
follow the SFT rules exactly); a pair keeps the prompt once. A record that is not a pair at all (a side
missing) yields one Problem; a pair that is wrong (identical sides, an empty side, images in an answer, a
placeholder count that does not match) yields a conversation whose `read_problems` say so, so that it is
reported as invalid, pair by pair, in the fit report.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ...errors import Problem
from ..types import Conversation, Message, Preference
from .records import RecordFormat, record_to_conversation
from .records.preference import is_kto, is_ranking


class _NotAPair(Exception):
    def __init__(self, what: str, fix: str):
        super().__init__(what)
        self.what, self.fix = what, fix


_HINT_PAIR = 'give each pair a prompt and both answers, such as {"prompt": ..., "chosen": ..., "rejected": ...}'


def preference_kind(record: Any, fmt: RecordFormat) -> str | None:
    """"pair", "kto" or None (an SFT record): the layout detector's preference rules (data/sources/records/preference.py),
    and one side alone is a pair with a side missing."""
    if not isinstance(record, dict):
        return None
    if is_kto(record, fmt):
        return "kto"
    if is_ranking(record, fmt) or (fmt.formatting is None and ("chosen" in record or "rejected" in record)):
        return "pair"
    return None


def preference_to_conversation(record: Any, *, sample_id: str, source: str, fmt: RecordFormat,
                               **kwargs) -> Conversation | Problem:
    """One preference record as a Conversation (with `.preference`), or the one Problem why it yields none.
    `kwargs` are record_to_conversation's (base_dir, the read's media rules, origin)."""
    def problem(what: str, fix: str, kind: str = "bad_record") -> Problem:
        return Problem(source=source, what=what, fix=fix, sample_id=sample_id, kind=kind)

    if not isinstance(record, dict):
        return problem("record is not an object", _HINT_PAIR)
    kind = preference_kind(record, fmt)
    convert = _PAIR_LAYOUTS if kind == "pair" else _KTO_LAYOUTS
    for layout, applies, build in convert:
        if applies(record, fmt):
            try:
                made = build(record, fmt)
            except _NotAPair as e:
                return problem(e.what, e.fix, kind="missing_side")
            return _convert(made, kind, layout, record, sample_id=sample_id, source=source, **kwargs)
    return problem("record is neither a ranking pair nor a KTO sample this version reads", _HINT_PAIR)


# -- each layout: the record -> (format, record with the chosen side, record with the rejected side | tag) --------
# The side records are ordinary SFT records read by data/sources/records (its converters: chat, alpaca, ms-swift), under a
# format and with keys that no longer mark them as preference data.
_PREF_KEYS = ("chosen", "rejected", "rejected_response", "label")


def _plain(fmt: RecordFormat, **changes) -> RecordFormat:
    return replace(fmt, ranking=False, chosen=None, rejected=None, kto_tag=None, **changes)


def _side(record: dict, fmt: RecordFormat, **values) -> dict:
    drop = {*_PREF_KEYS, fmt.chosen, fmt.rejected, fmt.kto_tag, "prompt" if "messages" in values else None}
    return {**{k: v for k, v in record.items() if k not in drop}, **values}


def _answer_turn(value: Any, fmt: RecordFormat) -> dict | None:
    """An answer as one turn in the record's own tags: a string, or a turn object as written."""
    if isinstance(value, dict):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        return value[0]
    if isinstance(value, str):
        if fmt.role_tag:
            return {fmt.role_tag: fmt.assistant_tag, fmt.content_tag or "content": value}
        return {"role": "assistant", "content": value}
    return None


def _sides(record: dict, fmt: RecordFormat, chosen: str | None = None, rejected: str | None = None) -> tuple:
    keys = (chosen or fmt.chosen or "chosen", rejected or fmt.rejected or "rejected")
    missing = [k for k in keys if record.get(k) in (None, "", [])]
    if missing:
        raise _NotAPair(f"the pair has no {' and no '.join(f'`{k}`' for k in missing)} answer",
                        f"give the pair both a `{keys[0]}` and a `{keys[1]}` answer, or remove it")
    return record[keys[0]], record[keys[1]]


def _ranking_sharegpt(record: dict, fmt: RecordFormat):
    sides = _sides(record, fmt)
    column = fmt.messages or ("messages" if "messages" in record else "conversations")
    turns = record.get(column)
    if not isinstance(turns, list):
        raise _NotAPair(f"the pair has no `{column}` list of prompt turns", f"add the prompt turns as a `{column}` list")
    chosen, rejected = (_answer_turn(s, fmt) for s in sides)
    if chosen is None or rejected is None:
        raise _NotAPair("an answer is neither a string nor one turn object", "write each answer as a string or one turn")
    pinned = _plain(fmt, messages=column)
    return pinned, _side(record, fmt, **{column: [*turns, chosen]}), _side(record, fmt, **{column: [*turns, rejected]})


def _ranking_alpaca(record: dict, fmt: RecordFormat):
    """LLaMA-Factory alpaca ranking: the alpaca converter reads each side with the answer as its `output`."""
    sides = _sides(record, fmt)
    if not all(isinstance(x, str) for x in sides):
        raise _NotAPair("an alpaca answer is not a string", "write `chosen` and `rejected` as strings")
    return _plain(fmt), _side(record, fmt, **{fmt.response: sides[0]}), _side(record, fmt, **{fmt.response: sides[1]})


def _swift_pair(record: dict, fmt: RecordFormat):
    """ms-swift: `query`, `response` (chosen), `rejected_response`; the swift converter reads each side."""
    sides = _sides(record, fmt, "response", "rejected_response")
    return _plain(fmt), _side(record, fmt, response=sides[0]), _side(record, fmt, response=sides[1])


def _as_turns(value: Any, role: str) -> list | None:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(t, dict) for t in value):
        return value
    if isinstance(value, dict):
        return [value]
    return None


def _trl_pair(record: dict, fmt: RecordFormat):
    sides = _sides(record, fmt)
    chosen, rejected = (_as_turns(x, "assistant") for x in sides)
    if chosen is None or rejected is None:
        raise _NotAPair("an answer is neither a string nor a list of turns",
                        "write each answer as a string or a list of turns")
    if "prompt" in record:
        prompt = _as_turns(record["prompt"], "user")
        if prompt is None:
            raise _NotAPair("`prompt` is neither a string nor a list of turns", "write the prompt as a string or turns")
    else:  # implicit prompt: the leading turns both conversations share
        k = 0
        while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
            k += 1
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    pinned = _plain(fmt, messages="messages", formatting=None)
    return pinned, _side(record, fmt, messages=[*prompt, *chosen]), _side(record, fmt, messages=[*prompt, *rejected])


def _tag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise _NotAPair(f"`{key}` is {value!r}, expected true (desirable) or false (undesirable)",
                        f"tag each sample's answer with `{key}`: true or false")
    return value


def _kto_tagged(record: dict, fmt: RecordFormat):
    tag = _tag(record.get(fmt.kto_tag), fmt.kto_tag)
    return _plain(fmt), _side(record, fmt), tag


def _trl_unpaired(record: dict, fmt: RecordFormat):
    tag = _tag(record.get("label"), "label")
    prompt, completion = _as_turns(record.get("prompt"), "user"), _as_turns(record.get("completion"), "assistant")
    if not prompt or not completion:
        raise _NotAPair("the sample needs a `prompt` and a `completion`", "write both, as strings or lists of turns")
    side = _side(record, fmt, messages=[*prompt, *completion])
    side.pop("completion", None)
    return _plain(fmt, messages="messages", formatting=None), side, tag


_PAIR_LAYOUTS = (
    ("ranking", lambda r, f: f.formatting == "alpaca", _ranking_alpaca),
    ("ranking", lambda r, f: "rejected_response" in r, _swift_pair),
    ("ranking", lambda r, f: f.messages is not None or "conversations" in r or ("messages" in r and "prompt" not in r),
     _ranking_sharegpt),
    ("ranking", lambda r, f: True, _trl_pair),
)
_KTO_LAYOUTS = (
    ("kto", lambda r, f: bool(f.kto_tag), _kto_tagged),
    ("kto", lambda r, f: "completion" in r, _trl_unpaired),
)


# -- the conversion shared by all layouts ------------------------------------------------------------------------
def _convert(made, kind: str, layout: str, record: dict, *, sample_id: str, source: str, **kwargs):
    fmt, first, other = made
    conv = record_to_conversation(first, sample_id=sample_id, source=source, fmt=fmt, **kwargs)
    if isinstance(conv, Problem):
        return conv
    conv.layout = layout
    if kind == "kto":
        conv.preference = Preference("kto", desirable=other)
        _check_answer(conv, conv.messages[-1] if conv.messages else None, "completion")
        return conv
    rejected_conv = record_to_conversation(other, sample_id=sample_id, source=source, fmt=fmt, **kwargs)
    if isinstance(rejected_conv, Problem):
        return rejected_conv
    rejected = rejected_conv.messages[-1] if rejected_conv.messages else None
    conv.preference = Preference("pair", rejected=rejected)
    seen = {p.what for p in conv.read_problems}
    conv.read_problems += [p for p in rejected_conv.read_problems if p.what not in seen]
    chosen = conv.messages[-1] if conv.messages else None
    _check_answer(conv, chosen, "chosen")
    _check_answer(conv, rejected, "rejected")
    if chosen is not None and rejected is not None and _parts(chosen) == _parts(rejected):
        conv.read_problems.append(_pair_problem(conv, "identical_pair", "the chosen and rejected answers are identical",
                                                "a pair needs two different answers: fix or remove it"))
    return conv


def _parts(m: Message) -> tuple:
    return tuple((p.type, getattr(p, "text", None) or getattr(p, "ref", None)) for p in m.parts)


def _check_answer(conv: Conversation, answer: Message | None, side: str) -> None:
    if answer is None or answer.role != "assistant":
        conv.read_problems.append(_pair_problem(conv, "missing_side", f"the {side} side has no assistant answer",
                                                f"end the {side} side with one assistant turn"))
        return
    media = len(answer.images) + len(answer.videos)
    if media:
        conv.read_problems.append(_pair_problem(
            conv, "image_count_mismatch",
            f"the {side} answer holds {media} image(s)/video(s); a preference sample's images belong to its prompt",
            "move the <image> placeholders into the prompt, so that both answers see the same images"))
    elif not answer.text.strip():
        conv.read_problems.append(_pair_problem(conv, "missing_side", f"the {side} answer is empty",
                                                f"write the {side} answer, or remove the sample"))


def _pair_problem(conv: Conversation, kind: str, what: str, fix: str) -> Problem:
    return Problem(source=conv.source, what=what, fix=fix, sample_id=conv.id, kind=kind)
