"""Export a store version to ONNX for one device profile, in the folder layout optimum's ONNX SD pipelines read.

    OUT/text_encoder/model.onnx   input_ids -> last_hidden_state, pooler_output
    OUT/unet/model.onnx           sample, timestep, encoder_hidden_states -> out_sample
    OUT/vae_decoder/model.onnx    latent_sample -> sample
    OUT/vae_encoder/model.onnx    sample -> latent_parameters (profile permitting)
    OUT/tokenizer/ OUT/scheduler/ OUT/model_index.json OUT/edgecp.json

The adapter is merged into a full-precision copy of the base and the concept tokens are baked into the text encoder,
so the device needs no peft and no torch. Each model is checked against PyTorch on the same inputs (tensor gate),
then one image is drawn through the export and through PyTorch with the same prompt, seed and steps (image gate:
PSNR >= the profile's `min_psnr`); below either the export is refused and nothing is left behind.

This module is the public entry; the work is done by the package's modules, one job each:
`trace` (PyTorch models to raw graphs), `parking` (models on disk while another stage runs), `external_data` (one
streamed model.onnx_data per model), `ort_patches` and `optimize` (onnxruntime.transformers' SD optimizer),
`quantize` (int8 and its calibration), `gates` (tensor and image gates), `optimum_layout` (the files besides the
graphs) and `job` (`ExportJob`, the stages in order). The names other modules and tools import from here stay here.
"""

from __future__ import annotations

from pathlib import Path

from edgecp.export.external_data import DATA_FILE, dir_bytes, write_one_data_file
from edgecp.export.gates import (
    CPU_ONLY_NOTE,
    GATE_SEED,
    gate_prompt,
    psnr,
    refusal_advice,
    step_ms,
    verified_on,
)
from edgecp.export.job import ExportJob, ExportProgress
from edgecp.export.optimize import cpu_kept_fp32
from edgecp.export.quantize import calibration_prompts

__all__ = [
    "CPU_ONLY_NOTE", "DATA_FILE", "GATE_SEED", "ExportJob", "ExportProgress",
    "calibration_prompts", "cpu_kept_fp32", "dir_bytes", "export_onnx", "gate_prompt", "psnr", "refusal_advice",
    "step_ms", "verified_on", "write_one_data_file",
]


def export_onnx(store_root: str | Path, profile_name: str = "cpu-fp32", out: str | Path | None = None,
                progress: ExportProgress | None = None, overwrite: bool = False,
                update_for: str | Path | None = None) -> dict:
    """Export the store's current version for `profile_name`; returns the report (per model: parity, bytes,
    seconds, external data; the image gate). Refuses below the profile's tensor or image gate, leaving nothing.

    `out` (default STORE/exports/PROFILE-VERSION): made absolute first (the optimizer and quantizer run with the
    working directory changed); outside the store or directly under STORE/exports/, not a file, empty unless
    `overwrite`, which replaces an earlier ONNX export there once the new one has passed its gates
    (`edgecp.outputs.check_output_dir`). HEAD is read once: that version is loaded and recorded.
    Every model is written as model.onnx + one model.onnx_data holding all its initializers (issue 25: a concept
    update replaces any of them; until then only models of 1 GiB of fp32 weights were).
    `progress` gets ProgressEvents whose phases are "reference <model>", "calibrate" per calibration step (static int8),
    "reference image" per gate-image step, then "<stage> <model>" (export, optimize, quantize, verify), each 0/1
    then 1/1, and "image gate" per denoising step.

    `update_for`: a base export (an earlier version of this store, same profile) that the device holds: `out` (default
    STORE/exports/PROFILE-VERSION-from-BASEVERSION) then receives only what differs from it (`export.update`), the
    image gate is drawn through base + update, and the report's `update` says its bytes against the full export's.
    A version whose concept tokens outgrew the base's personal table gets a full export (`update_refused` says why).
    """
    return ExportJob.open(store_root, profile_name, out, progress, overwrite, update_for).run()
