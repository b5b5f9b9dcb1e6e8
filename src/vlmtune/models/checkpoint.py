"""A checkpoint's text side and processor settings read from its files: what header-only accounting needs.

The data path (read -> validate -> encode -> fit) needs the tokenizer, the chat template, the token ids and the
processor's resize settings, all of which are small files of the checkpoint. Loading them through
`AutoProcessor` imports torch and transformers' model code: 2-4 s and ~0.9 GB before the first sample
(docs/benchmarks.md, "torch-free data path"). Here they come from the files through the libraries transformers
itself uses for them: `tokenizers.Tokenizer.from_file` for tokenizer.json, jinja2 for the chat template (in the
sandboxed environment transformers compiles templates in), JSON for the processor configs, and
`huggingface_hub.snapshot_download` for hub ids.

Exactness comes first. A file layout this module does not reproduce exactly (a tokenizer class other than
Qwen2's, a tokenizer.json whose pipeline differs from the one transformers rebuilds, unknown processor classes,
settings it does not model, a config without its vocabulary size) is *not* guessed at: `read_checkpoint` returns
None and the caller loads the real processor instead (tests/models/test_checkpoint.py checks both against
transformers for every family and for the legacy layouts).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..errors import VlmtuneError
from .families import FAMILIES

# The files read here (a hub id downloads only these).
SMALL_FILES = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
    "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
)

# What transformers' Qwen tokenizer classes rebuild around tokenizer.json's vocabulary and merges
# (transformers/models/qwen2/tokenization_qwen2.py, qwen3_5/tokenization_qwen3_5.py, 5.x): one pipeline with
# the class's pre-tokenizer regex. A file with another pipeline is loaded by transformers.
# tests/models/test_checkpoint.py compares these with the classes, so a transformers change fails a test.
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN3_5_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}|"""
                             r""" ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
TOKENIZER_REGEX = {"Qwen2Tokenizer": QWEN2_PRETOKENIZE_REGEX, "Qwen2TokenizerFast": QWEN2_PRETOKENIZE_REGEX,
                   "Qwen3_5Tokenizer": QWEN3_5_PRETOKENIZE_REGEX}
# the classes' __init__ defaults (the same in both), for tokens tokenizer_config.json leaves out
QWEN2_TOKEN_DEFAULTS = {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
QWEN2_BPE = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
             "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False}


def tokenizer_pipeline(regex: str) -> dict:
    """The normalizer, pre-tokenizer and decoder the classes build, as tokenizer.json writes them."""
    return {
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    }

# The processor classes' own defaults (transformers 5.x class attributes), for keys a config file leaves out;
# tests/models/test_checkpoint.py compares them with the classes.
IMAGE_DEFAULTS = {
    "Qwen2VLImageProcessor": {"size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
                              "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2},
}
VIDEO_DEFAULTS = {
    "Qwen2VLVideoProcessor": {"size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768},
                              "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "min_frames": 4,
                              "max_frames": 768, "do_sample_frames": False, "cap_pixels_per_frame": None,
                              "max_video_tokens": 128000, "fps": None, "num_frames": None},
    "Qwen3VLVideoProcessor": {"size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32},
                              "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "min_frames": 4,
                              "max_frames": 768, "do_sample_frames": True, "cap_pixels_per_frame": None,
                              "max_video_tokens": 768, "fps": 2, "num_frames": None},
}
# Only these video classes take the legacy min_pixels / max_pixels keys (their __init__ folds them into size).
LEGACY_PIXEL_KEYS = ("Qwen2VLImageProcessor", "Qwen2VLVideoProcessor")
# Keys of a processor config that change nothing the accounting reads.
_INERT_KEYS = {
    "do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std", "resample",
    "rescale_factor", "return_metadata", "image_processor_type", "video_processor_type", "processor_class",
    "auto_map", "data_format", "input_data_format", "device", "return_tensors", "default_to_square", "crop_size",
    "do_center_crop", "video_metadata", "disable_grouping", "_processor_class",
}
_SETTINGS_KEYS = {"size", "min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size",
                  "min_frames", "max_frames", "do_sample_frames", "cap_pixels_per_frame", "max_video_tokens",
                  "fps", "num_frames"}


def checkpoint_dir(name: str, cache_dir: str | None = None) -> Path:
    """The local folder holding `name`'s small files: the folder itself, or the hub snapshot (downloaded
    through huggingface_hub, as transformers does; cached files are used offline)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name), allow_patterns=list(SMALL_FILES), cache_dir=cache_dir))
    except Exception as e:  # hub errors have many types (offline, missing repo, gated, network)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
        raise VlmtuneError(
            f"cannot load the processor of {name}: {first}; pass a local checkpoint directory, or a hub id that is "
            "cached or reachable (check HF_HUB_OFFLINE and the network)"
        ) from e


