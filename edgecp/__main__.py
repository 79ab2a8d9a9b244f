"""`python -m edgecp`: the same as the `edgecp` command."""

from edgecp.cli import main

main()
