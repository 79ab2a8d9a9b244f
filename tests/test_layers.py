"""The layering contract (issue 23): every import inside edgecp points down, no circle, and the device runtime
imports no torch. Read from the source with `ast` (every import statement, at the top of a file or inside a
function), so a lazy import that would close a circle fails here just as a top-level one does."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "edgecp"

# top (1) to bottom (6): a module may import modules of its own layer or below, never above. Within a layer the
# graph must still be acyclic. The first matching prefix decides (most specific first).
LAYERS: list[tuple[str, int]] = [
    ("edgecp.cli", 1), ("edgecp.entry", 1), ("edgecp.runtime_cli", 1),
    ("edgecp.__main__", 1), ("edgecp.demo", 1),
    ("edgecp.api", 2), ("edgecp.train", 2), ("edgecp.generate", 2), ("edgecp.export", 2), ("edgecp.eval", 2),
    ("edgecp.lifecycle", 2), ("edgecp.priors", 2), ("edgecp.forgetting", 2),
    ("edgecp.methods", 3),
    ("edgecp.consolidation", 4), ("edgecp.adapters", 4), ("edgecp.model", 4), ("edgecp.personal", 4),
    ("edgecp.world", 4), ("edgecp.images", 4), ("edgecp.memory", 4), ("edgecp.diffusion", 4), ("edgecp.resumable", 4),
    ("edgecp.planner", 5), ("edgecp.store", 5), ("edgecp.config", 5), ("edgecp.errors", 5), ("edgecp.integrity", 5),
    ("edgecp.profiles", 5), ("edgecp.render", 5), ("edgecp.outputs", 5), ("edgecp.prompts", 5), ("edgecp.paths", 5),
    ("edgecp.scaling", 5), ("edgecp.scoped", 5), ("edgecp.seeds", 5), ("edgecp.progress", 5), ("edgecp.atomic", 5),
    ("edgecp.heap", 5), ("edgecp.sampling", 5), ("edgecp.captions", 5),
]
PACKAGE_INIT_LAYER = 6  # edgecp/__init__.py: imports nothing of edgecp
# what the device runtime (`pip install 'edgecp[runtime]'`: numpy, pillow, tokenizers, onnxruntime) imports
RUNTIME = ("edgecp.entry", "edgecp.runtime_cli", "edgecp.export.ort_runner", "edgecp.export.np_scheduler",
           "edgecp.export.update_format",
           "edgecp.store", "edgecp.integrity", "edgecp.outputs", "edgecp.progress", "edgecp.sampling", "edgecp.heap",
           "edgecp.atomic")


def modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the edgecp modules it imports (every import statement, wherever it stands)."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                if not t.startswith("edgecp"):
                    continue
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name:
                    graph[name].add(t)
    return graph


def layer(name: str) -> int:
    if name == "edgecp":
        return PACKAGE_INIT_LAYER
    for prefix, n in LAYERS:
        if name == prefix or name.startswith(prefix + "."):
            return n
    raise AssertionError(f"{name} has no layer in tests/test_layers.py: add it to LAYERS")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_circles_and_upward_imports():
    """The contract's own check fails on a circle and on an upward import (so a passing run means something)."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert layer("edgecp.methods.dsc") < layer("edgecp.consolidation.distill")
    assert layer("edgecp.cli") < layer("edgecp.train") < layer("edgecp.methods.base") < layer("edgecp.model.quant")


def test_no_import_circle_in_edgecp():
    assert cycles(import_graph()) == []


def test_every_import_points_down():
    graph = import_graph()
    upward = sorted(f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
                    for m, ts in graph.items() for t in ts if layer(t) < layer(m))
    assert upward == []


@pytest.mark.parametrize("module", RUNTIME)
def test_the_device_runtime_imports_no_torch(module):
    block = ["torch", "diffusers", "transformers", "peft", "safetensors.torch", "typer", "rich"]
    code = (f"import sys\nfor m in {block!r}: sys.modules[m] = None\nimport importlib\n"
            f"importlib.import_module({module!r})\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]


def test_named_seed_streams_draw_what_the_salts_drew():
    """edgecp.seeds names the salts the code used (issue 23) without moving a draw: the seeds of run seed 3, task 2,
    as the old expressions gave them (computed by hand: 3 x 7919 + 2 = 23759, ...)."""
    from edgecp import seeds

    got = {name: seeds.stream_seed(3, getattr(seeds, name), 2)
           for name in ("TRAIN", "BENCH_IMAGES", "CNS_IMPORTANCE", "REFERENCE_LOSS", "FISHER", "DSC")}
    assert got == {"TRAIN": 3002, "BENCH_IMAGES": 3002, "CNS_IMPORTANCE": 95, "REFERENCE_LOSS": 1841,
                   "FISHER": 23759, "DSC": 314189}
    assert seeds.PRIORS == 1234


def test_numpy_streams_draw_what_the_unnamed_keys_drew():
    """The numpy streams and fixed seeds edgecp.seeds names (issue 23, second pass) draw what the unnamed keys drew:
    the numbers below were drawn with the old expressions, np.random.default_rng([3, 0x5EC]),
    default_rng([3, 1 | 2, zlib.crc32(b"chelsea")]), default_rng(12345) and default_rng(0), before the names
    existed (and the export's seeds are the old GATE_SEED 0, CALIBRATION_SEED 1000, trace and estimate seeds 0)."""
    import zlib

    from edgecp import seeds
    from edgecp.eval import sequences
    from edgecp.world import data

    picks = seeds.numpy_stream(3, seeds.PROCEDURAL_CONCEPTS).choice(3600, 4, replace=False).tolist()
    assert picks == [728, 3152, 3289, 2308]
    got = [(c.name, c.source.shape, c.source.pattern, c.source.colour, c.source.accent, c.source.freq,
            round(c.source.angle, 6)) for c in sequences.procedural_sequence(3, seed=3)]
    assert got == [("p00", "crescent", "solid", "red", "teal", 5, 7.392424),
                   ("p01", "crescent", "stripes", "blue", "purple", 5, 146.394679),
                   ("p02", "square", "checker", "red", "black", 4, 64.812395)]
    assert seeds.numpy_stream(3, seeds.TRAIN_VIEWS, zlib.crc32(b"chelsea")).integers(0, 1000, 4).tolist() == [
        933, 655, 88, 121]
    assert sequences._rng(3, "train", "chelsea").integers(0, 1000, 4).tolist() == [933, 655, 88, 121]
    assert sequences._rng(3, "target", "chelsea").integers(0, 1000, 4).tolist() == [529, 596, 804, 486]
    fine = data._noise_banks()[0][0, 0, 0].tolist()  # the first pixel of the fine bank: default_rng(12345)'s first draws
    assert fine == pytest.approx([-1.423825, 1.263728, -0.870662], abs=1e-6)
    assert seeds.numpy_stream(seeds.CAPTION_WORDING).integers(0, 100, 3).tolist() == [85, 63, 51]
    assert (seeds.EXPORT_GATE, seeds.EXPORT_CALIBRATION, seeds.TRACE_EXAMPLE, seeds.CALIBRATION_RUN) == (0, 1000, 0, 0)
