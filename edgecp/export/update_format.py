"""A concept update of an ONNX export, as the device reads it: check it against the base export, then hand its
tensors to onnxruntime. Torch-free and onnx-free (the device runtime: numpy, onnxruntime, tokenizers).

An update folder (written by `edgecp export --profile P --update-for BASE`, `edgecp.export.update`):

    UPD/update.json           the manifest (below)
    UPD/tensors.safetensors   the initializers that differ from the base export's, keyed "<model>/<initializer name>"
    UPD/files/<rel>           the other files that differ (the tokenizer's, with the version's concept tokens)

update.json: `format` (FORMAT), `store`, `profile`, `from_version` (the base export's version) and `to_version`,
`base` (relative path -> sha256 of each model file of the base export: model.onnx, model.onnx_data), `target` (the
same of the full export of `to_version`, which `materialize` reproduces byte for byte), `tensors` (one entry per
tensor: model, name, dtype, shape, sha256, bytes), `files` (relative path -> sha256 and bytes of every file of the
update folder but update.json), `concepts`, `image_gate` (the gate drawn through base + update) and `export` (the
full export's report, what its edgecp.json would hold).

An update turns the base export into one version: updates are relative to the base, never chained, so a device
holding the base and any one update can move to any version, back included. `open_update` refuses, in one line that
names the problem, a base other than the one the update was made for, a damaged or truncated update, and a tensor
whose model, name, dtype or shape does not match the base graph's initializer, or that the base keeps inside its graph
(onnxruntime would crash, or silently ignore it). The base folder is only read. The runner hands the tensors to
onnxruntime with `SessionOptions.add_external_initializers`, which puts them in the graph before its optimizer runs;
`add_initializer` would only share them with the kernels, and an optimizer that reads an initializer's values (an
fp16 UNet's attention fusion on the CPU, measured) would fold the base's.

The tensors file is safetensors, read here by hand (8-byte header length, JSON header, raw data; 20 lines) because
the device runtime does not install the `safetensors` package; the workstation writes it with `safetensors.numpy`
and the tests check this reader against that library's.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecp.export.protobuf import fields, varint
from edgecp.integrity import check_files, read_export_meta, relative_problem

FORMAT = "edgecp-update/1"
MANIFEST = "update.json"
TENSORS = "tensors.safetensors"
FILES = "files"  # UPD/files/<rel>: whole files of the export that differ from the base's
MODELS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")  # text_encoder_2: SDXL
MODEL_FILES = ("model.onnx", "model.onnx_data")

# safetensors dtype <-> numpy <-> onnx TensorProto.DataType (the types an export's initializers use)
ST_NUMPY = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "U8": np.uint8,
            "I16": np.int16, "U16": np.uint16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_}
ONNX_ST = {1: "F32", 10: "F16", 11: "F64", 3: "I8", 2: "U8", 5: "I16", 4: "U16", 6: "I32", 7: "I64", 9: "BOOL"}
ST_ONNX = {v: k for k, v in ONNX_ST.items()}


class UpdateError(ValueError):
    """An update that cannot be used with this base: the message names the problem and the fix, in one line."""


def sha256_bytes(data) -> str:
    return hashlib.sha256(data).hexdigest()


def is_model_file(rel: str) -> bool:
    """`rel` (a path relative to an export) is a model's graph or its data file: MODEL/model.onnx[_data]."""
    parts = rel.split("/")
    return parts[0] in MODELS and parts[-1] in MODEL_FILES


def model_files(files: dict[str, dict]) -> dict[str, str]:
    """relative path -> sha256 of the model files in an export's file record (its edgecp.json `files`)."""
    return {rel: rec["sha256"] for rel, rec in sorted(files.items()) if is_model_file(rel) and isinstance(rec, dict)}


