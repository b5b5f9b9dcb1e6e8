"""The video demo's evaluation: the model picks the direction it finds most likely (log-likelihood).

Each clip is read as training reads it: `read_facts`, the run's VideoSpec for that clip (`for_clip`) and its
plan (the loaded processor's sampling rule), then `data.video.clip_inputs`, the one place a planned clip
becomes processor inputs for the collator and `vlmtune chat` too: exactly the planned frames decoded, and
the processor told not to sample or resize differently. The grid the processor returns is checked against
the plan, so the model is scored on the same tokens it was trained on.
"""

from __future__ import annotations

import os

from .evaluation import answer_scores
from .video_data import DIRECTIONS


def plan_clip(path: str, spec):
    """(VideoGrid, ClipInputs) of one clip, sampled, sized and decoded as the collator does."""
    from ...data.media import video

    planned = video.plan_clip(path, spec)
    return planned.grid, video.planned_inputs(path, planned)


def evaluate_video(model, processor, questions: list[dict], data_dir: str, spec, *, batch_size: int = 32) -> dict:
    """Accuracy of log-likelihood scoring among the four directions over the held-out clips.

    `spec` is the run's VideoSpec (`models.load.load_spec(cfg.model, cfg.fit).video`: the processor's, with the config's
    video keys applied), the one the data path plans the training clips with. Each
    (question, direction) pair is one sequence: the chat-templated prompt with the clip, then the direction
    and `<|im_end|>`, as a trained answer is laid out.
    """
    import torch

    clips = {}
    for q in questions:
        if q["video"] not in clips:
            clips[q["video"]] = plan_clip(os.path.join(data_dir, q["video"]), spec)
    pairs = [(i, d) for i in range(len(questions)) for d in DIRECTIONS]
    scores: dict[tuple[int, str], float] = {}
    end = processor.tokenizer.eos_token
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            texts = [_prompt(processor, questions[i]["question"]) + d + end for i, d in chunk]
            planned = [clips[questions[i]["video"]] for i, _ in chunk]
            kwargs = planned[0][1].kwargs
            if any(c.kwargs != kwargs for _, c in planned):  # one processor call takes one size for all clips
                raise ValueError("the held-out clips need different processor settings; evaluate them apart")
            full = processor(text=texts, videos=[c.frames for _, c in planned],
                             video_metadata=[c.metadata for _, c in planned], **kwargs,
                             padding=True, padding_side="right", return_tensors="pt")
            want = [g.thw for g, _ in planned]
            got = full["video_grid_thw"].tolist()
            if got != want:
                raise RuntimeError(f"the processor's video grids {got} differ from vlmtune's plan {want}")
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
