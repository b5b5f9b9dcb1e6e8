"""The doctor's data checks: the data through prepare's driver (or its cache), and what it says about cutoff_len,
the overflow policies, invalid samples (prepare's own `verdict`) and video clips."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ...errors import VlmtuneError
from .report import Check
from .report import names_text as _names

if TYPE_CHECKING:  # context.py holds the Context and imports this module
    from .context import Context

# data: warn when more than this share of samples is not kept whole by the overflow policies.
DATA_NOT_WHOLE_WARN = 0.05

@dataclass
class DataFacts:
    """The data as `prepare` will see it: accounted samples, their fates under the overflow policies."""

    samples: int
    invalid: int
    problems: list
    summary: dict
    fates: Counter
    rows: list[tuple[int, int]]  # (tokens, vision tokens: image + video pads) of each row that would be emitted
    errors: list[str]  # ids of samples that reach the 'error' policy
    split_rows: int
    limited: bool  # max_samples cut the data
    stats: list = field(default_factory=list)  # SampleStats of every valid sample
    longest: int = 0  # tokens of the longest row
    image_prefix: list[int] = field(default_factory=list)  # [k]: vision tokens of the k rows with the most

    def __post_init__(self):
        self.longest = max((t for t, _ in self.rows), default=0)
        most = sorted((i for _, i in self.rows), reverse=True)
        self.image_prefix = [0]
        for i in most:
            self.image_prefix.append(self.image_prefix[-1] + i)

def video_problems(ctx: Context) -> Counter:
    """The data's video problems by kind: every one the data path reports names the clip first ("video '...' ")."""
    return Counter(p.kind for p in ctx.data.problems if getattr(p, "what", "").startswith("video "))

def data_sections(cfg):
    """The data a run reads: the training data, or eval_dataset's when it only predicts (do_train: false)."""
    from ...data.drivers.prepare import eval_config

    return cfg.for_data() if cfg.do_train else eval_config(cfg.for_data())


def data_named(cfg) -> str:
    return f"dataset={cfg.dataset!r}" if cfg.do_train else f"eval_dataset={cfg.eval_dataset!r}"


def read_data(ctx: Context, progress: bool) -> None:
    """The data through prepare's driver (or prepare's cache, when it matches): every sample's fate under the
    configured policies, counted. A clean run leaves the cache behind for the `train` that follows."""
    if ctx.loaded is None or ctx.cfg.streaming:  # streaming: the data is fitted as it is read, not ahead
        return
    cfg = ctx.cfg
    from ...data.drivers.tally import summarize
    from ...data.drivers.prepare import EVAL_REPORT_FILE, REPORT_FILE, prepare_facts

    try:
        acc = prepare_facts(data_sections(cfg), ctx.loaded, progress=progress,
                            report_name=REPORT_FILE if cfg.do_train else EVAL_REPORT_FILE)
    except (VlmtuneError, OSError, ValueError) as e:
        ctx.data_error = f"{type(e).__name__}: {e}"
        return
    ctx.data = DataFacts(len(acc.stats), len(acc.invalid_ids), acc.problems, summarize(acc, cfg.cutoff_len),
                         acc.fates, acc.rows, acc.errors, acc.split_rows, acc.limited, acc.stats)

def check_data(ctx: Context) -> Check:
    """cutoff_len against the data.

    fail: a sample would reach the 'error' policy (prepare stops there); invalid samples while
    on_bad_sample=error; or no row at all would be emitted.
    warn: more than DATA_NOT_WHOLE_WARN (5%) of the samples are not kept whole (shrunk, truncated, split or
    dropped), or any sample is dropped.
    """
    cfg = ctx.cfg
    if ctx.loaded is None:
        return Check("data", "warn", "not checked: the model's processor could not be loaded (see the model check)",
                     "fix the model check first")
    if ctx.data is None and cfg.streaming:
        return Check("data", "ok", "not checked ahead: streaming: true fits each sample as it is read; "
                     "fit_report.jsonl accounts for every sample read (`vlmtune inspect` checks the data first)")
    if ctx.data is None:
        return Check("data", "fail", f"cannot read {data_named(cfg)}: {ctx.data_error}",
                     f"fix {data_named(cfg).split('=')[0]} / dataset_dir / media_dir (try `vlmtune inspect`)")
    d, s = ctx.data, ctx.data.summary
    n = d.samples
    if n == 0:
        first = f"; first: {d.problems[0]}" if d.problems else ""
        return Check("data", "fail", f"{data_named(cfg)} gave no valid sample ({len(d.problems)} "
                     f"problem(s){first})", f"fix {data_named(cfg).split('=')[0]} / dataset_dir / media_dir "
                     "(`vlmtune inspect` lists every "
                     "problem)")
    whole = d.fates["kept"]
    not_whole = n - whole
    fate_text = ", ".join(f"{_FATE_VERB[f]} {d.fates[f]}" + (f" (into {d.split_rows} rows)" if f == "split" else "")
                          for f in _FATE_VERB if d.fates[f])
    rec = s["recommended_cutoff_len"]
    per_count = "; ".join(f"{k} image(s): p99 {v['p99']}, max {v['max']}" for k, v in s["by_image_count"].items())
    if s.get("videos"):
        per_count += "".join(f"; {k} video(s): p99 {v['p99']}, max {v['max']}" for k, v in s["by_video_count"].items())
    limit = f" (max_samples={cfg.max_samples} of each data file)" if d.limited else ""
    message = (f"cutoff_len={cfg.cutoff_len}: {s['over_cutoff']} of {n} valid samples{limit} are longer; "
               f"overflow={_names(cfg.overflow)} would {fate_text or 'have no samples to fit'}; "
               f"recommended cutoff_len: {rec['p95']} keeps 95% whole, {rec['p99']} 99%, {rec['max']} all "
               f"({per_count})")
    if d.invalid:
        message += f"; {d.invalid} invalid sample(s)"
    raise_to = f"raise cutoff_len to {rec['max']} (keeps every sample whole)"
    if d.errors:
        shown = ", ".join(d.errors[:5]) + (f" and {len(d.errors) - 5} more" if len(d.errors) > 5 else "")
        return Check("data", "fail", f"{len(d.errors)} sample(s) would reach the 'error' policy ({shown}); "
                     f"{message}", f"{raise_to}, or end overflow with drop")
    from ...data.drivers.tally import verdict

    stop = verdict(cfg.read, d.invalid, s["records"])  # the decision prepare takes on the same counts
    if stop is not None and stop.kind == "invalid":
        first = str(d.problems[0]) if d.problems else ""
        return Check("data", "fail", f"{stop.what} (first: {first}); {message}",
                     "fix the samples (`vlmtune inspect` lists every problem), or set on_bad_sample: skip")
    if stop is not None:
        return Check("data", "warn", f"{stop.what}; train stops there; {message}",
                     "fix the samples (`vlmtune inspect` lists every problem), or set confirm_skipped_share: true")
    if not d.rows:
        return Check("data", "fail", f"no training row would be emitted; {message}",
                     f"{raise_to}, or put shrink_images, truncate_text or split before drop in overflow")
    if d.fates["dropped"] or not_whole > DATA_NOT_WHOLE_WARN * n:
        why = f"{not_whole} of {n} samples ({100 * not_whole / n:.1f}%) would not be kept whole (more than " \
              f"{DATA_NOT_WHOLE_WARN:.0%} warns)" if not_whole > DATA_NOT_WHOLE_WARN * n else \
              f"{d.fates['dropped']} sample(s) would be dropped"
        lower = "image_max_pixels or video_max_pixels" if s.get("videos") else "image_max_pixels"
        return Check("data", "warn", f"{why}; {message}", f"{raise_to}, or lower {lower}")
    return Check("data", "ok", message)

