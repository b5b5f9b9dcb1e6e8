"""`vlmtune inspect`: exact token accounting of a dataset, before any pixel is decoded.

Turns the rule of thumb "cutoff_len ≥ 1024 for one image, ≥ 2048 for two" into numbers computed
from the user's own data: length percentiles overall and per image (and video) count, and the smallest
cutoff_len that keeps 95% / 99% / 100% of the samples whole. Videos are counted from their container
headers (frames, rate, size) with the loaded processor's sampling and resize: no frame is decoded.

`--stage dpo` / `--stage kto` read preference data as those stages' prepare does (data/stages/pairs.py): a pair
is its prompt with its images once and two answers, and its length is its longer side (prompt + chosen or prompt
+ rejected), since both sides must fit cutoff_len; a KTO record is one sample with its tag. Without --stage
(stage sft, as a config without `stage`) a preference file is refused in one line per file that names the
--stage to add: its numbers depend on the stage, and prepare under sft would refuse it too.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from dataclasses import asdict

from ..config import POLICIES, FitArgs, folders, load_sections
from ..data.drivers.tally import Accounting, account, summarize  # noqa: F401  (account: re-exported for the cli)
from ..data.stages.pairs import PrefEncoded, stage_that_reads
from ..errors import ConfigError, Problem, SampleError, VlmtuneError
from ..models.load import Loaded

# inspect's flags -> the config keys they set (the rest keep their declared defaults)
FLAG_KEYS = {
    "model": "model_name_or_path", "trust_remote_code": "trust_remote_code", "data": "dataset",
    "dataset_dir": "dataset_dir", "media_dir": "media_dir",
    "allow_paths_outside_media_dir": "allow_paths_outside_media_dir", "allow_remote_images": "allow_remote_images",
    "image_min_pixels": "image_min_pixels", "image_max_pixels": "image_max_pixels",
    "cutoff_len": "cutoff_len", "preprocessing_num_workers": "preprocessing_num_workers", "stage": "stage",
}


def inspect_sections(args) -> tuple:
    """(model, read, fit, prepare, preference) sections from inspect's flags, checked as a config's keys are;
    the data goes through the same pipeline as prepare's with them. --cutoff-len not given: no fitting (the fit
    section's default is never shown as the user's); --stage not given: stage sft, a config's default."""
    values = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items()}
    for key in ("cutoff_len", "stage"):
        if values[key] is None:
            del values[key]
    if args.overflow:
        overflow = [p.strip() for p in args.overflow.split(",")]
        unknown = [p for p in overflow if p not in POLICIES]
        if unknown:
            raise VlmtuneError(f"--overflow {args.overflow}: {', '.join(map(repr, unknown))} is not a policy; "
                               f"use policies from {','.join(POLICIES)}")
        values["overflow"] = overflow
    return load_sections(values, "model", "read", "fit", "prepare", "preference")


# -- samples of another kind than the stage reads ----------------------------------------------------------------
_KIND_NAMES = {"dpo": "preference pairs (chosen / rejected)", "kto": "KTO samples (answers tagged desirable or not)",
               "sft": "SFT samples (no rejected answer, no tag)"}


def stage_lines(problems: list[Problem], stage: str) -> list[str]:
    """One line per data file and kind of sample the stage does not read (a ranking file under sft, an SFT file
    under dpo, ...), naming the --stage that reads them; the other problems are not among them."""
    counts: dict[tuple[str, str], int] = {}
    for p in problems:
        reads = stage_that_reads(p)
        if reads is not None:
            key = (re.sub(r"[:#]\d+$", "", p.source), reads)
            counts[key] = counts.get(key, 0) + 1
    return [f"{file}: {n} record(s) are {_KIND_NAMES[reads]}, which stage {stage}"
            f"{' (the default)' if stage == 'sft' else ''} does not read; inspect them with "
            f"{'--stage ' + reads if reads != 'sft' else '--stage sft (the default)'}"
            for (file, reads), n in counts.items()]


def stage_refusal(acc: Accounting) -> str | None:
    """When no sample is valid and every problem is a sample of another kind than the stage reads: the one line
    per file to stop with, instead of a line per record."""
    if acc.stats or not acc.problems or any(stage_that_reads(p) is None for p in acc.problems):
        return None
    return "\n".join(stage_lines(acc.problems, acc.stage or "sft"))


