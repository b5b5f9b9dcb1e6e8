"""Preference training (stage dpo | kto): log-probabilities of answers, the losses, the trainer, the reference.

The losses are written here, not taken from TRL: TRL's live inside its DPOTrainer / KTOTrainer methods, bound
to its own tokenization, collator and trainer state, so they cannot score our fitted pair rows without
adopting the rest. Each is a few lines of the published formula (LLaMA-Factory's and TRL's conventions: sums of
answer log-probabilities, averaged per token for ipo, orpo and simpo).

A batch of pairs is one forward over 2B sequences (the B chosen sides, then the B rejected ones:
data/stages/pair_collate.py). The reference is, in order of preference: log-probabilities precomputed before training
(`precompute_ref_log_probs`), a separate frozen model (`ref_model`, or a frozen copy of the starting model for
full / freeze fine-tuning), or, for LoRA, the same model with its adapter disabled (no second copy). orpo and
simpo use no reference.

KTO: each row is one answer, desirable or not. Its reference point (TRL's KL term) is estimated from the
batch's own policy/reference log-ratios, detached and clamped at zero, averaged over every rank under DDP;
TRL estimates it on mismatched prompt/answer pairs, which would need a third forward whose sequences could
exceed cutoff_len. An undesirable answer is never an SFT target: `pref_ftx` counts desirable rows only.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.stages.encode import IGNORE_INDEX
from .trainer import VlmTrainer

# pref_loss values that score length-averaged log-probabilities (LLaMA-Factory and TRL do the same for these)
AVERAGED = ("ipo", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")
_EXTRA = ("ref_logps", "kto_tags")  # collator keys that are not model inputs


@dataclass(frozen=True)
class PrefOptions:
    stage: str
    beta: float
    loss: str
    ftx: float = 0.0
    simpo_gamma: float = 0.5
    label_smoothing: float = 0.0
    kto_chosen_weight: float = 1.0
    kto_rejected_weight: float = 1.0

    @classmethod
    def of(cls, pref) -> "PrefOptions":
        """From the config's preference section (`cfg.preference`)."""
        return cls(pref.stage, pref.pref_beta, pref.pref_loss, pref.pref_ftx, pref.simpo_gamma,
                   pref.dpo_label_smoothing, pref.kto_chosen_weight, pref.kto_rejected_weight)

    @property
    def needs_reference(self) -> bool:
        return self.stage == "kto" or self.loss not in REFERENCE_FREE


