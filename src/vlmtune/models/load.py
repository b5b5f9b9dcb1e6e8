"""Loading processors and models from a hub id or a local path, the way transformers does it.

trust_remote_code is never turned on here: it is passed through only when the user set it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import ModelSpec


@dataclass
class Loaded:
    processor: object
    config: object
    spec: ModelSpec


def load_processor(model_name_or_path: str, *, trust_remote_code: bool = False, cache_dir: str | None = None):
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(
        model_name_or_path, trust_remote_code=trust_remote_code, cache_dir=cache_dir
    )
    config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code, cache_dir=cache_dir)
    return processor, config


def load_spec(
    model_name_or_path: str,
    *,
    image_min_pixels: int | None = None,
    image_max_pixels: int | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
) -> Loaded:
    """Processor, config and the ModelSpec with the user's pixel bounds applied."""
    processor, config = load_processor(model_name_or_path, trust_remote_code=trust_remote_code, cache_dir=cache_dir)
    spec = ModelSpec.from_processor(processor, config).with_pixels(image_min_pixels, image_max_pixels)
    return Loaded(processor=processor, config=config, spec=spec)
