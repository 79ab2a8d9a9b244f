"""The README and the guides say true things about the code (issue 23): every relative link resolves, every
`edgecp ...` command line in a code block parses with the real CLI, every `python tools/X.py --flag` names a tool and
flags it has, and the onnxruntime bound the README states is pyproject's and matches the release the export's
onnxruntime patches were written for. Reads files only (no model, no torch): well under a second."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "architecture.md", *sorted((ROOT / "docs" / "guide").glob("*.md"))]
GUIDES = ("install", "memory", "methods", "bases", "store", "export", "bench")


def code_lines(text: str) -> list[str]:
    """The commands of the fenced code blocks (comments cut, `\\` continuations joined)."""
    out, in_code, buf = [], False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if not in_code:
            continue
        line = buf + line
        if line.rstrip().endswith("\\"):
            buf = line.rstrip()[:-1] + " "
            continue
        buf = ""
        out.append(re.split(r"\s+#\s", line, maxsplit=1)[0].strip())
    return out


def commands(prefix: str) -> list[tuple[str, str]]:
    return [(f.relative_to(ROOT).as_posix(), c) for f in DOCS for c in code_lines(f.read_text()) if c.startswith(prefix)]


def test_the_readme_links_every_guide_and_every_guide_exists():
    readme = (ROOT / "README.md").read_text()
    for name in GUIDES:
        assert f"](docs/guide/{name}.md)" in readme, name
        assert (ROOT / "docs" / "guide" / f"{name}.md").is_file(), name


@pytest.mark.parametrize("doc", [*DOCS, *sorted((ROOT / "docs").glob("*/README.md"))], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(doc):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        path = target.split("#")[0]
        if path and not target.startswith(("http://", "https://", "mailto:")) and not (doc.parent / path).exists():
            broken.append(target)
    assert broken == []


def test_every_edgecp_command_line_parses(monkeypatch):
    """Each line is parsed by the CLI's click command, down to the subcommand (options, arguments, types); a path the
    example assumes need not exist. A line without --store assumes one is set ($EDGECP_STORE, docs/guide/store.md)."""
    import typer

    from edgecp.cli import app

    monkeypatch.setenv("EDGECP_STORE", "my-model")

    group = typer.main.get_command(app)  # typer may bring its own copy of click: duck-typed below
    lines = commands("edgecp ")
    assert len(lines) > 40, "the README's tour and the guides' command blocks"
    bad, parsed = [], 0
    for doc, line in lines:
        try:
            parent = group.make_context("edgecp", shlex.split(line)[1:])
            cmd, rest = group, [*parent._protected_args, *parent.args]
            while hasattr(cmd, "resolve_command") and rest:  # a group: on to its subcommand
                name, cmd, rest = cmd.resolve_command(parent, rest)
                parent = cmd.make_context(name, list(rest), parent=parent)
                rest = [*parent._protected_args, *parent.args] if hasattr(cmd, "resolve_command") else []
            parsed += not hasattr(cmd, "resolve_command")
        except Exception as e:  # click's UsageError, BadParameter, NoSuchOption, ...
            if not hasattr(e, "format_message"):
                raise
            bad.append(f"{doc}: {line}: {e.format_message()}")
    assert bad == []
    groups = (["profiles"], ["methods"])  # groups that list when called alone
    assert parsed == len(lines) - sum(line.split()[1:] in groups for _, line in lines)


def test_every_tool_command_names_a_tool_and_its_flags():
    bad = []
    for doc, line in commands("python tools/") + commands("OMP_NUM_THREADS=1 python tools/"):
        words = shlex.split(line.replace("OMP_NUM_THREADS=1 ", ""))
        tool = ROOT / words[1]
        if not tool.is_file():
            bad.append(f"{doc}: {words[1]} does not exist")
            continue
        source = tool.read_text()
        bad += [f"{doc}: {words[1]} has no {w}" for w in words[2:] if w.startswith("--") and f'"{w.split("=")[0]}"' not in source]
    assert bad == []


def _upper_bound(requirements: list[str], package: str) -> str:
    spec = next(r for r in requirements if re.match(rf"{re.escape(package)}\b(?!-)", r))
    m = re.search(r"<\s*(\d+\.\d+)", spec)
    assert m, f"{package} has no upper bound in pyproject ({spec})"
    return m.group(1)


def test_the_onnxruntime_bound_is_the_patches_next_minor_and_the_readme_says_so():
    """pyproject bounds onnxruntime below the next minor of the release the export's patches were written for
    (edgecp/export/ort_patches.py), and the README names that bound and the tested release."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    releases = set(re.findall(r'OrtPatch\(\s*"[\w-]+",\s*"(\d+\.\d+)"', (ROOT / "edgecp/export/ort_patches.py").read_text()))
    assert len(releases) == 1, releases
    major, minor = map(int, releases.pop().split("."))
    bound = f"{major}.{minor + 1}"
    assert _upper_bound(extras["runtime"], "onnxruntime") == bound
    assert _upper_bound(extras["cuda"], "onnxruntime-gpu") == bound
    readme = (ROOT / "README.md").read_text()
    assert f"<{bound}" in readme and f"onnxruntime {major}.{minor}." in readme
