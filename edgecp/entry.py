"""The `edgecp` console script: the full typer CLI, or, on the lean device install (no typer / rich), the
runtime CLI that runs `edgecp generate --backend onnx` (edgecp/runtime_cli.py)."""

from __future__ import annotations

import importlib.util


def main() -> None:
    if importlib.util.find_spec("typer") is None or importlib.util.find_spec("rich") is None:
        from edgecp.runtime_cli import main as runtime_main

        runtime_main()
        return
    from edgecp.cli import main as full_main

    full_main()
