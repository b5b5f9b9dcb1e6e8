"""`vlmtune train`: setup → train → cleanup, on the transformers Trainer.

Reads top to bottom: load the processor and its ModelSpec, prepare (validate + fit) the data,
load the model and choose what trains, build the guarded collator, run one step on the
worst-case batch, train, save, plot. Distribution (torchrun, accelerate launch, DeepSpeed) is
the Trainer's: this file only keeps every rank's work identical where DDP needs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import yaml

from ..data.drivers.cache import claim_output_dir, folder_problems
from ..data.stages.collate import Collator
from ..data.stages.pack import pack_dataset
from ..data.drivers.prepare import EVAL_REPORT_FILE, Prepared, eval_config, format_report_summary, prepare
from ..data.drivers.streaming import streamed_dataset
from ..errors import ConfigError, disk_full_is_an_error
from ..models.hybrid import keep_packed_samples_apart
from ..models.load import (
    Loaded,
    apply_finetuning,
    format_trainable,
    keep_frozen_out_of_backward,
    load_model,
    load_spec,
    trainable_summary,
)
from ..models.quant import experts_note
from .checkpoints import (
    CompleteCheckpointCallback,
    GracefulStopCallback,
    continues_in,
    earlier_run_problem,
    layout_change,
    remove_earlier_checkpoints,
    resolve_resume,
)
from .plot import plot_loss, plot_rewards
from .preference import preference_trainer
from .sharding import (
    dataset_modalities,
    fill_accelerate_env,
    fsdp_arguments,
    one_process_fsdp,
    sharding_of,
    zero_stage,
)
from .trainer import VlmTrainer


@dataclass
class Run:
    cfg: object
    loaded: Loaded
    prepared: Prepared
    trainer: VlmTrainer
    trainable: dict
    resume: str | None


@dataclass
class TrainResult:
    output_dir: str
    prepared: Prepared
    trainable: dict
    log_history: list[dict]
    loss_plot: str | None
    global_step: int
    worst_case: dict | None = None
    stopped_by_signal: bool = False
    predict_metrics: dict | None = None  # do_predict's scores and counts (predict_results.json)


# Set to 1 to have every rank write rank_{r}_weights.sha256 (one line per parameter) into output_dir
# after training, so that a test (or a user chasing a DDP problem) can check that the ranks agree.
DEBUG_RANK_HASH_ENV = "VLMTUNE_DEBUG_RANK_HASH"


def say(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, flush=True)


# -- setup -----------------------------------------------------------------------------------
def setup(cfg, *, progress: bool = True, preflight: Callable | None = None) -> Run:
    """Everything before the first step. `preflight(cfg, loaded=, log=, progress=)` runs once the processor is
    loaded and may raise to stop the run: `vlmtune train` passes the doctor's checks (run_doctor: true)."""
    from transformers import set_seed

    resume = check_output(cfg)  # before any work: every problem with the folders and the checkpoint at once
    loaded = load_spec(cfg.model, cfg.fit)
    if preflight is not None:
        preflight(cfg, log=say, progress=progress, loaded=loaded)
    cfg = cpu_precision(cfg)
    set_seed(cfg.seed)
    init_cpu_distributed(cfg.ddp_timeout, deepspeed=bool(cfg.deepspeed))
    for filled in fill_accelerate_env(loaded.spec.model_type):
        say(f"accelerate launch with FSDP: {filled} (the family's decoder layers and vision blocks)")
    args = training_arguments(cfg, progress, model_type=loaded.spec.model_type)
    if cfg.streaming:  # no prepared copy: rows are fitted on the fly, the report written as samples are read
        train_ds, eval_ds = streamed_dataset(cfg.for_data(), loaded), None
        prepared = Prepared("(streaming: no prepared copy)", train_ds.stream.report_path, 0, {}, 0, False)
        say(f"streaming: samples are fitted as they are read; fit report: {prepared.report_path}")
    else:
        prepared = prepare_once(cfg, loaded, args, progress)
        say(format_report_summary(prepared))
        train_ds, eval_ds = split_validation(prepared.dataset(), cfg.val_size, cfg.seed)
        if cfg.eval_dataset:  # prepared and fitted like the training data, with its own fit report
            with args.main_process_first(desc="prepare eval_dataset"):
                eval_prep = prepare(eval_config(cfg.for_data()), loaded, progress=progress, report_name=EVAL_REPORT_FILE)
            say("eval_dataset:\n" + format_report_summary(eval_prep))
            eval_ds = eval_prep.dataset()
    if cfg.packing:
        before = len(train_ds)
        train_ds = pack_dataset(train_ds, cfg.cutoff_len,
                                os.path.join(prepared.path, f"packed-{cfg.cutoff_len}-{args.process_index}.arrow"))
        say(f"packing: {before} rows into {len(train_ds)} sequences of at most {cfg.cutoff_len} tokens")
    if not cfg.streaming and len(train_ds) == 0:
        raise ConfigError([f"no training rows were emitted from dataset={cfg.dataset!r}; "
                           f"see {prepared.report_path} for what happened to each sample"])

    model = build_model(cfg)
    note = experts_note(model)  # QLoRA on a MoE: its experts are not quantized
    if note:
        say(note)
    trainable = trainable_summary(model)
    say("trainable parameters:\n" + format_trainable(trainable))

    common = dict(
        args=args,
        callbacks=[CompleteCheckpointCallback(), GracefulStopCallback()],
        spec=loaded.spec,
        sharded=sharding_of(cfg),
        modalities=dataset_modalities(train_ds),
        loraplus_lr_ratio=cfg.loraplus_lr_ratio,
        pissa_init_dir=os.path.join(cfg.output_dir, "pissa_init") if cfg.pissa_init else None,
        moe_aux_loss_coef=cfg.moe_aux_loss_coef,
    )
    if cfg.stage != "sft":  # dpo / kto: pairs or tagged answers, their collator, loss and reference
        trainer = preference_trainer(cfg, model, loaded, train_ds, eval_ds, model_dtype(cfg), **common)
    else:
        collator = Collator(loaded.processor, loaded.spec, cutoff_len=cfg.cutoff_len,
                            video=getattr(loaded, "video", None))
        trainer = VlmTrainer(model=model, data_collator=collator, train_dataset=train_ds, eval_dataset=eval_ds,
                             **common)
    change = layout_change(resume, args) if resume else None
    if change:
        say(f"WARNING: {change}")
    return Run(cfg, loaded, prepared, trainer, trainable, resume)


