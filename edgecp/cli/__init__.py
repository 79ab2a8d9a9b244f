"""The `edgecp` command: parse -> build config -> call ONE library function -> render.

Errors a user can fix print one line and exit non-zero; EDGECP_DEBUG=1 shows the traceback. `main()` also turns
what the environment does to a command into one line (issue 21): Ctrl-C ("interrupted: ...", exit 130), a
read-only store, a full disk and other OSErrors that name a path. For its own process only, it silences the
notices libraries print on import (kernels' "Skipping publisher trust check" when the Hub is offline, diffusers'
FutureWarnings, diffusers' and transformers' log lines and progress bars: `common.cli_process`); the library sets
nothing of the kind.

One module per command group, each attached by its `register(app)`, in the order `edgecp --help` lists them:
store (init, set-method), concepts (add-concept, plan, concepts), use (generate, export, profiles), bench (methods,
bench, demo), lifecycle (history, rollback, remove-concept, verify, gc); common holds what they share.
"""

from __future__ import annotations

import os
import sys

import typer

from edgecp.cli import bench, concepts, lifecycle, store, use
from edgecp.cli.common import Interrupted, cli_process, err, os_error_line
from edgecp.errors import EdgecpError
from edgecp.render import esc

__all__ = ["app", "main", "Interrupted", "os_error_line", "FULL_ONLY"]

app = typer.Typer(
    name="edgecp", help="Continual personalization of Stable Diffusion: teach concepts one at a time, export to ONNX.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)
# `edgecp --help` lists the commands in the order they are registered (groups, here `profiles`, after them)
store.register(app)
concepts.register(app)
use.register(app)
bench.register(app)
lifecycle.register(app)

# what the lean install (edgecp[runtime]) lacks: a command that imports one of them says which install it needs
FULL_ONLY = {"torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "onnx", "onnxscript",
             "torchao", "skimage", "matplotlib"}


def main() -> None:
    debug = os.environ.get("EDGECP_DEBUG") == "1"
    try:
        with cli_process():
            app()
    except EdgecpError as e:
        if debug:
            raise
        err.print(f"[red]error:[/] {esc(e)}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except ModuleNotFoundError as e:  # the lean install (edgecp[runtime]) has no torch stack: say which install
        if e.name is None or e.name.split(".")[0] not in FULL_ONLY or debug:
            raise
        err.print(f"[red]error:[/] this command needs {e.name.split('.')[0]}, which the lean install lacks: "
                  "pip install 'edgecp[full]' (or 'edgecp[train,cuda]' on a CUDA machine)", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (KeyboardInterrupt, Interrupted):
        err.print("interrupted: the store is at its last committed version", highlight=False, soft_wrap=True)
        sys.exit(130)
    except OSError as e:
        line = None if debug else os_error_line(e)
        if line is None:
            raise
        err.print(f"[red]error:[/] {esc(line)}", highlight=False, soft_wrap=True)
        sys.exit(2)
