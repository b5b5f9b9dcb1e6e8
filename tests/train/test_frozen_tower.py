"""A frozen vision tower stays out of the backward: no vision parameter or activation is in the autograd graph.

Each case builds the real training setup (`recipe.setup`: the tiny checkpoint, PEFT, gradient checkpointing,
the Trainer) and runs one forward/backward on its longest batch, then reads the graph three ways: the
parameters the loss's graph accumulates into, whether the vision modules' outputs require grad, and whether a
backward hook on the first vision block fires.
"""

from __future__ import annotations

import pytest
import torch

from vlmtune.train import recipe


def graph_parameters(loss, model) -> set[str]:
    """Names of the parameters the loss's autograd graph accumulates gradients into."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    seen, names, todo = set(), set(), [loss.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None and id(var) in by_id:
            names.add(by_id[id(var)])
        todo += [f for f, _ in fn.next_functions]
    return names


def visual_of(model):
    return next(m for n, m in model.named_modules() if n.split(".")[-1] == "visual")


def probe(run) -> dict:
    """One forward/backward on the first (longest) batch, with hooks on the vision tower."""
    trainer = run.trainer
    model = trainer.model
    visual = visual_of(model)
    block, patch = visual.blocks[0], visual.patch_embed
    seen = {"block_out_grad": [], "patch_out_grad": [], "block_backward": 0}
    handles = [
        block.register_forward_hook(lambda m, i, o: seen["block_out_grad"].append(
            (o[0] if isinstance(o, tuple) else o).requires_grad)),
        patch.register_forward_hook(lambda m, i, o: seen["patch_out_grad"].append(o.requires_grad)),
        block.register_full_backward_hook(lambda m, gi, go: seen.__setitem__("block_backward",
                                                                             seen["block_backward"] + 1)),
    ]
    ds = trainer.train_dataset
    rows = [ds[i] for i in range(len(ds)) if ds[i]["images"]][:1]
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    model.train()
    try:
        loss = model(**batch).loss
        seen["graph"] = graph_parameters(loss, model)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    seen["vision_grads"] = sorted(f"visual.{n}" for n, p in visual.named_parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return seen


def part(name: str) -> str:
    parts = name.split(".")
    if "visual" not in parts:
        return "llm"
    return "projector" if "merger" in parts or "deepstack_merger_list" in parts else "vision"


CASES = {
    # name: (arch, keys, the vision tower trains, the projector trains)
    "lora": ("qwen2_vl", {}, False, False),
    "lora-no-checkpointing": ("qwen2_vl", {"gradient_checkpointing": False}, False, False),
    "lora-projector": ("qwen2_vl", {"freeze_multi_modal_projector": False}, False, True),
    "full": ("qwen2_vl", {"finetuning_type": "full"}, False, False),
    "qwen2_5-lora": ("qwen2_5_vl", {}, False, False),
    "qwen3-lora": ("qwen3_vl", {}, False, False),
    "lora-vision": ("qwen2_vl", {"freeze_vision_tower": False}, True, False),
    "lora-vision-no-checkpointing": ("qwen2_vl", {"freeze_vision_tower": False, "gradient_checkpointing": False},
                                     True, False),
    "full-vision": ("qwen2_vl", {"finetuning_type": "full", "freeze_vision_tower": False}, True, False),
    "qwen3-lora-vision": ("qwen3_vl", {"freeze_vision_tower": False}, True, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_vision_tower_is_in_the_backward_exactly_when_it_trains(case, make_config, write_dataset, out_dir):
    arch, keys, tower_trains, projector_trains = CASES[case]
    cfg = make_config(arch, write_dataset(["one", "two"]), out_dir, **keys)
    run = recipe.setup(cfg, progress=False)
    seen = probe(run)
    in_graph = {part(n) for n in seen["graph"]}
    assert "llm" in in_graph
    assert ("vision" in in_graph) is tower_trains
    assert ("projector" in in_graph) is projector_trains
    assert seen["block_out_grad"] and all(g is tower_trains for g in seen["block_out_grad"])
    # patch_embed (a Conv3d, never a LoRA target) trains only in full fine-tuning of the tower
    patch_trains = tower_trains and keys.get("finetuning_type") == "full"
    assert seen["patch_out_grad"] and all(g is patch_trains for g in seen["patch_out_grad"])
    assert (seen["block_backward"] > 0) is tower_trains
    vision_grads = {part(n) for n in seen["vision_grads"]}
    assert ("vision" in vision_grads) is tower_trains
    assert ("projector" in vision_grads) is projector_trains


def test_the_hooks_transformers_adds_would_put_a_frozen_tower_in_the_backward(make_config, write_dataset,
                                                                               out_dir):
    """The probe can fail: with transformers' input-embedding hooks put back and the no_grad wrapper taken off
    (what setup did before), the frozen tower's first block runs its backward and its output requires grad,
    although no vision parameter trains. With the hooks back but the wrapper kept, the tower stays out."""
    cfg = make_config("qwen2_vl", write_dataset(["one"]), out_dir)
    run = recipe.setup(cfg, progress=False)
    run.trainer.model.get_base_model().enable_input_require_grads()
    seen = probe(run)
    assert seen["block_backward"] == 0 and not any(seen["block_out_grad"])
    del visual_of(run.trainer.model).forward  # the class's own forward again
    seen = probe(run)
    assert seen["block_backward"] > 0
    assert seen["block_out_grad"] and all(seen["block_out_grad"])
    assert {part(n) for n in seen["graph"]} == {"llm"}  # still no vision parameter: only activations


def test_a_frozen_visual_module_runs_under_no_grad_and_follows_unfreezing(make_config, write_dataset, out_dir):
    cfg = make_config("qwen2_vl", write_dataset(["one"]), out_dir)
    run = recipe.setup(cfg, progress=False)
    visual = visual_of(run.trainer.model)
    spec = run.loaded.spec
    m, p, t = spec.merge_size, spec.patch_size, spec.temporal_patch_size
    pixels = torch.randn(m * m, 3 * t * p * p, requires_grad=True)
    grid = torch.tensor([[1, m, m]])
    out = visual(pixels, grid_thw=grid).pooler_output
    assert out.grad_fn is None and not out.requires_grad
    visual.blocks[0].mlp.fc1.base_layer.weight.requires_grad_(True) if hasattr(
        visual.blocks[0].mlp.fc1, "base_layer") else visual.blocks[0].mlp.fc1.weight.requires_grad_(True)
    out = visual(pixels, grid_thw=grid).pooler_output
    assert out.requires_grad
