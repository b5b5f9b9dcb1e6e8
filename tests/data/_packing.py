"""Shared assertions of the packing tests."""

from __future__ import annotations

import torch


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(model, packed: dict, unpacked: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed batch's loss equals the unpacked one's (relative 1e-4) and so does every gradient."""
    lp, gp = loss_and_grads(model, packed)
    lu, gu = loss_and_grads(model, unpacked)
    assert torch.allclose(lp, lu, rtol=1e-4, atol=0)
    assert gp.keys() == gu.keys()
    for name in gp:
        assert torch.allclose(gp[name], gu[name], rtol=1e-3, atol=1e-6), name
    return lp, lu
