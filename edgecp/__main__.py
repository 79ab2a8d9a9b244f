"""`python -m edgecp`: the same as the `edgecp` command."""

from edgecp.entry import main

main()
