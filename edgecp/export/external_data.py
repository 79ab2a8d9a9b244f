"""Streaming external data: a model's weights into one `model.onnx_data` beside its graph, one tensor at a time.

torch's exporter writes a model past 2 GiB as one file per tensor, named after graph nodes; optimum,
onnxruntime.transformers and most tools expect `model.onnx` + one `model.onnx_data`. onnx's own
`convert_model_to_external_data` + `save_model` would first load every weight into the proto, a second copy of the
model in memory; here each tensor is read from its file, written and dropped. The offsets and locations are set with
onnx's `set_external_data`, so any onnx reader (onnx.load, onnxruntime, optimum) reads the result.

`weight_free` gives onnxruntime's optimizer and quantizer the graph without its weights: they copy the proto they
are given (shape inference, save and reload), and on the graph alone those copies are small.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import (  # _get_all_tensors: onnx's own walk, private but stable since onnx 1.6
    ExternalDataInfo,
    _get_all_tensors,
    set_external_data,
    uses_external_data,
)

DATA_FILE = "model.onnx_data"      # optimum's and onnxruntime.transformers' name for the one external-data file
ALIGN = 4096                       # page-aligned tensors: onnxruntime maps them instead of copying
INLINE_MAX = 1024                  # smaller tensors: in the graph for intermediates; 64-byte aligned in the data file
SMALL_ALIGN = 64


def all_tensors(model):
    """Initializers and tensor attributes of `model`, subgraphs included (nothing public in onnx gives both)."""
    return _get_all_tensors(model)


def weight_bytes(model, folder: Path) -> int:
    """Bytes of all initializer data of a model loaded with load_external_data=False (inline or external)."""
    total = 0
    for t in all_tensors(model):
        if uses_external_data(t):
            info = ExternalDataInfo(t)
            total += info.length if info.length else (folder / info.location).stat().st_size
        else:
            total += len(t.raw_data)
    return total


def dir_bytes(d: Path) -> int:
    """Bytes of every file under `d`."""
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def tensor_data(t, folder: Path, fp16: frozenset[str] = frozenset()) -> bytes | None:
    """`t`'s bytes: from the proto (`raw_data`), else from its external file in `folder`; None when it has neither.
    A tensor named in `fp16` was retyped to float16 while its external data is still fp32: converted here with
    onnxruntime's own value mapping (`float16.convert_np_to_float16`)."""
    if t.HasField("raw_data") and len(t.raw_data):
        return t.raw_data  # in the proto: the fp16 converter already converted it
    if not uses_external_data(t):
        return None
    info = ExternalDataInfo(t)
    with open(folder / info.location, "rb") as f:
        f.seek(info.offset or 0)
        raw = f.read(info.length) if info.length else f.read()
    if t.name in fp16:
        # onnxruntime.transformers puts its own folder on sys.path when imported: only fp16 exports pay for it
        from onnxruntime.transformers.float16 import convert_np_to_float16

        raw = convert_np_to_float16(np.frombuffer(raw, dtype=np.float32)).astype(np.float16).tobytes()
    return raw


def inline(t, raw: bytes) -> None:
    """`raw` into the proto as `t`'s data, its external reference dropped."""
    del t.external_data[:]
    t.data_location = onnx.TensorProto.DEFAULT
    t.raw_data = raw


def append_tensor(t, raw: bytes, data, align: int = 4096) -> None:
    """`raw` at the next `align` boundary of the open data file `data`, `t` pointing at it."""
    offset = data.tell()
    if offset % align:
        data.write(b"\0" * (align - offset % align))
        offset = data.tell()
    data.write(raw)
    del t.external_data[:]
    t.raw_data = b""  # set_external_data insists on the field; the data now lives in the file
    set_external_data(t, DATA_FILE, offset=offset, length=data.tell() - offset)
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL


# the typed field onnx keeps a tensor's values in when it has no raw_data (onnx.proto's TensorProto comments)
TYPED_FIELD = {1: ("float_data", np.float32), 10: ("int32_data", np.uint16), 16: ("int32_data", np.uint16),
               2: ("int32_data", np.uint8), 3: ("int32_data", np.int8), 4: ("int32_data", np.uint16),
               5: ("int32_data", np.int16), 6: ("int32_data", np.int32), 9: ("int32_data", np.bool_),
               7: ("int64_data", np.int64), 11: ("double_data", np.float64), 12: ("uint64_data", np.uint32),
               13: ("uint64_data", np.uint64)}
TYPED_FIELDS = tuple(dict.fromkeys(name for name, _ in TYPED_FIELD.values()))


def tensor_bytes(t, folder: Path) -> bytes:
    """An initializer's data as little-endian bytes of its dtype, wherever the proto keeps it: its external file,
    `raw_data`, or a typed field (onnxruntime's quantizer writes zero points and scales as `int32_data` /
    `float_data`), read by onnx's own `numpy_helper.to_array`."""
    raw = tensor_data(t, folder)
    return bytes(raw) if raw is not None else numpy_helper.to_array(t).tobytes()


