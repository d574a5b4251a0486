"""
`otter generate` (one prompt, its images, one answer) and `otter chat` (an interactive conversation on stdin/stdout),
for any Otter model folder: registered by otter/cli.py. Imports of torch-heavy modules wait until a command runs.
"""

import argparse
import sys
from typing import NamedTuple

DTYPES = ("float32", "bfloat16", "float16")
DTYPE_HELP = ("the dtype the weights are cast to on load; unset, what runs well on the device: float32 on a CPU, "
              "bfloat16 on a CUDA GPU (float16 on one without bfloat16)")
FORMATS = ("chat", "raw")
CHAT_HELP = ("commands: /image PATH, /video PATH (attach an image or a video to the next message), /reset (forget the "
             "conversation), /quit")


class ChatTurn(NamedTuple):
    """One exchange of a conversation: the user's message, its images (PIL) and videos (`Video`), and the answer."""

    message: str
    images: list
    answer: str


def media_kinds(media) -> list[str]:
    """"image" or "video" for each medium (PIL images and `otter.processing_otter.Video`s); a count means images."""
    from .processing_otter import Video

    if isinstance(media, int):
        return ["image"] * media
    return ["video" if isinstance(medium, Video) else "image" for medium in media]


def chat_template(prompt_format: str) -> str:
    """
    The chat template (Jinja) a conversation is written in. `chat`: Otter's instruction format (what MIMIC-IT training
    writes). `raw`: the same User/GPT dialogue without the `<answer>` token, for models never trained with it
    (OpenFlamingo's releases). See `otter.prompts.chat_template`.
    """
    from .prompts import chat_template as jinja_template

    if prompt_format not in FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r}; expected one of {FORMATS}")
    return jinja_template(answer_token=prompt_format == "chat")


def chat_prompt(history: list[ChatTurn], message: str, media, template: str | None = None) -> str:
    """
    The prompt for the next turn of a conversation: the earlier turns and `message`, rendered by the chat template
    (`template`, default Otter's format) up to where the answer starts. With Otter's format this is exactly the
    training text of the same turns (`otter.train.data.instruction_text`) cut before the last answer. `media`:
    the message's images and videos (or how many images).
    """
    from .prompts import chat_messages, render_chat

    turns = [(turn.message, media_kinds(turn.images), turn.answer) for turn in history]
    turns.append((message, media_kinds(media), None))
    return render_chat(chat_messages(turns), add_generation_prompt=True, template=template)


def single_prompt(text: str, media, prompt_format: str | None, has_answer_token: bool) -> str:
    """
    `otter generate`'s prompt for `media` (its images and videos, or how many images). Text with `<image>` /
    `<video>` markers is used as is (one marker per image or video, in order); otherwise it is wrapped: `chat` puts it
    in Otter's chat format (`<image>...User: {text} GPT:<answer>`), `raw` puts the media's markers before it
    (OpenFlamingo style). `prompt_format=None` picks chat when the tokenizer knows `<answer>`.
    """
    import re

    from .prompts import IMAGE_TOKEN, VIDEO_TOKEN

    kinds = media_kinds(media)
    markers = re.findall(f"{IMAGE_TOKEN}|{VIDEO_TOKEN}", text)
    if markers:
        if prompt_format is not None:
            raise ValueError(f"--format {prompt_format} wraps a plain prompt; this prompt already holds <image> / "
                             "<video> markers and is used as is (drop --format, or the markers)")
        if markers != [f"<{kind}>" for kind in kinds]:
            raise ValueError(f"the prompt holds the markers {''.join(markers)}, but {len(kinds)} images and videos "
                             f"were given (--image, --video) in this order: {', '.join(kinds) or 'none'}")
        return text
    if prompt_format is None:
        prompt_format = "chat" if has_answer_token else "raw"
    if prompt_format == "raw":
        return "".join(f"<{kind}>" for kind in kinds) + text
    return chat_prompt([], text, media, chat_template("chat"))


