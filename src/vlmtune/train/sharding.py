"""Sharded training: FSDP2 and DeepSpeed ZeRO through the keys users already have.

Two ways in, one result:
- the config's `fsdp` / `fsdp_config` (the Trainer's keys, as LLaMA-Factory passes them), turned into the
  Trainer's FSDP2 arguments here;
- `accelerate launch --config_file fsdp2.yaml`, which sets ACCELERATE_USE_FSDP and FSDP_* in the environment;
  the Accelerator reads them itself, and this module only fills in the wrap classes.
Either way the units FSDP2 shards (fully_shard per module) are the family's decoder layers and vision blocks
(models/families.py), so every family is sharded the same way whatever its `_no_split_modules` says.

accelerate only engages FSDP for GPU-like devices; on CPU ranks (gloo) it silently falls back to DDP. The
Trainer's CPU accelerator is switched to FSDP here (`engage_fsdp_on_cpu`) so that `fsdp` means the same on a
CPU as on a GPU: that is what lets the 2-rank gloo tests check FSDP2 against DDP.
"""

from __future__ import annotations

import os

from ..config.cross_checks import FSDP1_CONFIG_KEYS, fsdp_settings
from ..errors import ConfigError
from ..models.families import FAMILIES

_TRUE = ("1", "true", "yes")


def wrap_classes(model_type: str) -> list[str]:
    """The family's decoder layer and vision block class names (what FSDP2 shards as one unit each)."""
    family = FAMILIES.get(model_type)
    if family is None or not family.wrap_classes:
        raise ConfigError([f"model_type={model_type!r} has no wrap classes in vlmtune's family table, so it cannot "
                           "be sharded with fsdp; train it with DDP or DeepSpeed instead"])
    return list(family.wrap_classes)


def accelerate_fsdp(environ=os.environ) -> bool:
    """Launched by `accelerate launch` with an FSDP config (it sets ACCELERATE_USE_FSDP for every rank)."""
    return environ.get("ACCELERATE_USE_FSDP", "false").lower() in _TRUE


def sharding_of(cfg) -> str | None:
    """"fsdp", "deepspeed" or None: how this run shards (the config's keys, or accelerate launch's FSDP)."""
    if cfg.fsdp or accelerate_fsdp():
        return "fsdp"
    if cfg.deepspeed:
        return "deepspeed"
    return None


def one_process_fsdp(cfg, environ=os.environ) -> str | None:
    """The problem of `fsdp` in a run of one process: FSDP shards the model across processes, and the Trainer
    refuses it alone only after the data is prepared and the model loaded (and leaves ACCELERATE_USE_FSDP set in
    the environment for the next run in the process)."""
    if not cfg.fsdp or int(environ.get("WORLD_SIZE", "1")) > 1:
        return None
    return (f"fsdp: {cfg.fsdp!r} shards the model across processes, but this run is one process (no WORLD_SIZE); "
            "launch it on several: `torchrun --nproc_per_node N -m vlmtune train <config>` (docs/sharding.md), or "
            "set fsdp: null to train on one")


def zero_stage(deepspeed: str | dict | None) -> int:
    """The ZeRO stage of a DeepSpeed config (a JSON path or a dict); 0 without one or when it cannot be read
    (the Trainer reports an unreadable file itself)."""
    if not deepspeed:
        return 0
    conf = deepspeed
    if not isinstance(conf, dict):
        import json

        try:
            with open(deepspeed, encoding="utf-8") as fh:
                conf = json.load(fh)
        except (OSError, ValueError):
            return 0
    stage = (conf.get("zero_optimization") or {}).get("stage", 0) if isinstance(conf, dict) else 0
    return stage if isinstance(stage, int) else 0


def fsdp_reshards(cfg, environ=os.environ) -> bool | None:
    """Under FSDP: whether weights are resharded after each forward (full_shard, ZeRO-3-like: True) or kept
    gathered until the backward (shard_grad_op, ZeRO-2-like: False); None without FSDP."""
    if cfg.fsdp:
        settings = fsdp_settings(cfg.fsdp_config)
        return str(settings.get("reshard_after_forward", "full_shard" in cfg.fsdp.split())).lower() in _TRUE
    if accelerate_fsdp(environ):
        return environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in _TRUE
    return None


