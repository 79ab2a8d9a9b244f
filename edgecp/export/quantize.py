"""int8 quantization with onnxruntime's quantizers, and static int8's calibration data, on the graph without weights.

Two variants, tried in a profile's order (`quantization`): `static`, onnxruntime's QDQ format with activation
ranges from a calibration run (the UNet only, `STATIC_MODELS`), and `dynamic`, onnxruntime's IntegerOps
quantization of MatMul/Gemm weights. onnxruntime's `quantize_static` / `quantize_dynamic` load every weight, and
more than once (a shape-inferred copy, a saved calibration model); their steps are called here on the weight-free
graph (`external_data.weight_free`), so a quantizer reads the weights it quantizes, one at a time, and the result is
written by the streaming writer.

Choices where onnxruntime leaves them to the caller: MinMax ranges (its default; no histogram of every activation,
which would not fit SD-scale memory); uint8 activations with uint8 weights (U8U8): onnxruntime's recommended U8S8
multiplies with `vpmaddubsw` on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI), whose 16-bit pair sums
saturate, so a U8S8 export gated on one CPU draws another image on another (the tiny base's static gate: 20.5 dB on
an AVX2 machine, 33 dB on an AVX-512 VNNI one); U8U8 widens to 16 bits first and is exact everywhere, as optimum's
`AutoQuantizationConfig.avx2` chooses; per-channel symmetric weights (as its CNN examples); which nodes stay float
(`kept_float`); the calibration prompts (`calibration_prompts`). docs/export/README.md has the measurements behind
them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx.helper import tensor_dtype_to_np_dtype

from edgecp.export.external_data import weight_free, write_one_data_file
from edgecp.export.gates import gate_prompt
from edgecp.export.ort_patches import (
    QUANTIZER_SHAPE_INFERENCE,
    applied,
    calibrator_graph,
    quiet_logging,
    shape_inferred,
)
from edgecp.export.ort_runner import session_options

STATIC_OPS = ("Conv", "MatMul", "Gemm")  # static QDQ: the convolutions too (most of a UNet's time on a CPU)
# Static int8 is for the UNet, which runs twice per step (guidance); the text encoder and the VAE decoder run once per
# image, where integer kernels save little and the VAE's quantization error lands straight in the pixels: they take
# the dynamic variant (our choice, measured: see docs/export/README.md)
STATIC_MODELS = ("unet",)
BASE_CALIBRATION_PROMPTS = ("a photo of a dog", "a photo of a person", "a landscape painting")  # our choice


def calibration_prompts(concepts: list[dict]) -> list[str]:
    """Static int8's calibration prompts: three plain ones for the base (a subject, a person, a scene: our choice,
    onnxruntime and the papers name none) and, per concept, its prompt in its class (its token through every model)
    and its class alone (what the base drew before). Text only: the user's photos are never read (they are purged
    once a concept is committed)."""
    prompts = list(BASE_CALIBRATION_PROMPTS)
    for c in concepts:
        prompts.append(gate_prompt([c]))
        if c.get("class_word"):
            prompts.append(f"a photo of a {c['class_word']}")
    return list(dict.fromkeys(prompts))


class CalibrationFeeds:
    """onnxruntime's CalibrationDataReader over recorded inputs, cast to the graph's input types and ranks (the
    pipeline's 0-d timestep for a (1,) input, or the reverse)."""

    def __init__(self, feeds: list[dict], graph):
        types = {i.name: (tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type), len(i.type.tensor_type.shape.dim))
                 for i in graph.graph.input}

        def cast(v, dtype, rank):
            a = np.asarray(v, dtype=dtype)
            return a if a.ndim == rank else a.reshape([1] * rank)

        self.it = iter([{k: cast(v, *types[k]) for k, v in f.items() if k in types} for f in feeds])

    def get_next(self) -> dict | None:
        return next(self.it, None)


def kept_float(model) -> list[str]:
    """Nodes static int8 leaves in float (our choice; onnxruntime quantizes every listed op type by default):
    - MatMuls of two activations (attention's Q K^T and its product with V): nothing to store as int8, and quantized
      per call they made SD1.5's UNet slower for the same image;
    - a model's first and last convolution: the first sees the raw input (latents, noise), the last writes the
      model's output at full range, where quantizing moved the tiny UNet's output most."""
    consts = {t.name for t in model.graph.initializer}
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and not set(n.input) & consts]
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    return exclude + (convs[:1] + convs[-1:] if len(convs) > 1 else [])


