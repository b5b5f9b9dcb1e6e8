"""Loading a config: the YAML file and `key=value` overrides (read through bounded_yaml.py), each key converted and
checked, the checks across keys (cross_checks.py), LLaMA-Factory compatibility, the derived defaults and advice;
every problem raised at once."""

from __future__ import annotations

import difflib
import os
from dataclasses import fields
from typing import Any, Callable, Iterable

from ..errors import ConfigError
from .bounded_yaml import parse_overrides, read_mapping
from .compat import CLASSIFIED, LLAMA_FACTORY_KEYS, accepts, allowed
from .bundle import Config
from .bundle import assemble as _assemble
from .cross_checks import FSDP1_CONFIG_KEYS, check_together, fsdp_settings, trains
from .keys import KEY_TABLE as _KEYS
from .keys import KEYS, default_of
from .sections import SECTIONS
from .values import INVALID as _INVALID
from .values import OVERFLOW_POLICIES, TERMINAL_POLICIES, did_you_mean, shown, yaml_text
from .values import BadValue as _Bad
from .values import converter as _converter
from .values import without_none as _without_none

# Keys of older LLaMA-Factory versions (or other trainers) that vlmtune rejects with a specific fix instead of
# "unknown key". The current LLaMA-Factory keys are classified in compat.py.
LLAMA_FACTORY_REPLACED: dict[str, str] = {
    "image_resolution": "set image_max_pixels to image_resolution**2 instead (262144 for 512)",
    "video_resolution": "set video_max_pixels to video_resolution**2 instead (65536 for 256)",
    "vision_tower": "the vision tower comes with model_name_or_path; use freeze_vision_tower to train or freeze it",
    "train_mm_proj_only": "set finetuning_type: full with freeze_language_model: true, freeze_vision_tower: true "
    "and freeze_multi_modal_projector: false to train only the projector",
}

# do_predict's keys (LLaMA-Factory's GeneratingArguments and the switches).
_GENERATION = ("do_predict", "predict_with_generate", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
               "num_beams", "repetition_penalty", "length_penalty", "skip_special_tokens")

# A ddp_timeout above this (LLaMA-Factory's examples use 180000000) lets a stuck rank hang the job for days.
_LONG_DDP_TIMEOUT_S = 24 * 3600

# --- loading ------------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike | None, overrides: Iterable[str] = (), base: dict | None = None) -> Config:
    """Read a YAML config, apply `key=value` overrides on top, validate, and return a Config.

    Later sources win: `base` (defaults a caller supplies, e.g. the demo), then the file, then the overrides.
    Every problem found, in any source, is raised together in one ConfigError.
    """
    problems: list[str] = []
    raw: dict[str, Any] = {}
    origin: dict[str, str] = {}
    _merge(raw, origin, base or {}, lambda k: "in the base config")
    if path is not None:
        where = os.fspath(path)
        _merge(raw, origin, read_mapping(where, problems), lambda k: f"in {where}")
    parsed, texts = parse_overrides(overrides, problems)
    _merge(raw, origin, parsed, lambda k: f"in override {shown(texts[k])}")
    return _build(raw, origin, problems)


def load_sections(values: dict[str, Any], *names: str) -> tuple:
    """Some sections alone (`names`: keys of SECTIONS), from flat key values such as a command's flags, each key
    converted and checked as in a config file; keys not given take their defaults, a key of another section is
    an error. Every problem is raised together in one ConfigError. `vlmtune inspect` builds its model, read,
    fit and prepare sections this way, with no output_dir to require."""
    classes = [SECTIONS[n] for n in names]
    keys = [f.name for cls in classes for f in fields(cls)]
    problems = [f"{k} is not a key of the {', '.join(names)} sections" for k in values if k not in keys]
    converted = {k: _field_value(k, values[k] if k in values else default_of(k), problems) for k in keys}
    if problems:
        raise ConfigError(problems)
    return tuple(cls(**{f.name: converted[f.name] for f in fields(cls)}) for cls in classes)


def _merge(raw: dict, origin: dict, new: dict, where: Callable[[str], str]) -> None:
    for key, value in new.items():
        raw[key] = value
        origin[key] = where(key)


def _build(raw: dict, origin: dict, problems: list[str]) -> Config:
    notes: list[str] = []
    _nothink_template(raw, origin, problems, notes)
    for key, value in list(raw.items()):
        if key not in _KEYS:
            _foreign_key(key, value, origin[key], problems, notes, raw)
    predicting = _only_predicts(raw)
    values = {key: None if key == "dataset" and predicting and raw.get(key) is None
              else _field_value(key, raw.get(key, default_of(key)), problems) for key in KEYS}
    problems.extend(check_together(values))
    if problems:
        raise ConfigError(problems)
    derived = _resolve(values)
    notes.extend(_advice(values))
    if predicting:
        notes.extend(_predict_only_notes(raw))
    return _assemble(values, notes, derived)


