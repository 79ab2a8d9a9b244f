"""The `edgecp` command of the lean device install (`pip install edgecp[runtime]`: numpy, onnxruntime, tokenizers,
pillow; no typer, rich or torch): `edgecp generate ... --backend onnx` on an export, with argparse and a plain
progress line. Every other command names the full install. `edgecp.entry` picks this when typer or rich is absent.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from edgecp.errors import EdgecpError

FULL_INSTALL = "pip install 'edgecp[full]'"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as the full CLI's usage errors
        raise EdgecpError(f"{message}: see `edgecp generate --help`")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgecp generate", description="Generate images with onnxruntime on an ONNX export "
                "(the lean device install: only --backend onnx).")
    p.add_argument("prompt", help="Text prompt; <name> stands for a learned concept.")
    p.add_argument("--store", "-s", type=Path, help="The store folder (its newest intact export is used).")
    p.add_argument("--onnx-dir", type=Path, help="An ONNX export folder.")
    p.add_argument("--update", type=Path, help="A concept update of the export in --onnx-dir (edgecp export --update-for).")
    p.add_argument("-n", type=int, default=4, help="Number of images.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the starting noise.")
    p.add_argument("--steps", type=int, default=25, help="Sampling steps (DDIM).")
    p.add_argument("--guidance", type=float, default=7.5, help="Classifier-free guidance scale.")
    p.add_argument("--size", type=int, default=None, help="Image side in pixels (default: the model's).")
    p.add_argument("--out", type=Path, default=Path("edgecp-out"), help="Output folder.")
    p.add_argument("--backend", default="onnx", help="onnx (torch needs the full install).")
    p.add_argument("--reduce-memory", action="store_true",
                   help="Hold one model at a time (peak: the UNet, not all three; seconds of loading per image).")
    return p


def generate(argv: list[str]) -> None:
    from edgecp.generate import GenerateConfig, find_export, generate_from_onnx

    a = _parser().parse_args(argv)
    if a.backend != "onnx":
        raise EdgecpError(f"--backend '{a.backend}' needs the full install ({FULL_INSTALL}); this install runs --backend onnx")
    if a.store is None and a.onnx_dir is None:
        raise EdgecpError("no model given: pass --onnx-dir DIR (an `edgecp export` folder) or --store STORE")
    if a.update is not None and a.onnx_dir is None:
        raise EdgecpError("--update needs --onnx-dir BASE (the export the update was made for)")
    cfg = GenerateConfig(n=a.n, seed=a.seed, steps=a.steps, guidance=a.guidance, size=a.size,
                         reduce_memory=a.reduce_memory)

    def bar(ev) -> None:  # a ProgressEvent ("sample", step, total)
        sys.stderr.write(f"\rsample (onnx) {ev.step}/{ev.total}" + ("\n" if ev.step == ev.total else ""))
        sys.stderr.flush()

    paths = generate_from_onnx(a.onnx_dir or find_export(a.store), a.prompt, cfg, a.out, callback=bar,
                               on_note=lambda m: sys.stderr.write(f"note: {m}\n"), update=a.update)
    print(f"wrote {len(paths) - 1} image(s) and a grid: {paths[-1]}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print("usage: edgecp generate PROMPT --onnx-dir DIR [--update UPD] [-n N] [--steps S] [--seed S] [--size PX] [--out DIR] [--reduce-memory]\n"
                  f"This is edgecp's lean device install; the other commands need {FULL_INSTALL}.")
            return
        if argv[0] != "generate":
            raise EdgecpError(f"`edgecp {argv[0]}` needs the full install: {FULL_INSTALL} (this one only runs "
                              "`edgecp generate --backend onnx`)")
        generate(argv[1:])
    except EdgecpError as e:
        if os.environ.get("EDGECP_DEBUG") == "1":
            raise
        sys.stderr.write(f"error: {e}\n")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
