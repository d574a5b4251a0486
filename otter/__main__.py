"""`python -m otter`: the `otter` command, for environments whose scripts folder is not on PATH."""

from otter.cli import main

main()
