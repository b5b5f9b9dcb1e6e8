"""The `vlmtune` command line: one subcommand per user task, each calling one function."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import ConfigError, VlmtuneError, bounded
from ..models.families import MODEL_TYPES


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from ..models.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(args.out, arch=args.arch, seed=args.seed, vocab_source=args.vocab)
    print(f"wrote a tiny random {args.arch} checkpoint to {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.video and args.dpo:
        raise SystemExit("vlmtune demo: choose one of --video and --dpo")
    if args.dpo:
        from .demo import format_pref_summary, run_pref_demo

        summary = run_pref_demo(args.out or "vlmtune-demo-dpo", steps=args.steps, quick=args.quick, arch=args.arch,
                                seed=args.seed)
        print(format_pref_summary(summary))
        return 0
    if args.video:
        from .demo import format_video_summary, run_video_demo

        out = args.out or "vlmtune-demo-video"
        summary = run_video_demo(out, steps=args.steps, quick=args.quick, arch=args.arch, seed=args.seed)
        print(format_video_summary(summary))
        return 0
    from .demo import format_summary, run_demo

    summary = run_demo(args.out or "vlmtune-demo", steps=args.steps, quick=args.quick, arch=args.arch, seed=args.seed)
    print(format_summary(summary))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from ..models.load import load_spec
    from .inspect import account, format_summary, inspect_sections, output_problems, plot_lengths, stage_refusal, \
        summarize, write_per_sample

    problems = output_problems(args.per_sample, args.plot)  # before any work: never over a file of yours
    try:
        model, read, fit, prep, pref = inspect_sections(args)
    except ConfigError as e:
        raise ConfigError(e.problems + problems) from None
    if problems:
        raise ConfigError(problems)
    loaded = load_spec(model, fit)
    fitting = bool(args.show) and args.cutoff_len is not None  # the shown sample is fitted by the pipeline
    acc = account(read, loaded, fit, fitting=fitting, progress=not args.json, preference=pref,
                  keep_ids=[args.show] if args.show else (), workers=prep.preprocessing_num_workers or 1)
    refusal = stage_refusal(acc)  # a preference file without --stage (or the reverse): one line per file
    if refusal:
        raise VlmtuneError(refusal)
    if args.show:
        from .inspect import show_sample

        print(show_sample(acc, loaded, args.show, fit if fitting else None, color=sys.stdout.isatty()))
        return 0
    summary = summarize(acc, args.cutoff_len)
    if args.per_sample:
        write_per_sample(acc, args.per_sample)
    if args.plot:
        plot_lengths(acc, args.plot, args.cutoff_len)
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary))
        for what, path in (("per-sample counts", args.per_sample), ("length histogram", args.plot)):
            if path:
                print(f"{what}: {path}")
    if not acc.stats:  # nothing to train on: scripts must not read this as success
        print(f"no valid sample in {args.data!r} ({summary['records']} record(s), all invalid)", file=sys.stderr)
        return 1
    return 0


def _load_cfg(args: argparse.Namespace):
    from ..config import load_config

    return load_config(args.config, args.overrides)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from ..data.drivers.prepare import format_report_summary, prepare

    cfg = _load_cfg(args)
    print(format_report_summary(prepare(cfg.for_data())))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ..train.recipe import run

    cfg = _load_cfg(args)
    for note in cfg.notes:
        print(f"note: {note}")
    result = run(cfg, preflight=train_preflight(cfg))
    if cfg.do_train:
        print(f"trained {result.global_step} step(s); model saved to {result.output_dir}")
    else:
        m = result.predict_metrics
        print(f"predicted {m['predict_samples']} sample(s) (do_train: false, nothing trained); predictions in "
              f"{result.output_dir}")
    return 0


def train_preflight(cfg):
    """What `train` runs once the processor is loaded: the doctor's checks, unless run_doctor: false."""
    if not cfg.run_doctor:
        return None
    from .doctor import check_or_raise

    return check_or_raise


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import Check, failures, format_checks, run_checks, to_json

    try:
        cfg = _load_cfg(args)
        checks = run_checks(cfg, progress=False)
    except VlmtuneError as e:
        if not args.json:
            raise
        # --json promises JSON on stdout: a config that does not load gives one failed check per problem
        print(to_json(_error_checks(e, Check)))
        return 2
    if not args.json:  # the same notes `train` prints: keys accepted without effect, advice
        for note in cfg.notes:
            print(f"note: {note}")
    print(to_json(checks) if args.json else format_checks(checks))
    return 1 if failures(checks) else 0


