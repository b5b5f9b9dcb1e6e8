"""Loading a config: the YAML file, `key=value` overrides, validation (every problem at once) and advice."""

from __future__ import annotations

import difflib
import os
import typing
from dataclasses import fields
from typing import Any, Callable, Iterable

import yaml

from ..errors import ConfigError
from .compat import CLASSIFIED, LLAMA_FACTORY_KEYS, accepts, allowed
from .bundle import Config
from .bundle import assemble as _assemble
from .keys import KEY_TABLE as _KEYS
from .keys import KEYS, default_of
from .sections import SECTIONS
from .values import INVALID as _INVALID
from .values import OVERFLOW_POLICIES, TERMINAL_POLICIES, shown
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
        _merge(raw, origin, _read_yaml(where, problems), lambda k: f"in {where}")
    parsed, texts = _parse_overrides(overrides, problems)
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
    data = _read_yaml(path, problems)
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


def _safe_yaml(text: str, where: str) -> Any:
    """YAML text -> its value, with the bounds above; raises yaml.YAMLError, or ValueError saying which bound."""
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


def _read_yaml(path: str, problems: list[str]) -> dict:
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
        data, repeated = _safe_yaml(text, path)
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


def _parse_overrides(overrides: Iterable[str], problems: list[str]) -> tuple[dict, dict]:
    """`key=value` strings -> ({key: value}, {key: the text}); values read as YAML, so `bf16=true` is a bool."""
    parsed, texts = {}, {}
    for text in overrides:
        key, eq, value = text.partition("=")
        key = key.strip()
        if not eq or not key:
            problems.append(f"override {shown(text)} is not key=value; write it like cutoff_len=1024")
            continue
        try:
            parsed[key] = _safe_yaml(value, f"override {shown(key)}")[0] if value.strip() else None
        except yaml.YAMLError as e:
            problems.append(f"override {shown(text)} has a value that is not valid YAML ({_yaml_error(e)}); quote it")
            continue
        except ValueError as e:
            problems.append(str(e))
            continue
        texts[key] = text
    return parsed, texts


def _build(raw: dict, origin: dict, problems: list[str]) -> Config:
    notes: list[str] = []
    _nothink_template(raw, origin, problems, notes)
    for key, value in list(raw.items()):
        if key not in _KEYS:
            _foreign_key(key, value, origin[key], problems, notes, raw)
    values = {key: _field_value(key, raw.get(key, default_of(key)), problems) for key in KEYS}
    problems.extend(_check_together(values))
    if problems:
        raise ConfigError(problems)
    derived = _resolve(values)
    notes.extend(_advice(values))
    return _assemble(values, notes, derived)


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
    text = _yaml_text(value)
    if c is None:
        _other_key(key, value, where, problems)
    elif c.kind in ("noop", "command"):
        notes.append(f"ignored {key}={shown(value)}: {c.why}")
    elif c.kind == "alias":
        converted = c.convert(value) if c.convert else value
        if converted is not None and c.to not in raw:
            raw[c.to] = converted
            notes.append(f"{key}={text} is read as {c.to}={_yaml_text(converted)}: {c.why}")
        elif c.to in raw and converted is not None and raw[c.to] != converted:
            problems.append(f"{key}={text} ({where}) contradicts {c.to}={_yaml_text(raw[c.to])}; {c.why}: "
                            f"remove {key}")
        else:
            notes.append(f"ignored {key}={shown(value)}: {c.why}")
    elif accepts(key, value):
        notes.append(f"ignored {key}={shown(value)}: {c.why}")
    else:
        values = " or ".join(_yaml_text(a) for a in allowed(key))
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


def _did_you_mean(word: str, options: Iterable[str], otherwise: str) -> str:
    options = list(options)
    if len(word) > 64:  # no key is this long, and difflib's time grows with it
        return otherwise
    # A prefix is usually a shortened name ("adamw" for adamw_torch); difflib alone would pick grokadamw.
    close = [o for o in options if word and o.startswith(word)][:1] or difflib.get_close_matches(word, options, n=1)
    return f"did you mean {close[0]!r}?" if close else otherwise


def _yaml_text(v: Any) -> str:
    """A value as YAML writes a scalar; anything long shown bounded (it may be echoed in a note or an error)."""
    if v is True or v is False or v is None:
        return "true" if v else "false" if v is False else "null"
    text = str(v) if isinstance(v, (str, int, float)) else ""
    return text if text and len(text) <= 120 else shown(v)


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
        return f"{key}={shown(value)} is not {what}; {_did_you_mean(value, meta['choices'], _choices_fix(key, meta))}"
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
            hint = _did_you_mean(p, OVERFLOW_POLICIES, "use only these")
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