# -- loading ------------------------------------------------------------------------------------------------------
def default_dtype(device) -> str:
    """
    The dtype the commands load a model in when `--dtype` is not given: what runs well on `device`. float32 on a CPU,
    where half precision runs several times slower; bfloat16 on a CUDA GPU (float16 on one without bfloat16);
    float32 on any other device.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    return "float32"


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
QUANTIZATIONS = ("8bit", "4bit")
BITSANDBYTES_MIN_VERSION = "0.46.1"  # transformers' own minimum


def parse_device_map(value: str | dict | None):
    """
    `--device-map`: a strategy (auto, balanced, balanced_low_0, sequential: accelerate's, which fill the GPUs, then
    the CPU, then `offload_folder`), a JSON object of module names to devices (`{"vision_model": 0,
    "language_model": 1}`; 0, "cuda:1", "cpu", "disk"), or a JSON file holding one; a dict is returned as it is.
    A ValueError names a bad value.
    """
    import json
    from pathlib import Path

    import torch

    if value is None or isinstance(value, dict) or value in DEVICE_MAP_STRATEGIES:
        return value
    text = value.strip()
    if not text.startswith("{"):
        if not Path(value).is_file():
            raise ValueError(f"--device-map {value!r} is not one of {', '.join(DEVICE_MAP_STRATEGIES)}, a JSON object "
                             "of module names to devices, or a JSON file holding one")
        text = Path(value).read_text(encoding="utf-8")
    try:
        device_map = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--device-map {value!r} is not valid JSON ({error})") from None
    if not isinstance(device_map, dict) or not device_map or not all(
            isinstance(name, str) and isinstance(device, (int, str)) and not isinstance(device, bool)
            for name, device in device_map.items()):
        raise ValueError(f"--device-map {value!r}: expected a JSON object of module names to devices (0, \"cuda:1\", "
                         "\"cpu\", \"disk\")")
    for name, placed in device_map.items():
        if isinstance(placed, str) and placed != "disk":
            try:
                torch.device(placed)
            except RuntimeError:
                raise ValueError(f"--device-map: {name!r} goes to {placed!r}, which is not a device (expected e.g. 0, "
                                 "\"cuda:1\", \"cpu\", \"disk\")") from None
    return device_map


def _main_device(device, device_map):
    """The device whose dtype default applies: `device`, or the first accelerator a device map uses (else cpu)."""
    import torch

    if device_map is None:
        return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(device_map, str):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for placed in device_map.values():
        if placed not in ("cpu", "disk"):
            return torch.device(placed)
    return torch.device("cpu")


def quantization_config(quantization: str, dtype):
    """
    `quantization` ("8bit" or "4bit") -> transformers' `BitsAndBytesConfig` quantizing only the language model's
    linear layers: the vision tower, the perceiver, the gated cross-attention blocks and the output embeddings keep
    `dtype` (what transformers also does for the output embeddings). A ValueError names what is missing: the
    bitsandbytes package, or a version of it too old for transformers.
    """
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version
    from transformers import BitsAndBytesConfig

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; expected one of {QUANTIZATIONS}")
    try:
        installed = version("bitsandbytes")
    except PackageNotFoundError:
        raise ValueError(f"--load-in-{quantization} needs bitsandbytes, which is not installed: pip install "
                         "'otter-flamingo[quantization]' (or bitsandbytes)") from None
    if Version(installed) < Version(BITSANDBYTES_MIN_VERSION):
        raise ValueError(f"--load-in-{quantization} needs bitsandbytes >= {BITSANDBYTES_MIN_VERSION}; {installed} is "
                         "installed: pip install -U bitsandbytes")
    # module-name patterns transformers leaves unquantized: a prefix, or a regex from the start of the name
    skip = ["vision_model", "perceiver", r".*\.gated_cross_attn_layer", "language_model.lm_head",
            "language_model.embed_out"]  # the output embeddings: MPT's and LLaMA's, GPT-NeoX's
    if quantization == "8bit":
        _log_once("bitsandbytes.autograd._functions")  # it warns of its float16 cast on every 8-bit matmul
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=skip)


class _FirstTimeOnly:
    """A logging filter that lets each message through once."""

    def __init__(self):
        self.seen = set()

    def filter(self, record) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def _log_once(logger_name: str) -> None:
    """Each message of the logger `logger_name` is shown once per process, not on every call."""
    import logging

    logger = logging.getLogger(logger_name)
    if not any(isinstance(existing, _FirstTimeOnly) for existing in logger.filters):
        logger.addFilter(_FirstTimeOnly())


def _check_bitsandbytes_backend(quantization: str, devices) -> None:
    """A ValueError when bitsandbytes has no backend for a device the quantized model would run on."""
    try:
        import bitsandbytes
    except (ImportError, OSError, RuntimeError) as error:  # e.g. its native library fails to load
        raise ValueError(f"--load-in-{quantization}: bitsandbytes is installed but cannot be imported ({error})") \
            from None
    supported = set(getattr(bitsandbytes, "supported_torch_devices", ()))
    missing = sorted({device.type for device in devices} - supported)
    if missing:
        raise ValueError(f"--load-in-{quantization}: bitsandbytes {bitsandbytes.__version__} has no backend for "
                         f"{', '.join(missing)} (it supports {', '.join(sorted(supported)) or 'no device here'}); "
                         "load without quantization, or on a device it supports")


def load_otter(path, device: str | None = None, dtype: str | None = None, device_map: str | dict | None = None,
               quantization: str | None = None, offload_folder: str | None = None):
    """
    An Otter folder -> `OtterForConditionalGeneration` in eval mode, placed as the command line asks; what
    `otter generate`, `chat`, `serve`, `demo` and `eval` load models with. A ValueError names a bad option.

    - `device` (e.g. "cuda:1"): the whole model on one device; None: cuda when available, else cpu.
    - `device_map`: the model spread over several devices instead (`parse_device_map`: "auto" fills every GPU in
      turn, then the CPU, then `offload_folder`); not with `device`. Inputs then go to `input_device(model)`.
    - `dtype` ("float32", "bfloat16", "float16"): None is `default_dtype` of the device (of the first GPU of a map).
    - `quantization` ("8bit", "4bit"): the language model's linear layers in 8 or 4 bits through bitsandbytes
      (`quantization_config`), on `device` (or the map); a ValueError when bitsandbytes is not installed or has
      no backend for the device.
    """
    import torch

    from otter import OtterForConditionalGeneration

    if device is not None and device_map is not None:
        raise ValueError("--device and --device-map cannot be used together: --device puts the whole model on one "
                         "device, --device-map spreads it over several (auto: every GPU, then the CPU)")
    device_map = parse_device_map(device_map)
    if device is not None:
        try:
            torch.device(device)
        except RuntimeError:
            raise ValueError(f"--device {device!r} is not a device; expected e.g. cpu, cuda or cuda:1") from None
    main_device = _main_device(device, device_map)
    dtype_name = dtype or default_dtype(main_device)
    if dtype_name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype_name!r}; expected one of {DTYPES}")
    torch_dtype = getattr(torch, dtype_name)
    kwargs = {"dtype": torch_dtype}
    if quantization is not None:
        kwargs["quantization_config"] = quantization_config(quantization, torch_dtype)
        if device_map is None:  # a quantized model cannot be moved after loading: it is placed while it loads
            device_map = {"": str(main_device)}
        devices = ([torch.device(placed) for placed in device_map.values() if placed != "disk"]
                   if isinstance(device_map, dict) else [main_device])
        _check_bitsandbytes_backend(quantization, devices)
    if device_map is not None:
        kwargs["device_map"] = device_map
        if offload_folder is not None:
            kwargs["offload_folder"] = offload_folder
    elif offload_folder is not None:
        raise ValueError("--offload-folder holds what --device-map offloads to disk; add --device-map")
    model = OtterForConditionalGeneration.from_pretrained(path, **kwargs)
    if device_map is None:
        model = model.to(main_device)
    return model.eval()


def input_device(model):
    """
    The device a model's inputs go to: where its input embeddings run. The same as `model.device` on one device; with
    a device map, the language model's first device (an offloaded embedding runs on its hook's execution device).
    """
    import torch

    embeddings = model.get_input_embeddings()
    execution_device = getattr(getattr(embeddings, "_hf_hook", None), "execution_device", None)
    if execution_device is not None:
        return torch.device(execution_device)
    return embeddings.weight.device


def load_model(path: str, device: str | None, dtype: str | None = None, device_map: str | dict | None = None,
               quantization: str | None = None, offload_folder: str | None = None):
    """
    An Otter folder -> (model in eval mode, processor), placed as `load_otter` does; SystemExit naming a bad folder
    or option.
    """
    from otter import OtterProcessor

    try:
        model = load_otter(path, device, dtype, device_map=device_map, quantization=quantization,
                           offload_folder=offload_folder)
        processor = OtterProcessor.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise SystemExit(f"otter: {error}") from None
    return model, processor


def add_placement_options(parser: argparse.ArgumentParser) -> None:
    """
    `--device-map`, `--offload-folder`, `--load-in-8bit` / `--load-in-4bit` (dest `quantization`): how a big model is
    placed, for a command whose parser has `--device` and `--dtype`. Pass `placement_kwargs(args)` to `load_model`.
    """
    parser.add_argument("--device-map", default=None, metavar="MAP",
                        help="spread the model over several devices (not with --device): auto (every GPU in turn, "
                             "then the CPU, then --offload-folder), balanced, balanced_low_0, sequential, or a JSON "
                             "object (or file) of module names to devices, e.g. '{\"vision_model\": 0, "
                             "\"perceiver\": 0, \"language_model\": 1}'")
    parser.add_argument("--offload-folder", default=None, metavar="DIR",
                        help="where --device-map puts the weights it offloads to disk")
    quantization = parser.add_mutually_exclusive_group()
    quantization.add_argument("--load-in-8bit", dest="quantization", action="store_const", const="8bit",
                              help="the language model's linear layers in 8 bits (bitsandbytes' LLM.int8); the "
                                   "vision tower, perceiver and cross-attention stay in --dtype")
    quantization.add_argument("--load-in-4bit", dest="quantization", action="store_const", const="4bit",
                              help="the language model's linear layers in 4 bits (bitsandbytes' NF4), computing in "
                                   "--dtype; the vision tower, perceiver and cross-attention stay in --dtype")


def placement_kwargs(args) -> dict:
    """The `load_model` / `load_otter` keywords of `add_placement_options`' options."""
    return {"device_map": args.device_map, "quantization": args.quantization, "offload_folder": args.offload_folder}


