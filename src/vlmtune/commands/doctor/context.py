"""What every doctor check reads: the `Context` (config, device, model, data facts, environment), filled once
by `load_context` and `data.read_data`, and the few readings of it that several checks share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...errors import VlmtuneError
from ...models.families import display_name
from .data import DataFacts
from .device import DeviceInfo
from .memory import ModelFacts, meta_model, model_facts


@dataclass
class Context:
    cfg: Any
    device: DeviceInfo
    loaded: Any = None
    model: Any = None
    model_error: str | None = None
    facts: "ModelFacts | None" = None
    facts_error: str | None = None
    data: DataFacts | None = None
    data_error: str | None = None
    env: dict = field(default_factory=dict)


def load_context(ctx: Context, loaded, model) -> None:
    cfg = ctx.cfg
    try:
        if loaded is None:
            from ...models.load import load_spec

            loaded = load_spec(cfg.model, cfg.fit)
        ctx.loaded = loaded
        ctx.model = model if model is not None else meta_model(loaded.config, cfg.trust_remote_code)
    except Exception as e:  # any failure to load is reported by check_model, the other checks go on
        ctx.model_error = f"{type(e).__name__}: {e}"
        return
    try:
        ctx.facts = model_facts(ctx.model.config, cfg, trust_remote_code=cfg.trust_remote_code)
    except VlmtuneError as e:  # lora_target matches nothing: the vision check says so
        ctx.facts_error = "; ".join(getattr(e, "problems", None) or [str(e)])
    except Exception as e:  # an unexpected config: the memory check says it could not estimate
        ctx.facts_error = f"{type(e).__name__}: {e}"


def model_type(ctx: Context) -> str | None:
    return getattr(ctx.loaded.config, "model_type", None) if ctx.loaded is not None else None


def family(ctx: Context) -> str:
    t = model_type(ctx)
    return f"{display_name(t)} ({t})"


def worst_batch(ctx: Context, batch: int) -> tuple[int, int, str]:
    """(padded sequence length, vision tokens) of the worst batch of `batch` rows, and where they come from.

    group_by_length batches rows of similar length, so the worst batch holds the longest rows: the length
    is the longest row's, the vision tokens (image + video pads: one vision feature each, merge² patches of
    temporal_patch_size frames for both) the sum of the `batch` rows with the most. Without data: cutoff_len
    tokens per row, max_image_token_share of them image tokens.
    """
    cfg = ctx.cfg
    d = ctx.data
    if d is not None and d.rows:
        return d.longest, d.image_prefix[min(batch, len(d.rows))], "the longest fitted rows of the data"
    share = int(cfg.max_image_token_share * cfg.cutoff_len)
    return cfg.cutoff_len, batch * share, f"no data: assumed {cfg.cutoff_len} tokens, {share} of them image tokens, per row"


def world_size(ctx: Context) -> int:
    v = ctx.env.get("WORLD_SIZE", "1")
    return max(1, int(v)) if v.isdigit() else 1
