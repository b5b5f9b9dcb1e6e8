"""Ask a Qwen-VL checkpoint (optionally with a LoRA adapter) questions about images and video clips.

`ChatModel` loads the processor and the model once and answers many questions; `chat` is the
one-shot form; `ChatSession` keeps a multi-turn conversation; `interactive` is the read-eval
loop of ``vlmtune chat`` without a question (it reads from any file object, so it is testable).

The prompt is built the way transformers does it for these models: an HF chat-format
conversation (user content = the image parts, then the text), rendered with the processor's chat
template and ``add_generation_prompt=True``, then the processor on text + images, then
``model.generate``. Only the newly generated tokens are decoded (``skip_special_tokens=True``).

A video part is handled as in training: the clip's header facts (data/media/video.read_facts), the frames the
loaded processor's VideoSpec plans for it (with the chat's video_* options, the config keys' meaning),
and exactly those frames decoded and handed to the processor unsampled (data/media/video.clip_inputs, which
the collator uses too), so the model sees a clip as it saw clips in training.

trust_remote_code is never turned on here: it is passed through only when the caller sets it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

from ..errors import VlmtuneError
from ..models.load import check_adapter, check_model, load_processor
from ..models.video_grid import VideoSampleError, VideoSpec

DEFAULT_MAX_NEW_TOKENS = 64

# "owner/name" or "name": what a hub id looks like (a local path that does not exist and does
# not look like one is reported as missing instead of being sent to the hub).

INTERACTIVE_HELP = (
    "Type a question and press Enter. Commands: /image PATH attaches an image to the next question, "
    "/video PATH a video clip, /reset starts a new conversation, /exit quits."
)


# ---------------------------------------------------------------------------------------------
# Checks that run before anything heavy is loaded.
# ---------------------------------------------------------------------------------------------


def check_images(paths: Iterable) -> list[Path]:
    """Fail with one VlmtuneError naming every image path that is missing or not readable.

    Only the file header is read (cheap), so this runs before the model is loaded.
    PIL images in `paths` are accepted as they are.
    """
    from PIL import Image, UnidentifiedImageError

    from ..data.media.images import read_header
    from ..models.grid import MAX_ASPECT_RATIO

    missing: list[str] = []
    unreadable: list[str] = []
    refused: list[str] = []
    out: list[Path] = []
    for p in paths:
        if isinstance(p, Image.Image):
            continue
        path = Path(p).expanduser()
        if path.exists() and not path.is_file() and not path.is_dir():  # a FIFO or device: never opened
            unreadable.append(f"{p} (not a regular file: a FIFO, device or socket)")
            continue
        if not path.is_file():
            missing.append(str(p))
            continue
        try:
            header = read_header(str(path))  # the header only: a decompression bomb is never decoded
        except Image.DecompressionBombError:
            refused.append(f"{p} has more pixels than Pillow's limit of {2 * (Image.MAX_IMAGE_PIXELS or 0):,} (a "
                           "possible decompression bomb); downscale it")
            continue
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            unreadable.append(f"{p} ({type(e).__name__}: {str(e)[:200]})")
            continue
        w, h = header.width, header.height
        if w <= 0 or h <= 0 or max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
            refused.append(f"{p} is {w}x{h}, an aspect ratio above the processor's limit of {MAX_ASPECT_RATIO}; crop "
                           "or pad it")
            continue
        if (Image.MAX_IMAGE_PIXELS or 0) and w * h > Image.MAX_IMAGE_PIXELS:
            refused.append(f"{p} is {w}x{h} = {w * h:,} pixels, above Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} "
                           "(a possible decompression bomb); downscale it")
            continue
        out.append(path)
    if refused:
        raise VlmtuneError("cannot use as an image: " + "; ".join(refused))
    if missing:
        if len(missing) == 1:
            raise VlmtuneError(
                f"image file not found: {missing[0]}; check the path "
                "(a relative path is resolved from the current directory)"
            )
        raise VlmtuneError(
            f"{len(missing)} image files not found: {', '.join(missing)}; check the paths "
            "(a relative path is resolved from the current directory)"
        )
    if unreadable:
        raise VlmtuneError(
            f"cannot read as an image: {', '.join(unreadable)}; pass image files Pillow can open "
            "(PNG, JPEG, WebP, GIF, BMP, TIFF)"
        )
    return out


def check_videos(paths: Iterable) -> list:
    """Fail with one VlmtuneError naming every video clip that is missing or cannot be read; else each clip's
    VideoFacts (data/media/video.read_facts: the container's headers and its first frame), in order.

    Runs before the model is loaded."""
    from ..data.media.video import VideoReadError, read_facts

    missing: list[str] = []
    unreadable: list[str] = []
    out = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            missing.append(str(p))
            continue
        try:
            out.append(read_facts(str(path)))
        except VideoReadError as e:
            if e.kind == "no_decoder":
                raise VlmtuneError(f"cannot read the video {p}: no video decoder (PyAV) is installed; {e.fix}") from None
            unreadable.append(f"{p} ({e.what}; {e.fix})")
    if missing:
        if len(missing) == 1:
            raise VlmtuneError(
                f"video file not found: {missing[0]}; check the path "
                "(a relative path is resolved from the current directory)"
            )
        raise VlmtuneError(
            f"{len(missing)} video files not found: {', '.join(missing)}; check the paths "
            "(a relative path is resolved from the current directory)"
        )
    if unreadable:
        raise VlmtuneError(f"cannot read as a video: {', '.join(unreadable)}")
    return out


def pick_device_dtype(device=None, dtype=None, stored=None):
    """(device, dtype). Without a dtype: the checkpoint's `stored` dtype where the device computes in it at
    speed (a bf16 checkpoint on a bf16 GPU, or on a CPU that train.speed.cpu_bf16 keeps bf16 on), so no
    float32 copy is made; otherwise bf16 on a GPU that supports it, else float32."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if dtype is None:
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            dtype = stored if stored in (torch.bfloat16, torch.float16) else torch.bfloat16
        elif device.type == "cuda" and stored == torch.float16:
            dtype = torch.float16
        elif device.type == "cpu" and stored == torch.bfloat16 and _cpu_bf16_is_fast():
            dtype = torch.bfloat16
        else:
            dtype = torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return device, dtype


def _cpu_bf16_is_fast() -> bool:
    from ..train.speed import cpu_bf16

    return cpu_bf16().keep


def load_image(image):
    """A PIL RGB image from a path (EXIF orientation applied) or a PIL image."""
    from PIL import Image, UnidentifiedImageError

    from ..data.media.images import open_rgb

    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    path = Path(image).expanduser()
    if not path.is_file():
        check_images([image])  # raises the standard message
    try:
        return open_rgb(path)
    except (UnidentifiedImageError, OSError) as e:
        raise VlmtuneError(
            f"cannot read as an image: {image} ({e}); pass image files Pillow can open "
            "(PNG, JPEG, WebP, GIF, BMP, TIFF)"
        ) from None


def video_spec(processor, config, fps=None, maxlen=None, min_pixels=None, max_pixels=None) -> VideoSpec | None:
    """The processor's VideoSpec with the chat's video options (the config keys' meaning), or None when the
    processor has no Qwen-VL video processor (videos are then refused when asked about)."""
    for name, value in (("video_maxlen", maxlen), ("video_min_pixels", min_pixels), ("video_max_pixels", max_pixels)):
        if value is not None and int(value) < 1:
            raise VlmtuneError(f"{name}={value}; it must be a positive number")
    if fps is not None and float(fps) <= 0:
        raise VlmtuneError(f"video_fps={fps}; it must be a positive number of frames per second")
    try:
        spec = VideoSpec.from_processor(processor, config)
    except ValueError:
        return None
    return spec.with_config(fps, maxlen, min_pixels, max_pixels)


def _check_generation(max_new_tokens: int, temperature: float) -> None:
    if int(max_new_tokens) < 1:
        raise VlmtuneError(f"max_new_tokens={max_new_tokens}; it must be at least 1")
    if float(temperature) < 0:
        raise VlmtuneError(f"temperature={temperature}; use 0 for greedy decoding or a positive value to sample")


# ---------------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------------


def _quantization(bits, adapter, dtype) -> dict:
    """from_pretrained arguments for ChatModel's quantization_bit."""
    from ..models.quant import inference_kwargs, trained_quantization

    if bits == "adapter":
        keys = trained_quantization(adapter) if adapter is not None else {"quantization_bit": None}
    elif bits in (None, 4, 8):
        keys = {"quantization_bit": bits}
    else:
        raise VlmtuneError(f"quantization_bit={bits!r} is not supported; use 4, 8, none, or leave it out to follow "
                           "the adapter's training run")
    return inference_kwargs(keys, dtype)


class ChatModel:
    """A processor and a model (optionally with a LoRA adapter), loaded once, asked many times.

    ``ChatModel(model, adapter)`` loads from a hub id / local directory.
    """

    def __init__(
        self,
        model: str,
        adapter: str | None = None,
        *,
        image_max_pixels: int | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        device=None,
        dtype=None,
        trust_remote_code: bool = False,
        quantization_bit: int | str | None = "adapter",
        video_fps: float | None = None,
        video_maxlen: int | None = None,
        video_min_pixels: int | None = None,
        video_max_pixels: int | None = None,
        enable_thinking: bool = True,
    ):
        """quantization_bit: 4 or 8 loads the base quantized (bitsandbytes); "adapter" (the default): as the
        adapter's training run did (its vlmtune_config.yaml), so a QLoRA adapter meets the base it was trained on;
        None: unquantized. video_*: the config keys of the same names (frames sampled per second, at most
        video_maxlen frames, pixel bounds per frame), as the adapter was trained with. enable_thinking: the chat
        template's (Qwen3.5): false asks for the answer without a thinking block (docs/thinking.md)."""
        from transformers import AutoModelForImageTextToText

        _check_generation(max_new_tokens, temperature)
        model = str(model)
        check_model(model)
        if adapter is not None:
            adapter = str(adapter)
            check_adapter(adapter)
        # The processor comes from the base model, even when the adapter directory holds one
        # too (training saves it there): the base checkpoint is the reference.
        processor, config = load_processor(model, trust_remote_code=trust_remote_code)
        video = video_spec(processor, config, video_fps, video_maxlen, video_min_pixels, video_max_pixels)
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        device, dtype = pick_device_dtype(device, dtype, stored=stored)
        quant = _quantization(quantization_bit, adapter, dtype)
        net = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype, trust_remote_code=trust_remote_code,
                                                          **quant)
        if adapter is not None:
            from peft import PeftModel

            net = PeftModel.from_pretrained(net, adapter)
        net = (net if quant else net.to(device)).eval()  # a quantized model is placed while it loads
        self._init(net, processor, image_max_pixels, max_new_tokens, temperature, video)
        self.model_name, self.adapter = model, adapter
        self.enable_thinking = bool(enable_thinking)

    def _init(self, model, processor, image_max_pixels, max_new_tokens, temperature, video=None) -> None:
        if image_max_pixels is not None and int(image_max_pixels) < 1:
            raise VlmtuneError(f"image_max_pixels={image_max_pixels}; it must be a positive number of pixels")
        self.model = model
        self.processor = processor
        self.image_max_pixels = None if image_max_pixels is None else int(image_max_pixels)
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.video = video  # the processor's VideoSpec with the video_* options; None: no Qwen-VL video processor
        self.enable_thinking = True  # passed to the chat template (Qwen3.5 thinks unless it is false)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    # -- building inputs ----------------------------------------------------------------------

    @staticmethod
    def user_message(question: str, images: Sequence = (), videos: Sequence = ()) -> dict:
        """An HF chat-format user turn: the images (loaded now, as PIL RGB), the video clips (paths, checked
        now), then the text."""
        check_images(images)
        check_videos(videos)
        content = [{"type": "image", "image": load_image(im)} for im in images]
        content += [{"type": "video", "video": str(Path(v).expanduser())} for v in videos]
        content.append({"type": "text", "text": str(question)})
        return {"role": "user", "content": content}

    def plan_clip(self, path):
        """(VideoGrid, ClipInputs) of a clip: the frames, grid and tokens the processor makes of it, and the
        planned frames decoded for it (what the collator hands the video processor in training)."""
        from ..data.media.video import VideoReadError, plan_clip, planned_inputs

        if self.video is None:
            raise VlmtuneError(f"cannot use the video {path}: {type(self.processor).__name__} has no Qwen-VL video "
                               "processor (Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints have one)")
        facts = check_videos([path])[0]
        try:
            planned = plan_clip(str(path), self.video, facts)
        except VideoSampleError as e:
            raise VlmtuneError(f"cannot use the video {path} ({facts.frames} frames at {facts.fps:.3g} fps, "
                               f"{facts.width}x{facts.height}): {e}") from None
        try:
            clip = planned_inputs(str(path), planned)
        except VideoReadError as e:
            raise VlmtuneError(f"cannot decode the video {path}: {e.what}; {e.fix}") from None
        return planned.grid, clip

    def _image_size(self) -> dict | None:
        if self.image_max_pixels is None:
            return None
        size = getattr(self.processor.image_processor, "size", None) or {}
        if not isinstance(size, dict):
            size = {k: getattr(size, k, None) for k in ("shortest_edge", "longest_edge")}
        lo = size.get("shortest_edge") or getattr(self.processor.image_processor, "min_pixels", None) or 1
        return {"shortest_edge": min(int(lo), self.image_max_pixels), "longest_edge": self.image_max_pixels}

    def inputs(self, messages: list[dict]):
        """The processor batch (on the model's device) for a conversation ending in a user turn."""
        # only a template that reads enable_thinking gets it: transformers warns about a kwarg no template reads
        think = {"enable_thinking": self.enable_thinking} if "enable_thinking" in (
            self.processor.chat_template or "") else {}
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **think)
        images = [
            load_image(part["image"])
            for msg in messages
            if not isinstance(msg["content"], str)
            for part in msg["content"]
            if part.get("type") == "image"
        ]
        videos = [
            part["video"]
            for msg in messages
            if not isinstance(msg["content"], str)
            for part in msg["content"]
            if part.get("type") == "video"
        ]
        kwargs: dict = {}
        size = self._image_size()
        if size is not None and images:
            kwargs["images_kwargs"] = {"size": size}  # per modality: a video's size bounds are its own
        if videos:
            clips = [self.plan_clip(v)[1] for v in videos]
            bounds = {str(c.kwargs["size"]) for c in clips}
            if len(bounds) > 1:  # one processor call takes one size for all its videos
                raise VlmtuneError(
                    f"these {len(clips)} video clips need different pixel bounds ({', '.join(sorted(bounds))}): "
                    "Qwen3-VL's video_max_pixels / video_min_pixels count per frame, times the frames sampled from "
                    "each clip; ask about one clip at a time, or leave out the video pixel options")
            kwargs.update(videos=[c.frames for c in clips], video_metadata=[c.metadata for c in clips],
                          videos_kwargs=dict(clips[0].kwargs))
        batch = self.processor(text=[text], images=images or None, return_tensors="pt", **kwargs)
        batch = batch.to(self.device)
        for key in ("pixel_values", "pixel_values_videos"):
            if key in batch:
                batch[key] = batch[key].to(self.dtype)
        return batch

    # -- generating ---------------------------------------------------------------------------

    def generation_kwargs(self, max_new_tokens: int | None = None, temperature: float | None = None) -> dict:
        n = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        t = self.temperature if temperature is None else float(temperature)
        _check_generation(n, t)
        kwargs: dict = {"max_new_tokens": n}
        if t > 0:
            kwargs.update(do_sample=True, temperature=t)
        else:
            # Greedy, whatever the checkpoint's generation_config says about sampling.
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        gc = getattr(self.model, "generation_config", None)
        if gc is not None and gc.pad_token_id is None:
            kwargs["pad_token_id"] = self.processor.tokenizer.pad_token_id
        return kwargs

    def generate(self, messages: list[dict], *, max_new_tokens: int | None = None, temperature: float | None = None) -> str:
        """The answer to a conversation (HF chat format, ending in a user turn)."""
        import torch

        kwargs = self.generation_kwargs(max_new_tokens, temperature)
        batch = self.inputs(messages)
        with torch.inference_mode():
            out = self.model.generate(**batch, **kwargs)
        new = out[:, batch["input_ids"].shape[1] :]
        return self.processor.batch_decode(new, skip_special_tokens=True)[0]

    def ask(
        self, question: str, images: Sequence = (), *, videos: Sequence = (), max_new_tokens: int | None = None,
        temperature: float | None = None,
    ) -> str:
        """The answer to one question about `images` (paths or PIL images) and `videos` (clip paths), in a fresh
        conversation."""
        return self.generate(
            [self.user_message(question, images, videos)], max_new_tokens=max_new_tokens, temperature=temperature
        )


