"""`python -m rlcore` is the `rlcore` command."""

from rlcore.cli import main

main()
