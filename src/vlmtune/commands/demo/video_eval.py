"""The video demo's evaluation: the model picks the direction it finds most likely (log-likelihood).

Each clip is read as training reads it: `read_facts`, the frames vlmtune samples (`VideoSpec.plan`, the
loaded processor's rule), exactly those frames decoded by `decode_frames`, then the processor with
`do_sample_frames=False`. The grid the processor returns is checked against the planned one, so the model
is scored on the same tokens it was trained on.
"""

from __future__ import annotations

import os

from .evaluation import answer_scores
from .video_data import DIRECTIONS


def clip_inputs(path: str, spec):
    """(frames, metadata, grid) of one clip, sampled and decoded as vlmtune does."""
    from transformers.video_utils import VideoMetadata

    from ...data.video import decode_frames, read_facts

    facts = read_facts(path)
    grid = spec.plan(facts.frames, facts.fps, facts.height, facts.width)
    frames = decode_frames(path, grid.indices, facts.rotation)
    md = VideoMetadata(total_num_frames=facts.frames, fps=facts.fps, frames_indices=list(grid.indices))
    return frames, md, grid


def evaluate_video(model, processor, questions: list[dict], data_dir: str, spec, *, batch_size: int = 32) -> dict:
    """Accuracy of log-likelihood scoring among the four directions over the held-out clips.

    `spec` is the run's VideoSpec (the processor's, with the config's video settings applied). Each
    (question, direction) pair is one sequence: the chat-templated prompt with the clip, then the direction
    and `<|im_end|>`, as a trained answer is laid out.
    """
    import torch

    clips = {}
    for q in questions:
        if q["video"] not in clips:
            clips[q["video"]] = clip_inputs(os.path.join(data_dir, q["video"]), spec)
    pairs = [(i, d) for i in range(len(questions)) for d in DIRECTIONS]
    scores: dict[tuple[int, str], float] = {}
    size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    end = processor.tokenizer.eos_token
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            texts = [_prompt(processor, questions[i]["question"]) + d + end for i, d in chunk]
            inputs = [clips[questions[i]["video"]] for i, _ in chunk]
            full = processor(text=texts, videos=[f for f, _, _ in inputs], video_metadata=[m for _, m, _ in inputs],
                             do_sample_frames=False, size=size, input_data_format="channels_last",
                             padding=True, padding_side="right", return_tensors="pt")
            planned = [g.thw for _, _, g in inputs]
            got = full["video_grid_thw"].tolist()
            if got != planned:
                raise RuntimeError(f"the processor's video grids {got} differ from vlmtune's plan {planned}")
            for (i, d), score in zip(chunk, answer_scores(model, processor, full, [d for _, d in chunk])):
                scores[(i, d)] = score
    model.train(was_training)
    picks = [max(DIRECTIONS, key=lambda d: scores[(i, d)]) for i in range(len(questions))]
    right = {d: 0 for d in DIRECTIONS}
    total = {d: 0 for d in DIRECTIONS}
    for q, pick in zip(questions, picks):
        total[q["answer"]] += 1
        right[q["answer"]] += int(pick == q["answer"])
    n = len(questions)
    return {
        "accuracy": sum(right.values()) / n if n else 0.0,
        # per true direction: a model that always answers "left" shows 100% / 0% / 0% / 0% here
        "by_direction": {d: right[d] / total[d] for d in DIRECTIONS if total[d]},
        "picked": {d: picks.count(d) for d in DIRECTIONS},
        "questions": n,
    }


def _prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def video_chance() -> float:
    return 1 / len(DIRECTIONS)
