"""Packing that stays exact on hybrid models: no recurrent or convolution state crosses a packed sample boundary.

Qwen3.5's gated-delta linear-attention layers carry state along the sequence: a causal conv1d over the last few
tokens and the delta rule's recurrent state. vlmtune packs samples into one row with positions restarting at each
sample and no attention mask; the full-attention layers then see a block-diagonal mask (transformers derives it
from the restarting positions), but transformers' PyTorch reference of `causal_conv1d_fn` and
`chunk_gated_delta_rule` ignores sample boundaries, so the state of one sample flows into the next (the
flash-linear-attention and causal-conv1d kernels honour `cu_seqlens` / `seq_idx`, but only when they are given).

`keep_packed_samples_apart(model)` makes each linear-attention layer boundary-aware:

* a forward pre-hook on each linear-attention decoder layer finds the sample boundaries exactly as transformers
  does for the full-attention mask (`find_packed_sequence_indices`: where the text position does not step by 1;
  only without an attention mask and without a cache, i.e. in packed training) and hands them to the layer;
* the layer then runs either the kernels with the boundaries (`cu_seqlens` for the delta rule, `seq_idx` for the
  conv; the batch is flattened into one row, as the kernels take boundaries for a single row) when both kernel
  packages are installed and the tensors are on a GPU, or, everywhere else, once per sample: each sample's conv
  starts from zero padding and its recurrence from a zero state, exactly as when it is alone.

A model whose layers carry state of a kind this module does not know is refused (`PackingRefused`), never packed
with a leak. tests/train/test_hybrid_packing.py checks packed == unpacked (loss and gradients) and that the test
fails with the boundary-aware path switched off.
"""

from __future__ import annotations

import functools
import importlib

from ..errors import VlmtuneError

SEGMENTS_KWARG = "vlmtune_sample_index"  # (batch, length) index of each token's packed sample
LINEAR_ATTENTION = "linear_attention"
_KNOWN_LAYER_TYPES = {"full_attention", LINEAR_ATTENTION}


class PackingRefused(VlmtuneError):
    """Packing cannot be made exact for this model."""


def linear_attention_layers(model) -> list:
    """The decoder layers with a gated-delta linear-attention mixer (`linear_attn`)."""
    return [m for m in model.modules()
            if getattr(m, "block_type", None) == LINEAR_ATTENTION or _is_gated_delta(getattr(m, "linear_attn", None))]


def _is_gated_delta(module) -> bool:
    return module is not None and type(module).__name__.endswith("GatedDeltaNet")


def kernels_installed() -> dict[str, bool]:
    """Whether transformers will run the linear-attention layers with the fast kernels, per package (it picks them
    the same way: flash-linear-attention's chunk_gated_delta_rule, causal-conv1d's causal_conv1d_fn)."""
    return {"flash-linear-attention": _importable("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
            "causal-conv1d": _importable("causal_conv1d", "causal_conv1d_fn")}


def _importable(module: str, name: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), name)
    except Exception:  # a broken install (no GPU toolkit, ABI mismatch) is no kernel either
        return False


def keep_packed_samples_apart(model) -> str:
    """Make packed training exact on `model`; returns how: "no recurrent layers", or "per sample or kernels".

    Raises PackingRefused when the model has stateful layers this cannot keep apart."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", config)
    types = set(getattr(text, "layer_types", None) or ())
    unknown = types - _KNOWN_LAYER_TYPES - {"sliding_attention"}
    if unknown:
        raise PackingRefused(
            f"packing: true cannot be made exact on this model: its layer types {sorted(unknown)} carry state "
            "across positions that vlmtune cannot keep inside each packed sample; set packing: false")
    layers = linear_attention_layers(model)
    if LINEAR_ATTENTION in types and len(layers) != sum(t == LINEAR_ATTENTION for t in text.layer_types):
        raise PackingRefused(
            f"packing: true cannot be made exact on this model: its config has "
            f"{sum(t == LINEAR_ATTENTION for t in text.layer_types)} linear-attention layers but vlmtune found "
            f"{len(layers)} gated-delta layers it can keep apart; set packing: false")
    for layer in layers:
        _segment_aware(layer)
    return "per sample or kernels" if layers else "no recurrent layers"


def _segment_aware(layer) -> None:
    if getattr(layer, "_vlmtune_segment_aware", False):
        return
    layer.register_forward_pre_hook(_find_samples, with_kwargs=True)
    mixer = layer.linear_attn
    mixer.forward = _per_sample_forward(mixer.forward)
    layer._vlmtune_segment_aware = True


def _find_samples(layer, args, kwargs):
    """Each token's packed sample, from the text positions, under transformers' own condition for the packed
    full-attention mask (no attention mask, no cache)."""
    from transformers.masking_utils import find_packed_sequence_indices

    positions = kwargs.get("position_ids")
    if positions is None or kwargs.get("attention_mask") is not None or kwargs.get("cache") is not None:
        return None
    if positions.ndim == 3:  # (rows, batch, length): the text row is the first
        positions = positions[0]
    samples = find_packed_sequence_indices(positions)
    if samples is None:
        return None
    return args, {**kwargs, SEGMENTS_KWARG: samples}


def _per_sample_forward(forward):
    """The mixer's forward, run per packed sample (or by the kernels with the boundaries) when it is given them."""

    @functools.wraps(forward)
    def run(hidden_states, *args, **kwargs):
        samples = kwargs.pop(SEGMENTS_KWARG, None)
        if samples is None:
            return forward(hidden_states, *args, **kwargs)
        if kwargs.get("cache") is not None or kwargs.get("attention_mask") is not None:
            raise PackingRefused("a packed batch reached a linear-attention layer with a cache or attention mask; "
                                 "packed training runs without both (set packing: false to pad instead)")
        if _kernels_for(hidden_states):
            return _with_kernels(forward, hidden_states, samples, args, kwargs)
        return _one_sample_at_a_time(forward, hidden_states, samples, args, kwargs)

    return run


def _kernels_for(hidden_states) -> bool:
    """Both kernel packages installed (transformers then runs them) and the tensors on a GPU (they need one)."""
    return hidden_states.is_cuda and all(kernels_installed().values())


def _lengths(samples_row) -> list[int]:
    import torch

    return torch.unique_consecutive(samples_row, return_counts=True)[1].tolist()


def _one_sample_at_a_time(forward, hidden_states, samples, args, kwargs):
    """Each sample alone: its conv from zero padding, its recurrence from a zero state (what it gets unpacked)."""
    import torch

    rows = []
    for b in range(hidden_states.shape[0]):
        pieces, start = [], 0
        for n in _lengths(samples[b]):
            pieces.append(forward(hidden_states[b : b + 1, start : start + n], *args, **kwargs))
            start += n
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows, dim=0)


def _with_kernels(forward, hidden_states, samples, args, kwargs):
    """The kernels with the boundaries: the batch flattened into one row (they take the boundaries of one row);
    `cu_seq_lens_q` reaches the delta rule as its cu_seqlens, `seq_idx` the conv."""
    import torch

    batch, length, width = hidden_states.shape
    lengths = [n for b in range(batch) for n in _lengths(samples[b])]
    counts = torch.tensor(lengths, device=hidden_states.device)
    cu_seqlens = torch.nn.functional.pad(counts.cumsum(0), (1, 0))
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths), device=hidden_states.device, dtype=torch.int32),
                                      counts).unsqueeze(0)
    out = forward(hidden_states.reshape(1, batch * length, width), *args, cu_seq_lens_q=cu_seqlens, seq_idx=seq_idx,
                  **kwargs)
    return out.reshape(batch, length, -1)