def set_bytes(t, raw: bytes) -> None:
    """Replace an inline initializer's values by `raw` (little-endian bytes of its dtype), in the field it keeps them
    in: `raw_data`, or its typed field (float16 as its bit patterns in int32_data), so that the proto is written as
    it was but for the values."""
    if t.HasField("raw_data"):
        if len(t.raw_data) != len(raw):
            raise ValueError(f"{t.name}: {len(raw)} bytes in place of {len(t.raw_data)}")
        t.raw_data = raw
        return
    name, dtype = TYPED_FIELD[t.data_type]
    values = np.frombuffer(raw, dtype=dtype)
    box = getattr(t, name)
    if len(box) != values.size:
        raise ValueError(f"{t.name}: {values.size} values in place of {len(box)}")
    del box[:]
    box.extend(values.tolist())


def write_one_data_file(src: Path, dst_dir: Path, external: bool, model=None, fp16: frozenset[str] = frozenset(),
                        overrides: dict[str, bytes] | None = None, small_inline: bool = False) -> None:
    """`src` (a model.onnx, its weights inline or in any number of external files beside it) -> dst_dir/model.onnx,
    self-contained, or with its initializers in one dst_dir/model.onnx_data when `external`.

    External: every initializer of the main graph goes to the data file, the small ones too (a scale, a zero point),
    but for small int64 ones (a Reshape's shape, a Slice's axes: onnxruntime's loader refuses them outside the graph,
    and no concept changes them), so that a concept update can replace any of the others through onnxruntime's
    `add_external_initializers` (issue 25; `add_initializer` shares a value with the session but leaves the graph's
    own copy to the graph optimizer, which then folds the base's values). `small_inline`: tensors under 1 KiB stay
    in the graph instead: the intermediates that onnxruntime.transformers' optimizer and quantizer read run shape
    inference, which reads a Reshape's shape only from the graph (`weight_free`).

    `model`: the graph to write in place of src's (its external tensors still read from src's folder), e.g. one
    the optimizer rewrote without loading the weights. `fp16`: names of tensors the fp16 converter retyped to
    float16 while their data was still fp32 in the external file (see `tensor_data`). `overrides`: initializer name ->
    the bytes to write in place of its own (a concept update's, same dtype and shape: `export.update.materialize`)."""
    model = onnx.load(str(src), load_external_data=False) if model is None else model
    overrides = overrides or {}
    for t in model.graph.initializer:
        if t.name not in overrides:
            continue
        if uses_external_data(t):
            info = ExternalDataInfo(t)
            if info.length and info.length != len(overrides[t.name]):
                raise ValueError(f"{t.name}: {len(overrides[t.name])} bytes in place of {info.length}")
            inline(t, overrides[t.name])
        else:  # the proto's fields as they were (byte-identical output), the bytes replaced
            set_bytes(t, overrides[t.name])
    dst_dir.mkdir(parents=True, exist_ok=True)
    if not external:
        for t in all_tensors(model):
            if uses_external_data(t):  # small enough to be one protobuf: every tensor inline
                inline(t, tensor_data(t, src.parent, fp16))
    else:
        # the main graph's initializers by name (a node attribute's tensor with an initializer's name is not expected)
        # (int64 ones stay in the graph: shapes and axes, which onnxruntime's loader reads only from there)
        initializers = {t.name for t in model.graph.initializer
                        if t.name and t.data_type != onnx.TensorProto.INT64} if not small_inline else set()
        with open(dst_dir / DATA_FILE, "wb") as data:
            for t in all_tensors(model):
                raw = tensor_data(t, src.parent, fp16) if uses_external_data(t) or len(t.raw_data) >= INLINE_MAX else None
                if raw is None and t.name in initializers:
                    raw = tensor_bytes(t, src.parent)
                    for name in TYPED_FIELDS:
                        t.ClearField(name)
                if raw is None:
                    continue
                if len(raw) < INLINE_MAX and t.name not in initializers:
                    inline(t, raw)  # a small tensor another writer put outside (a Reshape's shape), for shape inference
                else:
                    append_tensor(t, raw, data, ALIGN if len(raw) >= INLINE_MAX else SMALL_ALIGN)
                del raw
    onnx.save_model(model, str(dst_dir / "model.onnx"))


@contextlib.contextmanager
def weight_free(src: Path, folder: Path):
    """`src`'s weights streamed into folder's one data file; yields the graph loaded without them, with the working
    directory at `folder`, against which onnx resolves an external tensor's location when a library step reads
    it, so only the weights a step reads come into memory."""
    write_one_data_file(src, folder, external=True, small_inline=True)  # every tensor >= 1 KiB in one file, streamed
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        yield graph
    finally:
        os.chdir(cwd)