def to_int8(src: Path, dst_dir: Path, external: bool, notes: list[str] | None = None) -> dict:
    """onnxruntime's dynamic int8 quantization of MatMul/Gemm weights (`quantize_dynamic`'s steps: shape inference,
    `update_opset_version`, `ONNXQuantizer` in IntegerOps mode with `MatMulConstBOnly`) into dst_dir. MatMul/Gemm
    only: ConvInteger has no kernel on many execution providers and was slower than fp32 on onnxruntime's CPU
    (profiles/edge-int8.toml)."""
    # lazy: onnxruntime.quantization puts onnxruntime/transformers on sys.path (see edgecp.export.ort_patches)
    from onnxruntime.quantization import QuantType, onnx_quantizer
    from onnxruntime.quantization.quant_utils import QuantizationMode, update_opset_version

    weights = src.parent / "int8-weights"
    with (weight_free(src, weights) as graph, quiet_logging(),
          applied([QUANTIZER_SHAPE_INFERENCE], [] if notes is None else notes)):
        quantizer = onnx_quantizer.ONNXQuantizer(
            update_opset_version(shape_inferred(graph), QuantType.QUInt8), False, False, QuantizationMode.IntegerOps, False,
            QuantType.QUInt8, QuantType.QUInt8, None, [], [], ["MatMul", "Gemm"], {"MatMulConstBOnly": True})
        quantizer.quantize_model()
    write_one_data_file(weights / "model.onnx", dst_dir, external, model=quantizer.model.model)
    return {"quantization": "dynamic"}


def calibrated_ranges(model, weights: Path, feeds: list[dict], notes: list[str]):
    """MinMax ranges of every STATIC_OPS input and output of `model` (weight-free, its data in weights/) on `feeds`.
    The calibration graph (the same graph plus ReduceMin/ReduceMax outputs) is saved beside the one data file and
    references it, so onnxruntime's session is the only copy of the fp32 weights; it is gone when this returns."""
    from onnxruntime.quantization import calibrate  # lazy: see to_int8

    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # the calibrator adds its ReduceMin/Max nodes to the graph it is given
    with applied([calibrator_graph(copy)], notes):
        calibrator = calibrate.MinMaxCalibrater(weights / "model.onnx", list(STATIC_OPS),
                                                augmented_model_path=str(weights / "calibration.onnx"))
    calibrator.augment_graph()
    # the calibrator's own session (unoptimized, as here) runs in onnxruntime's default node order, where the added
    # ReduceMin/Max nodes run late and keep activations alive; in priority order each runs beside its producer and
    # the peak is the plain graph's (docs/export/README.md)
    options = session_options("disabled")
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    calibrator.infer_session = ort.InferenceSession(str(weights / "calibration.onnx"), sess_options=options,
                                                    providers=["CPUExecutionProvider"])
    calibrator.collect_data(CalibrationFeeds(feeds, model))
    return calibrator.compute_data()


def to_int8_static(src: Path, dst_dir: Path, external: bool, feeds: list[dict], notes: list[str] | None = None
                   ) -> dict:
    """onnxruntime's static int8 quantization in QDQ format (`quantize_static`'s steps) into dst_dir: MinMax ranges
    of every Conv/MatMul/Gemm input and output from `feeds`, per-channel symmetric uint8 weights, asymmetric uint8
    activations, int32 biases. onnxruntime fuses each DequantizeLinear -> op -> QuantizeLinear into its integer
    kernel (QLinearConv, QLinearMatMul) when the session is optimized."""
    from onnxruntime.quantization import QuantType  # lazy: see to_int8
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import update_opset_version

    weights = src.parent / "int8-weights"
    with weight_free(src, weights) as graph, quiet_logging():
        model = update_opset_version(shape_inferred(graph), QuantType.QUInt8, QuantType.QUInt8)
        ranges = calibrated_ranges(model, weights, feeds, [] if notes is None else notes)
        for i, node in enumerate(model.graph.node):  # the quantizer excludes nodes by name
            node.name = node.name or f"{node.op_type}_{i}"
        quantizer = QDQQuantizer(model, True, False, QuantType.QUInt8, QuantType.QUInt8, ranges, [], kept_float(model),
                                 list(STATIC_OPS), {"ActivationSymmetric": False, "WeightSymmetric": True})
        quantizer.quantize_model()
    write_one_data_file(weights / "model.onnx", dst_dir, external, model=quantizer.model.model)
    return {"quantization": "static", "calibration_samples": len(feeds)}