def _check_together(v: dict[str, Any]) -> list[str]:
    """Rules that involve several keys, each checked only when all its keys are valid on their own."""
    problems = []
    lo, hi = v["image_min_pixels"], v["image_max_pixels"]
    if _valid(lo, hi) and lo is not None and hi is not None and lo > hi:
        problems.append(
            f"image_min_pixels={lo} is larger than image_max_pixels={hi}; lower image_min_pixels or raise "
            "image_max_pixels"
        )
    vlo, vhi = v["video_min_pixels"], v["video_max_pixels"]
    if _valid(vlo, vhi) and vlo is not None and vhi is not None and vlo > vhi:
        problems.append(
            f"video_min_pixels={vlo} is larger than video_max_pixels={vhi}; lower video_min_pixels or raise "
            "video_max_pixels"
        )
    if v["streaming"] is True:  # as in LLaMA-Factory: an iterable dataset has no length to count epochs by
        if _valid(v["max_steps"]) and not (isinstance(v["max_steps"], int) and v["max_steps"] > 0):
            problems.append(f"streaming: true needs max_steps (got {v['max_steps']}); set max_steps such as 1000")
        if v["packing"] is True:
            problems.append("streaming: true cannot pack (packing plans over all rows); set packing: false")
        if _valid(v["val_size"]) and v["val_size"]:
            problems.append(f"streaming: true takes no val_size (got {v['val_size']}); set val_size: 0")
    if _valid(v["eval_dataset"], v["val_size"]) and v["eval_dataset"] and v["val_size"]:
        problems.append(f"eval_dataset={v['eval_dataset']!r} and val_size={v['val_size']} both name validation "
                        "data; set one of them (val_size: 0 to evaluate on eval_dataset)")
    if v["streaming"] is True and _valid(v["eval_dataset"]) and v["eval_dataset"]:
        problems.append("streaming: true takes no eval_dataset (it prepares nothing); set eval_dataset: null")
    if _valid(v["mix_strategy"], v["interleave_probs"]) and v["interleave_probs"] and v["mix_strategy"] == "concat":
        problems.append(f"interleave_probs={v['interleave_probs']!r} needs mix_strategy interleave_under or "
                        "interleave_over (concat reads every dataset whole); set mix_strategy or remove "
                        "interleave_probs")
    problems.extend(_check_probs(v))
    problems.extend(_check_predict(v))
    if v["bf16"] is True and v["fp16"] is True:
        problems.append("bf16 and fp16 are both true; set at most one of them (bf16 where the GPU supports it)")
    problems.extend(_check_trainable(v))
    problems.extend(_check_quant_variants(v))
    problems.extend(_check_preference(v))
    problems.extend(_check_sharding(v))
    return problems


# fsdp_config keys (without the fsdp_ prefix) that FSDP2 uses, and FSDP1-only ones that it has no use for.
FSDP_CONFIG_KEYS = ("version", "transformer_layer_cls_to_wrap", "reshard_after_forward", "state_dict_type",
                    "cpu_ram_efficient_loading", "activation_checkpointing", "offload_params", "cpu_offload",
                    "auto_wrap_policy", "min_num_params")
FSDP1_CONFIG_KEYS = ("sharding_strategy", "backward_prefetch", "forward_prefetch", "use_orig_params",
                     "sync_module_states", "limit_all_gathers")
FSDP_STATE_DICT_TYPES = ("FULL_STATE_DICT", "SHARDED_STATE_DICT")


def fsdp_settings(fsdp_config: dict | None) -> dict:
    """fsdp_config with the fsdp_ prefix taken off its keys (the Trainer accepts both spellings)."""
    return {(k[5:] if isinstance(k, str) and k.startswith("fsdp_") else k): val
            for k, val in (fsdp_config or {}).items()}


