"""User-facing errors: one line that names the value and the fix.

The CLI prints ``str(error)`` without a traceback (unless ``EDGECP_DEBUG=1``) and exits non-zero.
"""

from __future__ import annotations


class EdgecpError(Exception):
    """An error caused by the user's input or environment, with a one-line message saying how to fix it."""

    exit_code = 2


class StoreLockedError(EdgecpError):
    exit_code = 3


class DamagedStoreError(EdgecpError):
    """The store's files are not what edgecp wrote (truncated, missing, edited): the message says what to run."""

    exit_code = 4