def check_output(cfg, data=None) -> str | None:
    """Refuse, all at once and before the processor loads: fsdp on one process, overlapping output / prepared /
    data folders, an output_dir vlmtune may not write (a user's folder), a checkpoint that cannot resume, and an
    earlier run's checkpoints that are neither resumed nor overwritten; then claim output_dir (created, marked).
    Returns the checkpoint to resume from. `data`: the sections read (default: the training data's)."""
    data = data or cfg.for_data()
    problems = folder_problems(data)
    resume = None
    try:
        resume = resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
    except ConfigError as e:
        problems += e.problems
    if not problems:
        problems.append(earlier_run_problem(cfg.output_dir, resume, cfg.overwrite_output_dir))
    problems = [p for p in [one_process_fsdp(cfg), *problems] if p]
    if problems:
        raise ConfigError(problems)
    if continues_in(cfg.output_dir, resume) and cfg.overwrite_output_dir:
        say(f"overwrite_output_dir: true with resume_from_checkpoint: resuming {resume}, so output_dir's "
            "checkpoints are kept")
    claim_output_dir(data)
    return resume


def build_model(cfg):
    """The model to train: loaded, frozen / adapted as the config says, checkpointed, and with no gradient into
    frozen parts (bench/bench_real_size.py measures exactly this)."""
    model = load_model(cfg.model, cfg.finetuning, dtype=model_dtype(cfg))
    if cfg.packing:  # linear-attention layers keep each packed sample's state to itself, or packing is refused
        keep_packed_samples_apart(model)
    for c in (model.config, getattr(model.config, "text_config", None)):
        if c is not None:
            c.use_cache = False  # no KV cache in training (and packing needs none)
    # Adapters first, then checkpointing: PEFT adds its own input-embedding hooks to a model already checkpointed.
    model = apply_finetuning(model, cfg.finetuning)
    if cfg.gradient_checkpointing:
        # Non-reentrant: a checkpointed layer's recompute needs no input that requires grad, so no
        # input-embedding hook is needed (see keep_frozen_out_of_backward).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    keep_frozen_out_of_backward(model)
    return model