def _json(folder: Path, name: str) -> dict | None:
    p = folder / name
    if not p.is_file():
        return None
    with open(p, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else None


# -- tokenizer ---------------------------------------------------------------------------------
class FileTokenizer:
    """tokenizer.json through `tokenizers`, with the few members of transformers' tokenizer the data path uses
    (ids of special tokens, batch encoding without special tokens, decoding, the special tokens map)."""

    def __init__(self, backend, special_tokens_map: dict[str, str], pad_token: str | None,
                 unk_token: str | None, chat_template: str | None = None):
        self.backend_tokenizer = backend
        self.special_tokens_map = special_tokens_map
        self.pad_token_id = None if pad_token is None else backend.token_to_id(pad_token)
        self.unk_token_id = None if unk_token is None else backend.token_to_id(unk_token)
        self.chat_template = chat_template

    def convert_tokens_to_ids(self, token: str) -> int | None:
        i = self.backend_tokenizer.token_to_id(token)
        return self.unk_token_id if i is None else i

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, text, add_special_tokens: bool = False, split_special_tokens: bool = False) -> dict:
        backend = self.backend_tokenizer
        backend.encode_special_tokens = split_special_tokens  # as transformers sets it around one call
        try:
            if isinstance(text, str):
                return {"input_ids": backend.encode(text, add_special_tokens=add_special_tokens).ids}
            return {"input_ids": [e.ids for e in backend.encode_batch_fast(list(text),
                                                                          add_special_tokens=add_special_tokens)]}
        finally:
            backend.encode_special_tokens = False

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __getstate__(self):
        return {**self.__dict__, "backend_tokenizer": self.backend_tokenizer.to_str()}

    def __setstate__(self, state):
        from tokenizers import Tokenizer

        self.__dict__.update(state)
        self.backend_tokenizer = Tokenizer.from_str(state["backend_tokenizer"])


def _special_tokens(tc: dict) -> tuple[dict[str, str], set[str]]:
    """tokenizer_config.json's special tokens: the map transformers hands the chat template, and every one."""
    def content(v):
        return v.get("content") if isinstance(v, dict) else v

    # a key left out of the file takes Qwen2Tokenizer's default; a key written as null stays unset
    named = {k: content(tc.get(k, QWEN2_TOKEN_DEFAULTS.get(k))) for k in (
        "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")}
    named = {k: v for k, v in named.items() if isinstance(v, str)}
    extra = tc.get("extra_special_tokens") or tc.get("additional_special_tokens") or []
    if isinstance(extra, dict):
        return named, set()  # named extra tokens change the map the template sees: transformers decides
    every = set(named.values()) | {content(t) for t in extra}
    every |= {content(t) for t in (tc.get("added_tokens_decoder") or {}).values()}
    return named, every


def read_tokenizer(folder: Path, tc: dict) -> FileTokenizer | None:
    """The checkpoint's tokenizer from tokenizer.json and `tc` (its tokenizer_config.json, {} when absent) when
    transformers would build exactly this pipeline around it; None otherwise (the caller then loads transformers'
    tokenizer)."""
    path = folder / "tokenizer.json"
    regex = TOKENIZER_REGEX.get(tc.get("tokenizer_class"))
    if regex is None or not path.is_file() or tc.get("auto_map"):
        return None
    if tc.get("split_special_tokens") or tc.get("add_prefix_space") or tc.get("clean_up_tokenization_spaces"):
        return None
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    model = {k: v for k, v in (raw.get("model") or {}).items() if k not in ("vocab", "merges")}
    if any(raw.get(k) != v for k, v in tokenizer_pipeline(regex).items()) or model != QWEN2_BPE:
        return None
    named, every = _special_tokens(tc)
    added = {t["content"]: t for t in raw.get("added_tokens") or []}
    # transformers keeps the file's added tokens and marks the config's special tokens special: exact when the
    # file already does, and none of them is normalized or stripped
    if not every or not every <= set(added) or any(not added[t].get("special") for t in every) or any(
            t.get("normalized") or t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added.values()):
        return None
    for i, t in (tc.get("added_tokens_decoder") or {}).items():
        if added.get(t.get("content"), {}).get("id") != int(i):
            return None
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(json.dumps(raw))
    return FileTokenizer(backend, named, named.get("pad_token"), named.get("unk_token"), tc.get("chat_template"))


