"""The checkpoint's files read without transformers (models/checkpoint.py) equal transformers' processor exactly.

Every family's tiny checkpoint, and the older file layouts real checkpoints ship (preprocessor_config.json with
min_pixels/max_pixels, a separate video_preprocessor_config.json, chat_template.json), give the same ModelSpec,
VideoSpec, token ids and rendered chat templates through both routes; layouts the files cannot settle exactly
go to transformers.
"""

from __future__ import annotations

import inspect
import json
import pickle
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmtune.config import FitArgs
from vlmtune.models.checkpoint import (
    IMAGE_DEFAULTS,
    QWEN2_BPE,
    QWEN2_TOKEN_DEFAULTS,
    TOKENIZER_REGEX,
    VIDEO_DEFAULTS,
    FileProcessor,
    read_checkpoint,
    render_chats,
    tokenizer_pipeline,
)
from vlmtune.models.families import MODEL_TYPES
from vlmtune.models.load import load_processor, load_spec
from vlmtune.models.spec import ModelSpec
from vlmtune.models.video_grid import VideoSpec

SETTINGS = ("size", "patch_size", "temporal_patch_size", "merge_size", "min_frames", "max_frames",
            "do_sample_frames", "cap_pixels_per_frame", "max_video_tokens", "fps", "num_frames")


def _both(folder):
    files = read_checkpoint(folder)
    assert files is not None, f"{folder} should be read from its files"
    return files, load_processor(str(folder))


def _specs(processor, config):
    return ModelSpec.from_processor(processor, config), VideoSpec.from_processor(processor, config)


# -- the hand-kept constants are transformers' ---------------------------------------------------
@pytest.mark.parametrize("name", sorted(TOKENIZER_REGEX))
def test_tokenizer_pipelines_are_transformers(name):
    import transformers

    cls = getattr(transformers, name)
    built = json.loads(cls(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]).backend_tokenizer.to_str())
    pipeline = tokenizer_pipeline(TOKENIZER_REGEX[name])
    assert {k: built[k] for k in pipeline} == pipeline
    assert {k: v for k, v in built["model"].items() if k not in ("vocab", "merges")} == QWEN2_BPE
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k.endswith("_token")}
    assert {k: v for k, v in defaults.items() if v is not None} == QWEN2_TOKEN_DEFAULTS


def test_processor_defaults_are_transformers():
    import transformers

    for name, defaults in {**IMAGE_DEFAULTS, **VIDEO_DEFAULTS}.items():
        cls = getattr(transformers, name)
        assert {k: getattr(cls, k, None) for k in defaults} == defaults, name


# -- every family ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", MODEL_TYPES)
def test_family_files_equal_the_processor(tiny_ckpt, arch):
    (fp, fc), (proc, cfg) = _both(tiny_ckpt(arch))
    assert _specs(fp, fc) == _specs(proc, cfg)
    assert fp.chat_template == proc.chat_template
    assert fp.tokenizer.special_tokens_map == proc.tokenizer.special_tokens_map
    assert len(fp.tokenizer) == len(proc.tokenizer)


@pytest.fixture(scope="module")
def qwen_pair(tiny_ckpt):
    return {arch: _both(tiny_ckpt(arch)) for arch in ("qwen2_vl", "qwen3_vl", "qwen3_5")}


_TEXT = st.lists(st.sampled_from(list("ab xyz\n\t'\"{}%#<>|_é中😀") + ["<|im_start|>", "<|im_end|>", "<|image_pad|>",
                                                                    "<think>", "</tool_call>", "'s", "  ", "hello", " world"]),
                 max_size=20).map("".join)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(_TEXT, min_size=1, max_size=4))
