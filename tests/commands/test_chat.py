"""chat: the answer is exactly the model's greedy decode of the rendered conversation."""

from __future__ import annotations

import io

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmtune.commands import chat as chat_mod
from vlmtune.commands.chat import ChatModel, ChatSession, chat, interactive, load_image
from vlmtune.commands.cli import main
from vlmtune.errors import VlmtuneError

N = 8  # new tokens: enough to see a difference, fast on the tiny model
QUESTION = "What is shown in the image?"


@pytest.fixture(autouse=True)
def _cpu(monkeypatch):
    # The expected decodes are computed in fp32 on the CPU; keep chat there too on a GPU machine.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def setup(tiny_ckpt, tmp_path_factory):
    ckpt = tiny_ckpt("qwen2_vl")
    tmp = tmp_path_factory.mktemp("chat")
    img = tmp / "red.png"
    Image.new("RGB", (100, 80), (255, 0, 0)).save(img)
    adapter = tmp / "adapter"
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = AutoModelForImageTextToText.from_pretrained(ckpt)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(adapter)
    return ckpt, adapter, img


def greedy(ckpt, question, image_paths, adapter=None, max_new_tokens=N):
    """The expected answer, by hand: template, processor, generate, decode the new tokens."""
    processor = AutoProcessor.from_pretrained(ckpt)
    model = AutoModelForImageTextToText.from_pretrained(ckpt)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    content = [{"type": "image"} for _ in image_paths] + [{"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    images = [Image.open(p).convert("RGB") for p in image_paths] or None
    batch = processor(text=[text], images=images, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def expected(setup):
    ckpt, adapter, img = setup
    base = greedy(ckpt, QUESTION, [img])
    tuned = greedy(ckpt, QUESTION, [img], adapter=adapter)
    assert base != tuned  # the adapter changes the decode, so the tests below can tell them apart
    return base, tuned


def test_chat_is_the_greedy_decode(setup, expected):
    ckpt, adapter, img = setup
    base, tuned = expected
    assert chat(str(ckpt), QUESTION, [img], max_new_tokens=N) == base
    assert chat(ckpt, QUESTION, [str(img)], adapter=adapter, max_new_tokens=N) == tuned


def test_chat_model_reuse_and_text_only(setup, expected):
    ckpt, adapter, img = setup
    cm = ChatModel(ckpt, adapter, max_new_tokens=N)
    assert isinstance(cm.model, PeftModel)
    assert cm.device.type == "cpu" and cm.dtype == torch.float32
    assert cm.ask(QUESTION, [img]) == expected[1]
    assert cm.ask(QUESTION, [Image.open(img)]) == expected[1]  # PIL images work too
    assert cm.ask("Describe this image.") == greedy(ckpt, "Describe this image.", [], adapter=adapter)
    assert cm.ask(QUESTION, [img]) == expected[1]  # no state carried between asks


def test_image_max_pixels_reaches_the_processor(setup):
    ckpt, _, img = setup
    cm = ChatModel(ckpt, image_max_pixels=28 * 28 * 4)
    # 100x80 -> 112x84 (12 merged tokens) unbounded; 56x28 (2 tokens) within 3136 pixels.
    unbounded = cm.processor.image_processor(images=[load_image(img)], return_tensors="pt")
    assert unbounded["image_grid_thw"].tolist() == [[1, 6, 8]]  # the processor itself is left as it was
    batch = cm.inputs([cm.user_message(QUESTION, [img])])
    assert batch["image_grid_thw"].tolist() == [[1, 2, 4]]
    assert (batch["input_ids"] == cm.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum() == 2
    assert "mm_token_type_ids" in batch
    cm.ask(QUESTION, [img], max_new_tokens=2)  # generates with it


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (120, 40), (0, 0, 255)).save(path, exif=exif)
    im = load_image(path)
    assert im.size == (40, 120) and im.mode == "RGB"
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (10, 10), (1, 2, 3, 4)).save(rgba)
    assert load_image(rgba).mode == "RGB"


def test_missing_image_fails_before_loading(setup, tmp_path, monkeypatch, capsys):
    ckpt, _, img = setup

    def boom(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", boom)
    missing = tmp_path / "nope.png"
    msg = f"image file not found: {missing}; check the path (a relative path is resolved from the current directory)"
    with pytest.raises(VlmtuneError) as e:
        chat(ckpt, QUESTION, [img, missing])
    assert str(e.value) == msg

    assert main(["chat", "--model", str(ckpt), "--image", str(missing), QUESTION]) == 2
    assert capsys.readouterr().err == f"error: {msg}\n"

    other = tmp_path / "also-missing.jpg"
    with pytest.raises(VlmtuneError) as e:
        chat(ckpt, QUESTION, [missing, other])
    assert str(e.value) == (
        f"2 image files not found: {missing}, {other}; check the paths "
        "(a relative path is resolved from the current directory)"
    )
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    with pytest.raises(VlmtuneError, match=r"^cannot read as an image: .*notes\.txt"):
        chat(ckpt, QUESTION, [not_image])


def test_cli_prints_the_answer(setup, expected, capsys):
    ckpt, adapter, img = setup
    argv = ["chat", "--model", str(ckpt), "--adapter", str(adapter), "--image", str(img), "--max-new-tokens", str(N)]
    capsys.readouterr()
    assert main(argv + [QUESTION]) == 0
    assert capsys.readouterr().out == expected[1] + "\n"


def test_trust_remote_code_only_when_asked(setup, monkeypatch, capsys):
    ckpt, _, img = setup
    seen = []
    real_proc = AutoProcessor.from_pretrained.__func__
    real_model = AutoModelForImageTextToText.from_pretrained.__func__

    def spy(real):
        def f(cls, *a, **k):
            seen.append(k.get("trust_remote_code"))
            return real(cls, *a, **k)

        return classmethod(f)

    monkeypatch.setattr(AutoProcessor, "from_pretrained", spy(real_proc))
    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", spy(real_model))
    base = ["chat", "--model", str(ckpt), "--max-new-tokens", "1", "Hi"]
    assert main(base) == 0
    assert seen == [False, False]
    seen.clear()
    assert main(base[:1] + ["--trust-remote-code"] + base[1:]) == 0
    assert seen == [True, True]


def test_interactive_loop(setup, expected):
    ckpt, adapter, img = setup
    cm = ChatModel(ckpt, adapter, max_new_tokens=N)
    script = "\n".join(
        [
            f"/image {img}",
            QUESTION,
            "And now?",  # second turn: sees the first question and answer
            "/image /no/such/file.png",
            "/reset",
            f"/image {img}",
            QUESTION,
            "/exit",
            "never read",
        ]
    )
    out = io.StringIO()
    assert interactive(cm, io.StringIO(script + "\n"), out) == 3
    text = out.getvalue()
    assert text.startswith(chat_mod.INTERACTIVE_HELP + "\n")
    assert f"> (attached {img}; 1 image(s) for the next question)\n" in text
    assert "> error: image file not found: /no/such/file.png;" in text
    assert "> (new conversation)\n" in text
    # Both fresh conversations give the one-shot answer; the second turn is the session's answer.
    assert text.count(f"> {expected[1]}\n") == 2
    session = ChatSession(cm)
    session.ask(QUESTION, [img])
    second = session.ask("And now?")
    assert f"> {second}\n" in text
    assert len(session.messages) == 4 and session.messages[1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": expected[1]}],
    }
    assert "never read" not in text


def test_interactive_ends_at_eof_and_attaches_cli_images(setup, expected):
    ckpt, adapter, img = setup
    cm = ChatModel(ckpt, adapter, max_new_tokens=N)
    out = io.StringIO()
    assert interactive(cm, io.StringIO(f"\n/bogus\n{QUESTION}\n"), out, images=[img]) == 1
    assert f"> {expected[1]}\n" in out.getvalue()
    assert "unknown command /bogus." in out.getvalue()


def test_bad_generation_settings(setup):
    ckpt, _, _ = setup
    with pytest.raises(VlmtuneError, match=r"^max_new_tokens=0; it must be at least 1$"):
        chat(ckpt, QUESTION, max_new_tokens=0)
    with pytest.raises(VlmtuneError, match=r"^temperature=-1.0; use 0 for greedy decoding"):
        chat(ckpt, QUESTION, temperature=-1.0)


# -- QLoRA (issue 15) ----------------------------------------------------------------------------------------------
def make_qlora_adapter(ckpt, out, bits):
    """A random LoRA adapter made on the `bits`-bit base, with the vlmtune_config.yaml `train` saves beside it."""
    import yaml

    from vlmtune.config import load_config
    from vlmtune.models.quant import load_kwargs

    cfg = load_config(None, base=dict(model_name_or_path=str(ckpt), dataset="d", output_dir=str(out),
                                      quantization_bit=bits))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32, **load_kwargs(cfg.finetuning, torch.float32))
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                      target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(out)
    (out / "vlmtune_config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    return out, peft_model


def test_chat_loads_the_quantized_base_the_adapter_was_trained_on(tiny_ckpt, tmp_path):
    from vlmtune.models.quant import quantized_bits

    pytest.importorskip("bitsandbytes")
    ckpt = tiny_ckpt("qwen2_vl")
    adapter, qlora = make_qlora_adapter(ckpt, tmp_path / "adapter", 4)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    cm = ChatModel(ckpt, adapter, device="cpu", dtype=torch.float32)
    assert quantized_bits(cm.model) == 4
    with torch.no_grad():  # bitsandbytes' CPU kernels differ (~1e-3) between the graph and no-graph paths
        assert torch.allclose(cm.model.eval()(input_ids=ids).logits, qlora.eval()(input_ids=ids).logits, atol=1e-5)
    assert quantized_bits(ChatModel(ckpt, adapter, device="cpu", quantization_bit=None).model) is None
    assert quantized_bits(ChatModel(ckpt, adapter, device="cpu", quantization_bit=8).model) == 8
    with pytest.raises(VlmtuneError, match=r"^quantization_bit=3 is not supported"):
        ChatModel(ckpt, adapter, device="cpu", quantization_bit=3)
@pytest.mark.parametrize("stored, keep, expected", [
    ("bfloat16", True, "bfloat16"),  # bf16 checkpoint on a CPU that keeps bf16 (AMX-BF16): no float32 copy
    ("bfloat16", False, "float32"),  # a CPU without fast bf16: float32
    ("float32", True, "float32"),
    (None, True, "float32"),
])
def test_chat_keeps_a_bf16_checkpoint_bf16_on_a_cpu_where_bf16_is_fast(stored, keep, expected, monkeypatch):
    import torch

    from vlmtune.commands import chat as chat_mod
    from vlmtune.train import speed

    flags = frozenset({"amx_bf16"} if keep else {"avx512_bf16"})
    monkeypatch.setattr(speed, "cpu_bf16", lambda: speed.CpuBf16(keep, flags))
    device, dtype = chat_mod.pick_device_dtype("cpu", None, stored=stored)
    assert (device.type, dtype) == ("cpu", getattr(torch, expected))
    assert chat_mod.pick_device_dtype("cpu", "float16", stored=stored)[1] == torch.float16  # asked for: kept


# -- video (issue 14) ----------------------------------------------------------------------------------------------
VIDEO_QUESTION = "What happens in the video?"


@pytest.fixture(scope="module")
def clip(tmp_path_factory, make_clip):
    """30 frames at 10 fps, 64x48: sampled at 2 fps that is 6 frames (3 temporal patches)."""
    return make_clip(tmp_path_factory.mktemp("chat-video") / "fade.mp4", 30, 64, 48, rate=10)


def reference_batch(processor, question, clip_path, fps):
    """The processor on its own: the whole decoded clip, left to sample the frames itself at `fps`."""
    import numpy as np
    from transformers.video_utils import VideoMetadata

    from vlmtune.data.media.video import decode_frames, read_facts

    f = read_facts(clip_path)
    content = [{"type": "video"}, {"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    frames = np.stack(decode_frames(clip_path, range(f.frames)))
    meta = VideoMetadata(total_num_frames=f.frames, fps=f.fps, width=f.width, height=f.height, duration=f.duration)
    return processor(text=[text], videos=[frames], video_metadata=[meta], do_sample_frames=True, fps=fps,
                     input_data_format="channels_last", return_tensors="pt")


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"])
def test_chat_about_a_video_feeds_the_planned_clip(tiny_ckpt, clip, arch):
    from vlmtune.data.media.video import read_facts
    from vlmtune.models.load import load_spec

    ckpt = tiny_ckpt(arch)
    cm = ChatModel(ckpt, max_new_tokens=N)
    batch = cm.inputs([cm.user_message(VIDEO_QUESTION, videos=[clip])])
    # the plan, as prepare makes it for training
    f = read_facts(clip)
    video = load_spec(str(ckpt)).video
    plan = video.for_clip(f.frames, f.fps).plan(f.frames, f.fps, f.height, f.width)
    assert plan.frames == 6 and plan.t == 3
    assert batch["video_grid_thw"].tolist() == [plan.thw]
    pad = cm.processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int((batch["input_ids"] == pad).sum()) == plan.tokens
    assert int((batch["mm_token_type_ids"] == 2).sum()) == plan.tokens
    # the same as the processor sampling the whole clip itself: text, pixels and (Qwen2.5-VL) M-RoPE time
    ref = reference_batch(cm.processor, VIDEO_QUESTION, clip, video.fps)
    assert batch["input_ids"].tolist() == ref["input_ids"].tolist()
    assert torch.equal(batch["pixel_values_videos"], ref["pixel_values_videos"])
    assert sorted(batch.keys()) == sorted(ref.keys())
    if arch == "qwen2_5_vl":
        assert batch["second_per_grid_ts"].tolist() == ref["second_per_grid_ts"].tolist() == [plan.second_per_grid]
    answer = cm.ask(VIDEO_QUESTION, videos=[clip])
    with torch.inference_mode():
        out = cm.model.generate(**ref, **cm.generation_kwargs())
    assert answer == cm.processor.decode(out[0, ref["input_ids"].shape[1]:], skip_special_tokens=True)


def test_video_options_plan_as_the_config_keys_do(tiny_ckpt, clip, make_image, tmp_path, capsys):
    from vlmtune.data.media.video import read_facts
    from vlmtune.config import FitArgs
    from vlmtune.models.load import load_spec

    ckpt = tiny_ckpt("qwen2_vl")
    options = dict(video_fps=4.0, video_maxlen=4, video_max_pixels=28 * 28 * 2)
    cm = ChatModel(ckpt, max_new_tokens=N, image_max_pixels=28 * 28 * 4, **options)
    f = read_facts(clip)
    plan = load_spec(str(ckpt), FitArgs(**options)).video.plan(f.frames, f.fps, f.height, f.width)
    assert (plan.frames, plan.thw) == (4, [2, 2, 2])  # 4 frames of at most 2 × 28² pixels
    img = make_image(tmp_path / "red.png", 100, 80)
    batch = cm.inputs([cm.user_message(QUESTION, [img], [clip])])
    assert batch["video_grid_thw"].tolist() == [plan.thw]
    assert batch["image_grid_thw"].tolist() == [[1, 2, 4]]  # the image bound applies to the image only
    capsys.readouterr()
    argv = ["chat", "--model", str(ckpt), "--video", clip, "--video-fps", "4", "--video-maxlen", "4",
            "--video-max-pixels", str(28 * 28 * 2), "--max-new-tokens", str(N), VIDEO_QUESTION]
    assert main(argv) == 0
    assert capsys.readouterr().out == cm.ask(VIDEO_QUESTION, videos=[clip]) + "\n"


def test_missing_or_unreadable_video_fails_before_loading(tiny_ckpt, clip, tmp_path, monkeypatch, capsys):
    from vlmtune.data.media import video as video_mod
    from vlmtune.data.media.video import VideoReadError

    ckpt = tiny_ckpt("qwen2_vl")

    def boom(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", boom)
    missing = tmp_path / "nope.mp4"
    msg = f"video file not found: {missing}; check the path (a relative path is resolved from the current directory)"
    with pytest.raises(VlmtuneError) as e:
        chat(ckpt, VIDEO_QUESTION, videos=[clip, missing])
    assert str(e.value) == msg
    assert main(["chat", "--model", str(ckpt), "--video", str(missing), VIDEO_QUESTION]) == 2
    assert capsys.readouterr().err == f"error: {msg}\n"
    notes = tmp_path / "notes.mp4"
    notes.write_text("hello")
    with pytest.raises(VlmtuneError, match=r"^cannot read as a video: .*notes\.mp4 \(not a readable video container"):
        chat(ckpt, VIDEO_QUESTION, videos=[notes])

    def no_av(path):
        raise VideoReadError(path, "no_decoder", "PyAV is not installed", "pip install av (vlmtune[video])")

    monkeypatch.setattr(video_mod, "_av", no_av)
    with pytest.raises(VlmtuneError) as e:
        chat(ckpt, VIDEO_QUESTION, videos=[clip])
    assert str(e.value) == (f"cannot read the video {clip}: no video decoder (PyAV) is installed; "
                            "pip install av (vlmtune[video])")


def test_interactive_video(tiny_ckpt, clip):
    cm = ChatModel(tiny_ckpt("qwen2_vl"), max_new_tokens=N)
    script = f"/video {clip}\n{VIDEO_QUESTION}\n/video /no/such/clip.mp4\n/video\n/exit\n"
    out = io.StringIO()
    assert interactive(cm, io.StringIO(script), out) == 1
    text = out.getvalue()
    assert f"> (attached {clip}; 1 video(s) for the next question)\n" in text
    assert f"> {cm.ask(VIDEO_QUESTION, videos=[clip])}\n" in text
    assert "> error: video file not found: /no/such/clip.mp4;" in text
    assert "> usage: /video PATH\n" in text
    out = io.StringIO()
    assert interactive(cm, io.StringIO(f"{VIDEO_QUESTION}\n"), out, videos=[clip]) == 1  # --video in a terminal
    assert f"> {cm.ask(VIDEO_QUESTION, videos=[clip])}\n" in out.getvalue()


# -- hostile inputs (issue 21): a clear error naming the file and the fix, before the model loads ----------------
def _png_claiming(path, width: int, height: int):
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("kind", ["bomb", "strip", "fifo"])
def test_chat_refuses_a_hostile_image_before_loading_the_model(kind, tmp_path, capsys, monkeypatch):
    import os

    path = tmp_path / "img.png"
    if kind == "bomb":
        _png_claiming(path, 30000, 30000)  # 900 M pixels: Pillow's DecompressionBombError
    elif kind == "strip":
        Image.new("RGB", (5000, 1)).save(path)
    else:
        os.mkfifo(path)
    monkeypatch.setattr(chat_mod, "ChatModel", lambda *a, **k: pytest.fail("the model loaded"))
    rc = main(["chat", "--model", str(tmp_path), "--image", str(path), "what is it?"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and str(path) in err and len(err) < 1000
    assert {"bomb": "(a possible decompression bomb); downscale it",
            "strip": "is 5000x1, an aspect ratio above the processor's limit of 200; crop or pad it",
            "fifo": "not a regular file: a FIFO, device or socket"}[kind] in err


def test_an_adapter_of_pickles_is_refused_with_the_conversion(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(chat_mod.VlmtuneError) as err:
        chat_mod.check_adapter(str(adapter))
    msg = str(err.value)
    assert msg.startswith(f"adapter {adapter} holds its weights as adapter_model.bin, a Python pickle, which vlmtune "
                          "does not load")
    assert "convert it to safetensors" in msg and "'adapter_model.safetensors'" in msg
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    chat_mod.check_adapter(str(adapter))  # safetensors next to it: the pickle is never read


@pytest.mark.parametrize("arch", ["qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"])
def test_chat_about_images_on_the_current_generation(arch, tiny_ckpt, setup, capsys):
    """Two images, with and without thinking: the answer is the greedy decode of the template's own prompt."""
    _, _, img = setup
    ckpt = tiny_ckpt(arch)
    for thinking in (True, False):
        cm = ChatModel(ckpt, max_new_tokens=N, enable_thinking=thinking)
        batch = cm.inputs([cm.user_message(QUESTION, images=[img, img])])
        prompt = cm.processor.decode(batch["input_ids"][0])
        ending = {"qwen3_vl_moe": "assistant\n"}.get(arch, "assistant\n<think>\n" if thinking else
                                                     "assistant\n<think>\n\n</think>\n\n")
        assert prompt.endswith(ending) and prompt.count("<|vision_start|>") == 2
        with torch.inference_mode():
            out = cm.model.generate(**batch, max_new_tokens=N, do_sample=False)
        want = cm.processor.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        assert cm.ask(QUESTION, images=[img, img]) == want
    capsys.readouterr()
    assert main(["chat", "--model", str(ckpt), "--image", str(img), "--no-thinking", "--max-new-tokens", str(N),
                 QUESTION]) == 0
    assert capsys.readouterr().out == cm.ask(QUESTION, images=[img]) + "\n"  # cm: the thinking-off model
