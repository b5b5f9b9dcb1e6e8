"""`vlmtune demo --video`: the synthetic motion clips (deterministic, decodable MP4s, balanced labels, the
direction in the motion and not in the first frame), their evaluation through the real processor, and the
demo end to end (quick in the default suite, the full learning run slow)."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest

from vlmtune.commands.cli import main
from vlmtune.commands.demo import DIRECTIONS, VIDEO_DATASET_NAME, VIDEO_QUICK, run_video_demo, write_video_dataset
from vlmtune.commands.demo.video_data import FPS, FRAMES, SPEED_RANGE, Clip, draw_scene, render_clip, video_codec
from vlmtune.data.media.video import decode_frames, read_facts


@pytest.fixture(scope="module")
def quick_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("video-demo")
    return d, write_video_dataset(d / "data", VIDEO_QUICK, seed=5)


def _clip(c: dict) -> Clip:
    return Clip(**{**c, "background": tuple(c["background"]), "fill": tuple(c["fill"])})


def _centroid(frame: np.ndarray, background) -> tuple[float, float, int] | None:
    """(x, y, area) of the pixels that differ clearly from the background; None when the shape is out of view."""
    mask = np.abs(frame.astype(int) - np.array(background)).sum(axis=-1) > 90
    if mask.sum() < 4:
        return None
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean()), int(mask.sum())


def test_dataset_is_sharegpt_seeded_balanced_and_held_out(tmp_path, quick_data):
    d, a = quick_data
    b = write_video_dataset(tmp_path / "b", VIDEO_QUICK, seed=5)
    for name in ("dataset_info.json", f"{VIDEO_DATASET_NAME}.json", "eval.json"):
        assert (d / "data" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    clips = sorted((d / "data" / "videos").iterdir())
    assert len(clips) == VIDEO_QUICK.train_clips + VIDEO_QUICK.eval_clips
    for mp4 in clips:  # the encoder is deterministic too (one thread, fixed quality)
        assert mp4.read_bytes() == (tmp_path / "b" / "videos" / mp4.name).read_bytes()
    assert a["clips"] == b["clips"] and a["codec"] == b["codec"] == video_codec()
    assert write_video_dataset(tmp_path / "c", VIDEO_QUICK, seed=6)["clips"] != a["clips"]

    info = json.loads((d / "data" / "dataset_info.json").read_text())[VIDEO_DATASET_NAME]
    assert info["formatting"] == "sharegpt"
    assert info["columns"] == {"messages": "messages", "videos": "videos"}
    records = json.loads((d / "data" / f"{VIDEO_DATASET_NAME}.json").read_text())
    assert len(records) == a["records"] == VIDEO_QUICK.train_clips
    for r in records:
        assert set(r) == {"messages", "videos"} and len(r["videos"]) == 1
        user, answer = r["messages"]
        assert user["role"] == "user" and user["content"].startswith("<video>")
        assert user["content"].count("<video>") == 1
        assert answer["role"] == "assistant" and answer["content"] in DIRECTIONS
        assert (d / "data" / r["videos"][0]).is_file()
    # balanced labels, in training and held out
    answers = [r["messages"][1]["content"] for r in records]
    assert {k: answers.count(k) for k in DIRECTIONS} == {k: VIDEO_QUICK.train_clips // 4 for k in DIRECTIONS}
    held = [q["answer"] for q in a["eval_questions"]]
    assert {k: held.count(k) for k in DIRECTIONS} == {k: VIDEO_QUICK.eval_clips // 4 for k in DIRECTIONS}
    # the held-out clips are never trained on, and each record's answer is its clip's direction
    trained = {r["videos"][0] for r in records}
    assert not trained & {q["video"] for q in a["eval_questions"]}
    truth = {c["path"]: c["direction"] for c in a["clips"]["train"]}
    assert all(truth[r["videos"][0]] == r["messages"][1]["content"] for r in records)


def test_clips_are_decodable_mp4s_of_the_asked_size(quick_data):
    d, a = quick_data
    codec = {"libx264": "h264", "mpeg4": "mpeg4"}[a["codec"]]
    for c in a["clips"]["eval"] + a["clips"]["train"][:8]:
        path = str(d / "data" / c["path"])
        facts = read_facts(path)
        assert (facts.frames, facts.fps, facts.width, facts.height) == (FRAMES, FPS, c["side"], c["side"])
        assert (facts.rotation, facts.codec) == (0, codec)
        assert facts.duration == pytest.approx(FRAMES / FPS)
        frames = decode_frames(path, range(FRAMES), facts.rotation)
        rendered = render_clip(_clip(c))
        assert frames.shape == rendered.shape == (FRAMES, c["side"], c["side"], 3)
        # lossy (yuv420p halves the chroma), but close to what was drawn
        assert np.abs(frames.astype(int) - rendered).mean() < 6


def test_the_direction_is_in_the_motion(quick_data):
    """The decoded shape's centroid moves the stated way between the first two frames (where the shape is
    always in view) and over every pair of frames where it is in view."""
    d, a = quick_data
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    for c in a["clips"]["eval"] + a["clips"]["train"]:
        frames = decode_frames(str(d / "data" / c["path"]), range(FRAMES))
        seen = [_centroid(f, c["background"]) for f in frames]
        assert seen[0] is not None and seen[1] is not None, c["path"]
        sx, sy = step[c["direction"]]
        pairs = [(a_, b) for a_, b in zip(seen, seen[1:]) if a_ is not None and b is not None]
        moves = [(b[0] - a_[0], b[1] - a_[1]) for a_, b in pairs]
        assert moves and all(dx * sx + dy * sy > 0.4 for dx, dy in moves), (c["path"], c["direction"], moves)
        # and, while the whole shape is in view (a triangle leaving the frame sideways shifts its visible
        # part's centroid across), along the direction only
        whole = [(b[0] - a_[0], b[1] - a_[1]) for a_, b in pairs if abs(a_[2] - b[2]) < 0.1 * a_[2]]
        assert all(abs(dx * sy) + abs(dy * sx) < 0.25 * (dx * sx + dy * sy) + 0.5 for dx, dy in whole), whole


def test_first_frame_carries_no_direction():
    """By construction: a scene drawn from the same random state is the same scene for every direction
    (nothing about it is drawn after or from the direction), so its first frame is identical. And over
    many scenes the first frames' centroids are where the last frames' are not: the same for all four."""
    firsts, lasts = {k: [] for k in DIRECTIONS}, {k: [] for k in DIRECTIONS}
    for seed in range(30):
        scenes = [draw_scene(random.Random(seed), k, "circle", "red", 56) for k in DIRECTIONS]
        assert all(replace(s, direction="left") == replace(scenes[0], direction="left") for s in scenes)
        first = [render_clip(s, 1)[0] for s in scenes]
        assert all(np.array_equal(f, first[0]) for f in first)
    rng = random.Random(0)
    for k in range(800):
        s = draw_scene(rng, DIRECTIONS[k % 4], "square", "blue", 56)
        frames = render_clip(s)
        firsts[s.direction].append(_centroid(frames[0], s.background)[:2])
        lasts[s.direction].append(s.position(FRAMES - 1))
    means = {k: np.mean(v, axis=0) for k, v in firsts.items()}
    spread = max(np.abs(means[k] - means[j]).max() for k in DIRECTIONS for j in DIRECTIONS)
    assert spread < 3.0, means  # pixels, of a 56-pixel frame; sampling error ~1
    ends = {k: np.mean(v, axis=0) for k, v in lasts.items()}
    travel = (FRAMES - 1) * SPEED_RANGE[0] * 56
    assert ends["right"][0] - ends["left"][0] > travel and ends["down"][1] - ends["up"][1] > travel


def test_evaluation_scores_the_sampled_frames_through_the_processor(tmp_path, quick_data):
    """The evaluation reads clips as training will (plan -> decode exactly those frames -> processor),
    checks the processor's grid against the plan, and scores all four answers."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmtune.commands.demo import evaluate_video
    from vlmtune.commands.demo.video_eval import plan_clip
    from vlmtune.models.tiny import build_tiny_checkpoint
    from vlmtune.models.video_grid import VideoSpec

    d, a = quick_data
    model_dir = build_tiny_checkpoint(tmp_path / "model", arch="qwen2_vl", seed=0)
    processor = AutoProcessor.from_pretrained(model_dir)
    spec = VideoSpec.from_processor(processor)
    grid, clip = plan_clip(str(d / "data" / a["eval_questions"][0]["video"]), spec)
    # 8 frames at 4 fps, sampled at the processor's 2 fps: every other frame, two temporal patches of 4x4 tokens
    assert grid.indices == (0, 2, 4, 6) and grid.thw == [2, 8, 8] and grid.tokens == 32
    assert clip.frames.shape == (4, 112, 112, 3) and clip.indices == [0, 2, 4, 6]
    assert clip.kwargs["do_sample_frames"] is False
    questions = a["eval_questions"][:8]
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    result = evaluate_video(model, processor, questions, str(d / "data"), spec, batch_size=12)
    assert result["questions"] == 8 and 0.0 <= result["accuracy"] <= 1.0
    assert sum(result["picked"].values()) == 8
    assert set(result["by_direction"]) == {q["answer"] for q in questions}


