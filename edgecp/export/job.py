"""One ONNX export, stage by stage: `ExportJob`.

    reference   PyTorch's side, one model in memory at a time: the gate image and the tensor gate's references
    calibrate   static int8's calibration images through the UNet (their inputs are the quantizer's data)
    export      each model traced to a raw fp32 graph, its torch weights dropped as soon as it is written
    optimize    onnxruntime.transformers' SD optimizer (profiles with `optimize`, and fp16)
    quantize    onnxruntime's int8 quantizers (int8 profiles), as the variant being tried
    verify      the tensor gate, once every torch model is gone
    gate        the image gate
    write       edgecp.json, then the folder renamed into place

With `update_for` (a base export of an earlier version of the same store and profile) the job builds the full export
as above, then writes only what differs from the base (`export.update.make_update`) into a second temporary folder,
draws the image gate through base + update instead of the full folder, and puts the update in place; the full export
is not kept. A store whose concept tokens outgrew the base's personal table gets a full export instead, and the
report says why (`update_refused`).

Memory order: the text encoder's stage, then the UNet's (its DDIM loops and its export) while the text encoder and
the VAE are parked on disk, then the VAE's; the small models are exported once the UNet is gone (torch's exporter
holds a model under 2 GiB whole in memory, serialized), and onnxruntime's stages start only then, so no onnxruntime
session sits beside torch weights. Everything is written into a temporary folder beside `out`, locked while the job
lives; only a job whose models pass both gates renames it into place. A profile's int8 variants are tried in order
(static, then dynamic) from the raw graphs, which stay on disk until one passes.
"""

from __future__ import annotations

import dataclasses
import gc
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from edgecp import outputs, seeds
from edgecp.adapters import lora
from edgecp.errors import EdgecpError
from edgecp.export import references
from edgecp.export.external_data import dir_bytes, weight_bytes, write_one_data_file
from edgecp.export.gates import (
    Refused,
    check_image_gate,
    check_tensor_gate,
    gate_args,
    gate_prompt,
    image_gate,
    parity,
    verified_on,
    verify_optimization,
)
from edgecp.export.optimize import CPU_VERIFIED_VAE, cpu_kept_fp32
from edgecp.export.optimize import optimize as optimize_graph
from edgecp.export.optimum_layout import write_configs
from edgecp.export.ort_runner import cuda_usable
from edgecp.export.parking import parked
from edgecp.export.quantize import STATIC_MODELS, calibration_prompts, to_int8, to_int8_static
from edgecp.export.trace import ModelSpec, model_specs, torch_onnx_export
from edgecp.export.update import make_update, rewrite_manifest
from edgecp.heap import trim_heap
from edgecp.integrity import WRITING_MARK, lock_dir, read_export_meta, unlock_dir, write_export_meta
from edgecp.memory import release_memory
from edgecp.model.base import stored_unet_dtype
from edgecp.model.sdxl import bake_dual_tokens
from edgecp.model.tokens import PERSONAL_ROWS, bake_tokens, personal_rows
from edgecp.personal import PersonalModel, open_base
from edgecp.profiles import DeviceProfile, load_profile
from edgecp.progress import Progress, emit
from edgecp.store import Store

ExportProgress = Progress  # phases: "<stage> <model>", "reference image", "calibrate", "image gate"
CPU = torch.device("cpu")


@dataclass
class ModelState:
    """One model through the export: how it is traced, the tensor gate's inputs and PyTorch's outputs on them, and
    what the export of its raw graph measured."""

    spec: ModelSpec
    args: tuple = ()
    ref: tuple = ()
    external: bool = True   # written with one model.onnx_data (every export since issue 25)
    fp32_bytes: int = 0     # the raw graph's initializers
    seconds: float = 0.0


