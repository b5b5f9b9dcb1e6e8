"""What a config value may be: the field helper that declares a key, its converters and range checks.

Every key of the YAML is declared with `arg` in sections.py or training_sections.py; load.py converts and checks
a raw value with the helpers here. Nothing here knows a key by name.
"""

from __future__ import annotations

import difflib
import functools
import math
import operator
import os
import reprlib
import types
import typing
from dataclasses import MISSING, field
from typing import Any, Callable, Iterable

# The overflow policies, tried in the configured order on a sample longer than cutoff_len (data/stages/fit.py).
POLICIES = ("shrink_images", "truncate_text", "split", "drop", "error")
OVERFLOW_POLICIES = POLICIES
DEFAULT_OVERFLOW = ["shrink_images", "truncate_text", "split", "drop"]

# A sample handed to one of these never reaches a later policy, so only the last policy may be one of them.
TERMINAL_POLICIES = ("drop", "error")

# transformers' SchedulerType and OptimizerNames (5.x), copied: importing them pulls in transformers and peft,
# 8 s of CPU against 0.1 s for all of vlmtune.config (docs/benchmarks.md); tests/config checks they still match.
LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
    "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy",
)
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor", "adamw_anyprecision",
    "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad", "adamw_bnb_8bit", "adamw_8bit",
    "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit",
    "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw",
    "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw", "apollo_adamw_layerwise",
    "stable_adamw",
)

# How a config value is shown in a message: bounded, whatever its size (a long string, a list of a million
# items, an alias-nested structure), so that an error never echoes megabytes back.
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 120
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 8
_SHOWN.maxlevel = 3


def shown(value: Any) -> str:
    """repr(value), at most a few hundred characters."""
    return _SHOWN.repr(value)


def did_you_mean(word: str, options: Iterable[str], otherwise: str) -> str:
    """A "did you mean" for a word not among `options` (a prefix first, then the closest spelling), or `otherwise`."""
    options = list(options)
    if len(word) > 64:  # no key is this long, and difflib's time grows with it
        return otherwise
    # A prefix is usually a shortened name ("adamw" for adamw_torch); difflib alone would pick grokadamw.
    close = [o for o in options if word and o.startswith(word)][:1] or difflib.get_close_matches(word, options, n=1)
    return f"did you mean {close[0]!r}?" if close else otherwise


def yaml_text(v: Any) -> str:
    """A value as YAML writes a scalar; anything long shown bounded (it may be echoed in a note or an error)."""
    if v is True or v is False or v is None:
        return "true" if v else "false" if v is False else "null"
    text = str(v) if isinstance(v, (str, int, float)) else ""
    return text if text and len(text) <= _SHOWN.maxstring else shown(v)


# Stands for the value of a key that already has a problem, so that checks across keys skip it.
INVALID = object()


class BadValue(ValueError):
    """A value of the wrong type; the message completes "key=value ...", e.g. "is not an integer"."""


# --- field declarations -------------------------------------------------------------------------------------


def arg(
    default: Any = MISSING,
    help: str = "",
    *,
    expect: str | None = None,
    check: Callable[[Any], str | None] | None = None,
    choices: tuple[str, ...] | None = None,
    choices_what: str | None = None,
    convert: Callable[[Any], Any] | None = None,
    required: bool = False,
    prepared: bool = False,
) -> Any:
    """A dataclass field whose metadata documents it (help) and validates it (expect, check, choices, convert).

    `expect` completes "set KEY to ..." in error messages; `check` returns what is wrong with a well-typed value.
    `prepared`: the key changes what `prepare` emits, so it is part of the prepared dataset's fingerprint
    (keys.prepared_values); a key that does not (learning_rate, the skip thresholds) leaves the cache valid.
    """
    meta = {"help": help, "expect": expect, "check": check, "choices": choices, "choices_what": choices_what,
            "convert": convert, "required": required, "prepared": prepared}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=None if required else default, metadata=meta)


def positive(v: float) -> str | None:
    return "is not positive" if v <= 0 else None


def non_negative(v: float) -> str | None:
    return "is negative" if v < 0 else None


def share(v: float) -> str | None:
    return None if 0 < v <= 1 else "is not in (0, 1]"


def ratio(v: float) -> str | None:
    return None if 0 <= v <= 1 else "is not in [0, 1]"


def dropout(v: float) -> str | None:
    return None if 0 <= v < 1 else "is not in [0, 1)"


def minus_one_or_positive(v: int) -> str | None:
    """-1 means "not set" (max_steps: train by epochs; pissa_iter: an exact SVD)."""
    return None if v == -1 or v > 0 else "is neither -1 nor positive"


