"""What the command groups of `edgecp` share: the consoles, the option types (with `--store`'s fallbacks,
`resolve_store`), `key=value` parsing, the progress bars, and, for the CLI's own process, what `main()` sets
(`cli_process`) and how it words an OSError (`os_error_line`).

Output that is not a terminal (piped, redirected to a log, captured) is never wrapped or cut: the consoles are as
wide as a line needs there (`console`), and progress is plain lines printed as it happens, not a live display
rendered once at the end (`progress_bars`)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import time
import warnings
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console, ConsoleDimensions
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from edgecp.errors import EdgecpError
from edgecp.scoped import QUIET_LOGGERS, quiet_libraries

# the width of a console whose file is not a terminal: wide enough that rich never wraps a line or a table there
NOT_A_TERMINAL_WIDTH = 10_000
STORE_ENV = "EDGECP_STORE"  # the store of every command that takes --store, when --store is not given
NO_STORE = f"no store given: pass --store DIR, set {STORE_ENV}, or run in a store's folder"


class _Console(Console):
    """rich's Console, except where its file is not a terminal (a pipe, a log file, a test's capture): there rich
    would wrap at 80 columns and split file paths; here every line is as long as it is (NOT_A_TERMINAL_WIDTH).
    Decided at each print, so a console made at import follows a later redirection."""

    @property
    def size(self) -> ConsoleDimensions:
        dims = Console.size.fget(self)
        return dims if self.is_terminal else ConsoleDimensions(NOT_A_TERMINAL_WIDTH, dims.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


def console(stderr: bool = False, soft_wrap: bool = False) -> Console:
    """A console of the CLI: rich's on a terminal, never wrapping where the output is not one (`_Console`)."""
    return _Console(stderr=stderr, soft_wrap=soft_wrap)


out = console()
err = console(stderr=True)


def table(title: str | None = None, on: Console | None = None, **kw) -> Table:
    """A rich Table for console `on` (default `out`) whose title stays on one line where the output is not a
    terminal (rich wraps a title at the table's width, which splits a store path in it): there the table is at least
    as wide as its title. On a terminal the table keeps its own width (rich's min_width would overflow a narrow one);
    a console with soft_wrap prints the title on one line for the terminal to wrap."""
    if title is not None and not (on or out).is_terminal:
        kw.setdefault("min_width", Text.from_markup(title).cell_len)
    return Table(title=title, **kw)


def resolve_store(path: Path | None = None, alternative: str = "") -> Path:
    """The store a command works on: `path` (--store) when given, else $EDGECP_STORE, else the current folder when it
    holds store.json. None of them: EdgecpError (one line, exit 2) saying the three ways to give one, and
    `alternative` after them (generate: an ONNX folder instead)."""
    if path is not None:
        return path
    env = os.environ.get(STORE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    here = Path.cwd()
    if (here / "store.json").is_file():
        return here
    raise EdgecpError(NO_STORE + alternative)


# --store may be left out: click calls the factory while it parses (`resolve_store`: $EDGECP_STORE, then the current
# folder); a factory and not a callback, so a command that declares `store: StoreOpt` with no default needs no change
StoreOpt = Annotated[Path, typer.Option(
    "--store", "-s", default_factory=resolve_store, show_default=False,
    help=f"The store folder (made by `edgecp init`); default: ${STORE_ENV}, else the current folder if it is a store.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
PlanOpt = Annotated[Optional[list[str]], typer.Option(
    "--plan", help="Pin a plan setting key=value (weights=int8|bf16|fp32, gradient_checkpointing=true, micro_batch=1, "
    "dc_chunk=2, compute=fp32 with weights=int8, host_trained=true for custom-diffusion/cns); the planner chooses the "
    "rest.")]
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


def _number(loss: float | None, metric: str | None) -> str:
    """What a phase's number is and its value: "<metric> <value>" ("loss <value>" when the emitter names none)."""
    return "" if loss is None else f"{metric or 'loss'} {loss:.4f}"


def _clock(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class PlainProgress:
    """Progress as plain lines, for a stderr that is not a terminal (a log, a pipe): a line when a phase starts,
    at every tenth of it and when it ends, each printed (and flushed) as it happens, so that a log reads in order
    with the lines around it. A phase whose step goes back (it began again) starts over."""

    def __init__(self, console: Console):
        self.console = console
        self.phases: dict[str, list] = {}  # phase -> [start time, start step, last tenth printed, last step]

    def __call__(self, phase: str, step: int, total: int, loss: float | None = None, metric: str | None = None) -> None:
        now = time.monotonic()
        st = self.phases.get(phase)
        if st is None or step < st[3]:
            st = self.phases[phase] = [now, step, -1, step]
        st[3] = step
        tenth = min(10, 10 * step // total) if total > 0 else 10
        if tenth <= st[2]:
            return
        st[2] = tenth
        pct = f" ({100 * step // total}%)" if total > 0 else ""
        line = f"{phase:<12} {step}/{total}{pct}"
        number = _number(loss, metric)
        if number:
            line += f"  {number}"
        line += f"  {_clock(now - st[0])} elapsed"
        if total > 0 and st[1] < step < total and now > st[0]:
            line += f", ETA {_clock((total - step) * (now - st[0]) / (step - st[1]))}"
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)


@contextmanager
def progress_bars():
    """Yields `bar(phase, step, total, loss=None, metric=None)`, one bar per phase: a rich display with ETAs on a
    terminal; plain lines (`PlainProgress`) where stderr is not one. `metric` names what `loss` is (the
    ProgressEvent's; shown "<metric> <value>")."""
    if not err.is_terminal:
        yield PlainProgress(err)
        return
    cols = [TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*cols, console=err, transient=False) as prog:
        tasks: dict[str, int] = {}

        def bar(phase: str, step: int, total: int, loss: float | None = None, metric: str | None = None) -> None:
            if phase not in tasks:
                tasks[phase] = prog.add_task(phase, total=total, completed=step, info="")  # a resumed bar: ETA from here
            prog.update(tasks[phase], completed=step, total=total, info=_number(loss, metric))

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