def fsdp_wrap_classes(cfg, model_type: str, environ=os.environ) -> list[str]:
    """The classes this run's FSDP shards as units: fsdp_config's (or the accelerate config's) when named, else
    the family's. Raises ConfigError for a family without wrap classes."""
    named = fsdp_settings(cfg.fsdp_config).get("transformer_layer_cls_to_wrap") if cfg.fsdp else \
        environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
    if named:
        return [named] if isinstance(named, str) and "," not in named else \
            [c.strip() for c in (named.split(",") if isinstance(named, str) else named)]
    return wrap_classes(model_type)


def fsdp_arguments(cfg, model_type: str) -> dict:
    """The Trainer's fsdp / fsdp_config for the config's keys: FSDP2, transformer-based wrapping of the family's
    classes unless fsdp_config names others, full_shard → reshard after forward, offload → CPU offload."""
    if not cfg.fsdp:
        return {}
    options = cfg.fsdp.split()
    settings = fsdp_settings(cfg.fsdp_config)
    conf = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": wrap_classes(model_type),
            "reshard_after_forward": "full_shard" in options, "state_dict_type": "FULL_STATE_DICT"}
    if "offload" in options:
        conf["cpu_offload"] = True
    if "offload_params" in settings:  # accelerate's spelling of cpu_offload
        settings["cpu_offload"] = settings.pop("offload_params")
    conf.update({k: v for k, v in settings.items() if k not in FSDP1_CONFIG_KEYS})  # named as notes by the config
    return {"fsdp": True, "fsdp_config": conf}


def fill_accelerate_env(model_type: str, environ=os.environ) -> list[str]:
    """Under `accelerate launch` with FSDP: FSDP2 only, and the family's wrap classes where the accelerate config
    names none. Returns what was filled in, for the log."""
    if not accelerate_fsdp(environ):
        return []
    version = environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError([f"accelerate launch runs FSDP version {version} (fsdp_version in the accelerate "
                           "config); vlmtune runs FSDP2 only: set fsdp_version: 2 in the accelerate config"])
    filled = []
    if not environ.get("FSDP_AUTO_WRAP_POLICY"):
        environ["FSDP_AUTO_WRAP_POLICY"] = "TRANSFORMER_BASED_WRAP"
        filled.append("fsdp_auto_wrap_policy=TRANSFORMER_BASED_WRAP")
    if environ["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP" and not environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP"):
        environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] = ",".join(wrap_classes(model_type))
        filled.append(f"fsdp_transformer_layer_cls_to_wrap={environ['FSDP_TRANSFORMER_CLS_TO_WRAP']}")
    return filled


def engage_fsdp_on_cpu(accelerator) -> bool:
    """accelerate's state keeps MULTI_CPU (plain DDP over gloo) even when given an FSDP plugin; give it the
    plugin's distributed type so that prepare() shards the model with fully_shard. True when it did."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = getattr(state, "fsdp_plugin", None)
    if plugin is None:
        if not accelerate_fsdp():
            return False
        plugin = FullyShardedDataParallelPlugin()
    # AcceleratorState shares its attributes between instances and copies PartialState's in at every
    # AcceleratorState(): both are set, as AcceleratorState's own set-up does for a GPU.
    from accelerate.state import PartialState

    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def engage_deepspeed_on_cpu(accelerator, plugin) -> bool:
    """As engage_fsdp_on_cpu, for DeepSpeed: accelerate skips DeepSpeed when the device is a CPU; with its CPU
    accelerator (DS_ACCELERATOR=cpu, gloo) DeepSpeed runs ZeRO-2/3 there, which is how the CPU tests check it."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if plugin is None or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's comm layer adopts the gloo group started here
    plugin.set_mixed_precision(state.mixed_precision)
    plugin.select(_from_accelerator_state=True)
    state.deepspeed_plugins = plugin
    state.distributed_type = DistributedType.DEEPSPEED
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    return True


def dataset_modalities(train_dataset) -> tuple[str, ...]:
    """The vision inputs the data holds ("image", "video"), in the order the model runs them. Under sharding each
    rank runs the tower once per such modality in every micro-batch, on real or dummy pixels, so this must be
    the same on every rank: it is, since every rank reads the same prepared dataset. A stream cannot be read
    ahead, so it counts as holding both."""
    columns = getattr(train_dataset, "column_names", None)
    if not columns:
        return ("image", "video")
    held = []
    for modality, column in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
        if column in columns and any(len(g) for g in train_dataset[column]):
            held.append(modality)
    return tuple(held)