def _error_checks(e: VlmtuneError, check: type) -> list:
    """A failed check per configuration problem ("what; fix" split at its last "; "), or one for another error."""
    if not isinstance(e, ConfigError):
        return [check("doctor", "fail", str(e), "")]
    out = []
    for p in map(bounded, e.problems):
        what, sep, fix = p.rpartition("; ")
        out.append(check("config", "fail", what if sep else p, fix if sep else "fix the configuration"))
    return out


class _IntermixedParser(argparse.ArgumentParser):
    """A subcommand parser that reads options and positionals in any order.

    `vlmtune doctor cfg.yaml --json cutoff_len=256` would otherwise stop the overrides at --json
    ("unrecognized arguments"); argparse's parse_intermixed_args cannot be called on a parser with
    subcommands, so each subcommand's parser applies it to its own arguments.
    """

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:  # parse_known_intermixed_args calls back into here on Python < 3.13
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _config_command(sub, name: str, help: str, func) -> argparse.ArgumentParser:
    c = sub.add_parser(name, help=help)
    c.add_argument("config", help="YAML config (LLaMA-Factory key names)")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    c.set_defaults(func=func)
    return c


def _cmd_chat(args: argparse.Namespace) -> int:
    from .chat import ChatModel, check_images, check_videos, interactive

    question = args.question
    if question is None and not sys.stdin.isatty():
        question = sys.stdin.read().strip()  # piped: the whole input is one question
        if not question:
            raise VlmtuneError("no question: pass it as an argument, pipe it on stdin, or run in a terminal to chat")
    check_images(args.image)  # before the (slow) model load
    check_videos(args.video)
    cm = ChatModel(
        args.model,
        args.adapter,
        image_max_pixels=args.image_max_pixels,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        trust_remote_code=args.trust_remote_code,
        quantization_bit={"4": 4, "8": 8, "none": None, None: "adapter"}[args.quantization_bit],
        video_fps=args.video_fps,
        video_maxlen=args.video_maxlen,
        video_min_pixels=args.video_min_pixels,
        video_max_pixels=args.video_max_pixels,
        enable_thinking=not args.no_thinking,
    )
    if question is None:
        interactive(cm, sys.stdin, sys.stdout, images=args.image, videos=args.video)
    else:
        print(cm.ask(question, args.image, videos=args.video))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import describe_export, export, merge_job

    if args.config is not None:  # LLaMA-Factory's merge YAML
        if args.model or args.adapter or args.out:
            raise VlmtuneError("give either a merge CONFIG.yaml or --model/--adapter/--out, not both")
        job, notes = merge_job(args.config)
        for note in notes:
            print(f"note: {note}")
        out = export(dtype=args.dtype, force=args.force, **job)
        print(describe_export(out, adapter=job["adapter"][-1] if job["adapter"] else None))
        return 0
    if not args.model or not args.out:
        raise VlmtuneError("vlmtune export needs a merge CONFIG.yaml, or --model and --out (and --adapter for LoRA)")
    if not args.adapter:
        print(f"note: no --adapter: {args.model} is exported as it is (a full fine-tune needs no merge)")
    out = export(
        args.model, args.adapter, args.out, dtype=args.dtype, force=args.force, trust_remote_code=args.trust_remote_code
    )
    print(describe_export(out, adapter=args.adapter))
    return 0