def read_image(path: str):
    """An image file -> upright RGB PIL image; a ValueError naming the path when it is missing or unreadable."""
    from pathlib import Path

    from .processing_otter import load_image

    if not Path(path).is_file():
        raise ValueError(f"image {path} does not exist" if not Path(path).exists() else f"image {path} is not a file")
    return load_image(path)


def read_video(path: str, processor):
    """A video file -> `Video` of the frames the processor samples (its `num_frames`); a ValueError naming it."""
    from .processing_otter import DEFAULT_VIDEO_FRAMES, Video
    from .video import read_video as decode

    return Video(decode(path, num_frames=processor.num_frames or DEFAULT_VIDEO_FRAMES))


def read_media(kind: str, path: str, processor):
    return read_video(path, processor) if kind == "video" else read_image(path)


def generation_kwargs(args) -> dict:
    """The `generate()` options the command line gave; decoding is greedy unless --do-sample."""
    if not args.do_sample and (args.temperature is not None or args.top_p is not None):
        raise SystemExit("otter: --temperature and --top-p apply to sampling: add --do-sample")
    if args.max_new_tokens < 1:
        raise SystemExit(f"otter: --max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.num_beams is not None and args.num_beams < 1:
        raise SystemExit(f"otter: --num-beams must be at least 1, got {args.num_beams}")
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.num_beams is not None:
        kwargs["num_beams"] = args.num_beams
    if args.do_sample:
        kwargs.update({name: value for name, value in (("temperature", args.temperature), ("top_p", args.top_p))
                       if value is not None})
    return kwargs


def answer(model, processor, prompt: str, images: list, **kwargs) -> str:
    """
    The model's answer to `prompt` with `images` (PIL images and `Video`s, one per marker, in order): the new tokens,
    up to `<|endofchunk|>`.
    """
    import torch

    from .processing_otter import Video

    videos = [medium.frames for medium in images if isinstance(medium, Video)]
    images = [medium for medium in images if not isinstance(medium, Video)]
    inputs = processor(text=[prompt], images=[images], videos=[videos]).to(input_device(model))
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.vision_model.dtype)
    with torch.no_grad():
        sequences = model.generate(**inputs, **kwargs)
    return processor.decode_answers(sequences, inputs["input_ids"].shape[1])[0]


