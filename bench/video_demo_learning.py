"""Does the tiny Qwen2-VL learn the video demo's task? A plain training loop on the processor's batches.

Written while vlmtune's data path still refused videos, to choose the video demo's clip size, shape size and
steps (the notes in src/vlmtune/commands/demo/video_data.py): the clips are sampled and decoded as vlmtune
does (`video_eval.plan_clip`), handed to the processor as the collator will (`do_sample_frames=False`),
and only the answer, `<|im_end|>` and the newline after it are trained. Full fine-tuning, AdamW, linear
warm-up over 5% then cosine, gradient clipping at 1.0, as the demo's config. Held-out accuracy (the demo's
`evaluate_video`) is printed every --eval-every steps.

    PYTHONPATH=src python bench/video_demo_learning.py --out /tmp/vlearn --steps 1500 --seed 3

Once `vlmtune demo --video` trains through the recipe, compare its accuracy with this loop's.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--train-clips", type=int, default=1200)
    ap.add_argument("--eval-clips", type=int, default=80)
    ap.add_argument("--side", type=int, default=112, help="frame side in pixels")
    ap.add_argument("--seed", type=int, default=0, help="the data's seed (the model's is 0)")
    ap.add_argument("--eval-every", type=int, default=300)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmtune.commands.demo.video_data import VideoDemoSize, write_video_dataset
    from vlmtune.commands.demo.video_eval import _prompt, evaluate_video, plan_clip
    from vlmtune.models.tiny import build_tiny_checkpoint
    from vlmtune.models.video_grid import VideoSpec

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model_dir, data_dir = f"{args.out}/model", f"{args.out}/data"
    build_tiny_checkpoint(model_dir, arch="qwen2_vl", seed=0)
    size = VideoDemoSize(args.train_clips, args.eval_clips, args.steps, args.batch_size, 0)
    data = write_video_dataset(data_dir, size, args.seed, side=args.side)
    processor = AutoProcessor.from_pretrained(model_dir)
    spec = VideoSpec.from_processor(processor)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    questions = data["eval_questions"]
    print("before", evaluate_video(model, processor, questions, data_dir, spec), flush=True)

    records = json.load(open(f"{data_dir}/demo_motion.json", encoding="utf-8"))
    clips = {r["videos"][0]: plan_clip(f"{data_dir}/{r['videos'][0]}", spec)[1] for r in records}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warm = max(1, int(0.05 * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, args.steps - warm))))
    end = processor.tokenizer.eos_token
    rng, order = random.Random(0), []
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        if len(order) < args.batch_size:
            order += rng.sample(range(len(records)), len(records))
        batch = [records[order.pop()] for _ in range(args.batch_size)]
        answers = [r["messages"][1]["content"] + end + "\n" for r in batch]
        texts = [_prompt(processor, r["messages"][0]["content"].replace("<video>", "")) + a
                 for r, a in zip(batch, answers)]
        inputs = [clips[r["videos"][0]] for r in batch]
        full = processor(text=texts, videos=[c.frames for c in inputs], video_metadata=[c.metadata for c in inputs],
                         **inputs[0].kwargs, padding=True, padding_side="right", return_tensors="pt")
        labels = torch.full_like(full["input_ids"], -100)
        for k, a in enumerate(answers):
            n = len(processor.tokenizer(a, add_special_tokens=False)["input_ids"])
            b = int(full["attention_mask"][k].sum())
            labels[k, b - n : b] = full["input_ids"][k, b - n : b]
        loss = model(**full, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 50 == 0 or step == args.steps - 1:
            print(step, round(loss.item(), 3), f"{time.perf_counter() - start:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            print("eval", step + 1, evaluate_video(model, processor, questions, data_dir, spec), flush=True)


if __name__ == "__main__":
    main()