def check_video(ctx: Context) -> Check:
    """Videos against cutoff_len, one clip at a time.

    A video is one atomic run (Qwen3-VL: its temporal patches stay together), so truncate_text and split move
    whole videos, and a clip whose tokens alone exceed cutoff_len fits in no row as planned: only shrink_images
    keeps it, by lowering the clip's pixel budget, then its frame count (never below video_min_pixels and the
    processor's min_frames); otherwise the other policies leave it out or drop the sample. Counted per clip
    (SampleStats.longest_video). warn: any such clip. fail: videos in the data that cannot be read for want of a decoder (PyAV).
    """
    cfg = ctx.cfg
    if ctx.loaded is None:
        return Check("video", "warn", "not checked: the model's processor could not be loaded (see the model check)",
                     "fix the model check first")
    if ctx.data is None:
        if cfg.streaming:
            return Check("video", "ok", "not checked ahead: streaming: true fits each sample as it is read")
        return Check("video", "warn", "not checked: the data could not be read (see the data check)",
                     "fix the data check first")
    d, s = ctx.data, ctx.data.summary
    refused = video_problems(ctx)
    unread = refused["no_video_decoder"]
    if unread:
        return Check("video", "fail", f"{unread} video(s) in the data cannot be read: no video decoder (PyAV) is "
                     "installed, so their samples are invalid", "pip install av (vlmtune[video])")
    videos = s.get("videos", 0)
    unusable = (f"{sum(refused.values())} video problem(s) made their samples invalid "
                f"({', '.join(f'{k}: {n}' for k, n in sorted(refused.items()))})") if refused else ""
    if not videos:
        if refused:
            return Check("video", "warn", f"no usable video: {unusable}",
                         "fix the clips (`vlmtune inspect` lists every problem), or remove those samples")
        return Check("video", "ok", "no videos in the data")
    with_videos = [st for st in d.stats if st.videos]
    largest = max(with_videos, key=lambda st: st.longest_video)
    facts = (f"{videos} video(s) in {len(with_videos)} sample(s), {s['video_tokens']} video tokens; the largest "
             f"video takes {largest.longest_video} tokens (sample {largest.id})")
    over = [st for st in with_videos if st.longest_video > cfg.cutoff_len]
    if unusable:
        facts += f"; {unusable}"
    if not over:
        return Check("video", "ok", f"{facts}, within cutoff_len={cfg.cutoff_len}")
    if "shrink_images" in cfg.overflow:
        fate = ("a video is never cut, so such a clip fits in no row unless shrink_images lowers its pixel budget, "
                "then its frame count; otherwise the rest of overflow leaves it out or drops the sample")
    else:
        fate = ("a video is never cut and overflow has no shrink_images, so such a clip fits in no row: the rest of "
                "overflow leaves it out or drops the sample")
    return Check("video", "warn", f"{len(over)} sample(s) have a video whose tokens alone exceed "
                 f"cutoff_len={cfg.cutoff_len}: {fate}; {facts}",
                 "lower video_max_pixels, video_fps or video_maxlen, or raise cutoff_len")

_FATE_VERB = {"kept": "keep", "shrunk": "shrink", "truncated": "truncate", "split": "split", "dropped": "drop",
              "error": "stop prepare on"}