def _only_predicts(raw: dict) -> bool:
    """Whether the run only predicts (do_train false, given or resolved), so that dataset is not required."""
    v = {k: _field_value(k, raw.get(k, default_of(k)), []) for k in ("do_train", "do_predict")}
    return not trains({**v, "dataset": raw.get("dataset")})


# Keys that only training reads: given with do_train false, they are listed in a note (not used, said so).
_TRAINING_ONLY = tuple(
    f.name for name in ("finetuning", "training", "preference") for f in fields(SECTIONS[name])
    if not f.name.startswith("quantiz") and f.name not in (
        "double_quantization", "output_dir", "per_device_eval_batch_size", "bf16", "fp16", "force_cpu_bf16", "seed",
        "ddp_timeout", "overwrite_output_dir", "run_doctor", "do_train", "stage") and f.name not in _GENERATION
) + ("dataset", "mix_strategy", "interleave_probs", "packing")


def _predict_only_notes(raw: dict) -> list[str]:
    given = [k for k in _TRAINING_ONLY if k in raw]
    if not given:
        return []
    return ["do_train=false: only predicting, so these training keys are not used: " + ", ".join(given)]


def _nothink_template(raw: dict, origin: dict, problems: list[str], notes: list[str]) -> None:
    """LLaMA-Factory's `template: *_nothink` (qwen3_5_nothink) is the checkpoint's template with thinking off:
    enable_thinking=false, which the checkpoint's own chat template then renders (docs/thinking.md)."""
    template = raw.get("template")
    if not (isinstance(template, str) and template.endswith("_nothink")):
        return
    if raw.get("enable_thinking") is True:
        problems.append(f"template={template} ({origin['template']}) turns thinking off but enable_thinking=true "
                        f"({origin['enable_thinking']}); remove one of them")
    elif "enable_thinking" not in raw:
        raw["enable_thinking"] = False
        origin["enable_thinking"] = origin["template"]
        notes.append(f"template={template}: enable_thinking=false (the answer is trained without a thinking block; "
                     "the checkpoint's empty one is part of the prompt)")


def _foreign_key(key: Any, value: Any, where: str, problems: list[str], notes: list[str], raw: dict) -> None:
    """A key that is not ours: a LLaMA-Factory key (compat.CLASSIFIED), a replaced one, or a mistake."""
    c = CLASSIFIED.get(key) if isinstance(key, str) else None
    text = yaml_text(value)
    if c is None:
        _other_key(key, value, where, problems)
    elif c.kind in ("noop", "command"):
        notes.append(f"ignored {key}={shown(value)}: {c.why}")
    elif c.kind == "alias":
        converted = c.convert(value) if c.convert else value
        if converted is not None and c.to not in raw:
            raw[c.to] = converted
            notes.append(f"{key}={text} is read as {c.to}={yaml_text(converted)}: {c.why}")
        elif c.to in raw and converted is not None and raw[c.to] != converted:
            problems.append(f"{key}={text} ({where}) contradicts {c.to}={yaml_text(raw[c.to])}; {c.why}: "
                            f"remove {key}")
        else:
            notes.append(f"ignored {key}={shown(value)}: {c.why}")
    elif accepts(key, value):
        notes.append(f"ignored {key}={shown(value)}: {c.why}")
    else:
        values = " or ".join(yaml_text(a) for a in allowed(key))
        problems.append(f"{key}={shown(value)} is not supported; {c.why}; remove {key} or set it to {values}")


def _other_key(key: Any, value: Any, where: str, problems: list[str]) -> None:
    if key == "image_resolution" and isinstance(value, int) and not isinstance(value, bool) and value > 0:
        problems.append(
            f"image_resolution={value} ({where}) is replaced by image_max_pixels; "
            f"set image_max_pixels to image_resolution**2 = {value * value} instead"
        )
    elif key in LLAMA_FACTORY_REPLACED:
        problems.append(f"{key} ({where}) is not supported; {LLAMA_FACTORY_REPLACED[key]}")
    else:
        hint = _close_key(str(key))
        problems.append(f"unknown key {shown(key)} ({where}); {hint or 'see docs/config.md'}")


def _close_key(word: str) -> str | None:
    """A "did you mean" only for a close spelling (a typo), never for a merely related name."""
    known = list(KEYS) + [k for k in LLAMA_FACTORY_KEYS if k not in KEYS]
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.85)
    return f"did you mean {close[0]!r}?" if close else None


