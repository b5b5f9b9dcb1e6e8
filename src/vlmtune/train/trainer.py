"""The transformers Trainer with the two things Qwen-VL training needs on top.

1. Batches without an image (or without a video) under DDP, FSDP2 or DeepSpeed. Under DDP a rank whose batch
   has no pixels would skip a trainable vision tower while other ranks run it, so DDP waits forever for the
   tower's gradients ("Expected to have finished reduction in the prior iteration"). Under FSDP2 and ZeRO-3
   every module's forward gathers its shards collectively, so every rank must run the tower the same number
   of times, in the same order: a rank with images and videos runs it twice, before the language model. So
   each micro-batch runs the tower once per modality the data holds (dataset_modalities), on real pixels or
   on one minimal dummy input, always just before the language model (a forward pre-hook on it), and the dummy
   output joins the loss with weight zero: identical collectives on every rank, zero gradient, unchanged loss.
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
from .sharding import engage_deepspeed_on_cpu, engage_fsdp_on_cpu


class VlmTrainer(Trainer):
    """loraplus_lr_ratio: LoRA+ (lora_B learns at learning_rate × ratio); pissa_init_dir: where a PiSSA run's
    initial adapter is kept, so that the final adapter is saved converted to apply to the original base model."""

    def __init__(self, *args, spec: ModelSpec, sharded: str | None = None, modalities: tuple[str, ...] = ("image",),
                 loraplus_lr_ratio: float | None = None, pissa_init_dir: str | None = None,
                 moe_aux_loss_coef: float | None = None, **kwargs):
        self.sharded = sharded  # before the Trainer's __init__, which creates the accelerator
        super().__init__(*args, **kwargs)
        self.spec = spec
        self.moe_aux_loss_coef = moe_aux_loss_coef
        self._aux_sum, self._aux_count = 0.0, 0  # training micro-batches' aux losses since the last log
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.pissa_init_dir = pissa_init_dir
        if pissa_init_dir and self.is_world_process_zero():
            self.model.save_pretrained(pissa_init_dir)  # the adapter as PiSSA initialised it, before any step
        # sharded ("fsdp" / "deepspeed"): every module's forward is collective, so the tower runs once per
        # modality in every micro-batch; plain DDP only needs a trainable tower to run at all.
        self.modalities = tuple(modalities)
        self._dummy_vision = bool(self.modalities) and (sharded is not None or any(
            p.requires_grad and component_of(n) != "language_model" for n, p in self.model.named_parameters()
        ))
        self._pending: tuple[str, ...] = ()  # the dummy passes the current micro-batch still owes
        self._zero_terms: list[torch.Tensor] = []
        if self._dummy_vision:
            self._visual = _find_visual(self.model)
            _find_language_model(self.model).register_forward_pre_hook(self._before_language_model)

    def create_accelerator_and_postprocess(self):
        """As the Trainer's; on CPU ranks, FSDP is engaged as on GPUs (see train/sharding.py)."""
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None or self.sharded == "fsdp":
            from accelerate.utils import FullyShardedDataParallelPlugin

            state = self.accelerator.state
            if getattr(state, "fsdp_plugin", None) is None and self.args.fsdp_plugin_args is not None:
                state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            if engage_fsdp_on_cpu(self.accelerator):
                self.is_fsdp_enabled = True
        if self.args.deepspeed and engage_deepspeed_on_cpu(self.accelerator, self.args.deepspeed_plugin):
            self.is_deepspeed_enabled = True

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
        if self.is_fsdp_enabled and not _internal_call and "FULL" not in str(self.accelerator.state.fsdp_plugin.state_dict_type):
            # state_dict_type SHARDED_STATE_DICT: checkpoints stay sharded (each rank writes its shard, and resumes
            # from it), but the final model is gathered into one safetensors checkpoint, so that it loads with
            # from_pretrained and exports like any other. The Trainer would write no weights at all here.
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            self._save(output_dir or self.args.output_dir, state_dict=get_model_state_dict(self.model, options=options))
        else:
            super().save_model(output_dir, _internal_call=_internal_call)
        # The final adapter of a PiSSA run, converted (rank 2r) so that it applies to the original base weights
        # (PiSSA rewrote them to the residual). Checkpoints stay unconverted: resuming continues the residual model.
        if self.pissa_init_dir and not _internal_call and self.is_world_process_zero():
            self.model.save_pretrained(output_dir or self.args.output_dir,
                                       path_initial_model_for_weight_conversion=self.pissa_init_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None):
        """As the Trainer's; a gathered FSDP state dict holds a tied weight twice (one copy per key, so
        save_pretrained cannot see that they share storage): the tied copy is left out, as an unsharded save does."""
        if self.is_fsdp_enabled and state_dict:
            model = self.accelerator.unwrap_model(self.model)
            if getattr(model.config, "tie_word_embeddings", False) or getattr(
                    getattr(model.config, "text_config", None), "tie_word_embeddings", False):
                state_dict = {k: v for k, v in state_dict.items()
                              if k not in (getattr(model, "_tied_weights_keys", None) or {})}
        super()._save(output_dir, state_dict=state_dict)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.vision_passes(inputs) as zero:
            if self.moe_aux_loss_coef is None:
                result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                              num_items_in_batch=num_items_in_batch)
            else:
                result = self._loss_with_router_aux(model, inputs, return_outputs, num_items_in_batch)
        if zero:
            result = (result[0] + sum(zero), result[1]) if return_outputs else result + sum(zero)
        return result

    @contextlib.contextmanager
    def vision_passes(self, inputs):
        """Around one forward of `inputs`: the vision passes this micro-batch owes run inside it (just before the
        language model); yields the list their zero-weight terms are put in, for the caller to add to its loss."""
        self._pending, self._zero_terms = self._missing(inputs), []
        terms = self._zero_terms
        try:
            yield terms
            if self._pending:
                # Better an error now than ranks waiting for each other's gathers until ddp_timeout.
                raise RuntimeError(f"the dummy vision pass for {', '.join(self._pending)} did not run: the model's "
                                   "language model was not called through the hooked module")
        finally:
            self._pending = ()

    def _before_language_model(self, module, args):
        """Runs the vision passes this micro-batch owes, after its real ones and before the language model."""
        pending, self._pending = self._pending, ()
        for _ in pending:
            self._zero_terms.append(self._dummy_vision_pass())

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

    def _missing(self, inputs) -> tuple[str, ...]:
        """The modalities this micro-batch must run the tower for on dummy input (in the model's order)."""
        if not self._dummy_vision or self.args.world_size <= 1:
            return ()
        has = {"image": "pixel_values" in inputs, "video": "pixel_values_videos" in inputs}
        if self.sharded:  # collective forwards: once per modality, with or without gradients (evaluation too)
            return tuple(m for m in self.modalities if not has[m])
        # DDP: only gradients are collective, and any one pass through the tower gives it gradients
        return self.modalities[:1] if torch.is_grad_enabled() and not any(has.values()) else ()

    def _dummy_vision_pass(self) -> torch.Tensor:
        """The tower on one minimal input (one merge window of zero pixels), as a term of weight exactly 0."""
        visual = self._visual
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
        size = {"tokens": sum(len(r["input_ids"]) for r in rows), "images": sum(len(r["images"]) for r in rows),
                "videos": sum(len(r.get("videos") or []) for r in rows)}
        if log is not None:
            log(f"worst-case batch: one forward/backward on the longest batch ({size['tokens']} tokens, "
                f"{size['images']} images, {size['videos']} videos: {', '.join(r['id'] for r in rows)}) before "
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
        return {**size, "seconds": seconds, "peak_gpu_bytes": peak, "ids": [r["id"] for r in rows]}


def _find_language_model(model):
    """The decoder stack the model calls after merging vision features into the embeddings."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == "language_model" and hasattr(module, "layers"):
            return module
    raise AttributeError("the model has no `language_model` decoder; is this a Qwen-VL model?")


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