def format_summary(summary: dict) -> str:
    """A human-readable report of a summary."""
    s = summary
    stage = s.get("stage", "sft")
    unit = "pair" if stage == "dpo" else "sample"
    head = (f"{unit}s: {s['samples']} valid of {s['records']} records ({s['invalid_samples']} invalid, "
            f"{len(s['problems'])} problem(s))")
    if stage == "dpo":
        head += "; a pair's length is its longer side (prompt + the longer answer): both must fit cutoff_len"
    if stage == "kto":
        head += f"; {s['desirable']} desirable, {s['undesirable']} undesirable"
    lines = [
        head,
        f"images: {s['images']}" + (" (each pair's prompt images, once)" if stage == "dpo" else ""),
        f"tokens: {s['tokens']} = {s['text_tokens']} text + {s['image_tokens']} image"
        + (" (the longer sides)" if stage == "dpo" else ""),
        "",
        f"{'images/' + unit:>13} {unit + 's':>8} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}",
    ]
    rows = list(s["by_image_count"].items()) + [("all", s["lengths"])]
    if stage == "dpo":
        rows += [("chosen side", s["chosen_lengths"]), ("rejected side", s["rejected_lengths"])]
    for k, d in rows:
        lines.append(f"{k:>13} {d['samples']:>8} {d['p50']:>7} {d['p95']:>7} {d['p99']:>7} {d['max']:>7}")
    if s.get("videos"):
        lines[2] = (f"tokens: {s['tokens']} = {s['text_tokens']} text + {s['image_tokens']} image + "
                    f"{s['video_tokens']} video")
        lines.insert(2, f"videos: {s['videos']}")
        lines += ["", f"{'videos/sample':>13} {'samples':>8} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}"]
        for k, d in s["by_video_count"].items():
            lines.append(f"{k:>13} {d['samples']:>8} {d['p50']:>7} {d['p95']:>7} {d['p99']:>7} {d['max']:>7}")
    lines[1:1] = list(s.get("notes") or [])
    r = s["recommended_cutoff_len"]
    whole = " (both sides)" if stage == "dpo" else ""
    lines += ["", f"recommended cutoff_len: {r['p95']} keeps 95% whole{whole}, {r['p99']} keeps 99%, "
              f"{r['max']} keeps all"]
    if s["cutoff_len"] is not None:
        over = f"{unit}(s) exceed it" + (" (their longer side)" if stage == "dpo" else "")
        lines.append(f"cutoff_len={s['cutoff_len']}: {s['over_cutoff']} {over} and will be fitted by the overflow "
                     "policies")
    problems = [Problem(**p) for p in s["problems"]]
    if problems:
        shown = stage_lines(problems, stage) + [str(p) for p in problems if stage_that_reads(p) is None]
        lines += ["", "problems:"] + [f"  - {p}" for p in shown[:20]]
        if len(shown) > 20:
            lines.append(f"  ... and {len(shown) - 20} more (see --json)")
    return "\n".join(lines)


# The files --per-sample and --plot name are new, or ones inspect wrote before: a JSONL whose first line has
# exactly PER_SAMPLE_KEYS, a PNG whose Software tag is PLOT_SOFTWARE. Anything else is never written over.
PER_SAMPLE_KEYS = ("id", "tokens", "image_tokens", "text_tokens", "images", "videos", "video_tokens")
# and per stage: a pair's `tokens` are its longer side's, its sides' lengths follow; a KTO sample's tag
STAGE_KEYS = {"sft": (), "dpo": ("chosen_tokens", "rejected_tokens"), "kto": ("kto_tag",)}
PLOT_SOFTWARE = "vlmtune inspect"


def output_problems(per_sample: str | None, plot: str | None) -> list[str]:
    """Why inspect may not write --per-sample / --plot where they point (before any work, and again before
    writing): an existing path that is not a file inspect wrote."""
    problems = []
    for flag, path, ours in (("--per-sample", per_sample, _our_jsonl), ("--plot", plot, _our_png)):
        if path is None or not os.path.lexists(path):
            continue
        if os.path.islink(path) or not os.path.isfile(path):
            what = "a link" if os.path.islink(path) else "not a regular file"
        elif os.path.getsize(path) == 0 or ours(path):  # an empty file holds nothing to lose
            continue
        else:
            what = "a file that vlmtune inspect did not write"
        problems.append(f"{flag} {path} is {what}; vlmtune never overwrites your files: set {flag} to a new file "
                        "name, or delete that one yourself")
    return problems