def test_tokenizer_ids_equal(qwen_pair, texts):
    for (fp, _), (proc, _) in qwen_pair.values():
        assert fp.tokenizer(texts)["input_ids"] == proc.tokenizer(texts, add_special_tokens=False)["input_ids"]
        assert fp.tokenizer(texts[0])["input_ids"] == proc.tokenizer(texts[0], add_special_tokens=False)["input_ids"]
        assert fp.tokenizer(texts[0], split_special_tokens=True)["input_ids"] == proc.tokenizer(
            texts[0], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        ids = fp.tokenizer(texts[0])["input_ids"]
        assert fp.tokenizer.decode(ids) == proc.tokenizer.decode(ids, skip_special_tokens=False)


_PART = st.one_of(st.builds(lambda t: {"type": "text", "text": t}, _TEXT), st.just({"type": "image"}),
                  st.just({"type": "video"}))
_MESSAGE = st.builds(lambda role, parts: {"role": role, "content": parts},
                     st.sampled_from(["system", "user", "assistant"]), st.lists(_PART, min_size=1, max_size=3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chats=st.lists(st.lists(_MESSAGE, min_size=1, max_size=4), min_size=1, max_size=3),
       reasoning=st.booleans(), thinking=st.booleans(), tools=st.booleans())
def test_chat_template_renders_equal(qwen_pair, chats, reasoning, thinking, tools):
    from transformers.utils.chat_template_utils import render_jinja_template

    if reasoning:  # thinking templates read reasoning_content, filled from any of its names
        chats = [[{**m, "reasoning": "why"} if m["role"] == "assistant" else m for m in c] for c in chats]
    extra = {"enable_thinking": thinking}
    if tools:
        extra["tools"] = [{"type": "function", "function": {"name": "f", "description": "d <b>", "parameters": {
            "type": "object", "properties": {"x": {"type": "integer"}}}}}]
    for (fp, _), (proc, _) in qwen_pair.values():
        want, _ = render_jinja_template(conversations=chats, chat_template=proc.chat_template, **extra,
                                        **proc.tokenizer.special_tokens_map)
        assert render_chats(fp.chat_template, chats, fp.tokenizer.special_tokens_map, **extra) == want


# -- layouts of real checkpoints ---------------------------------------------------------------
def _layout(tmp_path, src, *, image=None, video=None, nested=True, template="jinja", tokenizer=None):
    """A copy of `src` with its processor settings written as `image` / `video` (None: as they are), nested in
    processor_config.json or in the older separate files, and its template as chat_template.jinja / .json."""
    out = tmp_path / "ckpt"
    shutil.copytree(src, out)
    pc = json.loads((out / "processor_config.json").read_text())
    img = pc.pop("image_processor") if image is None else image
    vid = pc.pop("video_processor") if video is None else video
    pc.pop("image_processor", None)
    pc.pop("video_processor", None)
    if nested:
        pc["image_processor"] = img
        if vid:
            pc["video_processor"] = vid
    else:
        (out / "preprocessor_config.json").write_text(json.dumps(img))
        if vid:
            (out / "video_preprocessor_config.json").write_text(json.dumps(vid))
    (out / "processor_config.json").write_text(json.dumps(pc))
    if template == "json":
        t = (out / "chat_template.jinja").read_text()
        (out / "chat_template.jinja").unlink()
        (out / "chat_template.json").write_text(json.dumps({"chat_template": t}))
    if tokenizer:
        tc = json.loads((out / "tokenizer_config.json").read_text())
        (out / "tokenizer_config.json").write_text(json.dumps({**tc, **tokenizer}))
    return out


QWEN2_HUB_PREPROCESSOR = {  # Qwen2-VL-2B-Instruct's preprocessor_config.json: legacy pixel keys, no size
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
}


@pytest.mark.parametrize("case", ["qwen2_hub", "qwen2_defaults", "qwen3_separate_files", "qwen3_defaults"])
def test_older_layouts_equal_the_processor(tiny_ckpt, tmp_path, case):
    if case == "qwen2_hub":  # one preprocessor_config.json feeds both processors; chat_template.json
        folder = _layout(tmp_path, tiny_ckpt("qwen2_vl"), image=QWEN2_HUB_PREPROCESSOR, video={}, nested=False,
                         template="json")
    elif case == "qwen2_defaults":  # keys left out take the classes' defaults
        folder = _layout(tmp_path, tiny_ckpt("qwen2_vl"), image={"image_processor_type": "Qwen2VLImageProcessorFast"},
                         video={"video_processor_type": "Qwen2VLVideoProcessor", "max_pixels": 200704})
    elif case == "qwen3_separate_files":
        folder = _layout(tmp_path, tiny_ckpt("qwen3_vl"), nested=False)
    else:
        folder = _layout(tmp_path, tiny_ckpt("qwen3_vl"),
                         image={"image_processor_type": "Qwen2VLImageProcessorFast", "patch_size": 16},
                         video={"video_processor_type": "Qwen3VLVideoProcessor"})
    (fp, fc), (proc, cfg) = _both(folder)
    assert _specs(fp, fc) == _specs(proc, cfg)
    assert fp.chat_template == proc.chat_template


@pytest.mark.parametrize("change", ["tokenizer_class", "split_special_tokens", "unknown_image_key",
                                    "qwen3_legacy_pixels", "auto_map"])
def test_layouts_not_settled_by_the_files_go_to_transformers(tiny_ckpt, tmp_path, change):
    src = tiny_ckpt("qwen3_vl" if change == "qwen3_legacy_pixels" else "qwen2_vl")
    if change == "tokenizer_class":
        folder = _layout(tmp_path, src, tokenizer={"tokenizer_class": "Qwen3_5Tokenizer"})
    elif change == "split_special_tokens":
        folder = _layout(tmp_path, src, tokenizer={"split_special_tokens": True})
    elif change == "unknown_image_key":
        img = json.loads((src / "processor_config.json").read_text())["image_processor"]
        folder = _layout(tmp_path, src, image={**img, "some_new_resize_knob": 3})
    elif change == "qwen3_legacy_pixels":  # Qwen3-VL's video processor does not fold min_pixels into size
        vid = json.loads((src / "processor_config.json").read_text())["video_processor"]
        folder = _layout(tmp_path, src, video={**vid, "min_pixels": 4096})
    else:
        folder = _layout(tmp_path, src, tokenizer={"auto_map": {"AutoTokenizer": ["x.T", None]}})
    assert read_checkpoint(folder) is None
    loaded = load_spec(str(folder))
    assert not isinstance(loaded.data_processor, FileProcessor)
    assert loaded.processor is loaded.data_processor


def test_loaded_reads_files_and_loads_transformers_on_demand(tiny_ckpt):
    loaded = load_spec(str(tiny_ckpt("qwen2_vl")), FitArgs(image_max_pixels=28 * 28 * 64))
    assert isinstance(loaded.data_processor, FileProcessor)
    assert loaded.spec.max_pixels == 28 * 28 * 64
    assert loaded._real is None
    assert type(loaded.processor).__name__ == "Qwen2VLProcessor"
    assert loaded.config.model_type == "qwen2_vl"
    copy = pickle.loads(pickle.dumps(loaded))  # what a worker process gets: the files' reading only
    assert copy._real is None and copy.spec == loaded.spec
    assert copy.data_processor.tokenizer("a b")["input_ids"] == loaded.processor.tokenizer(
        "a b", add_special_tokens=False)["input_ids"]