def _field_value(key: str, value: Any, problems: list[str]) -> Any:
    """The key's value converted to its declared type, or _INVALID after adding a problem."""
    _, f, hint = _KEYS[key]
    meta = f.metadata
    expect = meta["expect"] or "true or false"
    if value is None and (meta["required"] or _without_none(hint)[1]):
        if meta["required"]:
            problems.append(f"{key} is required; set {key} to {expect}")
            return _INVALID
        return None
    try:
        converted = _converter(f, hint)(value)
    except _Bad as e:
        fix = _choices_fix(key, meta) if meta["choices"] else f"set {key} to {expect}"
        problems.append(f"{key}={shown(value)} {e}; {fix}")
        return _INVALID
    problem = _check_value(key, converted, value, meta)
    if problem:
        problems.append(problem)
        return _INVALID
    return converted


def _check_value(key: str, value: Any, given: Any, meta: dict) -> str | None:
    """What is wrong with a well-typed value, if anything; messages show the value as `given`."""
    if meta["choices"] and value not in meta["choices"]:
        what = meta["choices_what"] or "one of " + ", ".join(map(repr, meta["choices"]))
        return f"{key}={shown(value)} is not {what}; {did_you_mean(value, meta['choices'], _choices_fix(key, meta))}"
    wrong = meta["check"](value) if meta["check"] else None
    if wrong:
        return f"{key}={shown(given)} {wrong}; set {key} to {meta['expect']}"
    return _check_names(key, value)


def _choices_fix(key: str, meta: dict) -> str:
    if meta["choices_what"]:
        return f"set {key} to {meta['choices_what']} such as {meta['choices'][0]}"
    return f"set {key} to one of " + ", ".join(meta["choices"])


def _check_names(key: str, value: Any) -> str | None:
    """The list-valued keys: each has its own rules."""
    if key == "overflow":
        return _check_overflow(value)
    if key == "lora_target" and not value:
        return f"lora_target={shown(value)} is empty; set lora_target to all or module names such as q_proj,v_proj"
    if key == "lora_target" and "all" in value and len(value) > 1:
        return f"lora_target={shown(value)} mixes all with module names; set lora_target to all or to module names"
    if key == "additional_target" and not value:
        return f"additional_target={shown(value)} is empty; set additional_target to module names or null"
    return None


def _check_overflow(policies: list[str]) -> str | None:
    for p in policies:
        if p not in OVERFLOW_POLICIES:
            known = ", ".join(map(repr, OVERFLOW_POLICIES))
            hint = did_you_mean(p, OVERFLOW_POLICIES, "use only these")
            return f"overflow policy {shown(p)} is not one of {known}; {hint}"
    if not policies:
        return "overflow=[] is empty; set overflow to policies such as [shrink_images, truncate_text, split, drop]"
    repeated = [p for i, p in enumerate(policies) if p in policies[:i]]
    if repeated:
        return f"overflow={shown(policies)} lists {shown(repeated[0])} twice; list each policy once"
    for i, p in enumerate(policies[:-1]):
        if p in TERMINAL_POLICIES:
            return (
                f"overflow={shown(policies)} has {policies[i + 1]!r} after {p!r}, which ends the search, so it would "
                f"never run; make {p!r} the last policy"
            )
    return None


def _resolve(v: dict[str, Any]) -> frozenset[str]:
    """Fill the null defaults that depend on other keys, so every reader sees one effective value.

    Returns the keys filled in.
    """
    fill = {
        "lora_alpha": lambda: 2 * v["lora_rank"],
        "preprocessing_num_workers": lambda: 1,
        "prepared_dir": lambda: os.path.join(v["output_dir"], "prepared"),
        "do_train": lambda: trains(v),
    }
    derived = frozenset(k for k in fill if v[k] is None)
    for k in derived:
        v[k] = fill[k]()
    return derived


def _advice(v: dict[str, Any]) -> list[str]:
    notes = []
    for key in fsdp_settings(v["fsdp_config"]):
        if key in FSDP1_CONFIG_KEYS:
            notes.append(f"ignored fsdp_config key {key!r}: it is an FSDP1 setting, and vlmtune runs FSDP2 "
                         "(fully_shard), which has no such option")
    if v["ddp_timeout"] > _LONG_DDP_TIMEOUT_S:
        notes.append(
            f"ddp_timeout={v['ddp_timeout']} s lets a stuck rank hang the job for over a day instead of failing "
            f"it; the default is {default_of('ddp_timeout')}"
        )
    if v["trust_remote_code"] is True:
        notes.append(
            "trust_remote_code=true runs Python code shipped with the checkpoint; Qwen-VL models need none "
            "with transformers >= 4.45, so remove it unless your checkpoint really ships custom code"
        )
    return notes