def _check_sharding(v: dict[str, Any]) -> list[str]:
    """fsdp / fsdp_config / deepspeed together: one sharding engine, FSDP2 only, every fsdp_config key known."""
    fsdp, conf, ds = v["fsdp"], v["fsdp_config"], v["deepspeed"]
    if not _valid(fsdp, conf, ds):
        return []
    problems = []
    if fsdp and ds:
        problems.append(f"fsdp={fsdp!r} and deepspeed={ds!r} are both set; they are two ways of sharding, so set "
                        "one of them to null")
    if conf and not fsdp:
        problems.append("fsdp_config is set but fsdp is not, so it would do nothing; set fsdp: full_shard auto_wrap "
                        "or remove fsdp_config")
    if fsdp and _valid(v["quantization_bit"]) and v["quantization_bit"] is not None:
        problems.append(f"quantization_bit={v['quantization_bit']} with fsdp={fsdp!r}: FSDP2 cannot shard the "
                        "packed 4/8-bit weights (each rank would keep them whole); remove fsdp (plain DDP keeps "
                        "one quantized copy per GPU, which is what QLoRA is for) or remove quantization_bit")
    settings = fsdp_settings(conf)
    for key in settings:
        if key not in FSDP_CONFIG_KEYS + FSDP1_CONFIG_KEYS:
            problems.append(f"fsdp_config key {key!r} is not an FSDP setting; "
                            f"{_did_you_mean(str(key), FSDP_CONFIG_KEYS, 'see docs/config.md (fsdp_config)')}")
    if str(settings.get("version", 2)) != "2":
        problems.append(f"fsdp_config version={settings['version']!r}: vlmtune runs FSDP2 only (FSDP1 is "
                        "deprecated in transformers); set version: 2 or remove it")
    sdt = settings.get("state_dict_type", "FULL_STATE_DICT")
    if sdt not in FSDP_STATE_DICT_TYPES:
        problems.append(f"fsdp_config state_dict_type={sdt!r} is not one of {', '.join(FSDP_STATE_DICT_TYPES)}; "
                        "set FULL_STATE_DICT (one safetensors file, needed by export) or SHARDED_STATE_DICT")
    if str(settings.get("activation_checkpointing", False)).lower() == "true" and v["gradient_checkpointing"]:
        problems.append("fsdp_config activation_checkpointing=true and gradient_checkpointing=true both recompute "
                        "activations; set gradient_checkpointing: false (FSDP's own) or remove "
                        "activation_checkpointing from fsdp_config")
    return problems


# Preference keys, each with the stages (and dpo losses) it means something for: set elsewhere it is an error,
# never ignored.
_REFERENCE_FREE = ("orpo", "simpo")


def _check_preference(v: dict[str, Any]) -> list[str]:
    """The preference keys against stage and pref_loss (docs/preference.md)."""
    stage, loss = v["stage"], v["pref_loss"]
    if not _valid(stage, loss):
        return []
    problems = []

    def unused(key: str, why: str, fix: str) -> None:
        if _valid(v[key]) and v[key] != default_of(key):
            problems.append(f"{key}={v[key]!r} {why}; {fix}")

    if stage == "sft":
        for key in ("pref_beta", "pref_loss", "pref_ftx", "simpo_gamma", "dpo_label_smoothing", "kto_chosen_weight",
                    "kto_rejected_weight", "ref_model", "ref_model_adapters", "precompute_ref_log_probs"):
            unused(key, "applies to the preference stages only, but stage='sft'", f"set stage: dpo (or kto), or "
                   f"remove {key}")
        return problems
    unused("train_on_prompt", f"has no effect with stage={stage!r}: only the final answer is scored",
           "remove train_on_prompt")
    unused("moe_aux_loss_coef", f"is not added to the stage {stage!r} loss (the preference trainer computes its own "
           "loss from the logits and asks for no router logits)", "remove moe_aux_loss_coef, or train with stage: sft")
    if stage == "kto":
        for key in ("pref_loss", "simpo_gamma", "dpo_label_smoothing"):
            unused(key, "applies to stage dpo only, but stage='kto'", f"remove {key}")
    if stage == "dpo":
        for key in ("kto_chosen_weight", "kto_rejected_weight"):
            unused(key, "applies to stage kto only, but stage='dpo'", f"remove {key}")
        if loss != "simpo":
            unused("simpo_gamma", f"applies to pref_loss simpo only, but pref_loss={loss!r}", "remove simpo_gamma")
        if loss not in ("sigmoid", "robust"):
            unused("dpo_label_smoothing", f"applies to pref_loss sigmoid or robust only, but pref_loss={loss!r}",
                   "remove dpo_label_smoothing")
        if loss in _REFERENCE_FREE:
            for key in ("ref_model", "ref_model_adapters", "precompute_ref_log_probs"):
                unused(key, f"names a reference, but pref_loss={loss!r} uses none", f"remove {key}")
    if v["pissa_init"] is True and not v["ref_model"] and not (stage == "dpo" and loss in _REFERENCE_FREE):
        problems.append(f"pissa_init=true with stage={stage!r}: the reference (the base with the adapter disabled) "
                        "would be PiSSA's residual, not the starting model; set ref_model to the starting model, "
                        "or pissa_init: false")
    if _valid(v["ref_model_adapters"], v["ref_model"]) and v["ref_model_adapters"] and not v["ref_model"]:
        problems.append(f"ref_model_adapters={v['ref_model_adapters']!r} needs ref_model (the base the adapter "
                        "applies to); set ref_model, or remove ref_model_adapters")
    if v["packing"] is True:
        problems.append(f"packing: true with stage={stage!r}: a pair's chosen and rejected sides (and a KTO batch) "
                        "are scored as whole sequences, which packing would mix; set packing: false")
    if v["streaming"] is True:
        problems.append(f"streaming: true with stage={stage!r} is not supported (preference rows are prepared and "
                        "checked as pairs first); set streaming: false")
    return problems


