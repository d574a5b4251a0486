"""The `otter` command. Each subcommand lives with the code it drives."""

import argparse
import logging
import shlex
import sys

import torch
from PIL import Image, ImageDraw

from .prompts import VQA, few_shot_prompt

logger = logging.getLogger(__name__)

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220)}


def shape_image(colour: str, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=COLOURS[colour])
    return image


def demo(args) -> None:
    """Two-shot VQA on drawn images with a tiny *randomly initialised* model: shows the whole pipeline offline."""
    from .tiny import build_tiny_otter

    print("otter demo: a tiny RANDOMLY INITIALISED model (no trained weights ship with the package yet),\n"
          "so its answers are noise. What runs is the real pipeline: processor, vision tower, perceiver,\n"
          "gated cross-attention, cached generation.\n")
    model, processor = build_tiny_otter(args.family, seed=args.seed)
    model.eval()
    demos = [{"question": "what colour is the circle?", "answer": colour} for colour in ("red", "green")]
    prompt = few_shot_prompt(VQA, demos, {"question": "what colour is the circle?"})
    images = [shape_image("red"), shape_image("green"), shape_image("blue")]
    inputs = processor(text=[prompt], images=[images])
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = processor.decode_answers(generated, inputs["input_ids"].shape[1])[0]
    print(f"model: {args.family} LM, {sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"prompt ({inputs['input_ids'].shape[1]} tokens, {len(images)} images: red, green, blue circles):")
    print("  " + prompt.replace("\n", "\n  "))
    print(f"answer: {answer!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otter", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="few-shot prompting end to end on a tiny model, offline")
    demo_parser.add_argument("--family", default="mpt", choices=["mpt", "gpt_neox", "llama"])
    demo_parser.add_argument("--seed", type=int, default=0)
    demo_parser.add_argument("--max-new-tokens", type=int, default=8)
    demo_parser.set_defaults(func=demo)
    # each package registers its own subcommands; imported here only, so `import otter` stays light
    from otter.conversion.cli import register as register_conversion

    register_conversion(commands)
    from otter.train.cli import register as register_training

    register_training(commands)
    from otter.eval.cli import register as register_evaluation

    register_evaluation(commands)
    from otter.chat import register as register_chat

    register_chat(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["otter", *argv])  # recorded by commands that write a model card
    args.func(args)


if __name__ == "__main__":
    main()