# ---------------------------------------------------------------------------------------------- safetensors


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """name -> read-only array of a safetensors file, mapped (no copy of the data). Refuses a file whose header does
    not parse or whose offsets leave the file (truncated)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UpdateError(f"{path.name} is truncated ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise UpdateError(f"{path.name} is truncated: its header says {n} bytes, the file has {size - 8} after it")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise UpdateError(f"{path.name} has no readable safetensors header") from None
    if not isinstance(header, dict):
        raise UpdateError(f"{path.name} has no readable safetensors header")
    start = 8 + n
    buf = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
    out = {}
    for name, rec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = ST_NUMPY[rec["dtype"]], [int(d) for d in rec["shape"]], rec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise UpdateError(f"{path.name}: tensor {name!r} has an unreadable header entry") from None
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= b <= e <= size - start or e - b != count * np.dtype(dtype).itemsize:
            raise UpdateError(f"{path.name}: tensor {name!r} lies outside the file (truncated or damaged)")
        out[name] = buf[start + b:start + e].view(dtype).reshape(shape)
    return out


# ---------------------------------------------------------------------------------------------- onnx initializers


def graph_initializers(path: Path, external: dict[str, bool] | None = None) -> dict[str, tuple[int, tuple[int, ...]]]:
    """name -> (onnx data type, dims) of the main graph's initializers of an ONNX model file, read from a memory map
    without the onnx package; `external` (if given) receives name -> whether its data is in an external file."""
    out: dict[str, tuple[int, tuple[int, ...]]] = {}
    if path.stat().st_size == 0:
        return out
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            for name, dtype, dims, outside in _initializers(buf):
                out[name] = (dtype, dims)
                if external is not None:
                    external[name] = outside
        except ValueError as e:
            raise UpdateError(f"'{path}': {e}") from None
    return out


def _initializers(buf):
    """(name, data type, dims, external) per initializer of the main graph. onnx.proto: ModelProto.graph 7;
    GraphProto.initializer 5; TensorProto.dims 1 (packed or not), .data_type 2, .name 8, .data_location 14
    (1: EXTERNAL)."""
    graphs = [v for f, wire, v in fields(buf, 0, len(buf)) if f == 7 and wire == 2]
    for graph in graphs:
        for g_field, g_wire, tensor in fields(buf, *graph):
            if g_field != 5 or g_wire != 2:
                continue
            dims, dtype, name, location = [], 0, "", 0
            for t_field, t_wire, tv in fields(buf, *tensor):
                if t_field == 1 and t_wire == 0:
                    dims.append(tv)
                elif t_field == 1:  # packed dims
                    k = tv[0]
                    while k < tv[1]:
                        d, k = varint(buf, k)
                        dims.append(d)
                elif (t_field, t_wire) == (2, 0):
                    dtype = tv
                elif (t_field, t_wire) == (8, 2):
                    name = bytes(buf[tv[0]:tv[1]]).decode("utf-8")
                elif (t_field, t_wire) == (14, 0):
                    location = tv
            yield name, dtype, tuple(d - (1 << 64) if d >= 1 << 63 else d for d in dims), location == 1


# ---------------------------------------------------------------------------------------------- the update


@dataclass
class Update:
    """An update checked against its base: per model, initializer name -> array (mapped from the update's file),
    the replacement files (relative path -> path in the update folder), and the manifest."""

    folder: Path
    manifest: dict[str, Any]
    base_meta: dict[str, Any]  # the base export's edgecp.json, checked
    tensors: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.manifest["to_version"]

    @property
    def concepts(self) -> list[dict]:
        return self.manifest.get("concepts", [])

    def file(self, base: Path, rel: str) -> Path:
        """The file `rel` of base + update: the update's copy when it carries one, else the base's."""
        return self.files.get(rel, base / rel)


def read_manifest(folder: Path) -> dict[str, Any]:
    """update.json of an update folder, its shape checked (one line on anything else)."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        raise UpdateError(f"'{folder}' is not an update folder (a folder `edgecp export --update-for` wrote)")
    path = folder / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise UpdateError(f"'{folder}' has no {MANIFEST}: not an edgecp update (a full export is passed as --onnx-dir)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UpdateError(f"{folder / MANIFEST} cannot be read as JSON: copy the update again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise UpdateError(f"{folder / MANIFEST} has format {got!r}, not {FORMAT!r}: make the update with this edgecp")
    for key, kind in (("base", dict), ("target", dict), ("tensors", list), ("files", dict), ("to_version", str),
                      ("from_version", str), ("profile", str)):
        if not isinstance(manifest.get(key), kind):
            raise UpdateError(f"{folder / MANIFEST} has no valid '{key}': copy the update again")
    return manifest


def open_update(base: Path, folder: Path, base_meta: dict[str, Any] | None = None) -> Update:
    """The update in `folder`, checked against the base export in `base` before any tensor is used: the base is a
    complete, intact edgecp export (every file against its edgecp.json sha256, unless the caller already checked it
    and passes its edgecp.json as `base_meta`: the base is hashed once) whose model files are
    the ones the update was made for; every file of the update matches its recorded sha256 and size; every tensor
    matches its manifest entry (dtype, shape, sha256) and an initializer of the base's graph of that model (name,
    dtype, shape). Raises UpdateError naming the first problem."""
    base, folder = Path(base), Path(folder)
    manifest = read_manifest(folder)
    meta = base_meta
    if meta is None:
        meta, problems = read_export_meta(base)
        if meta is None or problems:
            raise UpdateError(f"base export '{base}' is not intact: {problems[0]}; copy the base export again")
    have = model_files(meta.get("files", {}))
    want = manifest["base"]
    if have != want:
        differ = sorted(set(have) ^ set(want)) or [r for r in sorted(want) if have.get(r) != want[r]]
        raise UpdateError(
            f"update '{folder}' was made for another base export ({manifest['profile']} {manifest['from_version']}): "
            f"{differ[0]} differs in '{base}' (profile {meta.get('profile')}, version {meta.get('version')}); use "
            "the base export it was made for, or make the update with --update-for this base")
    problems = check_files(folder, manifest["files"])
    if problems:
        raise UpdateError(f"update '{folder}' is damaged: {problems[0]}; copy the update again")
    update = Update(folder, manifest, meta)
    for rel in manifest["files"]:
        if rel.startswith(FILES + "/"):
            inner = rel[len(FILES) + 1:]
            bad = relative_problem(inner)
            if bad:
                raise UpdateError(f"update '{folder}' names a file {bad}; copy the update again")
            update.files[inner] = folder / rel
    entries = manifest["tensors"]
    arrays = read_safetensors(folder / TENSORS) if entries else {}
    graphs: dict[str, dict] = {}
    outside: dict[str, dict[str, bool]] = {}
    for e in entries:
        try:
            model, name, dtype, shape, digest = e["model"], e["name"], e["dtype"], tuple(e["shape"]), e["sha256"]
        except (KeyError, TypeError):
            raise UpdateError(f"{folder / MANIFEST}: a tensor entry is incomplete; copy the update again") from None
        if model not in MODELS:
            raise UpdateError(f"update tensor {name!r} is for model {model!r}, not one of {list(MODELS)}")
        arr = arrays.get(f"{model}/{name}")
        if arr is None:
            raise UpdateError(f"update '{folder}' lacks tensor {model}/{name} that its manifest lists; copy it again")
        if ST_ONNX.get(dtype) is None or arr.dtype != np.dtype(ST_NUMPY[dtype]) or tuple(arr.shape) != shape:
            raise UpdateError(f"update tensor {model}/{name} is {arr.dtype}{list(arr.shape)}, its manifest says "
                              f"{dtype}{list(shape)}; copy the update again")
        if sha256_bytes(np.ascontiguousarray(arr)) != digest:
            raise UpdateError(f"update tensor {model}/{name} does not match its sha256 (damaged); copy the update again")
        if model not in graphs:
            outside[model] = {}
            graphs[model] = graph_initializers(base / model / "model.onnx", outside[model])
        found = graphs[model].get(name)
        if found is None:
            raise UpdateError(f"update tensor {model}/{name} is not an initializer of '{base}/{model}/model.onnx': "
                              "the update is for another export layout; make it again with --update-for this base")
        if found != (ST_ONNX[dtype], shape):
            raise UpdateError(f"update tensor {model}/{name} is {dtype}{list(shape)}, the base's is onnx type "
                              f"{found[0]}{list(found[1])}: make the update again with --update-for this base")
        if not outside[model][name]:
            raise UpdateError(f"base export '{base}' keeps {model}/{name} inside its graph, where an update cannot "
                              "replace it (an export of an older edgecp): export the base again with this edgecp")
        update.tensors.setdefault(model, {})[name] = arr
    return update


def read_update(folder: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """(update.json, problems) of an update folder, as `integrity.read_export_meta` for an export: problems is empty
    when every recorded file matches (verify and gc use it for updates under STORE/exports)."""
    try:
        manifest = read_manifest(folder)
    except UpdateError as e:
        return None, [str(e)]
    return manifest, check_files(Path(folder), manifest["files"])