def prepare_once(cfg, loaded, args, progress: bool = True) -> Prepared:
    """Each node's local rank 0 prepares while that node's other ranks wait at main_process_first's barrier
    (bounded by ddp_timeout), then load the same cache, so every rank sees the same rows in the same order.
    Nodes that share output_dir meet at prepare's lock: exactly one prepares, the others wait (bounded by
    ddp_timeout) and load its cache; nodes without a shared filesystem each prepare once."""
    with args.main_process_first(desc="prepare"):
        return prepare(cfg.for_data(), loaded, progress=progress)


def init_cpu_distributed(timeout_s: int, deepspeed: bool = False) -> None:
    """Under torchrun on CPUs, start the gloo process group here so that ddp_timeout bounds every
    collective: transformers passes the timeout on for GPU backends only, leaving a stuck CPU rank
    to hang for torch's default 30 minutes. With deepspeed, DeepSpeed's comm layer adopts that group before
    ZeRO-3 partitions the model as it loads."""
    dist = torch.distributed
    if (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
            and dist.is_available() and not dist.is_initialized()):
        dist.init_process_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        if deepspeed:
            import deepspeed as ds

            ds.init_distributed(dist_backend="gloo")


def training_arguments(cfg, progress: bool = True, model_type: str | None = None):
    """The Trainer's arguments for the config; model_type (the loaded family's) is needed with fsdp, whose wrap
    classes come from the family table."""
    from transformers import TrainingArguments

    has_eval = bool(cfg.val_size or cfg.eval_dataset)
    eval_strategy = "no" if not has_eval else ("steps" if cfg.eval_steps else "epoch")
    return TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps else cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_strategy="steps",
        save_total_limit=cfg.save_total_limit,
        eval_strategy=eval_strategy,
        eval_steps=cfg.eval_steps,
        report_to=cfg.report_to,
        deepspeed=cfg.deepspeed,
        **fsdp_arguments(cfg, model_type),
        seed=cfg.seed,
        data_seed=cfg.seed,
        ddp_timeout=cfg.ddp_timeout,
        dataloader_num_workers=cfg.dataloader_num_workers,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        length_column_name="length",
        remove_unused_columns=False,
        optim=cfg.optim,
        disable_tqdm=not progress,
        # Frozen parts are never in the graph's trainable set, and text-only batches get a
        # zero-weight vision pass (VlmTrainer), so DDP needs no unused-parameter search.
        ddp_find_unused_parameters=False,
        save_only_model=False,
        use_cpu=not torch.cuda.is_available(),
        # streaming: every rank iterates the stream and keeps its own batches; accelerate's default for an
        # iterable dataset (rank 0 reads and slices each batch along dim 0) would cut pixel_values apart.
        **({"accelerator_config": {"dispatch_batches": False}} if getattr(cfg, "streaming", False) else {}),
    )


def cpu_precision(cfg, decision=None):
    """bf16 on a CPU that `speed.cpu_bf16` (the one place that decides, from the CPU's bf16 instructions, never
    a timing) says not to keep: float32 instead, said in the log, unless force_cpu_bf16 is set. Every other case
    is returned unchanged."""
    if not cfg.bf16 or torch.cuda.is_available() or cfg.force_cpu_bf16:
        return cfg
    from .speed import cpu_bf16

    decision = decision or cpu_bf16()
    if decision.keep:
        return cfg
    say(f"bf16=true on a CPU without fast bf16 ({decision.why}): training in float32 instead (set "
        "force_cpu_bf16: true to keep bf16; `vlmtune doctor` measures the difference)")
    return cfg.replace(bf16=False)


def model_dtype(cfg):
    # bf16 weights on a GPU halve memory (LLaMA-Factory does the same); fp16 and the CPU keep
    # fp32 master weights with autocast, since fp16 weights cannot be trained with a grad scaler.
    if cfg.bf16 and torch.cuda.is_available():
        return torch.bfloat16
    return torch.float32