def _add_chat_export_parsers(sub) -> None:
    c = sub.add_parser("chat", help="ask a model (optionally with a LoRA adapter) about images and videos")
    c.add_argument("question", nargs="?", default=None, help="omit it in a terminal to chat interactively")
    c.add_argument("--model", required=True, help="hub id or local path of the Qwen-VL checkpoint")
    c.add_argument("--adapter", default=None, help="a LoRA adapter directory to apply")
    c.add_argument("--image", action="append", default=[], metavar="IMG", help="an image file (repeatable)")
    c.add_argument("--max-new-tokens", type=int, default=64)
    c.add_argument("--temperature", type=float, default=0.0, help="0 (the default) decodes greedily")
    c.add_argument("--image-max-pixels", type=int, default=None)
    c.add_argument("--video", action="append", default=[], metavar="CLIP", help="a video clip (repeatable)")
    c.add_argument("--video-fps", type=float, default=None, help="frames sampled per second (config key video_fps)")
    c.add_argument("--video-maxlen", type=int, default=None, help="at most this many frames per clip (video_maxlen)")
    c.add_argument("--video-min-pixels", type=int, default=None, help="per frame (video_min_pixels)")
    c.add_argument("--video-max-pixels", type=int, default=None, help="per frame (video_max_pixels)")
    c.add_argument("--trust-remote-code", action="store_true", help="only for checkpoints you trust")
    c.add_argument("--no-thinking", action="store_true",
                   help="a thinking checkpoint (Qwen3.5) answers without thinking (the template's enable_thinking=false)")
    c.add_argument("--quantization-bit", choices=["4", "8", "none"], default=None,
                   help="load the base in 4/8 bits (bitsandbytes); default: as the adapter was trained")
    c.set_defaults(func=_cmd_chat)

    e = sub.add_parser("export", help="merge a LoRA adapter into its base model and save a standalone checkpoint")
    e.add_argument("config", nargs="?", default=None,
                   help="a LLaMA-Factory merge YAML (model_name_or_path, adapter_name_or_path, export_dir, ...)")
    e.add_argument("--model", default=None, help="hub id or local path of the base checkpoint")
    e.add_argument("--adapter", default=None, help="the LoRA adapter directory (none for a full fine-tune)")
    e.add_argument("--out", default=None, help="output directory: new, empty, or (with --force) an earlier export")
    e.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="dtype of the merged weights (default auto: the base checkpoint's)")
    e.add_argument("--force", action="store_true",
                   help="replace an earlier export at --out (never a folder vlmtune did not create)")
    e.add_argument("--trust-remote-code", action="store_true", help="only for checkpoints you trust")
    e.set_defaults(func=_cmd_export)


