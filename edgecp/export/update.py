"""Concept updates, the workstation's side: an update from two exports, and a complete folder from base + update.

`make_update(base, full, out)` compares the full export of a version (`full`, just built by `ExportJob`) with the
base export the device holds (`base`, an earlier version of the same store and profile) and writes into `out` only
what differs: the initializers whose bytes differ, whatever they are (the merged K/V weights, the personal token
table, optimizer-packed tensors, int8 weights, scales and zero points), and the other files that differ (the
tokenizer's). It finds them by comparing the exports, not by knowing the method, so one code path serves every
method, profile and optimizer fusion; that needs exports that are deterministic for unchanged weights
(`tests/test_update.py` checks two exports of one version are byte-identical). Two exports whose graphs differ in
anything but initializer bytes (another int8 variant, a VAE kept fp32 in one, a grown personal table) cannot be one
update: `UpdateRefused` says which model and why.

`materialize(base, update, out)` writes base + update as a complete export folder, byte for byte the full export of
the update's version (its model files are checked against the sha256s the update recorded), for readers such as
optimum that know nothing of updates. The base folder is only read.

The device's side (checking an update, using its tensors) is `update_format`, torch- and onnx-free.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data
from safetensors.numpy import save_file

from edgecp import outputs
from edgecp.atomic import write_json_atomic
from edgecp.errors import EdgecpError
from edgecp.export.external_data import DATA_FILE, TYPED_FIELDS, tensor_bytes, write_one_data_file
from edgecp.export.update_format import (
    FILES,
    FORMAT,
    MANIFEST,
    MODELS,
    ONNX_ST,
    ST_NUMPY,
    TENSORS,
    UpdateError,
    is_model_file,
    model_files,
    open_update,
    read_manifest,
)
from edgecp.integrity import EXPORT_META, WRITING_MARK, hash_tree, write_export_meta


class UpdateRefused(EdgecpError):
    """Two exports that one update cannot join: the message names the model and the difference."""


@dataclass
class Changed:
    """One model's initializers that differ from the base's: name -> (onnx data type, dims, bytes)."""

    tensors: dict[str, tuple[int, tuple[int, ...], bytes]] = field(default_factory=dict)
    total: int = 0  # the model's initializers


def _structure(model) -> bytes:
    """The model without its main graph's initializer bytes (names, types and shapes kept): equal for two exports
    that one update can join."""
    for t in model.graph.initializer:
        kind = "raw" if t.HasField("raw_data") or uses_external_data(t) else "typed"
        for name in ("raw_data", "data_location", "external_data", *TYPED_FIELDS):
            t.ClearField(name)
        t.doc_string = kind  # where the values live stays part of the structure (materialize writes them there)
    return model.SerializeToString(deterministic=True)


def _digests(path: Path) -> tuple[dict[str, str], bytes]:
    """(initializer name -> sha256 of its bytes, the structure) of one model file; one tensor in memory at a time
    for external data (an inline model is one protobuf, read whole as onnx reads it)."""
    model = onnx.load(str(path), load_external_data=False)
    digests = {t.name: hashlib.sha256(tensor_bytes(t, path.parent)).hexdigest() for t in model.graph.initializer}
    return digests, _structure(model)


def diff_model(base: Path, new: Path, name: str) -> Changed:
    """The initializers of model `name` whose bytes differ between the base export and the new one."""
    if not (base / name / "model.onnx").is_file():
        raise UpdateRefused(f"the base export has no {name}/model.onnx: make a full export (without --update-for)")
    base_digests, base_structure = _digests(base / name / "model.onnx")
    model = onnx.load(str(new / name / "model.onnx"), load_external_data=False)
    changed = Changed(total=len(model.graph.initializer))
    for t in model.graph.initializer:
        raw = tensor_bytes(t, new / name)
        if base_digests.get(t.name) == hashlib.sha256(raw).hexdigest():
            continue
        if t.data_type not in ONNX_ST:
            raise UpdateRefused(f"{name}: initializer {t.name!r} changed and has onnx type {t.data_type}, which an "
                                "update does not carry; make a full export (without --update-for)")
        changed.tensors[t.name] = (t.data_type, tuple(t.dims), raw)
    if _structure(model) != base_structure:
        names_new = {t.name for t in model.graph.initializer}
        added = sorted(names_new - set(base_digests))
        gone = sorted(set(base_digests) - names_new)
        detail = (f"initializer {added[0]!r} is new" if added else f"initializer {gone[0]!r} is gone" if gone
                  else "its operators, or an initializer's type or shape, differ")
        raise UpdateRefused(f"{name}: the graph differs from the base export's ({detail}), so this version cannot be "
                            "an update of it; make a full export (without --update-for) and use it as the new base")
    return changed


def make_update(base: Path, base_meta: dict, full: Path, out: Path, manifest: dict) -> dict:
    """Write into `out` the update that turns the base export (`base`, its checked edgecp.json `base_meta`) into the
    full export `full`; returns the manifest (`manifest` gives store, profile, versions, concepts). Raises
    UpdateRefused where the two cannot be joined."""
    base_all = base_meta.get("files", {})
    base_files = model_files(base_all)
    # the export's own files: not its writing mark, nor the raw graphs a later int8 variant may still need
    new_meta_files = {rel: rec for rel, rec in hash_tree(full, exclude=(EXPORT_META,)).items()
                      if not any(part.startswith(".") for part in rel.split("/"))}
    models = [m for m in MODELS if (full / m / "model.onnx").is_file()]
    entries, arrays, per_model = [], {}, {}
    for name in models:
        changed = diff_model(base, full, name)
        size = 0
        for tname, (dtype, dims, raw) in sorted(changed.tensors.items()):
            st = ONNX_ST[dtype]
            arr = np.frombuffer(raw, dtype=ST_NUMPY[st]).reshape(dims)
            arrays[f"{name}/{tname}"] = arr
            entries.append({"model": name, "name": tname, "dtype": st, "shape": list(dims),
                            "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)})
            size += len(raw)
        per_model[name] = {"tensors": len(changed.tensors), "of": changed.total, "bytes": size}
    carried = [rel for rel, rec in new_meta_files.items()
               if not is_model_file(rel) and base_all.get(rel, {}).get("sha256") != rec["sha256"]]
    gone = sorted(r for r in base_all if r not in new_meta_files and not is_model_file(r))
    if gone:
        raise UpdateRefused(f"the base export has {gone[0]}, which this version's export does not: make a full export")
    out.mkdir(parents=True, exist_ok=True)
    if arrays:
        save_file(arrays, str(out / TENSORS))
    for rel in carried:
        dst = out / FILES / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(full / rel, dst)
    target = model_files(new_meta_files)
    manifest = {"format": FORMAT, **manifest, "base": base_files, "target": target, "tensors": entries,
                "models": per_model, "carried_files": sorted(carried)}
    manifest["files"] = hash_tree(out, exclude=(MANIFEST, WRITING_MARK))
    manifest["bytes"] = sum(r["bytes"] for r in manifest["files"].values())
    manifest["full_export_bytes"] = sum(r["bytes"] for r in new_meta_files.values())
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def rewrite_manifest(folder: Path, **extra) -> dict:
    """update.json with `extra` keys added (the image gate, the export's report): its file record is unchanged."""
    manifest = {**read_manifest(folder), **extra}
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def materialize(base: str | Path, update: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """Base + update as one complete export folder in `out` (outside the base), byte for byte the full export of the
    update's version: each model with changed tensors is rewritten from the base's graph with the update's bytes in
    place (the export's own writer, `write_one_data_file`), every other file copied (the update's copy where it
    carries one), edgecp.json last. Its model files must match the sha256s the update recorded, or nothing is left.
    Returns the folder's edgecp.json."""
    base, update = outputs.absolute(base), outputs.absolute(update)
    try:
        upd = open_update(base, update)
    except UpdateError as e:
        raise EdgecpError(str(e)) from None
    out = outputs.check_output_dir(out, None, overwrite=overwrite, kind="onnx")
    if out == base or base in out.parents or out in base.parents:
        raise EdgecpError(f"--out '{out}' overlaps the base export '{base}', which is never written to: pick "
                          "another folder")
    meta = upd.base_meta
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for rel in meta["files"]:
            if is_model_file(rel) and rel.split("/")[0] in upd.tensors:
                continue
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(upd.file(base, rel), dst)
        for rel, src in upd.files.items():
            if not (tmp / rel).exists():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, tmp / rel)
        for model, tensors in upd.tensors.items():
            src = base / model / "model.onnx"
            graph = onnx.load(str(src), load_external_data=False)
            external = any(uses_external_data(t) for t in graph.graph.initializer) or (base / model / DATA_FILE).exists()
            overrides = {k: np.ascontiguousarray(v).tobytes() for k, v in tensors.items()}
            write_one_data_file(src, tmp / model, external, model=graph, overrides=overrides)
        export_meta = dict(upd.manifest.get("export") or {})
        export_meta.pop("files", None)
        written = write_export_meta(tmp, export_meta)
        got = model_files(written["files"])
        if got != upd.manifest["target"]:
            bad = sorted(r for r in set(got) | set(upd.manifest["target"]) if got.get(r) != upd.manifest["target"].get(r))
            raise EdgecpError(f"materialized {bad[0]} does not match the full export the update recorded: nothing "
                              "was written; make a full export with `edgecp export` instead")
        outputs.put_in_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written
