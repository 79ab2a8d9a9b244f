"""`python -m edgecp.cli`: the full typer CLI, as `edgecp` runs it where typer and rich are installed."""

from edgecp.cli import main

main()
