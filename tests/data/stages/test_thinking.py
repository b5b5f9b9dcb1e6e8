"""Thinking blocks (docs/thinking.md): what an assistant target looks like with and without thinking, on the
checkpoint's own chat template (the tiny Qwen3.5's, which renders them as the real one does)."""

from __future__ import annotations

import pytest

from vlmtune.config import load_config
from vlmtune.data.stages.encode import IGNORE_INDEX, Encoder, emit
from vlmtune.data.types import Conversation, Message, TextPart
from vlmtune.errors import ConfigError
from vlmtune.models.load import load_spec


def _conv(*turns: str) -> Conversation:
    roles = ["user", "assistant"] * len(turns)
    return Conversation("s1", "data.jsonl:1", [Message(r, [TextPart(t)]) for r, t in zip(roles, turns)])


def _row(loaded, conv, enable_thinking):
    enc = Encoder(loaded.processor, loaded.spec, enable_thinking=enable_thinking).encode(conv, {})
    row = emit(enc, loaded.spec)
    tok = loaded.processor.tokenizer
    spans, cur = [], []
    for t, label in zip(row.input_ids, row.labels):  # the trained spans, each decoded
        if label != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    return tok.decode(row.input_ids), spans + ([tok.decode(cur)] if cur else [])


@pytest.fixture(scope="module")
def qwen3_5(tiny_ckpt):
    return load_spec(str(tiny_ckpt("qwen3_5")))


PROMPT = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("answer, text, target", [
    # thinking on (LLaMA-Factory's default): the block is trained, empty when the data has no reasoning
    ("Hello.", PROMPT + "<think>\n\n</think>\n\nHello.<|im_end|>\n", "<think>\n\n</think>\n\nHello.<|im_end|>"),
    ("<think>\nSay hello.\n</think>\n\nHello.", PROMPT + "<think>\nSay hello.\n</think>\n\nHello.<|im_end|>\n",
     "<think>\nSay hello.\n</think>\n\nHello.<|im_end|>"),
    ("<think>Say hello.</think>Hello.", PROMPT + "<think>\nSay hello.\n</think>\n\nHello.<|im_end|>\n",
     "<think>\nSay hello.\n</think>\n\nHello.<|im_end|>"),
])
def test_thinking_on_trains_the_thinking_block(qwen3_5, answer, text, target):
    assert _row(qwen3_5, _conv("Hi", answer), True) == (text, [target])


@pytest.mark.parametrize("answer", ["Hello.", "<think>\nSay hello.\n</think>\n\nHello.", "<think>x</think>\nHello."])
def test_thinking_off_trains_the_answer_after_an_empty_block_in_the_prompt(qwen3_5, answer):
    # the reasoning is dropped; the empty block is what the template's enable_thinking=false prompt ends with
    text, spans = _row(qwen3_5, _conv("Hi", answer), False)
    assert text == PROMPT + "<think>\n\n</think>\n\nHello.<|im_end|>\n"
    assert spans == ["Hello.<|im_end|>"]
    generation = qwen3_5.processor.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                       add_generation_prompt=True, enable_thinking=False)
    assert text.startswith(generation) and text[len(generation):] == spans[0] + "\n"


def test_multi_turn_thinking(qwen3_5):
    # an earlier answer is rendered (and trained) without its reasoning, as the template writes it
    conv = _conv("Hi", "<think>a</think>Hello.", "Again", "<think>b</think>Hi.")
    text, spans = _row(qwen3_5, conv, True)
    assert spans == ["Hello.<|im_end|>", "<think>\nb\n</think>\n\nHi.<|im_end|>"]
    text, spans = _row(qwen3_5, conv, False)
    assert spans == ["Hello.<|im_end|>", "Hi.<|im_end|>"]
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nHi.<|im_end|>\n")


def test_a_template_without_thinking_blocks_is_unchanged(tiny_ckpt):
    loaded = load_spec(str(tiny_ckpt("qwen3_vl")))
    conv = _conv("Hi", "Hello.")
    assert _row(loaded, conv, True) == _row(loaded, conv, False) == (PROMPT + "Hello.<|im_end|>\n", ["Hello.<|im_end|>"])


def _cfg(tmp_path, extra: str, *overrides):
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: m\ndataset: d\noutput_dir: o\n" + extra)
    return load_config(path, overrides)


def test_llama_factory_thinking_keys(tmp_path):
    assert _cfg(tmp_path, "").enable_thinking is True  # LLaMA-Factory's default
    assert _cfg(tmp_path, "enable_thinking: false\n").enable_thinking is False
    cfg = _cfg(tmp_path, "template: qwen3_5_nothink\n")
    assert cfg.enable_thinking is False
    assert any(n.startswith("template=qwen3_5_nothink: enable_thinking=false") for n in cfg.notes)
    cfg = _cfg(tmp_path, "template: qwen3_5\n")
    assert cfg.enable_thinking is True and "ignored template='qwen3_5'" in " ".join(cfg.notes)
    with pytest.raises(ConfigError, match=r"template=qwen3_5_nothink \(in .*c.yaml\) turns thinking off but "
                                          r"enable_thinking=true \(in override 'enable_thinking=true'\)"):
        _cfg(tmp_path, "template: qwen3_5_nothink\n", "enable_thinking=true")