def build_parser() -> argparse.ArgumentParser:
    from .demo.video_data import VIDEO_FULL, VIDEO_QUICK  # stdlib only at import: cheap

    p = argparse.ArgumentParser(prog="vlmtune", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_IntermixedParser)

    t = sub.add_parser("tiny-model", help="write a tiny random Qwen-VL checkpoint with a real processor")
    t.add_argument("out", help="output directory")
    t.add_argument("--arch", choices=MODEL_TYPES, default="qwen2_vl")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--vocab", choices=["trained", "qwen2"], default="trained",
                   help="trained: a small BPE trained in-process; qwen2: the real 151,643-token Qwen2 vocabulary "
                   "(needs pip install 'vlmtune[qwen-vocab]')")
    t.set_defaults(func=_cmd_tiny_model)

    m = sub.add_parser("demo", help="fine-tune a tiny Qwen2-VL on rendered shapes (or, with --video, "
                       "clips of a moving shape) on the CPU; accuracy before/after")
    m.add_argument("--out", default=None,
                   help="output folder (default: ./vlmtune-demo, with --video ./vlmtune-demo-video)")
    m.add_argument("--video", action="store_true",
                   help="the video task instead: MP4 clips of a shape moving left, right, up or down")
    m.add_argument("--dpo", action="store_true",
                   help="preference training instead (stage: dpo): right vs wrong answers about the shapes, held-out "
                   "preference accuracy before/after (output ./vlmtune-demo-dpo)")
    m.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default: 2400, 300 with --quick; with --video: %d, %d with --quick)"
                   % (VIDEO_FULL.steps, VIDEO_QUICK.steps))
    m.add_argument("--quick", action="store_true",
                   help="a short run (well under a minute) on less data: learns colour, not yet shape "
                   "(with --video: a smoke run, too short to learn motion)")
    m.add_argument("--arch", choices=MODEL_TYPES, default="qwen2_vl",
                   help="the tiny model's family; the demo's settings are tuned for qwen2_vl")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=_cmd_demo)

    i = sub.add_parser("inspect", help="exact token counts of a dataset and the cutoff_len it needs")
    i.add_argument("--model", required=True, help="hub id or local path of the Qwen-VL checkpoint")
    i.add_argument("--data", required=True, help="a data file, a folder, or dataset names from dataset_info.json")
    i.add_argument("--dataset-dir", default=None, help="folder holding dataset_info.json (LLaMA-Factory layout)")
    i.add_argument("--media-dir", default=None, help="folder image paths are relative to")
    i.add_argument("--cutoff-len", type=int, default=None, help="report how many samples exceed this length")
    i.add_argument("--stage", choices=("sft", "dpo", "kto"), default=None,
                   help="read the data as this stage's prepare does (the config key `stage`; default sft): dpo "
                        "counts each pair (ranking / TRL preference data) by its longer side, kto each tagged answer")
    i.add_argument("--image-max-pixels", type=int, default=None)
    i.add_argument("--image-min-pixels", type=int, default=None)
    i.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    i.add_argument("--plot", default=None, metavar="FILE", help="write a histogram of sample lengths (PNG)")
    i.add_argument("--per-sample", default=None, metavar="FILE", help="write one JSON line per sample")
    i.add_argument("--show", default=None, metavar="ID",
                   help="print one sample as the model sees it: trained spans, masked spans, image runs")
    i.add_argument("--overflow", default=None, metavar="P1,P2",
                   help="policies for --show with --cutoff-len (default: shrink_images,truncate_text,split,drop)")
    i.add_argument("--allow-paths-outside-media-dir", action="store_true")
    i.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) images once into a cache under the datasets cache")
    i.add_argument("--trust-remote-code", action="store_true", help="only for checkpoints you trust")
    i.add_argument("--preprocessing-num-workers", type=int, default=1, metavar="N",
                   help="worker processes reading, validating and encoding chunks (as in prepare)")
    i.set_defaults(func=_cmd_inspect)

    _config_command(sub, "prepare", "validate and fit the data to cutoff_len; write the prepared dataset", _cmd_prepare)
    _config_command(sub, "train", "fine-tune (LoRA, full or freeze) on the prepared data", _cmd_train)
    d = _config_command(sub, "doctor", "check the config against this machine, the model and the data", _cmd_doctor)
    d.add_argument("--json", action="store_true", help="print the checks as a JSON list")
    _add_chat_export_parsers(sub)
    return p


class DeepSpeedDetection(logging.Filter):
    """DeepSpeed, once installed, is imported by transformers at every model load and logs on stdout which
    accelerator it detected ("Setting accelerator to CPU. If you have GPU ..."): a stray line in every command's
    output, `--json` included. The doctor reports the device; DeepSpeed's other messages pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Setting accelerator to", "Setting ds_accelerator to"))


DEEPSPEED_DETECTION = DeepSpeedDetection()


def main(argv: list[str] | None = None) -> int:
    from ..models.quant import quiet_bitsandbytes

    # A command prints what it was asked for, not an optional library's import notices.
    quiet_bitsandbytes()
    logging.getLogger("DeepSpeed").addFilter(DEEPSPEED_DETECTION)  # deepspeed's own logger keeps its filters
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VlmtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