def _our_jsonl(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline(1 << 16)
        return list(json.loads(first)) in [list(PER_SAMPLE_KEYS + extra) for extra in STAGE_KEYS.values()]
    except (OSError, ValueError, TypeError):
        return False


def _our_png(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get("Software") == PLOT_SOFTWARE
    except (OSError, ValueError):
        return False


def _check_output(path: str, flag: str) -> None:
    problems = output_problems(path if flag == "--per-sample" else None, path if flag == "--plot" else None)
    if problems:
        raise ConfigError(problems)


def write_per_sample(acc: Accounting, path: str) -> None:
    _check_output(path, "--per-sample")  # again: something may have appeared there while accounting
    keys = PER_SAMPLE_KEYS + STAGE_KEYS[acc.stage or "sft"]
    with folders.replacing(path, "w", encoding="utf-8") as f:
        for s in acc.stats:
            row = asdict(s)
            f.write(json.dumps({k: row[k] for k in keys}) + "\n")


def plot_lengths(acc: Accounting, path: str, cutoff_len: int | None = None) -> None:
    """Histogram of sample lengths, one series per image count, with the cutoff drawn in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_count: dict[int, list[int]] = defaultdict(list)
    for s in acc.stats:
        by_count[s.images].append(s.tokens)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if by_count:
        hi = max(max(v) for v in by_count.values())
        bins = max(10, min(60, int(math.sqrt(sum(len(v) for v in by_count.values())) * 2)))
        edges = [hi * i / bins for i in range(bins + 1)] if hi > 0 else [0, 1]
        ax.hist([by_count[k] for k in sorted(by_count)], bins=edges, stacked=True,
                label=[f"{k} image(s)" for k in sorted(by_count)])
    if cutoff_len is not None:
        ax.axvline(cutoff_len, color="red", linestyle="--", label=f"cutoff_len={cutoff_len}")
    if acc.stage == "dpo":
        ax.set_xlabel("tokens per pair: its longer side (prompt + the longer answer; text + image runs)")
        ax.set_ylabel("pairs")
        ax.set_title("Pair lengths by number of images")
    else:
        ax.set_xlabel("tokens per sample (text + image runs)")
        ax.set_ylabel("samples")
        ax.set_title("Sample lengths by number of images")
    ax.legend()
    fig.tight_layout()
    _check_output(path, "--plot")
    with folders.replacing(path, "wb") as f:
        fig.savefig(f, dpi=100, format="png", metadata={"Software": PLOT_SOFTWARE})  # the tag says inspect wrote it
    plt.close(fig)


# -- one sample, readable ----------------------------------------------------------------------
TRAIN_OPEN, TRAIN_CLOSE = "\u27e6", "\u27e7"  # ⟦ trained text ⟧


def render_row(row, spec, tokenizer, color: bool = False) -> str:
    """A row as text: trained spans in ⟦…⟧ (green on a terminal), each image run as one marker."""
    from ..data.stages.encode import IGNORE_INDEX

    out: list[str] = []
    ids, labels = row.input_ids, row.labels
    image = 0
    spans = video_spans(ids, row.video_grid_thw, spec)
    i = 0
    while i < len(ids):
        if i in spans:
            k, end = spans[i]
            t, h, w = row.video_grid_thw[k]
            pads = sum(1 for x in ids[i:end] if x == spec.video_token_id)
            extra = f", {end - i} with the timestamps and markers" if end - i != pads else ""
            out.append(f"[video {k + 1}: {row.videos[k]} {len(row.video_frames[k])} of {row.video_total_frames[k]} "
                       f"frames, grid {t}x{h}x{w} = {pads} tokens{extra}]")
            i = end
            continue
        if ids[i] == spec.image_token_id:
            j = i
            while j < len(ids) and ids[j] == spec.image_token_id:
                j += 1
            g = row.image_grid_thw[image]
            out.append(f"[image {image + 1}: {row.images[image]} grid {g[0]}x{g[1]}x{g[2]} = {j - i} tokens]")
            image += 1
            i = j
            continue
        trained = labels[i] != IGNORE_INDEX
        j = i
        while (j < len(ids) and ids[j] != spec.image_token_id and j not in spans
               and (labels[j] != IGNORE_INDEX) == trained):
            j += 1
        text = tokenizer.decode(ids[i:j], skip_special_tokens=False)
        if trained:
            text = f"\033[32m{text}\033[0m" if color else f"{TRAIN_OPEN}{text}{TRAIN_CLOSE}"
        out.append(text)
        i = j
    return "".join(out)


def video_spans(ids: list[int], grids: list[list[int]], spec) -> dict[int, tuple[int, int]]:
    """{start: (video index, end)} of each video's expansion in `ids`: the run of pads (Qwen2/2.5-VL), or the
    temporal patches with their timestamps and markers, from the first timestamp to the last patch's
    `<|vision_end|>` (Qwen3-VL)."""
    spans: dict[int, tuple[int, int]] = {}
    i, k = 0, 0
    from ..data.stages.collate import frames_apart  # lazily: collate imports torch

    per_patch = frames_apart(spec)
    while i < len(ids) and k < len(grids):
        if ids[i] != spec.video_token_id:
            i += 1
            continue
        if not per_patch:
            end = i
            while end < len(ids) and ids[end] == spec.video_token_id:
                end += 1
            spans[i] = (k, end)
        else:
            start = i - 2  # back over the patch's <|vision_start|> and its timestamp to the template's
            while start > 0 and ids[start] != spec.vision_start_token_id:
                start -= 1
            end, closed = i, 0
            while end < len(ids) and closed < grids[k][0]:
                closed += ids[end] == spec.vision_end_token_id
                end += 1
            spans[start + 1] = (k, end)
        i, k = end, k + 1
    return spans


def show_sample(acc: Accounting, loaded: Loaded, sample_id: str, fit: FitArgs | None = None,
                color: bool = False) -> str:
    """The sample as the model will see it, after fitting (in the pipeline, `account(fitting=True)`) when `fit`
    is given; a pair: both sides, each with the answer it is scored on."""
    matches = [e for e in acc.encoded if e.id == sample_id]  # account(keep_ids=[sample_id]) keeps it whole
    if not matches:
        bad = [p for p in acc.problems if p.sample_id == sample_id]
        if bad:
            return f"sample {sample_id} is invalid:\n" + "\n".join(f"  - {p}" for p in bad)
        known = ", ".join(s.id for s in acc.stats[:5]) or "(no valid sample)"
        raise VlmtuneError(f"no sample with id {sample_id!r} in the data; ids look like: {known}; "
                           "pass one of them to --show (`--per-sample FILE` lists every id)")
    enc = matches[0]
    what = "pair" if isinstance(enc, PrefEncoded) and enc.rejected is not None else "sample"
    head = [f"{what} {enc.id} ({enc.source}): {enc.length} tokens = {enc.text_tokens} text + {enc.image_tokens} image"
            + (f" + {enc.video_tokens} video" if enc.videos else "") + f", {len(enc.images)} image(s)"
            + (f", {len(enc.videos)} video(s)" if enc.videos else "")]
    if isinstance(enc, PrefEncoded):
        head[0] += _pref_facts(enc)
    pieces = [enc]
    if fit is not None:
        out = next(f for f in acc.fitted if (f.sample_id if isinstance(f, SampleError) else f.id) == sample_id)
        if isinstance(out, SampleError):  # the 'error' policy: what prepare would stop with
            raise out
        after = f"{out.tokens_after}"
        if what == "pair":
            c, r = out.sides["chosen_tokens"][1], out.sides["rejected_tokens"][1]
            after = (f"{after} (chosen {c}, rejected {r}: both <= {fit.cutoff_len})" if out.pieces
                     else "none (the pair is left out, both sides)")
        head.append(f"fit to cutoff_len={fit.cutoff_len}: {out.fate} ({out.reason}); tokens after: {after}")
        pieces = out.pieces
    if isinstance(enc, PrefEncoded):  # only the final answer is a target, scored by the preference loss
        head.append(f"legend: {TRAIN_OPEN}scored{TRAIN_CLOSE} text is the answer the preference loss scores; the "
                    "rest is masked" if not color else "legend: green text is the answer the preference loss "
                    "scores; the rest is masked")
    else:
        head.append(f"legend: {TRAIN_OPEN}trained{TRAIN_CLOSE} text is in the loss; the rest is masked"
                    if not color else "legend: green text is in the loss; the rest is masked")
    body = []
    for p in pieces:
        for label, side in _sides(p):
            body.append(_render_side(side, label, loaded, color))
    return "\n".join(head + body)


def _pref_facts(enc: PrefEncoded) -> str:
    if enc.rejected is None:
        tag = "desirable" if enc.desirable else "undesirable: scored, never an SFT target"
        return f"; kto_tag: {str(enc.desirable).lower()} ({tag})"
    c, r = enc.chosen.length, enc.rejected.length
    longer = "both sides equal" if c == r else f"the longer side, {'chosen' if c > r else 'rejected'}"
    return f" ({longer}); prompt + chosen: {c}, prompt + rejected: {r}"


def _sides(piece) -> list[tuple[str, object]]:
    """(label, Encoded) of each sequence a piece is: one for SFT and KTO, two for a pair."""
    if not isinstance(piece, PrefEncoded):
        return [("", piece)]
    if piece.rejected is None:
        return [(f" ({'desirable' if piece.desirable else 'undesirable'})", piece.chosen)]
    return [(" chosen", piece.chosen), (" rejected", piece.rejected)]


def _render_side(side, label: str, loaded: Loaded, color: bool) -> str:
    from ..data.stages.encode import emit

    row = emit(side, loaded.spec)
    return (f"--- {row.id}{label}: {len(row.input_ids)} tokens ---\n"
            + render_row(row, loaded.spec, loaded.data_processor.tokenizer, color))
