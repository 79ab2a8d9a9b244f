"""Where edgecp keeps files that are not part of a store (the embedded model, hash cache)."""

from __future__ import annotations

import os
from pathlib import Path


def edgecp_home() -> Path:
    """``$EDGECP_HOME`` or ``~/.cache/edgecp``."""
    home = os.environ.get("EDGECP_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "edgecp"
