"""What the command groups of `edgecp` share: the consoles, the option types, `key=value` parsing, the progress bars,
and, for the CLI's own process, what `main()` sets (`cli_process`) and how it words an OSError (`os_error_line`)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import warnings
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from edgecp.errors import EdgecpError
from edgecp.scoped import QUIET_LOGGERS, quiet_libraries

out = Console()
err = Console(stderr=True)

StoreOpt = Annotated[Path, typer.Option("--store", "-s", help="The store folder (made by `edgecp init`).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
PlanOpt = Annotated[Optional[list[str]], typer.Option(
    "--plan", help="Pin a plan setting key=value (weights=int8|bf16|fp32, gradient_checkpointing=true, micro_batch=1, "
    "dc_chunk=2); the planner chooses the rest.")]
BudgetOpt = Annotated[Optional[str], typer.Option(
    "--memory-budget", help="Peak memory to stay within, e.g. 6GB (GPU memory on CUDA, resident memory on the CPU).")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cuda or cpu (default: cuda when present).")]

# What other libraries read from the environment when they are imported (inside a command, after `cli_process`
# began; none of them is imported by the CLI itself), each set only where the library is installed and the user
# set nothing: (package, variable, value).
LIBRARY_ENV = (
    ("diffusers", "DIFFUSERS_VERBOSITY", "error"),  # diffusers/utils/logging.py: its loggers' level
    ("transformers", "TRANSFORMERS_VERBOSITY", "error"),  # transformers/utils/logging.py: the same
    ("huggingface_hub", "HF_HUB_DISABLE_PROGRESS_BARS", "1"),  # the hub's download bars; transformers' follow it
    # diffusers' own bars ("Loading pipeline components...") read no variable of diffusers: tqdm's default
    ("tqdm", "TQDM_DISABLE", "1"),
)


def parse_kv(items: list[str] | None, flag: str) -> dict:
    """`key=value` pairs; values parsed as JSON when they can be (numbers, booleans, lists)."""
    result = {}
    for item in items or []:
        if "=" not in item:
            raise EdgecpError(f"{flag} '{item}' is not key=value: e.g. {flag} rank=16")
        k, v = item.split("=", 1)
        try:
            result[k.strip()] = json.loads(v)
        except ValueError:
            result[k.strip()] = v
    return result


@contextmanager
def progress_bars():
    """A rich progress display; yields `bar(phase, step, total, loss=None)` that creates a bar per phase."""
    cols = [TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*cols, console=err, transient=False) as prog:
        tasks: dict[str, int] = {}

        def bar(phase: str, step: int, total: int, loss: float | None = None) -> None:
            if phase not in tasks:
                tasks[phase] = prog.add_task(phase, total=total, completed=step, info="")  # a resumed bar: ETA from here
            info = f"loss {loss:.4f}" if loss is not None else ""
            prog.update(tasks[phase], completed=step, total=total, info=info)

        yield bar


class Interrupted(BaseException):
    """Ctrl-C, raised by `main()`'s SIGINT handler instead of KeyboardInterrupt: click turns a KeyboardInterrupt
    into "Aborted!" and exit 1 before main() can see it. A BaseException, so that no `except Exception` in a library
    swallows it; `finally` blocks (the staging purge, the lock) run as for KeyboardInterrupt."""


def _on_sigint(signum, frame) -> None:
    raise Interrupted()


@contextmanager
def _library_env():
    """LIBRARY_ENV set for the block; on exit the variables it added are removed again."""
    added = [(var, value) for package, var, value in LIBRARY_ENV
             if var not in os.environ and find_spec(package) is not None]
    for var, value in added:
        os.environ.setdefault(var, value)
    try:
        yield
    finally:
        for var, _ in added:
            os.environ.pop(var, None)


@contextmanager
def cli_process():
    """What the CLI sets for its own process, undone when main() returns (tests call main() in-process); the one
    place where edgecp changes other libraries' settings (the library sets nothing of the kind):
    - SIGINT raises `Interrupted` (main thread only; elsewhere Python's default stays);
    - LIBRARY_ENV: diffusers and transformers log errors only and draw no tqdm bars (edgecp draws its own). They
      read these variables when a command imports them; a caller that imported them before main() keeps its own
      bars, and its loggers' levels are set by the next item;
    - the loggers of `edgecp.scoped.QUIET_LOGGERS` at ERROR: the `kernels` package's (imported by bitsandbytes;
      with HF_HUB_OFFLINE=1 it warns "Skipping publisher trust check ..." on stderr at every import of
      bitsandbytes), torchao's and bitsandbytes' import notices, which the library quiets only while it trains,
      generates or plans; and diffusers' and transformers' loggers, at the level they had before on exit;
    - FutureWarnings ignored: diffusers' deprecation notices concern its API, not the user's command.
    """
    try:
        previous = signal.signal(signal.SIGINT, _on_sigint)
    except ValueError:  # not the main thread
        previous = None
    try:
        with warnings.catch_warnings(), _library_env(), quiet_libraries(QUIET_LOGGERS + ("diffusers", "transformers")):
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _store_of(path: Path) -> Path | None:
    """The store folder holding `path` (the nearest parent with store.json), if any."""
    for p in [path, *path.parents][:8]:
        if (p / "store.json").is_file():
            return p
    return None


def _free(path: Path) -> str:
    for p in [path, *path.parents]:
        try:
            return f"{shutil.disk_usage(p).free / 1e6:,.0f} MB free there now"
        except OSError:
            continue
    return "free space unknown"


def os_error_line(e: OSError) -> str | None:
    """One line for an OSError that names a path, or a full disk (None: leave the traceback). Generic, and honest about what is
    known: the path from e.filename, the store that holds it, the free space left; a write is atomic in edgecp
    (a version is renamed into place, an export too), so a failed command leaves the store at its last commit."""
    name = e.filename if e.filename is not None else e.filename2
    why = e.strerror or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT):  # a write() that fails names no file: the line still holds
        what = "over its disk quota" if e.errno == errno.EDQUOT else "full"
        where = f"'{Path(os.fsdecode(name))}'; {_free(Path(os.fsdecode(name)))}" if name is not None else \
            "while writing"
        return (f"the disk is {what} ({why}: {where}): nothing was committed and the store is at "
                "its last committed version; free some space (a concept needs a few MB in the store, an export "
                "about the size of the base) and retry")
    if name is None:
        return None
    path = Path(os.fsdecode(name))
    store = _store_of(path)
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        if store is not None:
            who = "" if e.errno == errno.EROFS else " for this user"
            return (f"store '{store}' is read-only{who} ({why}: '{path}'): commands that change it (add-concept, "
                    "export, rollback, gc, ...) need write access; make it writable, or copy it to a writable disk")
        return f"'{path}' cannot be accessed ({why}): fix its permissions or choose another path"
    return f"{why} (errno {e.errno}): '{path}'; run with EDGECP_DEBUG=1 for the traceback"
