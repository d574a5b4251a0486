"""`otter convert ...`: registered by otter/cli.py."""


def register(commands) -> None:
    convert = commands.add_parser("convert", help="convert OpenFlamingo checkpoints and their parts to Otter folders")
    convert.add_subparsers(dest="source", required=True)
