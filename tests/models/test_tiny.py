"""The tiny checkpoints load and behave like hub Qwen-VL checkpoints (real transformers classes)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vlmtune.models.grid import grid_for
from vlmtune.models.spec import ModelSpec
from vlmtune.models.tiny import ARCHS, build_tiny_checkpoint
from vlmtune.models.tiny_tokenizer import QWEN3_5_ADDED_TOKENS, SPECIAL_TOKENS

FAMILY_CLASS = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
    "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor"),
    "qwen3_5": ("Qwen3_5ForConditionalGeneration", "Qwen3VLProcessor"),
    "qwen3_5_moe": ("Qwen3_5MoeForConditionalGeneration", "Qwen3VLProcessor"),
}
TOKENIZER_CLASS = {a: "Qwen3_5Tokenizer" if a.startswith("qwen3_5") else "Qwen2Tokenizer" for a in FAMILY_CLASS}


def test_archs_and_classes_come_from_the_family_table():
    from vlmtune.models.families import FAMILIES

    assert ARCHS == tuple(FAMILY_CLASS)
    assert {t: (f.model_class, f.processor_class) for t, f in FAMILIES.items()} == FAMILY_CLASS

# The special tokens come right after the 1500 trained BPE tokens, in the real checkpoints' order.
EXPECTED_IDS = {
    "<|endoftext|>": 1500,
    "<|im_start|>": 1501,
    "<|im_end|>": 1502,
    "<|vision_start|>": 1509,
    "<|vision_end|>": 1510,
    "<|image_pad|>": 1512,
    "<|video_pad|>": 1513,
}

TWO_TURNS = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
    {"role": "user", "content": "And its colour?"},
    {"role": "assistant", "content": "Red."},
]

QWEN2_RENDERED = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What shape is this?<|im_end|>\n"
    "<|im_start|>assistant\nA red circle.<|im_end|>\n"
    "<|im_start|>user\nAnd its colour?<|im_end|>\n"
    "<|im_start|>assistant\nRed.<|im_end|>\n"
)

QWEN3_RENDERED = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What shape is this?<|im_end|>\n"
    "<|im_start|>assistant\nA red circle.<|im_end|>\n"
    "<|im_start|>user\nAnd its colour?<|im_end|>\n"
    "<|im_start|>assistant\nRed.<|im_end|>\n"
)


def _load_model(path, arch, auto=True):
    import transformers

    cls = transformers.AutoModelForImageTextToText if auto else getattr(transformers, FAMILY_CLASS[arch][0])
    return cls.from_pretrained(path)


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_like_a_hub_checkpoint(arch, tiny_ckpt):
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    path = tiny_ckpt(arch)
    processor = AutoProcessor.from_pretrained(path)
    assert type(processor).__name__ == FAMILY_CLASS[arch][1]
    assert type(processor.tokenizer).__name__ == TOKENIZER_CLASS[arch]
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessor"
    assert type(AutoTokenizer.from_pretrained(path)).__name__ == TOKENIZER_CLASS[arch]
    assert AutoConfig.from_pretrained(path).model_type == arch

    auto = _load_model(path, arch, auto=True)
    family = _load_model(path, arch, auto=False)
    assert type(auto).__name__ == type(family).__name__ == FAMILY_CLASS[arch][0]
    for (name, a), (_, b) in zip(auto.state_dict().items(), family.state_dict().items()):
        assert torch.equal(a, b), name
    # The real small checkpoints tie the LM head to the embeddings.
    assert auto.lm_head.weight.data_ptr() == auto.model.language_model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_files_are_small_safetensors(arch, tiny_ckpt):
    path = tiny_ckpt(arch)
    names = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= names
    assert not any(n.endswith(".bin") for n in names)
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert total < 10 * 1024 * 1024


@pytest.mark.parametrize("arch", ARCHS)
def test_special_tokens_are_single_ids(arch, tiny_processor, tiny_ckpt):
    tok = tiny_processor(arch).tokenizer
    config = json.loads((tiny_ckpt(arch) / "config.json").read_text())
    vocab_size = config["text_config"]["vocab_size"]
    qwen3_5 = arch.startswith("qwen3_5")
    assert len(tok) == (1526 if qwen3_5 else 1514) and vocab_size == 1536
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(1500, 1514))
    for token, i in zip(SPECIAL_TOKENS, ids):
        assert tok(token, add_special_tokens=False)["input_ids"] == [i]
        assert tok.decode([i]) == token
    for token, i in EXPECTED_IDS.items():
        assert tok.convert_tokens_to_ids(token) == i
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 1500)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 1502)
    assert tok.bos_token is None

    enc = tok("look: <|image_pad|><|image_pad|> here", add_special_tokens=False)["input_ids"]
    assert enc.count(1512) == 2
    assert tok.convert_ids_to_tokens(enc) == ["l", "ook", ":", "Ġ", "<|image_pad|>", "<|image_pad|>", "Ġhere"]

    assert config["image_token_id"] == 1512
    assert config["video_token_id"] == 1513
    assert config["vision_start_token_id"] == 1509
    assert config["vision_end_token_id"] == 1510
    if qwen3_5:  # Qwen3.5's added tokens follow, single ids that decoding keeps (they are not special)
        added = [tok.convert_tokens_to_ids(t) for t in QWEN3_5_ADDED_TOKENS]
        assert added == list(range(1514, 1526))
        assert tok("<think>\n\n</think>", add_special_tokens=False)["input_ids"][::3] == [1524, 1525]
        assert tok.decode([1524, 1502], skip_special_tokens=True) == "<think>"


def test_tokenizer_is_byte_level_bpe(tiny_processor):
    tok = tiny_processor("qwen2_vl").tokenizer
    assert tok.tokenize("Describe the red circle in the picture.") == [
        "Describe", "Ġthe", "Ġred", "Ġcircle", "Ġin", "Ġthe", "Ġpicture", "."
    ]
    assert tok.tokenize("12 squares!") == ["1", "2", "Ġsquares", "!"]  # Qwen2 splits digits one by one
    text = "Café: 3 ✓ shapes — naïve 😀!\n\tdone"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text, add_special_tokens=False)


# Qwen3.5 renders the assistant turn after the last user query with its thinking block (empty here), and the
# earlier one without; its generation prompt opens a thinking block.
QWEN3_5_RENDERED = QWEN3_RENDERED.replace("assistant\nRed.", "assistant\n<think>\n\n</think>\n\nRed.")


@pytest.mark.parametrize("arch, expected", [("qwen2_vl", QWEN2_RENDERED), ("qwen2_5_vl", QWEN2_RENDERED),
                                            ("qwen3_vl", QWEN3_RENDERED), ("qwen3_vl_moe", QWEN3_RENDERED),
                                            ("qwen3_5", QWEN3_5_RENDERED), ("qwen3_5_moe", QWEN3_5_RENDERED)])
def test_chat_template_renders_the_family_format(arch, expected, tiny_processor):
    processor = tiny_processor(arch)
    assert processor.apply_chat_template(TWO_TURNS, tokenize=False) == expected
    assert processor.tokenizer.apply_chat_template(TWO_TURNS, tokenize=False) == expected
    prompt = processor.apply_chat_template(TWO_TURNS[:1], tokenize=False, add_generation_prompt=True)
    opened = "<think>\n" if arch.startswith("qwen3_5") else ""
    assert prompt.endswith("What shape is this?<|im_end|>\n<|im_start|>assistant\n" + opened)


def test_qwen3_5_template_thinking_blocks(tiny_processor):
    """What the Qwen3.5 template does with reasoning, as its real template does (docs/thinking.md)."""
    processor = tiny_processor("qwen3_5")

    def render(messages, **kw):
        return processor.apply_chat_template(messages, tokenize=False, **kw)

    ask = [{"role": "user", "content": "Hi"}]
    assert render(ask, add_generation_prompt=True) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert render(ask, add_generation_prompt=True, enable_thinking=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # reasoning written inline, or as reasoning_content: the same block
    inline = ask + [{"role": "assistant", "content": "<think>\nSay hello.\n</think>\n\nHello."}]
    field = ask + [{"role": "assistant", "content": "Hello.", "reasoning_content": "Say hello."}]
    want = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nSay hello.\n</think>\n\nHello.<|im_end|>\n"
    assert render(inline) == render(field) == want
    # an earlier turn's reasoning is dropped; the reasoning of turns after the last user query is kept
    two = inline + [{"role": "user", "content": "Again"}, {"role": "assistant", "content": "<think>x</think>Hi."}]
    assert render(two) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n<think>\nx\n</think>\n\nHi.<|im_end|>\n")


def test_chat_template_details(tiny_processor):
    processor = tiny_processor("qwen2_vl")
    with_system = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "vs"},
                {"type": "image", "image": "b.png"},
                {"type": "video"},
            ],
        },
    ]
    assert processor.apply_chat_template(with_system, tokenize=False, add_vision_id=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>vs"
        "Picture 2: <|vision_start|><|image_pad|><|vision_end|>"
        "Video 1: <|vision_start|><|video_pad|><|vision_end|><|im_end|>\n"
    )
    q3 = tiny_processor("qwen3_vl")
    assert q3.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


EXPECTED_GRIDS = {
    # images of (width, height) = (100, 80) and (60, 130)
    "qwen2_vl": [[1, 6, 8], [1, 10, 4]],
    "qwen2_5_vl": [[1, 6, 8], [1, 10, 4]],
    "qwen3_vl": [[1, 4, 6], [1, 8, 4]],
    "qwen3_vl_moe": [[1, 4, 6], [1, 8, 4]],
    "qwen3_5": [[1, 4, 6], [1, 8, 4]],
    "qwen3_5_moe": [[1, 4, 6], [1, 8, 4]],
}


@pytest.mark.parametrize("arch", ARCHS)
def test_processor_and_model_forward_backward(arch, tiny_ckpt, tiny_processor, make_image, tmp_path):
    processor = tiny_processor(arch)
    model = _load_model(tiny_ckpt(arch), arch)
    model.train()
    files = [
        make_image(tmp_path / "a.png", 100, 80, (255, 0, 0)),
        make_image(tmp_path / "b.jpg", 60, 130, (0, 0, 255)),
    ]
    images = [Image.open(f) for f in files]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "Compare the two pictures."},
                {"type": "image"},
            ],
        },
        {"role": "assistant", "content": "The first one is red and the second one is blue."},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    inputs = processor(text=[text], images=images, return_tensors="pt")
    assert {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"} <= set(inputs)

    grid = inputs["image_grid_thw"]
    assert grid.tolist() == EXPECTED_GRIDS[arch]
    spec = ModelSpec.from_processor(processor, model.config)
    assert [spec.grid(im.height, im.width).thw for im in images] == EXPECTED_GRIDS[arch]
    merge = processor.image_processor.merge_size
    n_pad = int((inputs["input_ids"] == spec.image_token_id).sum())
    assert n_pad == int(grid.prod(-1).sum()) // merge**2 == sum(spec.grid(im.height, im.width).tokens for im in images)
    assert int((inputs["mm_token_type_ids"] != 0).sum()) == n_pad
    patch_dim = 3 * spec.temporal_patch_size * spec.patch_size**2
    assert tuple(inputs["pixel_values"].shape) == (int(grid.prod(-1).sum()), patch_dim)

    out = model(**inputs, labels=inputs["input_ids"])
    assert tuple(out.logits.shape) == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    # The gradient reaches the patch embedding: the image features really flow into the LLM.
    patch_grad = model.model.visual.patch_embed.proj.weight.grad
    layer0 = model.model.language_model.layers[0]  # Qwen3.5's first layer is a linear-attention layer
    q_grad = (layer0.linear_attn.in_proj_qkv if hasattr(layer0, "linear_attn") else layer0.self_attn.q_proj).weight.grad
    assert patch_grad is not None and patch_grad.abs().sum() > 0
    assert q_grad is not None and q_grad.abs().sum() > 0


EXPECTED_SPEC = {
    "qwen2_vl": dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=28 * 28 * 256),
    "qwen2_5_vl": dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=28 * 28 * 256),
    "qwen3_vl": dict(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=64 * 64, max_pixels=32 * 32 * 256),
}
for _arch in ("qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"):
    EXPECTED_SPEC[_arch] = EXPECTED_SPEC["qwen3_vl"]


@pytest.mark.parametrize("arch", ARCHS)
def test_model_spec_from_tiny_checkpoint(arch, tiny_ckpt, tiny_processor):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_ckpt(arch))
    spec = ModelSpec.from_processor(tiny_processor(arch), config)
    assert spec.to_dict() == dict(
        model_type=arch,
        image_token="<|image_pad|>",
        image_token_id=1512,
        video_token="<|video_pad|>",
        video_token_id=1513,
        vision_start_token="<|vision_start|>",
        vision_start_token_id=1509,
        vision_end_token="<|vision_end|>",
        vision_end_token_id=1510,
        im_start_token="<|im_start|>",
        im_start_token_id=1501,
        im_end_token="<|im_end|>",
        im_end_token_id=1502,
        pad_token_id=1500,
        eos_token_id=1502,
        vocab_size=1536,
        **EXPECTED_SPEC[arch],
    )
    assert spec.factor == (28 if arch in ("qwen2_vl", "qwen2_5_vl") else 32)
    assert spec.max_pixels // spec.factor**2 == 256
    side = 16 * spec.factor
    assert grid_for(side, side, spec.patch_size, spec.merge_size, spec.min_pixels, spec.max_pixels).tokens == 256
    assert grid_for(4 * side, 4 * side, spec.patch_size, spec.merge_size, spec.min_pixels, spec.max_pixels).tokens == 256


def test_module_names_match_the_spec_prefixes(tiny_ckpt):
    """vlmtune's LoRA targeting relies on these names; pin them for every family."""
    expected_vision_linears = {
        "qwen2_vl": {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"},
        "qwen2_5_vl": {"attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
        "qwen3_vl": {"attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2"},
    }
    for arch in ("qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"):
        expected_vision_linears[arch] = expected_vision_linears["qwen3_vl"]
    attention = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    linear_attention = {f"linear_attn.{n}" for n in ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj")}
    mlp = {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    # MoE: the experts are fused parameters (mlp.experts.gate_up_proj / down_proj) and the router is no nn.Linear
    shared = {"mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj",
              "mlp.shared_expert_gate"}
    llm_linears = {  # layer 0 and the last layer (Qwen3.5: linear attention, then full attention)
        "qwen3_vl_moe": (attention, attention),
        "qwen3_5": (linear_attention | mlp, attention | mlp),
        "qwen3_5_moe": (linear_attention | shared, attention | shared),
    }
    for arch in ARCHS:
        model = _load_model(tiny_ckpt(arch), arch)
        linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        block0 = {n.removeprefix("model.visual.blocks.0.") for n in linears if n.startswith("model.visual.blocks.0.")}
        assert block0 == expected_vision_linears[arch], arch
        last = len(model.model.language_model.layers) - 1
        for layer, want in zip((0, last), llm_linears.get(arch, (attention | mlp, attention | mlp))):
            prefix = f"model.language_model.layers.{layer}."
            assert {n.removeprefix(prefix) for n in linears if n.startswith(prefix)} == want, (arch, layer)
        assert any(n.startswith("model.visual.merger.") for n in linears), arch
        assert "lm_head" in linears
        assert all(n.startswith(("model.visual.", "model.language_model.", "lm_head")) for n in linears), arch


def test_same_seed_same_bytes_other_seed_differs(tiny_ckpt, tmp_path):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again = build_tiny_checkpoint(tmp_path / "again", arch="qwen2_vl", seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # the global RNG is left as it was

    reference = tiny_ckpt("qwen2_vl")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (again / name).read_bytes() == (reference / name).read_bytes(), name

    other = tiny_ckpt("qwen2_vl", seed=1)
    assert (other / "model.safetensors").read_bytes() != (reference / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (reference / "tokenizer.json").read_bytes()


def test_unknown_arch_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="qwen2_vl"):
        build_tiny_checkpoint(tmp_path / "x", arch="llava")


def test_cli_tiny_model(tmp_path, capsys):
    from transformers import AutoConfig, AutoProcessor

    from vlmtune.commands.cli import main

    out = tmp_path / "cli-ckpt"
    assert main(["tiny-model", str(out), "--arch", "qwen3_vl", "--seed", "3"]) == 0
    assert f"wrote a tiny random qwen3_vl checkpoint to {out}" in capsys.readouterr().out
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "qwen3_vl"
    assert config.vision_config.patch_size == 16
    assert config.vision_config.out_hidden_size == config.text_config.hidden_size
    assert type(AutoProcessor.from_pretrained(out)).__name__ == "Qwen3VLProcessor"
    assert (out / "model.safetensors").is_file()


def test_tiny_checkpoints_go_only_into_new_empty_or_earlier_tiny_folders(tmp_path):
    from vlmtune.config import folders
    from vlmtune.errors import VlmtuneError

    user = tmp_path / "my-model"
    user.mkdir()
    (user / "config.json").write_text('{"mine": true}')
    with pytest.raises(VlmtuneError) as err:
        build_tiny_checkpoint(user)
    assert str(err.value) == (
        f"OUT {user} is a folder with content that vlmtune did not create (it has no .vlmtune-owned); vlmtune writes "
        "into or replaces only folders it created and never deletes or overwrites yours: set OUT to a new folder, or "
        "empty that one yourself")
    assert json.loads((user / "config.json").read_text()) == {"mine": True}

    out = build_tiny_checkpoint(tmp_path / "tiny", arch="qwen2_vl")
    assert folders.owner_of(out) == folders.TINY
    (out / "stale.txt").write_text("from the earlier build")
    build_tiny_checkpoint(out, arch="qwen2_vl", seed=1)  # an earlier tiny checkpoint is replaced whole
    assert not (out / "stale.txt").exists() and folders.owner_of(out) == folders.TINY
    assert (out / "model.safetensors").is_file()
