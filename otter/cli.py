"""The `otter` command. Each subcommand lives with the code it drives."""

import argparse
import logging
import shlex
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otter", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    # each package registers its own subcommands; imported here only, so `import otter` stays light
    from otter.conversion.cli import register as register_conversion

    register_conversion(commands)
    from otter.train.cli import register as register_training

    register_training(commands)
    from otter.eval.cli import register as register_evaluation

    register_evaluation(commands)
    from otter.demo import register as register_demo

    register_demo(commands)
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
