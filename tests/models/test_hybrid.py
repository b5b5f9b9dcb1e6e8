"""Packing on hybrid models (models/hybrid.py): packed == unpacked in loss and gradients on the tiny Qwen3.5 (and
Qwen3.5-MoE), and the same comparison fails with the boundary-aware path switched off, so it can fail."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlmtune.data.stages.collate import Collator
from vlmtune.data.stages.encode import Encoder, emit
from vlmtune.data.media.images import read_header
from vlmtune.data.stages.pack import pack_rows
from vlmtune.data.types import Conversation, ImagePart, Message, TextPart
from vlmtune.models import hybrid
from vlmtune.models.load import load_spec

RTOL = 1e-4


def _rows(loaded, tmp_path, make_image):
    paths = [str(make_image(tmp_path / f"p{k}.png", w, h, color=(50 * k, 90, 200 - 40 * k)))
             for k, (w, h) in enumerate([(120, 90), (64, 200), (150, 150)])]
    img = [ImagePart(p, p) for p in paths]
    T = TextPart
    convs = [
        Conversation("a", "d:1", [Message("user", [img[0], T("What colour?")]), Message("assistant", [T("red")])]),
        Conversation("b", "d:2", [Message("user", [T("Say hi.")]), Message("assistant", [T("hi there")])]),
        Conversation("c", "d:3", [Message("user", [T("Compare "), img[1], T(" with "), img[2]]),
                                  Message("assistant", [T("the second is bigger")])]),
        Conversation("d", "d:4", [Message("user", [T("Count the dots.")]), Message("assistant", [T("three")])]),
    ]
    enc = Encoder(loaded.processor, loaded.spec).encode_many(convs, {p: read_header(p) for p in paths})
    return [emit(e, loaded.spec).to_dict() for e in enc]


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_packed_equals_unpacked(model, loaded, rows, per_row: int):
    """Rows packed `per_row` samples at a time vs the same rows padded: loss and every gradient, rel 1e-4."""
    cutoff = max(sum(len(r["input_ids"]) for r in rows[i : i + per_row]) for i in range(0, len(rows), per_row))
    packed = [p for i in range(0, len(rows), per_row) for p in pack_rows(rows[i : i + per_row], cutoff)]
    assert [len(p["segments"]) for p in packed] == [per_row] * (len(rows) // per_row)
    collate = Collator(loaded.processor, loaded.spec, cutoff_len=cutoff)
    lp, gp = _loss_and_grads(model, collate(packed))
    lu, gu = _loss_and_grads(model, collate(rows))
    assert abs(lp.item() - lu.item()) <= RTOL * abs(lu.item())
    assert gp.keys() == gu.keys()
    for name in gu:
        assert torch.allclose(gp[name], gu[name], rtol=RTOL, atol=1e-6), name


@pytest.fixture(scope="module", params=["qwen3_5", "qwen3_5_moe"])
def family(request, tiny_ckpt):
    path = str(tiny_ckpt(request.param))
    return load_spec(path), path


def _model(path):
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("per_row", [4, 2])  # one packed row of four samples; two rows of two (a batch of 2)
def test_packed_equals_unpacked_with_the_boundary_aware_path(family, tmp_path, make_image, per_row):
    loaded, path = family
    model = _model(path)
    assert hybrid.keep_packed_samples_apart(model) == "per sample or kernels"
    assert len(hybrid.linear_attention_layers(model)) == 3
    assert_packed_equals_unpacked(model, loaded, _rows(loaded, tmp_path, make_image), per_row)


def test_without_the_boundary_aware_path_the_state_leaks(family, tmp_path, make_image):
    # the same comparison on the model as transformers builds it: recurrent and conv state cross the boundaries
    loaded, path = family
    with pytest.raises(AssertionError):
        assert_packed_equals_unpacked(_model(path), loaded, _rows(loaded, tmp_path, make_image), 4)


def test_the_kernels_get_the_boundaries(family, tmp_path, make_image, monkeypatch):
    """Where flash-linear-attention and causal-conv1d run (a GPU), the batch is flattened into one row and the
    kernels get `cu_seqlens` / `seq_idx`. Stand-ins with the kernels' boundary semantics (each sample from a zero
    state), built on transformers' reference, check that plumbing on the CPU."""
    import importlib

    loaded, path = family
    model = _model(path)
    modeling = importlib.import_module(type(hybrid.linear_attention_layers(model)[0].linear_attn).__module__)
    reference_conv, reference_rule = modeling.causal_conv1d_fn, modeling.torch_chunk_gated_delta_rule
    seen = []

    def conv(x, weight, bias=None, activation=None, seq_idx=None, **kwargs):
        if seq_idx is None:  # the padded batch
            return reference_conv(x, weight, bias, activation=activation)
        assert x.shape[0] == 1 and seq_idx.shape == (1, x.shape[-1]) and seq_idx.dtype == torch.int32
        lengths = torch.unique_consecutive(seq_idx[0], return_counts=True)[1].tolist()
        seen.append(("conv", lengths))
        pieces = torch.split(x, lengths, dim=-1)
        return torch.cat([reference_conv(p, weight, bias, activation=activation) for p in pieces], dim=-1)

    def rule(q, k, v, g, beta, cu_seqlens=None, **kwargs):
        kwargs = {k: kwargs[k] for k in ("initial_state", "output_final_state", "use_qk_l2norm_in_kernel")}
        if cu_seqlens is None:
            return reference_rule(q, k, v, g=g, beta=beta, **kwargs)
        assert q.shape[0] == 1 and cu_seqlens.dtype == torch.long
        lengths = cu_seqlens.diff().tolist()
        seen.append(("rule", lengths))
        outs = [reference_rule(*(t.split(lengths, dim=1)[i] for t in (q, k, v)), g=g.split(lengths, dim=1)[i],
                               beta=beta.split(lengths, dim=1)[i], **kwargs)[0] for i in range(len(lengths))]
        return torch.cat(outs, dim=1), None

    monkeypatch.setattr(modeling, "causal_conv1d_fn", conv)
    monkeypatch.setattr(modeling, "torch_chunk_gated_delta_rule", rule)
    monkeypatch.setattr(hybrid, "_kernels_for", lambda hidden_states: True)
    hybrid.keep_packed_samples_apart(model)
    rows = _rows(loaded, tmp_path, make_image)
    assert_packed_equals_unpacked(model, loaded, rows, 2)
    # two packed rows of two samples each (the shorter row's padding is a segment of its own), one row flattened
    first, second = (len(r["input_ids"]) for r in rows[:2])
    third, fourth = (len(r["input_ids"]) for r in rows[2:])
    width = max(first + second, third + fourth)
    want = [n for n in (first, second, width - first - second, third, fourth, width - third - fourth) if n]
    assert ("conv", want) in seen and ("rule", want) in seen


def test_other_stateful_layers_refuse_packing(tiny_ckpt):
    model = _model(str(tiny_ckpt("qwen3_5")))
    model.config.text_config.layer_types = ["mamba"] + model.config.text_config.layer_types[1:]
    with pytest.raises(hybrid.PackingRefused, match=r"packing: true cannot be made exact on this model: its layer "
                                                    r"types \['mamba'\] carry state .*; set packing: false"):
        hybrid.keep_packed_samples_apart(model)


def test_families_without_linear_attention_need_nothing(tiny_ckpt):
    model = _model(str(tiny_ckpt("qwen3_vl_moe")))
    assert hybrid.keep_packed_samples_apart(model) == "no recurrent layers"
    assert hybrid.linear_attention_layers(model) == []
