"""Patches to onnxruntime's optimizer and quantizer while the export runs them, each for one onnxruntime version.

They keep the library's steps weight-free (the steps run on the graph alone, see `external_data.weight_free`) and
quiet, and work around two onnxruntime 1.32 bugs. Each patch replaces a library internal, so each names the
onnxruntime release it was written against (major.minor). On another release it is still applied when what it
replaces exists (the export's optimize and quantize stages need them), and a note names the untested release; when
its target is gone it is skipped with a note. Both kinds of note go to the export's report
(`onnxruntime_patches_skipped` in edgecp.json); nothing is printed. Every patch is undone when its block ends.

onnxruntime.transformers' modules import each other by top-level name (the package puts its folder on sys.path when
imported), so the optimizer's patches replace names in those top-level modules, the ones the UNet optimizer uses.
That sys.path entry (top-level modules named `optimizer`, `metrics`, `benchmark`) comes with onnxruntime.quantization
too, which imports onnxruntime.transformers: both are imported inside the functions that use them, so only an
export's optimize and quantize stages add it, never a mere import of edgecp.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

INSTALLED = ".".join(ort.__version__.split(".")[:2])  # onnxruntime's major.minor here


@contextlib.contextmanager
def patched(owner, attr: str, value):
    """`owner.attr` is `value` inside the block, restored after."""
    old = getattr(owner, attr)
    setattr(owner, attr, value)
    try:
        yield
    finally:
        setattr(owner, attr, old)


@dataclass(frozen=True)
class OrtPatch:
    """One patch: its name, the onnxruntime release (major.minor) it is written for, why it exists, and a function
    returning the context manager that applies it."""

    name: str
    onnxruntime: str
    why: str
    apply: Callable[[], contextlib.AbstractContextManager]

    def note(self) -> str:
        """The report's line for this patch when it is skipped."""
        return (f"{self.name}: skipped on onnxruntime {ort.__version__} (written for {self.onnxruntime}; "
                f"{self.why})")


def applied(patches: Iterable[OrtPatch], notes: list[str]) -> contextlib.ExitStack:
    """Every patch whose target exists, applied until the returned stack exits; one note in `notes` per patch
    skipped (its target is gone) or applied on a release it was not written for."""
    stack = contextlib.ExitStack()
    for p in patches:
        try:
            stack.enter_context(p.apply())
        except AttributeError:  # what it replaces is gone in this release: skipped, and said
            notes.append(p.note())
            continue
        if p.onnxruntime != INSTALLED:  # the export needs them: applied, and the untested release is said
            notes.append(f"{p.name}: written for onnxruntime {p.onnxruntime}, applied on {ort.__version__} "
                         f"(untested there; {p.why})")
    return stack


@contextlib.contextmanager
def quiet_logging():
    """onnxruntime's optimizer and quantizer log on the root logger; the library never prints."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# ---------------------------------------------------------------------------------------------- optimizer


def _transformers_on_path() -> None:
    """onnxruntime.transformers imported, which puts its folder on sys.path, so that its modules' top-level names
    (the ones its optimizer uses) import (lazy: see the module docstring)."""
    import onnxruntime.transformers  # noqa: F401  (lazy: it puts its folder on sys.path, see the module docstring)


def _unet_head_count():
    _transformers_on_path()
    import fusion_attention_unet  # lazy: a top-level name only once onnxruntime.transformers is on sys.path

    original = fusion_attention_unet.FusionAttentionUnet.get_num_heads

    def get_num_heads(fusion, reshape_q, is_torch2: bool = False) -> int:
        if is_torch2:
            parent = fusion.model.get_parent(reshape_q, 1)
            if parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
                value = fusion.model.get_constant_value(parent.input[2])
                if isinstance(value, np.ndarray) and value.size == 1:
                    return max(int(value.reshape(-1)[0]), 0)
            return 0
        return original(fusion, reshape_q, is_torch2)

    return patched(fusion_attention_unet.FusionAttentionUnet, "get_num_heads", get_num_heads)


def _no_tqdm():
    _transformers_on_path()
    import onnx_model_unet  # lazy: see _unet_head_count

    is_installed = onnx_model_unet.is_installed
    return patched(onnx_model_unet, "is_installed", lambda name: name != "tqdm" and is_installed(name))


def _fp16_value_info_from_dims():
    _transformers_on_path()
    import float16  # lazy: see _unet_head_count

    return patched(float16, "make_value_info_from_tensor",
                   lambda t: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))


UNET_HEAD_COUNT = OrtPatch(
    "unet_head_count", "1.32",
    "FusionAttentionUnet.get_num_heads takes int() of a (1,) array, a TypeError since numpy 2.4 that aborts the "
    "fusion; the patched reader takes the same value by index", _unet_head_count)
NO_TQDM = OrtPatch(
    "no_tqdm", "1.32",
    "the UNet optimizer draws a tqdm bar on stderr when tqdm is installed; it is told tqdm is absent",
    _no_tqdm)
FP16_VALUE_INFO_FROM_DIMS = OrtPatch(
    "fp16_value_info_from_dims", "1.32",
    "the fp16 converter takes a converted initializer's shape from numpy_helper.to_array(tensor), which loads an "
    "external tensor's data (and misreads it once retyped); the shape is the tensor's dims", _fp16_value_info_from_dims)
OPTIMIZER_PATCHES = (UNET_HEAD_COUNT, NO_TQDM, FP16_VALUE_INFO_FROM_DIMS)


# ---------------------------------------------------------------------------------------------- quantizer


def shape_inferred(model):
    """onnx shape inference and the quantizer's metadata mark, on a graph whose weights stay external (the tensors'
    dims are in the proto): what onnxruntime's quantizers get from a saved-and-reloaded copy with every weight."""
    from onnxruntime.quantization.quant_utils import add_infer_metadata  # lazy: see the module docstring

    model = onnx.shape_inference.infer_shapes(model)
    add_infer_metadata(model)
    return model


def _quantizer_shape_inference():
    from onnxruntime.quantization import onnx_quantizer  # lazy: see the module docstring

    return patched(onnx_quantizer, "save_and_reload_model_with_shape_infer", shape_inferred)


QUANTIZER_SHAPE_INFERENCE = OrtPatch(
    "quantizer_shape_inference", "1.32",
    "the dynamic quantizer re-infers shapes after turning Gemm into MatMul by saving and reloading a deep copy with "
    "every weight; shape inference on the weight-free graph gives it the same value infos", _quantizer_shape_inference)


def calibrator_graph(graph) -> OrtPatch:
    """The calibrator is given `graph` (weight-free, already shape-inferred) instead of loading the model file with
    every weight and inferring its shapes again."""

    def apply():
        from onnxruntime.quantization import calibrate  # lazy: see the module docstring

        return patched(calibrate, "load_model_with_shape_infer", lambda _path: graph)

    return OrtPatch("calibrator_graph", "1.32",
                    "MinMaxCalibrater loads its model with every weight and infers its shapes; it is handed the "
                    "weight-free graph", apply)