def test_cli_demo_video_flag_parses():
    from vlmtune.commands.cli import build_parser

    args = build_parser().parse_args(["demo", "--video", "--quick"])
    assert args.video and args.quick and args.out is None
    assert not build_parser().parse_args(["demo"]).video


def test_summary_reads_for_a_person():
    from vlmtune.commands.demo import format_video_summary

    summary = {
        "arch": "qwen2_vl", "steps": 6, "quick": True, "eval_questions": 16, "chance": 0.25,
        "accuracy_before": 0.25, "accuracy_after": 0.5,
        "accuracy_by_direction_before": {"left": 1.0, "right": 0.0}, "accuracy_by_direction_after": {"left": 0.5},
        "clip": {"frames": 8, "fps": 4, "width": 112, "height": 112, "codec": "libx264",
                 "sampled_frames": [0, 2, 4, 6], "grid_thw": [2, 8, 8], "video_tokens": 32},
        "fit_report": {"kept": 96}, "fit_report_path": "out/train/fit_report.jsonl", "records": 96, "rows": 96,
        "loss_plot": "out/train/training_loss.png", "first_loss": 7.2, "final_loss": 0.4, "data": "out/data/x.json",
        "output_dir": "out/train", "seconds": 12.0, "train_seconds": 5.0, "summary_path": "out/demo_summary.json",
        "config": {"finetuning_type": "full", "cutoff_len": 128},
    }
    text = format_video_summary(summary)
    assert "before   25.0%" in text and "after    50.0%" in text and "chance 25.0%" in text
    assert "sampled frames [0, 2, 4, 6] -> grid [2, 8, 8], 32 video tokens" in text
    assert "kept 96" in text and "loss 7.20 -> 0.40" in text and "--quick" in text


def test_quick_video_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--video", "--out", str(out), "--quick", "--steps", "6"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo_summary.json").read_text(encoding="utf-8"))
    assert summary["task"] == "video" and summary["steps"] == 6
    assert summary["chance"] == 0.25 and summary["eval_questions"] == VIDEO_QUICK.eval_clips
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and 0.0 <= summary["accuracy_after"] <= 1.0
    assert summary["clip"]["sampled_frames"] == [0, 2, 4, 6] and summary["clip"]["grid_thw"] == [2, 8, 8]
    # every record fits whole: one clip of 32 tokens and a question
    assert summary["fit_report"] == {"kept": VIDEO_QUICK.train_clips}
    assert summary["records"] == summary["rows"] == VIDEO_QUICK.train_clips
    assert (out / "train" / "training_loss.png").is_file()
    assert "held-out accuracy" in printed and summary["loss_plot"] in printed


@pytest.mark.slow
def test_full_video_demo_learns_motion(tmp_path):
    summary = run_video_demo(tmp_path / "demo", progress=False)
    assert summary["accuracy_before"] <= 0.45
    assert summary["accuracy_after"] >= 0.6, summary  # chance is 0.25