# -- log-probabilities -------------------------------------------------------------------------------------------
def answer_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the sum of the log-probabilities of its labelled tokens, and how many there are."""
    labels = labels[:, 1:]
    logits = logits[:, :-1].float()
    mask = labels != IGNORE_INDEX
    picked = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


# -- the losses --------------------------------------------------------------------------------------------------
def dpo_losses(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor | None, rr: torch.Tensor | None,
               opt: PrefOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the chosen / rejected rewards, from the policy's (pc, pr) and the reference's (rc, rr)
    answer log-probabilities (already averaged per token for ipo / orpo / simpo)."""
    beta, eps = opt.beta, opt.label_smoothing
    if opt.loss == "orpo":  # odds ratio on the chosen side's likelihood plus its NLL
        log_odds = (pc - pr) - (torch.log1p(-torch.exp(pc)) - torch.log1p(-torch.exp(pr)))
        return -pc - beta * F.logsigmoid(log_odds), beta * pc.detach(), beta * pr.detach()
    if opt.loss == "simpo":
        logits = (pc - pr) - opt.simpo_gamma / beta
        return -F.logsigmoid(beta * logits), beta * pc.detach(), beta * pr.detach()
    a, b = pc - rc, pr - rr  # log-ratios of policy to reference
    logits = a - b
    if opt.loss == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif opt.loss == "robust":
        losses = (-F.logsigmoid(beta * logits) * (1 - eps) + F.logsigmoid(-beta * logits) * eps) / (1 - 2 * eps)
    elif opt.loss == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif opt.loss == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif opt.loss == "sppo_hard":
        losses = (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    elif opt.loss == "nca_pair":
        ca, cb = beta * a, beta * b
        losses = -F.logsigmoid(ca) - 0.5 * F.logsigmoid(-ca) - 0.5 * F.logsigmoid(-cb)
    else:
        raise ValueError(f"unknown pref_loss {opt.loss!r}")
    return losses, beta * a.detach(), beta * b.detach()


def kto_losses(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
               opt: PrefOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KTO losses and rewards: desirable rows are pushed above the reference point `kl`, undesirable ones
    below it, each weighted by its kto_*_weight."""
    ratio = policy - reference
    up = 1 - torch.sigmoid(opt.beta * (ratio - kl))
    down = 1 - torch.sigmoid(opt.beta * (kl - ratio))
    losses = torch.where(desirable, opt.kto_chosen_weight * up, opt.kto_rejected_weight * down)
    return losses, opt.beta * ratio.detach()


# -- the trainer -------------------------------------------------------------------------------------------------
class PreferenceTrainer(VlmTrainer):
    """VlmTrainer with a preference loss. `ref_model`: a frozen reference (None: the adapter disabled, or no
    reference for orpo / simpo, or precomputed log-probabilities in the batch)."""

    def __init__(self, *args, pref: PrefOptions, ref_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pref = pref
        self.ref_model = ref_model
        if ref_model is not None:
            ref_model.to(self.args.device)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    # the loss --------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        extra = {k: inputs.pop(k) for k in _EXTRA if k in inputs}
        labels = inputs.pop("labels")
        with self.vision_passes(inputs) as zero:  # the tower once per modality, as every rank (trainer.py)
            logits = model(**inputs).logits
        policy, counts = answer_logps(logits, labels)
        if self.pref.stage == "kto":
            loss, metrics = self._kto(model, inputs, labels, policy, counts, extra)
        else:
            loss, metrics = self._dpo(model, inputs, labels, policy, counts, extra)
        if zero:
            loss = loss + sum(zero)
        split = "train" if model.training else "eval"
        for k, v in metrics.items():
            self._metrics[split][k].append(float(v))
        return (loss, {"loss": loss}) if return_outputs else loss

    def _dpo(self, model, inputs, labels, policy, counts, extra):
        opt = self.pref
        n = policy.shape[0] // 2
        scored = policy / counts.clamp(min=1) if opt.loss in AVERAGED else policy
        reference = None
        if opt.needs_reference:
            ref = extra.get("ref_logps")
            ref = ref.to(policy) if ref is not None else self.reference_logps(model, inputs, labels)
            reference = ref / counts.clamp(min=1) if opt.loss in AVERAGED else ref
        pc, pr = scored[:n], scored[n:]
        rc, rr = (reference[:n], reference[n:]) if reference is not None else (None, None)
        losses, chosen, rejected = dpo_losses(pc, pr, rc, rr, opt)
        loss = losses.mean()
        if opt.ftx:
            loss = loss + opt.ftx * (-(policy[:n] / counts[:n].clamp(min=1))).mean()
        return loss, {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                      "rewards/margins": (chosen - rejected).mean(),
                      "rewards/accuracies": (chosen > rejected).float().mean(),
                      "logps/chosen": policy[:n].detach().mean(), "logps/rejected": policy[n:].detach().mean()}

    def _kto(self, model, inputs, labels, policy, counts, extra):
        opt = self.pref
        desirable = extra["kto_tags"].to(policy.device) == 1
        ref = extra.get("ref_logps")
        reference = ref.to(policy) if ref is not None else self.reference_logps(model, inputs, labels)
        kl = self._kl(policy.detach() - reference)
        losses, rewards = kto_losses(policy, reference, desirable, kl, opt)
        loss = losses.mean()
        if opt.ftx and desirable.any():  # the SFT term: desirable answers only, never an undesirable one
            avg = policy / counts.clamp(min=1)
            loss = loss + opt.ftx * (-avg[desirable]).mean()
        metrics = {"kl": kl}
        if desirable.any():
            metrics["rewards/chosen"] = rewards[desirable].mean()
        if (~desirable).any():
            metrics["rewards/rejected"] = rewards[~desirable].mean()
        return loss, metrics

    def _kl(self, ratios: torch.Tensor) -> torch.Tensor:
        """The batch's mean log-ratio over every rank, clamped at 0 (see the module docstring)."""
        total = torch.stack([ratios.sum(), torch.tensor(float(ratios.numel()), device=ratios.device)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        return (total[0] / total[1].clamp(min=1)).clamp(min=0).detach()

    @torch.no_grad()
    def reference_logps(self, model, inputs, labels) -> torch.Tensor:
        """Answer log-probabilities under the reference: the frozen model, or the policy with its adapter off."""
        if self.ref_model is not None:
            logits = self.ref_model(**inputs).logits
        else:
            unwrapped = self.accelerator.unwrap_model(model)
            if not hasattr(unwrapped, "disable_adapter"):
                raise RuntimeError("the reference is the model without its LoRA adapter, but the model has none; "
                                   "pass ref_model")
            with unwrapped.disable_adapter(), self.vision_passes(inputs):  # collective too when sharded
                logits = unwrapped(**inputs).logits
        return answer_logps(logits, labels)[0]

    def worst_case_step(self, log=None) -> dict:
        """The base's worst-case batch (both sides of its pairs, the reference too); its metrics are not logged."""
        out = super().worst_case_step(log)
        self._metrics["train"].clear()
        return out

    # evaluation and logging ---------------------------------------------------------------------------------------
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split = "train" if "loss" in logs else "eval" if "eval_loss" in logs else None
        if split is not None:
            prefix = "" if split == "train" else "eval_"
            for k, values in self._metrics[split].items():
                if values:
                    logs[prefix + k] = sum(values) / len(values)
            self._metrics[split].clear()
        super().log(logs, start_time)


def frozen_copy(model):
    """The starting model as the reference of a full / freeze run: a copy that never trains."""
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def precompute_reference(trainer: PreferenceTrainer, dataset, batch_size: int):
    """The dataset with the reference's answer log-probabilities of each row as columns (`ref_chosen_logps`, and
    `ref_rejected_logps` for pairs), computed once, in order; the collator hands them to the loss."""
    model = trainer.model
    was = model.training
    model.eval()
    chosen, rejected = [], []
    pairs = trainer.pref.stage == "dpo"
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        batch = trainer._prepare_inputs(trainer.data_collator(rows))
        batch = {k: v for k, v in batch.items() if k not in _EXTRA}
        labels = batch.pop("labels")
        with torch.no_grad(), trainer.compute_loss_context_manager():
            logps = _starting_logps(trainer, model, batch, labels).double().cpu().tolist()
        n = len(rows)
        chosen += logps[:n]
        rejected += logps[n:] if pairs else []
    model.train(was)
    dataset = dataset.add_column("ref_chosen_logps", chosen)
    return dataset.add_column("ref_rejected_logps", rejected) if pairs else dataset


def _starting_logps(trainer: PreferenceTrainer, model, batch, labels) -> torch.Tensor:
    """The reference's log-probabilities before any step: a full / freeze model without a ref_model is its own
    reference then (no copy needed)."""
    if trainer.ref_model is None and not hasattr(trainer.accelerator.unwrap_model(model), "disable_adapter"):
        return answer_logps(model(**batch).logits, labels)[0]
    return trainer.reference_logps(model, batch, labels)


def preference_trainer(cfg, model, loaded, train_ds, eval_ds, dtype, **kwargs) -> PreferenceTrainer:
    """The trainer of a dpo / kto run: its collator, its reference (module docstring) and, with
    precompute_ref_log_probs, the datasets with the reference's log-probabilities (the reference then freed)."""
    from ..data.stages.pair_collate import PreferenceCollator

    opt = PrefOptions.of(cfg.preference)
    ref = None
    if opt.needs_reference and cfg.ref_model:
        ref = load_reference(cfg, dtype)
    elif opt.needs_reference and cfg.finetuning_type != "lora" and not cfg.precompute_ref_log_probs:
        ref = frozen_copy(model)
    collator = PreferenceCollator(loaded.processor, loaded.spec, cutoff_len=cfg.cutoff_len,
                                  video=getattr(loaded, "video", None), stage=cfg.stage)
    trainer = PreferenceTrainer(model=model, data_collator=collator, train_dataset=train_ds, eval_dataset=eval_ds,
                                pref=opt, ref_model=ref, **kwargs)
    if opt.needs_reference and cfg.precompute_ref_log_probs:
        batch = cfg.per_device_eval_batch_size
        trainer.train_dataset = precompute_reference(trainer, train_ds, batch)
        if eval_ds is not None:
            trainer.eval_dataset = precompute_reference(trainer, eval_ds, batch)
        trainer.ref_model = None  # no reference model stays in memory
    return trainer


def load_reference(cfg, dtype):
    """`ref_model` (with `ref_model_adapters` merged in), frozen, in the training dtype."""
    from ..models.load import load_model

    ref = load_model(dataclasses.replace(cfg.model, model_name_or_path=cfg.ref_model),
                     dataclasses.replace(cfg.finetuning, quantization_bit=None), dtype=dtype)
    if cfg.ref_model_adapters:
        from peft import PeftModel

        ref = PeftModel.from_pretrained(ref, cfg.ref_model_adapters).merge_and_unload()
    return frozen_copy(ref)