# -- chat template -----------------------------------------------------------------------------
def read_chat_template(folder: Path, tokenizer_config: dict) -> str | None:
    """The processor's chat template as transformers finds it: chat_template.jinja, then chat_template.json,
    then processor_config.json, then the tokenizer's. None when it is missing or a set of named templates."""
    p = folder / "chat_template.jinja"
    if p.is_file():
        return p.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json"):
        t = (_json(folder, name) or {}).get("chat_template")
        if t is not None:
            return t if isinstance(t, str) else None
    t = tokenizer_config.get("chat_template")
    return t if isinstance(t, str) else None


@lru_cache(maxsize=8)
def compile_template(template: str):
    """The template compiled as transformers compiles it (utils/chat_template_utils.py,
    `_cached_compile_jinja_template`): an immutable sandbox, trim/lstrip blocks, loop controls, a `generation`
    block, its tojson, raise_exception, strftime_now, dict and a namespace without dunders. Rewritten, not
    imported, because importing that module imports transformers (0.6 s, the whole budget of `inspect`);
    tests/models/test_checkpoint.py renders every family's template both ways."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` renders its body (transformers tracks its span; we do not)
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}.")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(template)


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _aliased(chat: list[dict]) -> list[dict]:
    """transformers fills `reasoning_content` (and `thinking`) from whichever reasoning field a message has."""
    out = []
    for m in chat:
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        out.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
    return out


def _plain(value):
    """JSON-typed data as transformers' `_plain_template_data` rebuilds it (the data path passes nothing else)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    for t in (str, int, float):
        if isinstance(value, t):
            return t(value)
    return f"<{type(value).__name__}>"


def render_template(conversations: list[list[dict]], chat_template: str, tools=None, documents=None,
                    add_generation_prompt: bool = False, **kwargs) -> tuple[list[str], list]:
    """transformers' `render_jinja_template` for plain messages, same arguments and result (no
    continue_final_message, no assistant mask: the data path asks for neither)."""
    compiled = compile_template(chat_template)
    tools, documents, kwargs = _plain(tools), _plain(documents), _plain(kwargs)
    return [compiled.render(messages=_aliased(_plain(c)), tools=tools, documents=documents,
                            add_generation_prompt=add_generation_prompt, **kwargs) for c in conversations], []


def render_chats(template: str, chats: list[list[dict]], special_tokens_map: dict, **kwargs) -> list[str]:
    """The chats rendered as the Encoder renders them, with the tokenizer's special tokens."""
    return render_template(chats, template, **kwargs, **special_tokens_map)[0]


# -- processor settings ------------------------------------------------------------------------
def _settings(d: dict, cls: str, defaults: dict) -> SimpleNamespace | None:
    """A processor's settings as its __init__ makes them from a config dict; None where that is not plain."""
    unknown = set(d) - _INERT_KEYS - _SETTINGS_KEYS
    if unknown or (cls not in LEGACY_PIXEL_KEYS and ({"min_pixels", "max_pixels"} & set(d))):
        return None
    s = {**defaults, **{k: v for k, v in d.items() if k in _SETTINGS_KEYS and k not in ("min_pixels", "max_pixels")}}
    size = dict(s["size"])
    if d.get("min_pixels") is not None:
        size["shortest_edge"] = d["min_pixels"]
    if d.get("max_pixels") is not None:
        size["longest_edge"] = d["max_pixels"]
    if not isinstance(size.get("shortest_edge"), int) or not isinstance(size.get("longest_edge"), int):
        return None
    s["size"] = {"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"]}
    return SimpleNamespace(type_name=cls, **s)