def default_out(store: Store, profile: DeviceProfile, version: str, base_version: str | None = None) -> Path:
    """STORE/exports/PROFILE-VERSION (an update: PROFILE-VERSION-from-BASEVERSION), when the profile's name can name a
    folder."""
    name = f"{profile.name}-{version}" + (f"-from-{base_version}" if base_version else "")
    if not name.isprintable() or "/" in name or "\\" in name or name.startswith("."):
        raise EdgecpError(f"profile name '{profile.name}' cannot name a folder: give the profile a plain name "
                          "(letters, digits, '-'), or pass --out")
    return store.root / "exports" / name


@dataclass
class ExportJob:
    """The export of `model` (the store's version `version`) for `profile` into `out`; `run` returns the report."""

    store: Store
    version: str
    profile: DeviceProfile
    out: Path
    model: PersonalModel
    progress: ExportProgress | None = None
    update_for: Path | None = None  # the base export an update is made for (None: a full export)
    base_meta: dict | None = None   # its edgecp.json
    names: list[str] = field(init=False)
    gpu: bool = field(init=False)    # the export is verified on CUDA: CUDA-only fusions, fp16 checked there
    level: str = field(init=False)   # onnxruntime's optimization level of the gates' sessions
    models: dict[str, ModelState] = field(init=False)
    gate_job: references.Job = field(init=False)
    calibration: list[references.Job] = field(init=False)
    report: dict = field(init=False)
    notes: list[str] = field(init=False)  # onnxruntime patches skipped or applied untested (export.ort_patches)
    tmp: Path = field(init=False)
    update_tmp: Path | None = field(init=False, default=None)

    @classmethod
    def open(cls, store_root: str | Path, profile_name: str = "cpu-fp32", out: str | Path | None = None,
             progress: ExportProgress | None = None, overwrite: bool = False,
             update_for: str | Path | None = None) -> ExportJob:
        """The job for the store's HEAD (read once: that version is loaded and recorded), `out` checked before any
        model is loaded. The base loads in full precision on the CPU: an fp32 file stays mapped and is read as each
        stage runs; a 16-bit UNet is converted tensor by tensor (diffusers would hold the file beside all of it).
        `update_for`: the base export an update is made for (`check_base`)."""
        profile = load_profile(profile_name)
        store = Store.open(outputs.absolute(store_root))
        version = store.head
        base_dir = base_meta = None
        refused = None
        if update_for is not None:
            base_dir = outputs.absolute(update_for)
            base_meta = check_base(store, profile, base_dir)
            n_tokens = len(store.manifest(version)["concepts"])
            if n_tokens > base_meta["personal_token_rows"]:
                refused = (f"version {version} has {n_tokens} concept tokens, more than the "
                           f"{base_meta['personal_token_rows']} personal rows of base export '{base_dir}': this is a "
                           f"full export (reserve {personal_rows(n_tokens)} rows); give it to the device as its new base")
                base_dir = base_meta = None
        kind = "update" if base_dir else "onnx"
        default = default_out(store, profile, version, base_meta["version"] if base_meta else None)
        out = outputs.check_output_dir(default if out is None else out, store.root, overwrite=overwrite,
                                       allow_exports_subdir=True, kind=kind)
        if base_dir is not None and (out == base_dir or base_dir in out.parents or out in base_dir.parents):
            raise EdgecpError(f"--out '{out}' overlaps the base export '{base_dir}', which an update never writes to: "
                              "pick another folder")
        stream = stored_unet_dtype(open_base(store)) not in (None, "F32")
        model = PersonalModel.load(store, version, device=CPU, stream=stream)
        job = cls(store, version, profile, out, model, progress, base_dir, base_meta)
        if refused:
            job.report["update_refused"] = refused
        return job

    def __post_init__(self) -> None:
        profile = self.profile
        self.names = (["unet", "text_encoder"] + ["text_encoder_2"] * self.comps.sdxl + ["vae_decoder"]
                      + (["vae_encoder"] if profile.vae_encoder else []))
        self.gpu = self.optimizing and "CUDAExecutionProvider" in profile.providers and cuda_usable()
        self.level = verify_optimization(profile, self.gpu)
        specs = model_specs(self.comps)
        self.models = {name: ModelState(specs[name]) for name in self.names}
        size = min(self.comps.resolution, profile.gate_size) // self.comps.vae_scale * self.comps.vae_scale
        self.gate_job = references.Job(gate_prompt(self.concepts), seeds.EXPORT_GATE, profile.gate_steps, size)
        # static int8's calibration images: text only (the purged photos are never read), seeds the gate never uses
        self.calibration = [references.Job(p, seeds.EXPORT_CALIBRATION + i, profile.calibration_steps, size)
                            for i, p in enumerate(calibration_prompts(self.concepts))] if self.static else []
        self.report = {"profile": profile.name, "precision": profile.precision, "providers": list(profile.providers),
                       "version": self.version, "models": {}}
        if self.base_meta and self.int8:  # the base's int8 variant only: another one is another graph
            self.profile = _with_quantization(profile, self.base_meta.get("quantization"))
        self.notes = []

    # -- what the profile asks for --------------------------------------------------------------------------------

    @property
    def comps(self):
        return self.model.comps

    @property
    def concepts(self) -> list[dict]:
        return [{k: c[k] for k in ("name", "token", "class_word")} for c in self.model.concepts]

    @property
    def optimizing(self) -> bool:
        return self.profile.optimize or self.profile.precision == "fp16"

    @property
    def int8(self) -> bool:
        return self.profile.precision == "int8"

    @property
    def static(self) -> bool:
        return self.int8 and "static" in self.profile.quantization

    @property
    def stages(self) -> list[str]:
        return (["reference"] + ["calibrate"] * self.static + ["export"] + ["optimize"] * self.optimizing
                + ["quantize"] * self.int8 + ["verify"])

    @property
    def text_names(self) -> list[str]:
        return [n for n in self.names if n.startswith("text_")]

    @property
    def vae_names(self) -> list[str]:
        return [n for n in self.names if n.startswith("vae_")]

    def scratch(self, name: str) -> Path:
        """Model `name`'s private folder: its raw graph and the intermediates of its onnxruntime stages."""
        return self.tmp / f".scratch-{name}"

    def stage(self, stage: str, name: str, done: int) -> None:
        if self.progress:
            emit(self.progress, f"{stage} {name}", done, 1)

    # -- the job ----------------------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Every stage into a temporary folder beside `out`, renamed into place once both gates pass; the report."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}-", dir=self.out.parent))
        lock = lock_dir(self.tmp)  # recovery and gc leave a temporary export alone while its writer lives
        lock_update = None
        try:
            if self.update_for is not None:
                self.update_tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}-", dir=self.out.parent))
                lock_update = lock_dir(self.update_tmp)
            self.reference()
            self.ship()
            self.write()
        finally:
            unlock_dir(lock)
            shutil.rmtree(self.tmp, ignore_errors=True)
            if self.update_tmp is not None:
                unlock_dir(lock_update)
                shutil.rmtree(self.update_tmp, ignore_errors=True)
        self.report["out"] = str(self.out)
        return self.report

    def reference(self) -> None:
        """PyTorch's side in three stages, one model in memory at a time (edgecp.export.references), each model's raw
        graph exported once its references are drawn; the UNet's stage runs while the others are parked on disk."""
        self.reference_text_encoder()
        with parked([self.comps.text_encoder, self.comps.vae], self.tmp / ".parked"):
            self.reference_unet()
            release_memory(CPU)  # the loops' activations back to the OS before the trace's
            self.export("unet", drop=True)
            release_memory(CPU)
        self.reference_vae()
        # the small models' exports wait until the UNet is gone: torch's exporter holds a model under 2 GiB whole in
        # memory, serialized, and streams only larger ones to disk
        for name in self.text_names:
            self.export(name, drop=True)
        for name in self.vae_names:
            self.export(name, drop=name == self.vae_names[-1])
        release_memory(CPU)  # torch's freed blocks back to the OS before onnxruntime's sessions

    def reference_text_encoder(self) -> None:
        """Stage 1, the text encoder(s) with the concept tokens baked: every prompt's embeddings. SDXL's two encoders
        each get their slice of the concept rows (`bake_dual_tokens`) and are exported as two models."""
        for name in self.text_names:
            self.stage("reference", name, 0)
        te = self.comps.text_encoder
        self.report["personal_token_rows"] = bake_dual_tokens(te) if self.comps.sdxl else bake_tokens(te)
        first = te.text_encoder if self.comps.sdxl else te
        self.report["base_vocab"] = first.get_input_embeddings().base_vocab
        te.eval().float()
        references.encode(self.comps, [self.gate_job, *self.calibration])
        for name in self.text_names:
            self.record(name)
            self.stage("reference", name, 1)

    def reference_unet(self) -> None:
        """Stage 2, the UNet with the adapter merged into its full-precision weights: the gate image's DDIM loop,
        then the calibration images'."""
        self.stage("reference", "unet", 0)
        self.comps.unet.eval().float()
        if lora.has_adapter(self.comps.unet):
            lora.merge(self.comps.unet)
        progress = self.progress
        step = (lambda _job, i, n: emit(progress, "reference image", i, n)) if progress else None
        references.denoise(self.comps, [self.gate_job], step)
        self.calibrate()
        self.record("unet")
        self.stage("reference", "unet", 1)

    def reference_vae(self) -> None:
        """Stage 3, the VAE: the gate image decoded."""
        for name in self.vae_names:
            self.stage("reference", name, 0)
        self.comps.vae.eval().float()
        references.decode(self.comps, [self.gate_job])
        for name in self.vae_names:
            self.record(name)
            self.stage("reference", name, 1)

    def record(self, name: str) -> None:
        """The tensor gate's inputs of model `name` (from the gate image) and PyTorch's outputs on them."""
        m = self.models[name]
        m.args = gate_args(self.gate_job.feeds[name], m.spec)
        with torch.no_grad():
            r = m.spec.module(*m.args)
        m.ref = r if isinstance(r, tuple) else (r,)

    def calibrate(self) -> None:
        """Static int8's calibration images through the UNet (`profile.calibration_steps` DDIM steps each); the
        inputs it records are the quantizer's calibration data."""
        if not self.calibration:
            return
        steps, progress = self.profile.calibration_steps, self.progress
        total = len(self.calibration) * steps
        done = {id(job): k * steps for k, job in enumerate(self.calibration)}
        step = (lambda job, i, _n: emit(progress, "calibrate", done[id(job)] + i, total)) if progress else None
        references.denoise(self.comps, self.calibration, step)

    def calibration_feeds(self, name: str) -> list[dict]:
        return [f for job in self.calibration for f in job.feeds.get(name, [])]

    def export(self, name: str, drop: bool) -> None:
        """Model `name`'s raw fp32 graph into its scratch folder; then (`drop`) its torch weights go."""
        m = self.models[name]
        raw = self.scratch(name) / "raw"
        raw.mkdir(parents=True)
        t0 = time.perf_counter()
        self.stage("export", name, 0)
        torch_onnx_export(m.spec, raw / "model.onnx", self.profile.opset)
        if drop:
            m.spec.module.to("meta")  # its references are computed, its graph is written
        self.stage("export", name, 1)
        graph = onnx.load(str(raw / "model.onnx"), load_external_data=False)  # the graph only, no weights
        m.fp32_bytes = weight_bytes(graph, raw)
        m.seconds = time.perf_counter() - t0

    def ship(self) -> None:
        """onnxruntime's stages per variant in the profile's order until one passes both gates (int8: static, else
        dynamic; any other profile: one); the report names each refused variant and why."""
        variants = list(self.profile.quantization) if self.int8 else [None]
        attempts = []
        for k, variant in enumerate(variants):
            try:
                self.attempt(variant, keep_raw=k + 1 < len(variants))
                break
            except Refused as e:
                attempts.append({"quantization": variant, "refused": str(e).removeprefix("export refused: ")})
                if k + 1 == len(variants):
                    tried = "; ".join(f"{a['quantization']}: {a['refused'].split(';')[0]}" for a in attempts[:-1])
                    if self.update_for is not None and self.int8:  # held to the base's variant: say what else works
                        raise EdgecpError(
                            f"{str(e).split(';')[0]} with the base export's {variant} int8, which an update must keep: "
                            f"make a full export (`edgecp export --profile {self.profile.name}`, which may fall back "
                            "to another int8 variant) and give it to the device as its new base") from None
                    raise EdgecpError(str(e) + (f" (also refused: {tried})" if tried else "")) from None
                for name in self.names:
                    shutil.rmtree(self.tmp / name, ignore_errors=True)
        for scratch in self.tmp.glob(".scratch-*"):  # raw graphs kept for a variant that was not needed
            shutil.rmtree(scratch)
        if variant is not None:
            self.report["quantization"] = variant
            self.report["refused_variants"] = attempts

    def attempt(self, variant: str | None, keep_raw: bool) -> None:
        """One variant: every model built and verified, the optimum layout written, the image gate drawn; raises
        Refused below a gate. `keep_raw`: a later variant may start from the raw graphs."""
        models = {name: self.build(name, variant, keep_raw) for name in self.names}
        # verified once every torch model is gone: an onnxruntime session never sits beside torch weights
        for name in self.names:
            self.verify(name, models[name], variant, keep_raw)
        for name in self.names:  # size against the fp32 reference: its weights as torch's exporter wrote them
            models[name]["fp32_weight_bytes"] = self.models[name].fp32_bytes
        self.report["models"] = models
        write_configs(self.tmp, self.comps, self.names)
        if self.update_for is not None:
            self.make_update(variant)
        self.gate()

    def build(self, name: str, variant: str | None, keep_raw: bool) -> dict:
        """Model `name`'s raw graph through the profile's onnxruntime stages into tmp/NAME; its report entry. The
        intermediates go now; the raw graph too unless a later step may need it."""
        scratch, external, t0 = self.scratch(name), self.models[name].external, time.perf_counter()
        src, info = scratch / "raw" / "model.onnx", {}
        if self.optimizing:
            src, info = self.optimize(name)
        if self.int8:
            info.update(self.quantize(name, variant, src))
        elif not self.optimizing:
            write_one_data_file(src, self.tmp / name, external)
        entry = {"external_data": external, "seconds": round(self.models[name].seconds + time.perf_counter() - t0, 2),
                 **info}
        for sub in scratch.iterdir():
            if sub.name != "raw" or not (keep_raw or self.profile.precision == "fp16" and name.startswith("vae_")):
                shutil.rmtree(sub)
        return entry

    def optimize(self, name: str) -> tuple[Path, dict]:
        """Model `name` through onnxruntime's SD optimizer (fp16 unless it stays fp32); (the result, what fused)."""
        self.stage("optimize", name, 0)
        into = self.scratch(name) / "optimized" if self.int8 else self.tmp / name
        fp16 = self.profile.precision == "fp16" and not cpu_kept_fp32(name, self.gpu)
        info = optimize_graph(self.scratch(name) / "raw" / "model.onnx", into, name, self.models[name].external, fp16,
                              self.gpu, self.notes)
        if self.profile.precision == "fp16" and not fp16:
            info["kept_fp32"] = CPU_VERIFIED_VAE
        self.stage("optimize", name, 1)
        return into / "model.onnx", info

    def quantize(self, name: str, variant: str | None, src: Path) -> dict:
        """`src` (model `name`'s fp32 graph) to int8 as `variant` (static for STATIC_MODELS, else dynamic)."""
        self.stage("quantize", name, 0)
        dst, external = self.tmp / name, self.models[name].external
        if variant == "static" and name in STATIC_MODELS:
            info = to_int8_static(src, dst, external, self.calibration_feeds(name), self.notes)
        else:
            info = to_int8(src, dst, external, self.notes)
        self.stage("quantize", name, 1)
        return info

    def verify(self, name: str, entry: dict, variant: str | None, keep_raw: bool) -> None:
        """The tensor gate on tmp/NAME, into its report `entry`; an fp16 VAE that fails it is written fp32 instead
        (fp16 overflows in some VAEs: SDXL's, activations past 65504). Raises Refused past the tolerance."""
        m, raw, t0 = self.models[name], self.scratch(name) / "raw", time.perf_counter()
        self.stage("verify", name, 0)
        diff, tol = parity(self.tmp / name / "model.onnx", m.args, m.ref, m.spec.inputs, self.profile, self.level)
        gc.collect()
        trim_heap()  # the session's memory back to the OS before the next one
        if self.profile.precision == "fp16" and name.startswith("vae_") and not diff <= tol:
            entry["kept_fp32"] = f"fp16 differed from PyTorch by {diff:.3g} > {tol:.3g}"
            shutil.rmtree(self.tmp / name)
            write_one_data_file(raw / "model.onnx", self.tmp / name, entry["external_data"])
            diff, tol = parity(self.tmp / name / "model.onnx", m.args, m.ref, m.spec.inputs, self.profile, self.level)
        if not keep_raw:
            shutil.rmtree(raw.parent, ignore_errors=True)
        self.stage("verify", name, 1)
        entry.update({"max_abs_diff": diff, "tolerance": tol, "bytes": dir_bytes(self.tmp / name),
                      "verify_seconds": round(time.perf_counter() - t0, 2)})
        check_tensor_gate(name, diff, tol, self.profile, variant)

    def gate(self) -> None:
        """The image gate through the export in tmp; raises Refused below the profile's `min_psnr`."""
        t0 = time.perf_counter()
        progress = self.progress
        on_step = (lambda ev: emit(progress, "image gate", ev.step, ev.total)) if progress else None
        folder, update = (self.tmp, None) if self.update_for is None else (self.update_for, self.update_tmp)
        result = image_gate(folder, self.profile, self.gate_job, self.store.info["base"].get("kind") == "tiny",
                            on_step, self.level, update)
        if update is not None:
            result["through"] = "base export + update"
        result["seconds"] = round(time.perf_counter() - t0, 2)
        self.report["image_gate"] = result
        check_image_gate(result, self.profile)

    def write(self) -> None:
        """The report's last keys, edgecp.json with every file's sha256 (last: only a complete export has it), then
        the folder into place (an earlier export there, with overwrite, is replaced only now, after both gates)."""
        self.report["stages"] = self.stages
        self.report["verified_on"] = verified_on(self.profile, self.gpu, self.report["image_gate"].get("provider"))
        if self.notes:
            self.report["onnxruntime_patches_skipped"] = list(dict.fromkeys(self.notes))
        meta = {**self.report, "concepts": self.concepts, "base": self.store.info["base"], "store": str(self.store.root),
                "store_created": self.store.info.get("created"), "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if self.update_for is None:
            write_export_meta(self.tmp, meta)
            outputs.put_in_place(self.tmp, self.out)
            return
        rewrite_manifest(self.update_tmp, image_gate=self.report["image_gate"], export=meta)
        (self.update_tmp / WRITING_MARK).unlink()
        outputs.put_in_place(self.update_tmp, self.out)
        self.update_tmp = None

    def make_update(self, variant: str | None) -> None:
        """What differs between the base export and the full export in tmp, into update_tmp (`make_update`); the
        report's `update` entry: its bytes against the full export's, per model the tensors that changed, and why."""
        for old in self.update_tmp.iterdir():  # an earlier variant's update; the writing mark stays
            if old.is_dir():
                shutil.rmtree(old)
            elif old.name != WRITING_MARK:
                old.unlink()
        manifest = make_update(self.update_for, self.base_meta, self.tmp, self.update_tmp, {
            "store": str(self.store.root), "store_created": self.store.info.get("created"),
            "profile": self.profile.name, "from_version": self.base_meta["version"], "to_version": self.version,
            "concepts": self.concepts, "personal_token_rows": self.report["personal_token_rows"]})
        self.report["update"] = {
            "base": str(self.update_for), "from_version": self.base_meta["version"], "bytes": manifest["bytes"],
            "full_export_bytes": manifest["full_export_bytes"],
            "fraction": round(manifest["bytes"] / manifest["full_export_bytes"], 5),
            "models": manifest["models"], "carried_files": manifest["carried_files"],
            "why": update_why(manifest, self.store.info)}
        if self.int8:  # which int8 path ran: static re-calibrates per version, so its scales travel in the update
            qparams = sum(1 for t in manifest["tensors"] if t["name"].endswith(("_scale", "_zero_point")))
            self.report["update"]["int8"] = (
                f"{variant}: " + ("re-calibrated for this version; the update carries the "
                                  f"{qparams} scales and zero points that changed" if variant == "static" else
                                  "weights quantized per version, activations at run time: no calibration"))


def check_base(store: Store, profile: DeviceProfile, base: Path) -> dict:
    """The edgecp.json of `base`, an export that an update of `store` for `profile` can be made for: complete and
    intact, of the same profile, the same store (its creation time) and the same base model, with a personal token
    table (an export of this edgecp). EdgecpError in one line otherwise."""
    meta, problems = read_export_meta(base)
    if meta is None or problems:
        raise EdgecpError(f"--update-for '{base}' is not a complete, intact ONNX export ({problems[0]}): pass the "
                          "folder `edgecp export` wrote for the device")
    if meta.get("profile") != profile.name:
        raise EdgecpError(f"--update-for '{base}' is an export for profile {meta.get('profile')!r}, not "
                          f"{profile.name!r}: pass --profile {meta.get('profile')} or that profile's base export")
    if meta.get("base") != store.info["base"] or meta.get("store_created") != store.info.get("created"):
        raise EdgecpError(f"--update-for '{base}' was exported from another store or base model ({meta.get('store')}): "
                          f"an update joins two exports of the same store; pass an export of '{store.root}'")
    if not isinstance(meta.get("personal_token_rows"), int):
        raise EdgecpError(f"--update-for '{base}' has no personal token table (an export of an older edgecp): export "
                          "it again with this edgecp and give the device that export as its base")
    return meta


def _with_quantization(profile: DeviceProfile, variant: str | None) -> DeviceProfile:
    """`profile` restricted to the base export's int8 variant (static or dynamic)."""
    if variant is None or variant not in profile.quantization:
        return profile
    return dataclasses.replace(profile, quantization=(variant,))


def update_why(manifest: dict, info: dict) -> str:
    """Why the update is as large as it is, in one sentence: the tensors that changed per model, and what the
    store's method changes (its adapter's targets; methods with `base_delta` change full weights)."""
    parts = [f"{name}: {m['tensors']} of {m['of']} tensors, {m['bytes'] / 1e6:.2f} MB"
             for name, m in manifest["models"].items() if m["tensors"]]
    adapter = info.get("adapter", {})
    kind = adapter.get("kind")
    trains = f"a {kind.upper()} adapter on" if kind in ("lora", "vera") else "the weights of"
    what = (f"method {info['method']['name']} trains {trains} {', '.join(adapter.get('targets', []))}, merged into "
            f"those weights; the text encoder's personal token table ({PERSONAL_ROWS} rows per reserve) holds the "
            "concept tokens")
    return f"{'; '.join(parts) or 'no tensor changed'} ({what})"
