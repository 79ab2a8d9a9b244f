"""Rendering helpers shared by the CLI modules."""

from __future__ import annotations

from rich.markup import escape


def esc(value: object) -> str:
    """A user value (path, name, message) safe inside rich markup: `[b]` and `[/]` stay literal text."""
    return escape(str(value))