def _check_predict(v: dict[str, Any]) -> list[str]:
    """do_predict generates over eval_dataset (as in LLaMA-Factory), with predict_with_generate."""
    if not _valid(v["do_predict"], v["predict_with_generate"], v["eval_dataset"]):
        return []
    if v["do_predict"] and not v["eval_dataset"]:
        return ["do_predict=true needs eval_dataset: the datasets to generate answers for; set eval_dataset"]
    if v["do_predict"] != v["predict_with_generate"]:
        return [f"do_predict={_yaml_text(v['do_predict'])} with predict_with_generate="
                f"{_yaml_text(v['predict_with_generate'])}: vlmtune predicts by generating (eval_dataset already "
                "reports eval_loss); set both to true, or both to false"]
    return []


def _check_probs(v: dict[str, Any]) -> list[str]:
    """interleave_probs: one probability per dataset, summing to 1."""
    probs, datasets = v["interleave_probs"], v["dataset"]
    if not _valid(probs, datasets) or not probs:
        return []
    n = len([d for d in str(datasets).split(",") if d.strip()])
    try:
        values = [float(p) for p in probs.split(",")]
    except ValueError:
        return [f"interleave_probs={probs!r} is not comma-separated numbers; set it such as 0.5,0.5"]
    if len(values) != n or any(not 0 <= p <= 1 for p in values) or abs(sum(values) - 1) > 1e-6:
        return [f"interleave_probs={probs!r} must give each of the {n} dataset(s) a probability in [0, 1], "
                "summing to 1; set it such as " + ",".join([f"{1 / n:.3g}"] * n)]
    return []


# Keys that only mean something with LoRA adapters (finetuning_type lora), with the value that leaves them off.
_LORA_ONLY = {"quantization_bit": None, "use_dora": False, "use_rslora": False, "pissa_init": False,
              "loraplus_lr_ratio": None}


def _check_quant_variants(v: dict[str, Any]) -> list[str]:
    """quantization_bit and the LoRA variants against finetuning_type and each other."""
    problems = []
    kind = v["finetuning_type"]
    if _valid(kind) and kind != "lora":
        for key, off in _LORA_ONLY.items():
            if _valid(v[key]) and v[key] != off:
                why = (" (the quantized weights cannot be trained; QLoRA trains adapters on top of them)"
                       if key == "quantization_bit" else "")
                problems.append(f"{key}={shown(v[key])} needs finetuning_type='lora', but finetuning_type={kind!r}{why}; "
                                f"set finetuning_type: lora or remove {key}")
    bits, pissa = v["quantization_bit"], v["pissa_init"]
    if _valid(bits, pissa) and bits is not None and pissa:
        problems.append(f"pissa_init=true with quantization_bit={bits}: PiSSA's SVD needs the full-precision "
                        "weights and rewrites them; remove quantization_bit, or set pissa_init: false")
    if _valid(bits, v["quantization_type"]) and bits == 8 and v["quantization_type"] != "nf4":
        problems.append(f"quantization_type={v['quantization_type']!r} applies to 4-bit only, but "
                        "quantization_bit=8; set quantization_bit: 4 or remove quantization_type")
    return problems


def _valid(*values: Any) -> bool:
    return all(x is not _INVALID for x in values)


def _check_trainable(v: dict[str, Any]) -> list[str]:
    """A run that would train nothing fails here, not after the data is prepared."""
    kind = v["finetuning_type"]
    frozen = ("freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model")
    if not _valid(kind, v["additional_target"], *(v[k] for k in frozen)):
        return []
    if kind == "freeze" and v["freeze_language_model"] and not v["additional_target"]:
        return [
            "finetuning_type='freeze' trains decoder layers of the language model, but freeze_language_model is "
            "true; set freeze_language_model to false or set finetuning_type to lora or full"
        ]
    if kind != "freeze" and all(v[k] for k in frozen) and not v["additional_target"]:
        return [
            f"freeze_vision_tower, freeze_multi_modal_projector and freeze_language_model are all true, so "
            f"finetuning_type={kind!r} has nothing to train; set one of them to false"
        ]
    return []


def _resolve(v: dict[str, Any]) -> frozenset[str]:
    """Fill the null defaults that depend on other keys, so every reader sees one effective value.

    Returns the keys filled in.
    """
    fill = {
        "lora_alpha": lambda: 2 * v["lora_rank"],
        "preprocessing_num_workers": lambda: 1,
        "prepared_dir": lambda: os.path.join(v["output_dir"], "prepared"),
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