class ChatSession:
    """A multi-turn conversation with a ChatModel: each answer is kept for the next question."""

    def __init__(self, chat_model: ChatModel):
        self.chat_model = chat_model
        self.messages: list[dict] = []

    def ask(self, question: str, images: Sequence = (), videos: Sequence = ()) -> str:
        user = self.chat_model.user_message(question, images, videos)
        answer = self.chat_model.generate(self.messages + [user])
        self.messages += [user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        return answer

    def reset(self) -> None:
        self.messages = []


def chat(
    model: str,
    question: str,
    images: Sequence = (),
    adapter: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    image_max_pixels: int | None = None,
    *,
    videos: Sequence = (),
    trust_remote_code: bool = False,
    **video_options,
) -> str:
    """Load `model` (+ `adapter`), answer `question` about `images` and `videos`, return only the new text.
    `video_options`: ChatModel's video_fps, video_maxlen, video_min_pixels, video_max_pixels."""
    _check_generation(max_new_tokens, temperature)
    check_images(images)  # before the (slow) model load
    check_videos(videos)
    cm = ChatModel(
        model,
        adapter,
        image_max_pixels=image_max_pixels,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        trust_remote_code=trust_remote_code,
        **video_options,
    )
    return cm.ask(question, images, videos=videos)


def interactive(
    chat_model: ChatModel,
    infile: IO[str],
    outfile: IO[str],
    *,
    images: Sequence = (),
    prompt: str = "> ",
    videos: Sequence = (),
) -> int:
    """Read questions and commands from `infile` line by line, write answers to `outfile`.

    ``/image PATH`` attaches an image to the next question (repeatable), ``/video PATH`` a video clip,
    ``/reset`` starts a new conversation, ``/exit`` (or end of input) quits. `images` and `videos` are
    attached to the first question. Returns the number of questions answered.
    """
    session = ChatSession(chat_model)
    pending: list = list(images)
    pending_videos: list = list(videos)
    answered = 0

    def say(text: str) -> None:
        outfile.write(text + "\n")
        outfile.flush()

    say(INTERACTIVE_HELP)
    while True:
        outfile.write(prompt)
        outfile.flush()
        line = infile.readline()
        if not line:  # end of input
            outfile.write("\n")
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/reset":
                session.reset()
                pending, pending_videos = [], []
                say("(new conversation)")
            elif cmd in ("/image", "/video"):
                media = cmd[1:]
                if not arg:
                    say(f"usage: {cmd} PATH")
                    continue
                queue, check = (pending, check_images) if media == "image" else (pending_videos, check_videos)
                try:
                    check([arg])
                except VlmtuneError as e:
                    say(f"error: {e}")
                    continue
                queue.append(arg)
                say(f"(attached {arg}; {len(queue)} {media}(s) for the next question)")
            else:
                say(f"unknown command {cmd}. {INTERACTIVE_HELP}")
            continue
        try:
            answer = session.ask(line, pending, pending_videos)
        except VlmtuneError as e:
            say(f"error: {e}")
            pending, pending_videos = [], []
            continue
        pending, pending_videos = [], []
        answered += 1
        say(answer)
    return answered


__all__ = [
    "ChatModel",
    "ChatSession",
    "chat",
    "check_images",
    "check_videos",
    "check_adapter",
    "check_model",
    "interactive",
    "load_image",
    "pick_device_dtype",
]
