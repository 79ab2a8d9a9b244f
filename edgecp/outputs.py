"""Where `export` and `generate` may write what the user asked for (`--out`). Torch-free.

Rules (`check_output_dir`), each refusal one line naming the path and the fix:

- the path is made absolute and its symbolic links resolved before anything is written, so a relative `--out`
  means the same folder after a library step changes the working directory (onnxruntime's quantizer does), and a
  link cannot lead into a store;
- never inside a store (the store itself, `versions/`, `staging/`, ...): recovery and `gc` delete what they do
  not know there, and a version must hold only what its manifest lists. The one exception is a folder directly
  under `STORE/exports/` for the ONNX export, not a dot-name (recovery treats those as temporary): that is where
  the export goes by default (`STORE/exports/PROFILE-VERSION`) and where `gc` and `generate --backend onnx` find it;
- never an existing file; a missing parent folder is made;
- an existing folder must be empty, except:
  - exports, with `overwrite=True`: the folder is replaced whole once the new export has passed its gates (the old
    one is renamed aside, the new one renamed into place, the old one deleted), but only when it holds an earlier
    export of the same kind (ONNX: an `edgecp.json`; diffusers: nothing but `.safetensors` files; webui and
    checkpoint: their `edgecp-export.json` naming that format). Our choice, not
    the issue's: `--overwrite` is a request to replace an earlier export, and deleting any other folder (a typo'd
    `--out ~/Documents`) is refused even then;
  - images (`generate`, our choice): a folder that holds nothing but images named as generate names them
    (`<prompt>-vNNNN-s<seed>[-onnx]-<i|grid>.png`; hidden files and the desktop's Thumbs.db / desktop.ini are
    ignored) is generate's own and is reused, so the default `--out edgecp-out` works run after run; an image of
    the same name (same prompt, version and seed) is replaced. No marker file: the names are the mark, and folders
    from before this rule qualify. Any other non-empty folder needs `overwrite=True`, which writes the images into
    it (files of the same names replaced, nothing else touched).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

from edgecp.errors import EdgecpError
from edgecp.integrity import EXPORT_META

KINDS = ("onnx", "update", "diffusers", "webui", "checkpoint", "images")
TOOLS_REPORT = "edgecp-export.json"  # the report of a webui or checkpoint export (edgecp.export.webui.REPORT)
UPDATE_MANIFEST = "update.json"  # an update folder's manifest (edgecp.export.update_format.MANIFEST)
DESKTOP_FILES = ("Thumbs.db", "desktop.ini")  # what a file browser leaves in a folder it showed (besides dot-files)
# what generate names its files: <prompt slug>-<version>-s<seed>[-onnx]-<index | grid>.png (edgecp.generate)
IMAGE_NAME_RE = re.compile(r"[a-z0-9-]+-v[0-9]{4,}-s[0-9]+(-onnx)?-([0-9]+|grid)\.png"
                           r"|[a-z0-9-]+-step[0-9]{5,}-s[0-9]+-[0-9]+\.png")  # generate's; add-concept's samples



def absolute(path: str | Path) -> Path:
    """`path` absolute with `~` expanded, links kept (what the user named, for messages and link checks)."""
    return Path(os.path.abspath(Path(path).expanduser()))


def real_path(path: str | Path) -> Path:
    """`path` absolute, `~` expanded and symbolic links resolved (also for a path that does not exist yet)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _shown(out: str | Path, real: Path) -> str:
    plain = absolute(out)
    return f"'{out}'" + (f" (which resolves to '{real}')" if plain != real else "")