def _class_name(d: dict, key: str, fallback: str | None) -> str | None:
    name = d.get(key) or fallback
    return name[: -len("Fast")] if isinstance(name, str) and name.endswith("Fast") else name


def read_processor_settings(folder: Path, model_type: str) -> tuple[SimpleNamespace, SimpleNamespace | None] | None:
    """(image processor settings, video processor settings or None) by transformers' file precedence:
    processor_config.json's nested section, then video_preprocessor_config.json (video), then
    preprocessor_config.json. None when a class or key is not one this module reproduces."""
    nested = _json(folder, "processor_config.json") or {}
    legacy = _json(folder, "preprocessor_config.json")
    image = nested.get("image_processor") if isinstance(nested.get("image_processor"), dict) else legacy
    video = nested.get("video_processor") if isinstance(nested.get("video_processor"), dict) else (
        _json(folder, "video_preprocessor_config.json") or legacy)
    if image is None or image.get("auto_map") or (video or {}).get("auto_map"):
        return None
    icls = _class_name(image, "image_processor_type", None)
    if icls not in IMAGE_DEFAULTS:
        return None
    ip = _settings(image, icls, IMAGE_DEFAULTS[icls])
    if ip is None:
        return None
    vp = None
    if video is not None:
        # a legacy checkpoint (no video_processor_type) gets its family's video processor, as transformers maps it
        family = FAMILIES.get(model_type)
        vcls = _class_name(video, "video_processor_type", family.video_processor_class if family else None)
        if video is legacy and "video_processor_type" not in video:
            # a legacy preprocessor_config.json feeds the video processor too; its image-only keys are inert
            video = {k: v for k, v in video.items() if k != "image_processor_type"}
        if vcls not in VIDEO_DEFAULTS:
            return None
        vp = _settings(video, vcls, VIDEO_DEFAULTS[vcls])
        if vp is None:
            return None
    return ip, vp


# -- the whole -----------------------------------------------------------------------------------
class FileConfig(SimpleNamespace):
    """config.json with attribute access (text_config / vision_config nested), for the keys the data path reads."""

    @classmethod
    def of(cls, d: dict) -> "FileConfig":
        return cls(**{k: cls.of(v) if k in ("text_config", "vision_config") and isinstance(v, dict) else v
                      for k, v in d.items()})


@dataclass
class FileProcessor:
    """The processor's parts the data path reads, from the checkpoint's files; `folder` is where they are."""

    folder: Path
    tokenizer: FileTokenizer
    chat_template: str
    image_processor: SimpleNamespace
    video_processor: SimpleNamespace | None
    image_token: str = "<|image_pad|>"
    video_token: str = "<|video_pad|>"
    extra: dict[str, Any] = field(default_factory=dict)


def read_checkpoint(folder: Path) -> tuple[FileProcessor, FileConfig] | None:
    """The processor's data-path parts and the config from `folder`'s files; None where only transformers
    would get them exactly (see the module docstring)."""
    config = _json(folder, "config.json")
    if config is None or config.get("auto_map"):
        return None
    model_type = config.get("model_type")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    if not isinstance(text.get("vocab_size", config.get("vocab_size")), int):
        return None  # the config class's default would apply: transformers knows it
    family = FAMILIES.get(model_type)
    if family is not None and family.video_absolute_time and "tokens_per_second" not in (
            config.get("vision_config") or {}):
        return None  # the vision config class's default applies: transformers knows it
    if "vocab_size" not in text:
        text = {**text, "vocab_size": config["vocab_size"]}
    tokenizer_config = _json(folder, "tokenizer_config.json") or {}  # read once: the tokenizer and the template
    tokenizer = read_tokenizer(folder, tokenizer_config)
    settings = read_processor_settings(folder, model_type)
    template = read_chat_template(folder, tokenizer_config)
    if tokenizer is None or settings is None or not template:
        return None
    tokenizer.chat_template = template
    cfg = FileConfig.of({**config, "text_config": text})
    return FileProcessor(folder, tokenizer, template, settings[0], settings[1]), cfg


def processor_type_name(obj) -> str:
    """The class name a (file or transformers) image/video processor stands for, without a Fast suffix."""
    name = getattr(obj, "type_name", None) or type(obj).__name__
    return re.sub(r"Fast$", "", name)
