"""The guidance + DDIM step as a tiny ONNX graph, so that latents stay on the device between UNet calls.

With onnxruntime's CUDA provider and IO binding (`OnnxStableDiffusion(io_binding=...)`), the UNet's output stays
in GPU memory; this graph combines it (classifier-free guidance), takes the DDIM step (eta = 0) and writes both the
new latents and the next UNet input (the latents twice for guidance) on the same device. Per step only the
timestep and seven coefficients travel from the host. Written by hand because onnxruntime ships no scheduler and
the device runtime must not import torch or diffusers.

Inputs:  noise (N, C, h, w) float32, the UNet's output, N = 2B with guidance (unconditional half first) or B;
         latents (B, C, h, w) float32; coef (7,) float32 = [p, q, r, s, sqrt(a_prev), sqrt(1 - a_prev), guidance];
         clip (2,) float32 = [low, high] for x0 (+-3.4e38 when the scheduler does not clip).
Outputs: latents_out (B, C, h, w) = sqrt(a_prev) * clip(p x + q e) + sqrt(1 - a_prev) * (r x + s e),
         with e = u + guidance (c - u), u and c the first and last B rows of noise (u = c when N = B);
         model_in (N, C, h, w) = latents_out tiled N / B times.
(p, q, r, s) write x0 and epsilon as linear maps of (sample x, model output e) for each prediction type:
`NumpyDDIMScheduler.step_coefficients` computes them, so the graph serves epsilon, v and sample models alike.

The graph ships as `cfg_ddim_step.onnx` beside this module (the device install has no `onnx` package);
`build()` makes it and a test checks that the shipped file is what `build()` writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

STEP_GRAPH = Path(__file__).with_name("cfg_ddim_step.onnx")
OPSET = 17


def build():
    """The step graph as an onnx ModelProto (needs the `onnx` package: the export side)."""
    # lazy: the device runtime imports this module for STEP_GRAPH and has no `onnx`
    from onnx import TensorProto, helper, numpy_helper

    f32 = TensorProto.FLOAT
    dims = ["N", "C", "H", "W"]
    inputs = [
        helper.make_tensor_value_info("noise", f32, dims),
        helper.make_tensor_value_info("latents", f32, ["B", "C", "H", "W"]),
        helper.make_tensor_value_info("coef", f32, [7]),
        helper.make_tensor_value_info("clip", f32, [2]),
    ]
    outputs = [
        helper.make_tensor_value_info("latents_out", f32, ["B", "C", "H", "W"]),
        helper.make_tensor_value_info("model_in", f32, dims),
    ]
    consts = {name: numpy_helper.from_array(np.array(v, dtype=np.int64), name) for name, v in {
        "zero": [0], "ones3": [1, 1, 1], "big": [np.iinfo(np.int64).max],
        **{f"i{k}": [k] for k in range(8)}}.items()}
    n = helper.make_node
    nodes = [
        n("Shape", ["latents"], ["lat_shape"]),
        n("Shape", ["noise"], ["noise_shape"]),
        n("Gather", ["lat_shape", "zero"], ["b"], axis=0),           # (1,) B
        n("Gather", ["noise_shape", "zero"], ["nb"], axis=0),        # (1,) N
        n("Sub", ["nb", "b"], ["cond_start"]),
        n("Slice", ["noise", "zero", "b", "zero"], ["uncond"]),      # rows [0, B)
        n("Slice", ["noise", "cond_start", "big", "zero"], ["cond"]),  # rows [N - B, N)
    ]
    names = ["p", "q", "r", "s", "sa_prev", "sb_prev", "g"]
    for k, name in enumerate(names):  # scalar k of coef: Slice keeps it (1,), which broadcasts
        nodes.append(n("Slice", ["coef", f"i{k}", f"i{k + 1}", "zero"], [name]))
    nodes += [
        n("Sub", ["cond", "uncond"], ["diff"]),
        n("Mul", ["g", "diff"], ["gdiff"]),
        n("Add", ["uncond", "gdiff"], ["eps_model"]),                # u + g (c - u), as diffusers
        n("Mul", ["p", "latents"], ["px"]), n("Mul", ["q", "eps_model"], ["qe"]), n("Add", ["px", "qe"], ["x0_raw"]),
        n("Mul", ["r", "latents"], ["rx"]), n("Mul", ["s", "eps_model"], ["se"]), n("Add", ["rx", "se"], ["eps"]),
        n("Slice", ["clip", "i0", "i1", "zero"], ["lo1"]), n("Slice", ["clip", "i1", "i2", "zero"], ["hi1"]),
        n("Squeeze", ["lo1", "zero"], ["lo"]), n("Squeeze", ["hi1", "zero"], ["hi"]),
        n("Clip", ["x0_raw", "lo", "hi"], ["x0"]),
        n("Mul", ["sa_prev", "x0"], ["ax0"]), n("Mul", ["sb_prev", "eps"], ["beps"]),
        n("Add", ["ax0", "beps"], ["latents_out"]),
        n("Div", ["nb", "b"], ["reps"]),
        n("Concat", ["reps", "ones3"], ["tile"], axis=0),
        n("Tile", ["latents_out", "tile"], ["model_in"]),
    ]
    graph = helper.make_graph(nodes, "cfg_ddim_step", inputs, outputs, initializer=list(consts.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgecp")
    model.ir_version = 8  # onnxruntime 1.14+ reads it
    return model


def write(path: Path = STEP_GRAPH) -> None:
    """Write the shipped graph (what `python -m edgecp.export.step_graph` does after a change here)."""
    import onnx  # lazy: see build

    model = build()
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


if __name__ == "__main__":
    write()