def earlier_output(folder: Path, kind: str) -> bool:
    """`folder` holds what an earlier run of the same kind wrote (see the module docstring)."""
    if kind == "onnx":
        meta = folder / EXPORT_META
        return meta.is_file() and not meta.is_symlink()
    if kind == "update":
        meta = folder / UPDATE_MANIFEST
        return meta.is_file() and not meta.is_symlink()
    if kind == "diffusers":
        return all(p.is_file() and not p.is_symlink() and p.suffix == ".safetensors" for p in folder.iterdir())
    if kind in ("webui", "checkpoint"):
        report = folder / TOOLS_REPORT
        try:
            return not report.is_symlink() and json.loads(report.read_text()).get("format") == kind
        except (OSError, ValueError, AttributeError):
            return False
    if kind == "images":
        return all(p.name.startswith(".") or p.name in DESKTOP_FILES
                   or p.is_file() and not p.is_symlink() and IMAGE_NAME_RE.fullmatch(p.name) for p in folder.iterdir())
    raise ValueError(f"kind {kind!r} is not one of {KINDS}")


def check_output_dir(out: str | Path, store_root: str | Path | None = None, overwrite: bool = False,
                     allow_exports_subdir: bool = False, kind: str = "onnx") -> Path:
    """The absolute, link-free folder to write `kind` ("onnx", "diffusers" or "images") to, or EdgecpError.

    `store_root`: the store the output comes from (None: no store to keep out of). `allow_exports_subdir`: a folder
    directly under STORE/exports/ is allowed (the ONNX export's own place). `overwrite`: see the module docstring.
    Nothing is written here."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    real = real_path(out)
    shown = _shown(out, real)
    store = real_path(store_root) if store_root is not None else None
    if store is not None and _inside(real, store):
        exports = store / "exports"
        if not (allow_exports_subdir and real.parent == exports and not real.name.startswith(".")):
            where = "is the store" if real == store else f"is inside the store '{store}'"
            also = f", or a new folder directly under '{exports}'" if allow_exports_subdir else ""
            raise EdgecpError(
                f"output folder {shown} {where}, whose folders edgecp manages (recovery and gc delete what they do "
                f"not know there): pass an --out outside the store{also}"
            )
    if real.exists():
        if not real.is_dir():
            raise EdgecpError(f"output folder {shown} is an existing file, not a folder: pass the path of a new or "
                              "empty folder as --out")
        if not any(real.iterdir()):
            return real
        if kind == "images":
            if earlier_output(real, "images") or overwrite:
                return real
            raise EdgecpError(
                f"output folder {shown} holds files other than edgecp generate's images: pass --overwrite to write the "
                "images into it anyway, or a new or empty --out"
            )
        what = {"onnx": "ONNX export (no edgecp.json)", "update": "update (no update.json)",
                "webui": f"webui export (no {TOOLS_REPORT} of one)",
                "checkpoint": f"checkpoint export (no {TOOLS_REPORT} of one)"}.get(
            kind, "diffusers export (files other than .safetensors)")
        if not overwrite:
            raise EdgecpError(f"output folder {shown} exists and is not empty: pass --overwrite to replace the earlier "
                              "export there, or a new or empty --out")
        if store is not None and _inside(store, real):
            raise EdgecpError(f"output folder {shown} holds the store '{store}': --overwrite would delete it; pass "
                              "another --out")
        if not earlier_output(real, kind):
            raise EdgecpError(
                f"output folder {shown} holds no earlier edgecp {what}: --overwrite replaces only an earlier export "
                "and never deletes another folder; remove it yourself or pass a new or empty --out"
            )
        return real
    parent = real.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise EdgecpError(f"output folder {shown} cannot be made: '{parent}' is a file, not a folder; pass another --out")
    return real


def put_in_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder `tmp` (a sibling of `out`) to `out`. An empty `out` is removed first; a non-empty
    one (an earlier export that `check_output_dir` allowed to be overwritten) is renamed aside to a dot-name, the new
    one renamed into place, and the old one deleted (under STORE/exports a dot-folder left by a crash is removed by
    the store's recovery)."""
    old = None
    if out.exists():
        if any(out.iterdir()):
            old = out.with_name(f".{out.name}-replaced-{uuid.uuid4().hex[:8]}")
            os.rename(out, old)
        else:
            out.rmdir()
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
