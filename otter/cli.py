"""
The `otter` command. Each subcommand lives with the code it drives.

Errors: a user error (a bad argument, a missing or damaged file, a refused resume) prints one `otter: ...` line and
exits with status 1. A user error is an exception the library raises itself: a `ValueError` or file error raised by
Otter's own code (its convention for bad input), or one of its named error classes. Anything else is a bug or an
environment failure and keeps its traceback. `--debug` (or `OTTER_DEBUG=1`) shows the traceback of every error.

`otter train` and `otter eval` need Otter's `train` and `eval` extras (pyproject.toml's optional-dependencies) on top
of the core the other commands run on; a missing one is a user error named before any work starts.
"""

import argparse
import importlib.metadata
import logging
import os
import shlex
import sys
from pathlib import Path

# what Otter's own code raises for bad input (see the module docstring)
USER_ERROR_TYPES = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                    PermissionError)
DISTRIBUTION = "otter-flamingo"
# the commands that need more than the core, and the extra that installs what they need
COMMAND_EXTRAS = {"train": "train", "eval": "eval", "serve": "serve"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otter", description="Flamingo-style multimodal in-context learning.")
    parser.add_argument("--version", action=_VersionAction, nargs=0, help="print the versions a bug report needs")
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
    from otter.serve import register as register_serve

    register_serve(commands)
    _add_debug_option(parser, top=True)
    return parser


def _add_debug_option(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """`--debug` on the command and on every subcommand, so that it may be given anywhere on the line."""
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="show the traceback of every error (also: OTTER_DEBUG=1)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in dict.fromkeys(action.choices.values()):
                _add_debug_option(subparser)


def _own_directories() -> set[Path]:
    """The folders of Otter's own modules (otter, otter.conversion, otter.train, otter.eval: installed apart)."""
    return {Path(module.__file__).resolve().parent for name, module in list(sys.modules.items())
            if (name == "otter" or name.startswith("otter.")) and getattr(module, "__file__", None)}


def is_user_error(error: BaseException) -> bool:
    """Whether `error` is one the library raised on purpose for bad input (see the module docstring)."""
    if type(error).__module__.split(".")[0] == "otter":
        return True
    if not isinstance(error, USER_ERROR_TYPES) or error.__traceback__ is None:
        return False
    traceback = error.__traceback__
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    return Path(traceback.tb_frame.f_code.co_filename).resolve().parent in _own_directories()


class _VersionAction(argparse.Action):
    """`--version`, computed when asked for (it imports torch, which `otter --help` need not)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def version_line() -> str:
    """`otter 0.1.0 (Python 3.11.7, torch 2.14.1, transformers 5.24.0)`: what a bug report needs."""
    import platform

    import torch
    import transformers

    from otter import __version__

    return (f"otter {__version__} (Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__})")


def missing_requirements(extra: str) -> list[str]:
    """The requirements of Otter's `extra` that are not installed (none when Otter itself is not installed)."""
    from packaging.requirements import Requirement

    try:
        requirements = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:  # run from a source tree: nothing to check against
        return []
    missing = []
    for line in requirements:
        requirement = Requirement(line)
        if requirement.marker is None or not requirement.marker.evaluate({"extra": extra}):
            continue
        try:
            importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement.name)
    return missing


def check_extra(command: str) -> None:
    """Refuses `command` before it starts when the extra it needs is not (completely) installed."""
    extra = COMMAND_EXTRAS.get(command)
    missing = missing_requirements(extra) if extra else []
    if missing:
        raise ValueError(f"`otter {command}` needs Otter's {extra} extra, and {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not installed: pip install '{DISTRIBUTION}[{extra}]'")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["otter", *argv])  # recorded by commands that write a model card
    debug = args.debug or os.environ.get("OTTER_DEBUG", "") not in ("", "0")
    try:
        check_extra(args.command)
        args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("otter: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:
        if debug or not is_user_error(error):
            raise
        print(f"otter: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