def split_validation(ds, val_size, seed: int):
    """Hold out val_size of the *samples* (split pieces, which share their sample_id, stay on one side), or None
    when 0."""
    if not val_size:
        return ds, None
    base = ds["sample_id"]
    ids = sorted(set(base))
    n_val = int(val_size) if val_size >= 1 else max(1, round(len(ids) * float(val_size)))
    rng = random.Random(seed)
    rng.shuffle(ids)
    held = set(ids[:n_val])
    train_idx = [k for k, b in enumerate(base) if b not in held]
    val_idx = [k for k, b in enumerate(base) if b in held]
    return ds.select(train_idx), ds.select(val_idx)


# -- train -----------------------------------------------------------------------------------
# A checkpoint cut short by a full disk is never marked complete (checkpoints.py), so resume skips it.
_DISK_FULL_FIX = ("free space there (or lower save_total_limit), then run again with resume_from_checkpoint: true: "
                  "it resumes from the last complete checkpoint, never the one cut short")


def train(run: Run) -> TrainResult:
    cfg, trainer = run.cfg, run.trainer
    worst = predicted = None
    whole = sharding_of(cfg) == "fsdp" or zero_stage(cfg.deepspeed) == 3
    if cfg.worst_case_first and whole and run.resume is None:
        say("worst-case batch: skipped, since under fsdp or ZeRO-3 the model is only sharded when training starts "
            "and one unsharded forward/backward would hold every weight on every rank")
    elif cfg.worst_case_first and run.resume is None and not cfg.streaming:  # streaming: no lengths to rank
        worst = trainer.worst_case_step(log=say)
        ga = cfg.gradient_accumulation_steps
        say(f"worst-case batch ok: {worst['tokens']} tokens, {worst['images']} images, {worst['videos']} videos, "
            f"{worst['seconds']:.2f}s for one forward/backward (an optimizer step of {ga} such micro-batch(es) takes "
            f"at most about {worst['seconds'] * ga:.0f}s)")
    if run.resume:
        say(f"resuming from {run.resume}")
    if (cfg.overwrite_output_dir and not continues_in(cfg.output_dir, run.resume)
            and trainer.args.local_process_index == 0):  # every check passed: start over
        for path in remove_earlier_checkpoints(cfg.output_dir):
            say(f"overwrite_output_dir: removed the earlier run's {path}")
    with disk_full_is_an_error(f"a checkpoint or the model into {cfg.output_dir}", _DISK_FULL_FIX):
        trainer.train(resume_from_checkpoint=run.resume)
    stop = next((c for c in trainer.callback_handler.callbacks if isinstance(c, GracefulStopCallback)), None)
    stopped = bool(stop and stop.stopped_at is not None)
    if stopped:
        say(f"stopped by SIGTERM after step {stop.stopped_at}; checkpoint-{stop.stopped_at} is saved: "
            "resume with resume_from_checkpoint=true")
    with disk_full_is_an_error(f"the trained model into {cfg.output_dir}", _DISK_FULL_FIX):
        trainer.save_model(cfg.output_dir)
        trainer.save_state()
    if os.environ.get(DEBUG_RANK_HASH_ENV) == "1":
        write_weight_hashes(trainer.model, cfg.output_dir, trainer.args.process_index)
    loss_plot = None
    if trainer.is_world_process_zero():
        run.loaded.processor.save_pretrained(cfg.output_dir)
        with open(os.path.join(cfg.output_dir, "vlmtune_config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        with open(os.path.join(cfg.output_dir, "trainable_parameters.json"), "w", encoding="utf-8") as f:
            json.dump(run.trainable, f, indent=2)
        if cfg.do_predict:  # LLaMA-Factory's predict: answers generated for eval_dataset, with their scores
            from .predict import predict

            predicted = predict(trainer.model, trainer.data_collator, run.loaded.processor.tokenizer, trainer.eval_dataset, cfg,
                    cfg.output_dir, log=say)
        if cfg.plot_loss:
            loss_plot = plot_loss(trainer.state.log_history, cfg.output_dir)
            say(f"loss plot: {loss_plot}" if loss_plot else no_plot_note(trainer.state.global_step, cfg.logging_steps))
            rewards_plot = plot_rewards(trainer.state.log_history, cfg.output_dir) if cfg.stage != "sft" else None
            if rewards_plot:
                say(f"rewards plot: {rewards_plot}")
    return TrainResult(cfg.output_dir, run.prepared, run.trainable, list(trainer.state.log_history), loss_plot,
                       trainer.state.global_step, worst, stopped, predicted if cfg.do_predict else None)


def no_plot_note(steps: int, logging_steps: int) -> str:
    """plot_loss: true with no loss logged: said, not a missing file found later."""
    return (f"plot_loss: no loss was logged in {steps} step(s) (logging_steps={logging_steps}), so no loss plot was "
            f"written; set logging_steps to at most {max(1, steps)} to get one")


def weight_hash(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    data = t.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{data.dtype} {tuple(data.shape)}".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_weight_hashes(model, output_dir: str, rank: int) -> str:
    """`<sha256>  <parameter name>` for every parameter of this rank's model, as sha256sum writes."""
    lines = [f"{weight_hash(p)}  {name}\n"
             for name, p in sorted(model.named_parameters(), key=lambda item: item[0])]
    path = os.path.join(output_dir, f"rank_{rank}_weights.sha256")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return path


def cleanup(run: Run) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# -- predict only (do_train: false) ---------------------------------------------------------------------------
def predict_only(cfg, *, progress: bool = True, preflight: Callable | None = None) -> TrainResult:
    """LLaMA-Factory's predict config: eval_dataset prepared as for evaluation, answers generated with
    model_name_or_path (+ adapter_name_or_path), nothing trained. One process: generation is not sharded."""
    from transformers import set_seed

    from .predict import predict

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(["do_train=false predicts in one process (generation is not split across ranks); run "
                           "`vlmtune train CONFIG.yaml` without torchrun / accelerate launch"])
    data = eval_config(cfg.for_data())
    check_output(cfg, data)
    loaded = load_spec(cfg.model, cfg.fit)
    if preflight is not None:
        preflight(cfg, log=say, progress=progress, loaded=loaded)
    cfg = cpu_precision(cfg)
    set_seed(cfg.seed)
    prepared = prepare(data, loaded, progress=progress, report_name=EVAL_REPORT_FILE)
    say("eval_dataset:\n" + format_report_summary(prepared))
    model = predict_model(cfg)
    collator = Collator(loaded.processor, loaded.spec, cutoff_len=cfg.cutoff_len, video=getattr(loaded, "video", None))
    metrics = predict(model, collator, loaded.processor.tokenizer, prepared.dataset(), cfg, cfg.output_dir, log=say)
    return TrainResult(cfg.output_dir, prepared, {}, [], None, 0, predict_metrics=metrics)


def predict_model(cfg):
    """The model to generate with: model_name_or_path, with adapter_name_or_path applied (PEFT), on this
    process's device. dtype: bf16 / fp16 as the config says; on a GPU without either, bf16 where it has it, else
    fp16 (as LLaMA-Factory infers it); float32 on a CPU."""
    from ..models.load import check_adapter

    gpu = torch.cuda.is_available()
    half = torch.bfloat16 if cfg.bf16 or (gpu and not cfg.fp16 and torch.cuda.is_bf16_supported()) else torch.float16
    dtype = half if gpu else torch.float32
    model = load_model(cfg.model, cfg.finetuning, dtype=dtype)
    if cfg.adapter_name_or_path:
        from peft import PeftModel

        check_adapter(cfg.adapter_name_or_path)
        model = PeftModel.from_pretrained(model, cfg.adapter_name_or_path)
    if cfg.quantization_bit is None:  # a quantized model is placed on its device as it loads
        model = model.to("cuda" if gpu else "cpu")
    return model.eval()


def run(cfg, *, progress: bool = True, preflight: Callable | None = None) -> TrainResult:
    if not cfg.do_train:
        return predict_only(cfg, progress=progress, preflight=preflight)
    r = setup(cfg, progress=progress, preflight=preflight)
    # No barrier after a failure: this rank exits with its error and the launcher stops the others, instead of
    # every rank waiting ddp_timeout at a barrier that a rank stuck in a collective never reaches.
    result = train(r)
    cleanup(r)
    return result
