"""The transformers Trainer with the two things Qwen-VL training needs on top.

1. Text-only batches under DDP / DeepSpeed: a rank whose batch has no image would skip the vision
   tower while other ranks run it, so DDP waits forever for the tower's gradients ("Expected to
   have finished reduction in the prior iteration") and ZeRO-3 waits for its parameter gathers. Such
   a batch runs the tower on one minimal dummy image and adds it to the loss with weight zero:
   identical graphs on every rank, zero gradient, unchanged loss.
2. Worst-case first: one forward/backward on the longest batch before the first step, so an
   out-of-memory or a data problem shows up in seconds, not hours.
3. A mixture-of-experts router's load-balancing loss (moe_aux_loss_coef) is added here, not by the model (whose own
   `router_aux_loss_coef` is held at 0 during the forward and never saved changed): coef × the mean over the
   step's micro-batches whichever way the Trainer scales the loss for gradient accumulation (the Qwen MoE classes
   set accepts_loss_kwargs = False, so the Trainer divides the whole loss by the steps; a model normalised over
   the step's tokens is not divided, and its aux term is divided here), and logged as `aux_loss`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping

import torch
from transformers import Trainer

from ..models.load import component_of
from ..models.spec import ModelSpec


class VlmTrainer(Trainer):
    """loraplus_lr_ratio: LoRA+ (lora_B learns at learning_rate × ratio); pissa_init_dir: where a PiSSA run's
    initial adapter is kept, so that the final adapter is saved converted to apply to the original base model."""

    def __init__(self, *args, spec: ModelSpec, deepspeed: bool = False, loraplus_lr_ratio: float | None = None,
                 pissa_init_dir: str | None = None, moe_aux_loss_coef: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.spec = spec
        self.moe_aux_loss_coef = moe_aux_loss_coef
        self._aux_sum, self._aux_count = 0.0, 0  # training micro-batches' aux losses since the last log
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.pissa_init_dir = pissa_init_dir
        if pissa_init_dir and self.is_world_process_zero():
            self.model.save_pretrained(pissa_init_dir)  # the adapter as PiSSA initialised it, before any step
        self._dummy_vision = deepspeed or any(
            p.requires_grad and component_of(n) != "language_model" for n, p in self.model.named_parameters()
        )

    def create_optimizer(self, model=None):
        """LoRA+: PEFT's create_loraplus_optimizer with the optimizer class and arguments `optim` names."""
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        from peft.optimizers import create_loraplus_optimizer

        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model or self.model)
        kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
        self.optimizer = create_loraplus_optimizer(model or self.model, cls, lr=self.args.learning_rate,
                                                   loraplus_lr_ratio=self.loraplus_lr_ratio,
                                                   loraplus_weight_decay=self.args.weight_decay, **kwargs)
        return self.optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call=_internal_call)
        # The final adapter of a PiSSA run, converted (rank 2r) so that it applies to the original base weights
        # (PiSSA rewrote them to the residual). Checkpoints stay unconverted: resuming continues the residual model.
        if self.pissa_init_dir and not _internal_call and self.is_world_process_zero():
            self.model.save_pretrained(output_dir or self.args.output_dir,
                                       path_initial_model_for_weight_conversion=self.pissa_init_dir)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.moe_aux_loss_coef is None:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        else:
            result = self._loss_with_router_aux(model, inputs, return_outputs, num_items_in_batch)
        if self._needs_dummy(inputs):
            zero = self._dummy_vision_pass(model)
            if return_outputs:
                result = (result[0] + zero, result[1])
            else:
                result = result + zero
        return result

    def _loss_with_router_aux(self, model, inputs, return_outputs, num_items_in_batch):
        """The loss plus moe_aux_loss_coef × the router's load-balancing loss (see the module docstring)."""
        with _model_adds_no_router_loss(self.accelerator.unwrap_model(model)):  # under DDP / DeepSpeed too
            loss, outputs = super().compute_loss(model, {**inputs, "output_router_logits": True}, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        aux = outputs["aux_loss"]
        share = 1.0
        if model.training:
            self._aux_sum = self._aux_sum + aux.detach().float()  # a tensor: no device sync per micro-batch
            self._aux_count += 1
            scaled = self.loss_is_scaled_for_ga
            if scaled is None:  # the Trainer's own test (training_step): it divides an unscaled loss by itself
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                    self.compute_loss_func is not None
            share = 1.0 / self.current_gradient_accumulation_steps if scaled else 1.0
        loss = loss + self.moe_aux_loss_coef * share * aux.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        """The training logs get `aux_loss`: the mean router load-balancing loss of this rank's micro-batches since
        the last log (with moe_aux_loss_coef set), before the coefficient."""
        if self._aux_count and "loss" in logs:
            logs = {**logs, "aux_loss": round(float(self._aux_sum) / self._aux_count, 6)}
            self._aux_sum, self._aux_count = 0.0, 0
        super().log(logs, *args, **kwargs)

    def _prepare_input(self, data):
        """As the Trainer's, except that Qwen2.5-VL's `second_per_grid_ts` stays float32: DeepSpeed casts every
        float input to its dtype, and the M-RoPE time positions (arange(t) × tokens_per_second × seconds,
        truncated) would then differ from the processor's (1.111 s is 1.109 in bf16)."""
        if isinstance(data, Mapping) and "second_per_grid_ts" in data:
            out = super()._prepare_input({k: v for k, v in data.items() if k != "second_per_grid_ts"})
            out["second_per_grid_ts"] = data["second_per_grid_ts"].to(self.args.device)
            return out
        return super()._prepare_input(data)

    def _needs_dummy(self, inputs) -> bool:
        # a batch with pixels (image or video) runs the tower already
        return (
            self._dummy_vision
            and "pixel_values" not in inputs
            and "pixel_values_videos" not in inputs
            and self.args.world_size > 1
            and torch.is_grad_enabled()
        )

    def _dummy_vision_pass(self, model) -> torch.Tensor:
        visual = _find_visual(model)
        m, p, t = self.spec.merge_size, self.spec.patch_size, self.spec.temporal_patch_size
        grid = torch.tensor([[1, m, m]], device=self.args.device)
        dtype = next(visual.parameters()).dtype
        pixels = torch.zeros(m * m, 3 * t * p * p, device=self.args.device, dtype=dtype)
        out = visual(pixels, grid_thw=grid)
        tensors = _tensors(out)
        return sum(x.float().sum() for x in tensors) * 0.0

    def worst_case_step(self, log=None) -> dict:
        """One forward/backward on the longest batch; gradients and RNG state are left untouched. `log(msg)` is
        told what runs before it starts (at real size on a CPU it takes minutes)."""
        ds = self.train_dataset
        # Longest first; among equals the most vision patches (the cost of a trainable tower).
        videos = ds["video_grid_thw"] if "video_grid_thw" in ds.column_names else [[]] * len(ds)
        patches = [sum(g[0] * g[1] * g[2] for g in grids + vgrids) for grids, vgrids in zip(ds["image_grid_thw"], videos)]
        lengths = ds["length"]
        order = sorted(range(len(ds)), key=lambda i: (lengths[i], patches[i]), reverse=True)
        rows = [ds[i] for i in order[: self.args.per_device_train_batch_size]]
        batch = self._prepare_inputs(self.data_collator(rows))
        if log is not None:
            log(f"worst-case batch: one forward/backward on the longest batch ({sum(len(r['input_ids']) for r in rows)} "
                f"tokens, {sum(len(r['images']) for r in rows)} images, {sum(len(r.get('videos') or []) for r in rows)} "
                f"videos: {', '.join(r['id'] for r in rows)}) before "
                "training starts, so that running out of memory shows now ...")
        model = self.model
        model.train()
        start = time.perf_counter()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            with self.autocast_smart_context_manager():
                loss = self.compute_loss(model, batch)  # the run's loss (a preference loss for dpo / kto)
            loss.backward()
        seconds = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        return {"tokens": sum(len(r["input_ids"]) for r in rows), "images": sum(len(r["images"]) for r in rows),
                "videos": sum(len(r.get("videos") or []) for r in rows),
                "seconds": seconds, "peak_gpu_bytes": peak, "ids": [r["id"] for r in rows]}


@contextlib.contextmanager
def _model_adds_no_router_loss(model):
    """While the forward runs, the model's own `router_aux_loss_coef` is 0, so it returns aux_loss without adding it
    to the loss (VlmTrainer adds it, scaled for gradient accumulation). Restored afterwards: nothing of it is saved."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    configs = [c for c in (base.config, getattr(base.config, "text_config", None))
               if c is not None and hasattr(c, "router_aux_loss_coef")]
    saved = [c.router_aux_loss_coef for c in configs]
    for c in configs:
        c.router_aux_loss_coef = 0.0
    try:
        yield
    finally:
        for c, v in zip(configs, saved):
            c.router_aux_loss_coef = v


def _find_visual(model):
    for name, module in model.named_modules():
        if name.split(".")[-1] == "visual":
            return module
    raise AttributeError("the model has no `visual` module; is this a Qwen-VL model?")


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    if hasattr(out, "to_tuple"):
        return [t for o in out.to_tuple() for t in _tensors(o)]
    return []