def val_size(v: int | float) -> str | None:
    if v < 0:
        return "is negative"
    # LLaMA-Factory reads a float as a fraction; 1.0 or more of the data cannot be held out.
    return "is a fraction of 1 or more" if isinstance(v, float) and v >= 1 else None


def _as_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    raise BadValue("is not true or false")


def _as_int(v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    raise BadValue("is not an integer")


def _as_float(v: Any) -> float:
    # PyYAML reads `1e-4` (no dot) as a string; accept what float() reads so such configs still load.
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            pass
    return float(_as_number(v))


def _as_number(v: Any) -> int | float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if not math.isfinite(v):  # YAML's .inf and .nan pass every range check
            raise BadValue("is not a finite number")
        return v
    raise BadValue("is not a number")


def _as_str(v: Any) -> str:
    if isinstance(v, (str, os.PathLike)):
        return os.fspath(v)
    raise BadValue("is not a string")


def _as_str_list(v: Any) -> list[str]:
    """A list of names, from a YAML list or from a comma-separated string (LLaMA-Factory's form)."""
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise BadValue("is not a string or a list of strings")
    return [s.strip() for s in items if s.strip()]


def as_comma_str(v: Any) -> str:
    """A comma-separated string; a YAML list is joined so both spellings mean the same."""
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return ",".join(s.strip() for s in v)
    if isinstance(v, (str, os.PathLike)):
        return os.fspath(v)
    raise BadValue("is not a string or a list of strings")


def _as_checkpoint(v: Any) -> str | bool | None:
    if v is False:  # HF's spelling of "do not resume"
        return None
    if v is True or isinstance(v, (str, os.PathLike)):
        return os.fspath(v) if isinstance(v, os.PathLike) else v
    raise BadValue("is not true, false or a path")


# The Trainer's `fsdp` options (transformers' FSDPOption): a sharding strategy, then auto_wrap / offload.
FSDP_OPTIONS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")
# FSDP1-only strategies: FSDP2 (fully_shard), the only FSDP vlmtune runs, has no equivalent.
FSDP1_ONLY = ("no_shard", "hybrid_shard", "hybrid_shard_zero2")


def as_fsdp(v: Any) -> str | None:
    """The Trainer's `fsdp`: true, or options as a string ("full_shard auto_wrap") or list; false: none.
    Returned as the options joined by spaces, full_shard added when no strategy is named."""
    if v is False or v is None:
        return None
    items = ["full_shard", "auto_wrap"] if v is True else v.split() if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise BadValue("is not true, false or FSDP options such as 'full_shard auto_wrap'")
    for item in items:
        if item in FSDP1_ONLY:
            raise BadValue(f"asks for {item!r}, an FSDP1 strategy; vlmtune runs FSDP2, which offers full_shard "
                       "(ZeRO-3-like) and shard_grad_op (ZeRO-2-like)")
        if item not in FSDP_OPTIONS:
            raise BadValue(f"has {item!r}, which is not one of {', '.join(FSDP_OPTIONS)}")
    if "full_shard" in items and "shard_grad_op" in items:
        raise BadValue("names both full_shard and shard_grad_op; keep one")
    if "full_shard" not in items and "shard_grad_op" not in items:
        items = ["full_shard", *items]
    return " ".join(dict.fromkeys(items))


def as_mapping_or_json(v: Any) -> dict:
    """A YAML mapping, or the path of a JSON file holding one (as the Trainer's fsdp_config accepts)."""
    if isinstance(v, dict):
        return dict(v)
    if isinstance(v, (str, os.PathLike)):
        import json

        try:
            with open(v, encoding="utf-8") as fh:
                data = json.load(fh)
        except OSError as e:
            raise BadValue(f"cannot be read ({e.strerror})") from None
        except ValueError as e:
            raise BadValue(f"is not valid JSON ({e})") from None
        if isinstance(data, dict):
            return data
        raise BadValue("does not hold a JSON object")
    raise BadValue("is not a mapping or the path of a JSON file")


_CONVERTERS: dict[Any, Callable[[Any], Any]] = {
    bool: _as_bool,
    int: _as_int,
    float: _as_float,
    str: _as_str,
    int | float: _as_number,
    list[str]: _as_str_list,
    bool | str: _as_checkpoint,
}


def without_none(hint: Any) -> tuple[Any, bool]:
    """(the hint with None removed, whether None is allowed)."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else ()
    if type(None) not in args:
        return hint, False
    rest = [a for a in args if a is not type(None)]
    return functools.reduce(operator.or_, rest), True


def converter(f: Any, hint: Any) -> Callable[[Any], Any]:
    return f.metadata["convert"] or _CONVERTERS[without_none(hint)[0]]