def _has_answer_token(processor) -> bool:
    from .prompts import ANSWER_TOKEN

    return ANSWER_TOKEN in processor.tokenizer.get_vocab()


def _seed(args) -> None:
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)


# -- otter generate -----------------------------------------------------------------------------------------------
def run_generate(args) -> None:
    from pathlib import Path

    kwargs = generation_kwargs(args)
    for kind, path in args.media:  # before the model loads
        if not Path(path).is_file():
            raise SystemExit(f"otter: {kind} {path} " + ("is not a file" if Path(path).exists() else "does not exist"))
    model, processor = load_model(args.model, args.device, args.dtype, **placement_kwargs(args))
    try:
        images = [read_media(kind, path, processor) for kind, path in args.media]
        prompt = single_prompt(args.prompt, images, args.format, _has_answer_token(processor))
    except ValueError as error:
        raise SystemExit(f"otter: {error}") from None
    _seed(args)
    print(answer(model, processor, prompt, images, **kwargs))


# -- otter chat ---------------------------------------------------------------------------------------------------
def run_chat(args) -> None:
    from .language_models import max_positions
    from .prompts import ANSWER_TOKEN, END_OF_CHUNK, IMAGE_TOKEN, VIDEO_TOKEN

    kwargs = generation_kwargs(args)
    model, processor = load_model(args.model, args.device, args.dtype, **placement_kwargs(args))
    prompt_format = args.format or ("chat" if _has_answer_token(processor) else "raw")
    template = chat_template(prompt_format)
    limit = max_positions(model.config.text_config)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"otter chat: {args.model} ({prompt_format} format). {CHAT_HELP}", file=sys.stderr)
    _seed(args)
    history: list[ChatTurn] = []
    pending: list = []  # images and videos attached to the next message
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # EOF
            break
        line = line.strip()
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command == "/quit":
            break
        if command == "/reset":
            history.clear()
            pending.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if command in ("/image", "/video"):
            if not rest.strip():
                print(f"error: {command} needs a path: {command} PATH", file=sys.stderr)
                continue
            try:
                pending.append(read_media(command[1:], rest.strip(), processor))
            except ValueError as error:
                print(f"error: {error}", file=sys.stderr)
            continue
        if command.startswith("/"):
            print(f"error: unknown command {command}; {CHAT_HELP}", file=sys.stderr)
            continue
        special = next((token for token in (IMAGE_TOKEN, VIDEO_TOKEN, END_OF_CHUNK, ANSWER_TOKEN) if token in line),
                       None)
        if special is not None:
            print(f"error: a message cannot hold the special token {special}; attach images with /image PATH",
                  file=sys.stderr)
            continue
        prompt = chat_prompt(history, line, pending, template)
        if limit is not None:  # forget the oldest turns rather than overflow the language model's positions
            while history and len(processor.tokenizer(prompt)["input_ids"]) + kwargs["max_new_tokens"] > limit:
                history.pop(0)
                print("(context full: the oldest turn was forgotten)", file=sys.stderr)
                prompt = chat_prompt(history, line, pending, template)
        images = [image for turn in history for image in turn.images] + pending
        try:
            reply = answer(model, processor, prompt, images, **kwargs)
        except ValueError as error:  # e.g. a message longer than the model's context on its own
            print(f"error: {error}; the message was not sent (its images stay attached)", file=sys.stderr)
            continue
        print(reply, flush=True)
        history.append(ChatTurn(line, pending, reply))
        pending = []


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="an Otter model folder (weights, tokenizer, processor)")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="chat: Otter's 'User: ... GPT:<answer>' instruction format; raw: OpenFlamingo style "
                             "(default: chat when the tokenizer has the <answer> token, else raw)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--num-beams", type=int, default=None, help="beam search with this many beams")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (with --do-sample)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (with --do-sample)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default=None, choices=DTYPES, help=DTYPE_HELP)
    add_placement_options(parser)


def register(commands) -> None:
    parser = commands.add_parser(
        "generate", help="answer one prompt about one or more images",
        description="Answer one prompt about images; prints only the answer. A prompt with <image> markers is used "
                    "as is (one --image per marker); a plain prompt is wrapped in the model's format (--format).",
    )
    parser.add_argument("--image", action="append", dest="media", default=[], metavar="PATH",
                        type=lambda path: ("image", path),
                        help="an image file; repeat for several, in the order of the prompt's markers")
    parser.add_argument("--video", action="append", dest="media", metavar="PATH", type=lambda path: ("video", path),
                        help="a video file (mp4, webm, avi, mkv, gif, ...; needs PyAV: pip install "
                             "'otter-flamingo[video]'), sampled to the processor's num_frames")
    parser.add_argument("--prompt", required=True, help="the question or instruction")
    _add_generation_options(parser)
    parser.set_defaults(func=run_generate)
    parser = commands.add_parser(
        "chat", help="talk with a model about images, interactively (stdin/stdout)",
        description="A conversation on stdin/stdout: each line is a message, answered on one line; earlier turns "
                    f"and their images stay in context. {CHAT_HELP}; end of input also ends.",
    )
    _add_generation_options(parser)
    parser.set_defaults(func=run_chat)
