"""The demo's evaluation: the model picks the candidate answer it finds most likely (log-likelihood)."""

from __future__ import annotations

import os

from .data import COLOURS, SHAPES


def candidates_for(kind: str) -> tuple[str, ...]:
    return tuple(COLOURS) if kind == "colour" else SHAPES


def evaluate(model, processor, questions: list[dict], data_dir: str, *, min_pixels: int, max_pixels: int,
             batch_size: int = 32) -> dict:
    """Accuracy of log-likelihood scoring over the held-out questions, overall and per kind.

    Each (question, candidate) pair is one sequence: the chat-templated prompt, then the candidate
    and `<|im_end|>`, exactly as a trained answer is laid out. Its score is the sum of the log
    probabilities of those answer tokens; the argmax over the candidates is the model's answer.
    """
    import torch
    from PIL import Image

    pairs = [(i, c) for i, q in enumerate(questions) for c in candidates_for(q["kind"])]
    scores: dict[tuple[int, str], float] = {}
    was_training = model.training
    model.eval()
    images = {}
    for q in questions:
        if q["image"] not in images:
            with Image.open(os.path.join(data_dir, q["image"])) as im:
                images[q["image"]] = im.convert("RGB")
    end = processor.tokenizer.eos_token  # <|im_end|>: a trained answer ends with it
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            prompts = [_prompt(processor, questions[i]["question"]) for i, _ in chunk]
            texts = [p + c + end for p, (_, c) in zip(prompts, chunk)]
            imgs = [images[questions[i]["image"]] for i, _ in chunk]
            size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
            full = processor(text=texts, images=imgs, size=size, padding=True, padding_side="right",
                             return_tensors="pt")
            for (i, c), score in zip(chunk, answer_scores(model, processor, full, [c for _, c in chunk])):
                scores[(i, c)] = score
    model.train(was_training)
    right = {"colour": 0, "shape": 0}
    total = {"colour": 0, "shape": 0}
    for i, q in enumerate(questions):
        cands = candidates_for(q["kind"])
        pick = max(cands, key=lambda c: scores[(i, c)])
        total[q["kind"]] += 1
        right[q["kind"]] += int(pick == q["answer"])
    n = sum(total.values())
    return {
        "accuracy": sum(right.values()) / n if n else 0.0,
        "by_kind": {k: right[k] / total[k] for k in total if total[k]},
        "questions": n,
    }


def answer_scores(model, processor, full, answers: list[str]) -> list[float]:
    """Sum of the log probabilities of each row's answer and `<|im_end|>`, the last tokens of the row.

    `full` is the processor's right-padded batch of prompt + answer + `<|im_end|>` texts. The answer follows
    the newline that ends the prompt, a pre-tokenizer boundary, so it tokenizes the same alone as in context.
    """
    import torch

    end = processor.tokenizer.eos_token
    answer_lens = [len(processor.tokenizer(a + end, add_special_tokens=False)["input_ids"]) for a in answers]
    lens = full["attention_mask"].sum(dim=1)
    logits = model(**full).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = full["input_ids"][:, 1:]
    tok_lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    out = []
    for k in range(len(answers)):
        # answer tokens sit at positions prompt_len .. len-1, predicted from the position before
        b = int(lens[k])
        a = b - answer_lens[k]
        out.append(float(tok_lp[k, a - 1 : b - 1].sum()))
    return out


def _prompt(processor, question: str) -> str:
    """The generation prompt the answer follows. A thinking template (Qwen3.5) is asked with thinking off: its prompt
    then ends with the empty thinking block that precedes each trained answer (the demo's data has no reasoning,
    docs/thinking.md); other templates ignore enable_thinking."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, enable_thinking=False)


def chance(questions: list[dict]) -> float:
    """Expected accuracy of guessing uniformly among each question's candidates."""
    return sum(1 / len(candidates_for(q["kind"])) for q in questions) / len(questions)


def score_answers(model, processor, questions: list[dict], candidates: list[tuple[str, ...]], data_dir: str, *,
                  min_pixels: int, max_pixels: int, batch_size: int = 32) -> list[list[float]]:
    """For each question ({"image", "question"}), the score (`answer_scores`) of each of its candidate answers."""
    import torch
    from PIL import Image

    images = {}
    for q in questions:
        if q["image"] not in images:
            with Image.open(os.path.join(data_dir, q["image"])) as im:
                images[q["image"]] = im.convert("RGB")
    flat = [(i, c) for i, cands in enumerate(candidates) for c in cands]
    end = processor.tokenizer.eos_token
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    got: list[float] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(flat), batch_size):
            chunk = flat[start : start + batch_size]
            texts = [_prompt(processor, questions[i]["question"]) + c + end for i, c in chunk]
            full = processor(text=texts, images=[images[questions[i]["image"]] for i, _ in chunk], size=size,
                             padding=True, padding_side="right", return_tensors="pt")
            got += answer_scores(model, processor, full, [c for _, c in chunk])
    model.train(was_training)
    it = iter(got)
    return [[next(it) for _ in cands] for cands in candidates]
