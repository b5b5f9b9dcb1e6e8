"""The demo's data: rendered shapes in LLaMA-Factory's sharegpt format, and the held-out questions."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

# Colours far apart in RGB, each jittered per image; the background is a pale grey, so the shape's
# colour dominates every image token that covers it.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 50),
    "blue": (35, 70, 215),
    "yellow": (235, 205, 25),
}
SHAPES = ("circle", "square", "triangle")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")

# The held-out questions ask exactly these; training also uses paraphrases.
COLOUR_QUESTION = "What colour is the shape?"
SHAPE_QUESTION = "Which shape is this?"
COLOUR_PARAPHRASES = (COLOUR_QUESTION, "What is the colour of the shape in this picture?", "Which colour is it?")
SHAPE_PARAPHRASES = (SHAPE_QUESTION, "What shape is shown?", "Name the shape in the picture.")

DATASET_NAME = "demo_shapes"

# Image tokens per image at the demo's pixel budget: small, so that a CPU step takes a fraction of
# a second, yet enough patches (8 x 8 of 14 px for Qwen2-VL) to see a shape's outline.
IMAGE_TOKENS = 16
# Every ordinary sample (one or two images, a few turns) fits; the deliberately long ones do not.
CUTOFF_LEN = 128


@dataclass(frozen=True)
class DemoSize:
    """How much data and training a demo run gets."""

    train_images: int
    eval_images: int
    steps: int
    batch_size: int
    # A second process decodes and resizes the next batch's images (40% of a step) while the main
    # one trains; not worth its start-up in a run of a few seconds.
    loader_workers: int


# Shape is learnt late and suddenly (held-out shape accuracy with seed 0: 73% after 1600 steps,
# 98% after 2400; seeds 1 and 2 also 98% after 2400); colour is learnt within ~300 steps.
FULL = DemoSize(train_images=2000, eval_images=60, steps=2400, batch_size=8, loader_workers=1)
QUICK = DemoSize(train_images=240, eval_images=16, steps=300, batch_size=8, loader_workers=0)


@dataclass(frozen=True)
class Picture:
    path: str  # relative to the data folder
    shape: str
    colour: str


def draw_picture(rng: random.Random, shape: str, colour: str, size: tuple[int, int] | None = None):
    """One shape of one colour on a plain pale background; size, aspect and position vary."""
    from PIL import Image, ImageDraw

    if size is None:
        w = rng.randint(56, 400)
        h = max(56, min(400, round(w * rng.uniform(0.5, 2.0))))
    else:
        w, h = size
    bg = rng.randint(215, 250)
    bg_rgb = tuple(max(0, min(255, bg + rng.randint(-6, 6))) for _ in range(3))
    im = Image.new("RGB", (w, h), bg_rgb)
    fill = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    side = min(w, h)
    d = rng.uniform(0.75, 0.95) * side  # the shape's extent
    x0 = rng.uniform(0, w - d)
    y0 = rng.uniform(0, h - d)
    draw = ImageDraw.Draw(im)
    if shape == "circle":
        draw.ellipse([x0, y0, x0 + d, y0 + d], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x0 + d, y0 + d], fill=fill)
    else:
        # Always pointing up: with triangles pointing either way, a trial on shape questions alone
        # reached 79% held-out accuracy after 1500 steps instead of 100%.
        draw.polygon([(x0 + d / 2, y0), (x0, y0 + d), (x0 + d, y0 + d)], fill=fill)
    return im


def pictures(rng: random.Random, folder: Path, prefix: str, n: int, big: bool = False) -> list[Picture]:
    """n pictures whose shape and colour cycle through every combination, in a shuffled order."""
    combos = [(s, c) for s in SHAPES for c in COLOURS]
    out = []
    for k in range(n):
        if k % len(combos) == 0:
            rng.shuffle(combos)
        shape, colour = combos[k % len(combos)]
        size = (rng.randint(600, 900), rng.randint(600, 900)) if big else None
        name = f"{prefix}_{k:04d}.png"
        draw_picture(rng, shape, colour, size).save(folder / name)
        out.append(Picture(f"images/{name}", shape, colour))
    return out


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _colour_turns(rng, p: Picture) -> list[dict]:
    return [_user("<image>" + rng.choice(COLOUR_PARAPHRASES)), _assistant(p.colour)]


def _shape_turns(rng, p: Picture) -> list[dict]:
    return [_user("<image>" + rng.choice(SHAPE_PARAPHRASES)), _assistant(p.shape)]


def _which_picture(rng, a: Picture, b: Picture) -> dict:
    """"Which picture shows a circle, the first or the second?" over two pictures of different shapes."""
    target = rng.choice((a, b))
    answer = "the first" if target is a else "the second"
    q = f"<image><image>Which picture shows a {target.shape}, the first or the second?"
    return {"messages": [_user(q), _assistant(answer)], "images": [a.path, b.path]}


def _preamble(rng: random.Random, words: int) -> str:
    vocab = ("the picture shows a small shape on a plain background and we look at it closely because "
             "every colour and every shape matters here so please read this long note before you answer").split()
    return " ".join(rng.choice(vocab) for _ in range(words)).capitalize() + "."


def training_records(rng: random.Random, pics: list[Picture], big: list[Picture]) -> list[dict]:
    """sharegpt records over the training pictures; every picture is asked about at least once."""
    records: list[dict] = []
    for p in pics:
        # Every picture is asked its shape, most also their colour, half both in one two-turn chat
        # (one image, two answers). Colour is easy but not free: with colour asked of only 30% of
        # the pictures, held-out colour accuracy ended at 56% while shape reached 94%.
        r = rng.random()
        if r < 0.5:
            first, second = (_colour_turns, _shape_turns) if rng.random() < 0.5 else (_shape_turns, _colour_turns)
            turns = first(rng, p) + second(rng, p)
            turns[2]["content"] = turns[2]["content"].replace("<image>", "")
            records.append({"messages": turns, "images": [p.path]})
        elif r < 0.8:
            records.append({"messages": _shape_turns(rng, p), "images": [p.path]})
        else:
            records.append({"messages": _colour_turns(rng, p), "images": [p.path]})
    for _ in range(len(pics) // 8):  # two images
        a = rng.choice(pics)
        b = rng.choice([q for q in pics if q.shape != a.shape])
        records.append(_which_picture(rng, a, b))
    records += long_records(rng, pics, big)
    rng.shuffle(records)
    return records


def long_records(rng: random.Random, pics: list[Picture], big: list[Picture]) -> list[dict]:
    """Samples longer than CUTOFF_LEN, one kind per fitting policy that should act on it."""
    out = []
    n = max(2, len(pics) // 40)
    for _ in range(n):
        # Eight large pictures in one turn: too many image tokens -> shrink_images lowers the budget.
        eight = rng.sample(big, 8)
        k = rng.randrange(len(eight))
        q = "<image>" * len(eight) + f"What colour is the {ORDINALS[k]} shape?"
        out.append({"messages": [_user(q), _assistant(eight[k].colour)], "images": [p.path for p in eight]})
    for _ in range(n):
        # A long text-only exchange before the question -> truncate_text drops it.
        p = rng.choice(pics)
        msgs = [_user(_preamble(rng, 140)), _assistant("I have read the note."), *_colour_turns(rng, p)]
        out.append({"messages": msgs, "images": [p.path]})
    for _ in range(n):
        # Ten pictures, one per turn: no budget fits them in one sample -> split at turn boundaries.
        ten = rng.sample(pics, 10)
        msgs = [m for p in ten for m in (_colour_turns(rng, p) if rng.random() < 0.5 else _shape_turns(rng, p))]
        out.append({"messages": msgs, "images": [p.path for p in ten]})
    return out


def eval_questions(pics: list[Picture]) -> list[dict]:
    """Held-out single-image questions: the colour and the shape of each picture."""
    out = []
    for p in pics:
        out.append({"image": p.path, "question": COLOUR_QUESTION, "kind": "colour", "answer": p.colour})
        out.append({"image": p.path, "question": SHAPE_QUESTION, "kind": "shape", "answer": p.shape})
    return out


def write_dataset(data_dir: str | os.PathLike, size: DemoSize, seed: int) -> dict:
    """Render the pictures and write the sharegpt dataset, dataset_info.json and eval.json."""
    data = Path(data_dir)
    rng, train, big, held_out = picture_sets(data, size, seed, n_big=12)
    records = training_records(rng, train, big)
    write_sharegpt(data, DATASET_NAME, records, "images")
    questions = eval_questions(held_out)
    write_json(data / "eval.json", questions)
    return {"records": len(records), "eval_questions": questions}


def picture_sets(data: Path, size: DemoSize, seed: int, n_big: int) -> tuple[random.Random, list[Picture],
                                                                             list[Picture], list[Picture]]:
    """The image demos' pictures, rendered under data/images: (the stream the training records are drawn from
    next, training pictures, `n_big` large ones, held-out ones)."""
    images = data / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train = pictures(rng, images, "train", size.train_images)
    big = pictures(rng, images, "big", n_big, big=True)
    # Its own stream, so that the held-out pictures do not change what is trained on.
    held_out = pictures(random.Random(f"eval-{seed}"), images, "eval", size.eval_images)
    return rng, train, big, held_out


def write_sharegpt(data: Path, name: str, records: list[dict], media: str) -> None:
    """`records` as `name`.json and its dataset_info.json entry (LLaMA-Factory sharegpt; `media`: the
    images or videos column)."""
    write_dataset_files(data, name, records, {
        "formatting": "sharegpt",
        "columns": {"messages": "messages", media: media},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    })


def write_dataset_files(data: Path, name: str, records: list[dict], entry: dict) -> None:
    """`records` as `name`.json and dataset_info.json naming it, with `entry` (formatting, columns, ...)."""
    write_json(data / f"{name}.json", records)
    write_json(data / "dataset_info.json", {name: {"file_name": f"{name}.json", **entry}})


def write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
