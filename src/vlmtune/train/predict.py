"""`do_predict`: generate an answer for every prepared row of eval_dataset, as LLaMA-Factory's predict does, and
write `generated_predictions.jsonl` ({"prompt", "predict", "label"} per line) and `predict_results.json`
(predict_bleu-4, predict_rouge-1, predict_rouge-2, predict_rouge-l, ×100, and the timing).

A row's prompt is its tokens up to its last trained span (the answer), with its images and videos (collated as
for training, so the accounting is the same); the label is that span's text. A row whose last answer holds an
image is left out and counted (`predict_skipped`). Rows are generated per_device_eval_batch_size at a time, prompts of
similar length together and left-padded (the model continues every row from its last position); the answers are
the same token ids as one row at a time (tests/train/test_predict.py) and are written in input order.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter

import torch

from ..data.stages.encode import IGNORE_INDEX


def split_row(row: dict, media_ids: tuple[int, ...] = ()) -> tuple[dict, list[int]] | None:
    """(the row cut before its last trained span, that span's ids); None when it has no target, or when what
    is cut off holds an image or video pad (`media_ids`)."""
    labels = row["labels"]
    end = max((i for i, t in enumerate(labels) if t != IGNORE_INDEX), default=None)
    if end is None:
        return None
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    if any(t in media_ids for t in row["input_ids"][start:]):
        return None
    prompt = {**row, "input_ids": row["input_ids"][:start], "labels": [IGNORE_INDEX] * start}
    return prompt, row["input_ids"][start:end + 1]


def prompts_of(rows, media_ids: tuple[int, ...]) -> tuple[list[tuple[int, dict, list[int]]], int]:
    """(input position, prompt row, label ids) for every row that can be predicted, and how many cannot."""
    out, skipped = [], 0
    for k, row in enumerate(rows):
        cut = split_row(row, media_ids)
        if cut is None or not cut[0]["input_ids"]:
            skipped += 1
            continue
        out.append((k, *cut))
    return out, skipped


def batches_of(items: list, size: int) -> list[list]:
    """Batches of `size` prompts of similar length (longest first, so an out-of-memory shows at once): less
    compute goes to padding; the caller puts the answers back in input order."""
    ranked = sorted(items, key=lambda item: -len(item[1]["input_ids"]))
    return [ranked[i:i + size] for i in range(0, len(ranked), size)]


def left_pad(batch: dict, pad_id: int) -> dict:
    """The collator pads on the right (for training); a decoder-only model generates after the last position of
    every row, so the prompts are moved to the right end, pads before them."""
    mask = batch["attention_mask"]
    lengths = mask.sum(dim=1).tolist()
    width = mask.shape[1]
    out = dict(batch)
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("mm_token_type_ids", 0)):
        if key not in batch:
            continue
        old = batch[key]
        new = torch.full_like(old, fill)
        for i, n in enumerate(lengths):
            new[i, width - n:] = old[i, :n]
        out[key] = new
    return out


def answer_ids(generated: list[int], eos_ids: set[int]) -> list[int]:
    """The tokens a row generated, up to and with its first end token: what follows is the batch's padding
    (a row that ends early waits, padded, for the others)."""
    for i, t in enumerate(generated):
        if t in eos_ids:
            return generated[:i + 1]
    return generated


def generation_kwargs(cfg) -> dict:
    gen = {"max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample, "num_beams": cfg.num_beams,
           "repetition_penalty": cfg.repetition_penalty, "length_penalty": cfg.length_penalty,
           "use_cache": True}  # training turned the model's cache off
    if cfg.do_sample:
        gen.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    return gen


def _eos_ids(model) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def generate_batch(model, collator, prompts: list[dict], gen: dict) -> list[list[int]]:
    """Each prompt's generated ids (up to its end token), from one left-padded batch holding exactly their images
    and videos."""
    pad = collator.spec.pad_token_id
    batch = left_pad(collator(prompts), pad)
    batch.pop("labels", None)
    device = next(model.parameters()).device
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    out = model.generate(**batch, **gen, pad_token_id=pad)
    width, eos = batch["input_ids"].shape[1], _eos_ids(model)
    return [answer_ids(out[i, width:].tolist(), eos) for i in range(len(prompts))]


@torch.inference_mode()
def predict(model, collator, tokenizer, rows, cfg, output_dir: str, log=print) -> dict:
    """Generate for every row, per_device_eval_batch_size rows at a time; write the two files (the predictions in
    input order); the metrics."""
    model.eval()
    gen = generation_kwargs(cfg)
    start = time.perf_counter()
    spec = collator.spec
    items, skipped = prompts_of(rows, (spec.image_token_id, spec.video_token_id))
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=cfg.skip_special_tokens)  # noqa: E731
    found: dict[int, dict] = {}
    for chunk in batches_of(items, cfg.per_device_eval_batch_size):
        for (k, prompt, label), new in zip(chunk, generate_batch(model, collator, [c[1] for c in chunk], gen)):
            found[k] = {"prompt": tokenizer.decode(prompt["input_ids"], skip_special_tokens=False),
                        "predict": decode(new), "label": decode(label)}
    lines = [found[k] for k in sorted(found)]
    seconds = time.perf_counter() - start
    metrics = {**scores(lines), "predict_runtime": round(seconds, 4),
               "predict_samples_per_second": round(len(lines) / seconds, 3) if seconds else 0.0,
               "predict_samples": len(lines), "predict_skipped": skipped}
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "generated_predictions.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in lines)
    with open(os.path.join(output_dir, "predict_results.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    log(f"predictions: {len(lines)} written to {os.path.join(output_dir, 'generated_predictions.jsonl')}"
        + (f" ({skipped} row(s) without a text answer left out)" if skipped else "")
        + "; " + ", ".join(f"{k}={v}" for k, v in metrics.items() if k.startswith("predict_") and "-" in k))
    return metrics


# The metrics LLaMA-Factory reports, written here (about 30 lines) instead of depending on nltk, jieba and
# rouge_chinese for four numbers. Tokens: words, with each CJK character a token of its own (jieba's role).
def tokens(text: str) -> list[str]:
    out: list[str] = []
    for word in text.split():
        buf = ""
        for ch in word:
            if "\u4e00" <= ch <= "\u9fff" or "\u3040" <= ch <= "\u30ff" or "\uac00" <= ch <= "\ud7af":
                out += [buf, ch] if buf else [ch]
                buf = ""
            else:
                buf += ch
        if buf:
            out.append(buf)
    return out


def _ngrams(toks: list[str], n: int) -> Counter:
    return Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))


def bleu4(hyp: list[str], ref: list[str]) -> float:
    """Sentence BLEU-4 with NIST geometric smoothing (nltk's SmoothingFunction().method3), in [0, 1]."""
    if not hyp or not ref:
        return 0.0
    logs, k = [], 1
    for n in range(1, 5):
        h, r = _ngrams(hyp, n), _ngrams(ref, n)
        total = max(1, sum(h.values()))
        match = sum(min(c, r[g]) for g, c in h.items())
        if match == 0:
            k *= 2
            logs.append(math.log(1 / (k * total)))
        else:
            logs.append(math.log(match / total))
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(sum(logs) / 4)


def _f1(overlap: int, n_hyp: int, n_ref: int) -> float:
    return 0.0 if not overlap else 2 * overlap / (n_hyp + n_ref)


def rouge_n(hyp: list[str], ref: list[str], n: int) -> float:
    h, r = _ngrams(hyp, n), _ngrams(ref, n)
    return _f1(sum((h & r).values()), sum(h.values()), sum(r.values()))


def rouge_l(hyp: list[str], ref: list[str]) -> float:
    prev = [0] * (len(ref) + 1)
    for a in hyp:
        cur = [0]
        for j, b in enumerate(ref):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    return _f1(prev[-1], len(hyp), len(ref))


def scores(lines: list[dict]) -> dict:
    """The mean of each metric over the predictions, ×100 and rounded as LLaMA-Factory reports them."""
    if not lines:
        return {"predict_bleu-4": 0.0, "predict_rouge-1": 0.0, "predict_rouge-2": 0.0, "predict_rouge-l": 0.0}
    pairs = [(tokens(x["predict"]), tokens(x["label"])) for x in lines]
    mean = lambda f: round(100 * sum(f(h, r) for h, r in pairs) / len(pairs), 4)  # noqa: E731
    return {"predict_bleu-4": mean(bleu4), "predict_rouge-1": mean(lambda h, r: rouge_n(h, r, 1)),
            "predict_rouge-2": mean(lambda h, r: rouge_n(h, r, 2)), "predict_rouge-l": mean(rouge_l)}
