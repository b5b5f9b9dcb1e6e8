"""moe_aux_loss_coef: VlmTrainer adds coef × the router's load-balancing loss once, scaled for gradient
accumulation, logs it as aux_loss, and leaves the model's own coefficient as it was; null computes nothing."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

from vlmtune.models.load import apply_finetuning
from vlmtune.train.trainer import VlmTrainer

from _moe import cfg, moe_model

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])


def _trainer(tmp_path, model, coef, accumulation=2):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                             gradient_accumulation_steps=accumulation)
    trainer = VlmTrainer(model=model, args=args, spec=None, moe_aux_loss_coef=coef)
    trainer.current_gradient_accumulation_steps = accumulation  # set by the training loop at each step
    return trainer


@pytest.mark.parametrize("kind", ["qwen3_vl_moe", "qwen3_5_moe"])
def test_aux_loss_is_added_once_and_logged(tmp_path, kind):
    model = apply_finetuning(moe_model(kind), cfg(lora_target="all").finetuning)
    text = model.base_model.model.config.text_config
    own = text.router_aux_loss_coef
    with torch.no_grad():
        ce = model(input_ids=IDS, labels=IDS).loss  # router logits off: no aux term in it
        aux = model(input_ids=IDS, output_router_logits=True).aux_loss
    assert aux > 0
    trainer = _trainer(tmp_path, model, coef=0.5)
    assert trainer.model_accepts_loss_kwargs is False  # these classes say so: the Trainer divides by the 2 steps
    model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(model, {"input_ids": IDS, "labels": IDS}, num_items_in_batch=torch.tensor(9))
    torch.testing.assert_close(loss, ce + 0.5 * aux, rtol=1e-5, atol=1e-6)
    assert text.router_aux_loss_coef == own  # the model's own term stayed out, and its config is unchanged
    trainer.log({"loss": 1.0})
    assert trainer.state.log_history[-1]["aux_loss"] == pytest.approx(float(aux), rel=1e-5)


def test_aux_loss_of_a_loss_normalised_over_the_step_is_divided_here(tmp_path):
    model = apply_finetuning(moe_model("qwen3_vl_moe"), cfg(lora_target="all").finetuning)
    items = torch.tensor(9)  # label tokens of the step's two micro-batches
    with torch.no_grad():
        ce = model(input_ids=IDS, labels=IDS, num_items_in_batch=items).loss
        aux = model(input_ids=IDS, output_router_logits=True).aux_loss
    trainer = _trainer(tmp_path, model, coef=0.5)
    trainer.model_accepts_loss_kwargs = True  # as for a model whose loss is divided by the step's tokens
    model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(model, {"input_ids": IDS, "labels": IDS}, num_items_in_batch=items)
    torch.testing.assert_close(loss, ce + 0.5 * aux / 2, rtol=1e-5, atol=1e-6)


def test_no_coefficient_computes_nothing(tmp_path):
    model = apply_finetuning(moe_model("qwen3_vl_moe"), cfg(lora_target="all").finetuning)
    trainer = _trainer(tmp_path, model, coef=None)
    model.train()
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(model, {"input_ids": IDS, "labels": IDS}, return_outputs=True)
    assert outputs.aux_loss is None and outputs.router_logits is None
    trainer.log({"loss": float(loss)})
    assert "aux_loss" not in trainer.state.log_history[-1]


def test_a_ddp_wrapped_model_gets_the_same_aux_term(tmp_path):
    """Under torchrun the Trainer hands compute_loss the DistributedDataParallel wrapper: the model's own coefficient
    is still found (through accelerate's unwrap_model) and held at 0."""
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = apply_finetuning(moe_model("qwen3_vl_moe"), cfg(lora_target="all").finetuning)
    with torch.no_grad():
        ce = model(input_ids=IDS, labels=IDS).loss
        aux = model(input_ids=IDS, output_router_logits=True).aux_loss
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        trainer = _trainer(tmp_path, model, coef=0.5)
        wrapped.train()
        with torch.no_grad():
            loss = trainer.compute_loss(wrapped, {"input_ids": IDS, "labels": IDS})
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(loss, ce + 0.5 * aux, rtol=1e-5, atol=1e-6)
