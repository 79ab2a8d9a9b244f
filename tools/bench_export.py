#!/usr/bin/env python
"""Exports per device profile, measured: export time, peak RSS, size, parity, image quality; ONNX vs PyTorch speed.

    python tools/bench_export.py --store edgecp-demo/store --out /tmp/bx            # tiny base, every profile
    python tools/bench_export.py --store S --out /tmp/bx --size 256 --steps 25 --profiles cpu-fp32,edge-int8

For each profile, `edgecp export` runs in a fresh process (its own peak RSS, `resource.getrusage`), then in this
process, on the same machine and threads:
- UNet call latency (batch 2: classifier-free guidance, at `--size`) of the export on onnxruntime's CPU provider and
  of the merged PyTorch UNet, same inputs, `--runs` calls of each in alternating blocks of about 5 (`paired`); their
  means and ratio;
- a whole image (`--steps` DDIM steps, guidance 7.5, the gate prompt, seed 0) through edgecp's onnxruntime runner
  and through diffusers (PyTorch fp32), `--image-runs` of each in alternation after a 2-step warm-up image:
  seconds and ratio, PSNR against PyTorch's image and against the cpu-fp32 export's image. Alternation: this
  shared host's speed drifts by up to 30% over minutes (its GEMM rate, measured twice, 137 and 173 GFLOP/s), and a
  ratio of two sides timed minutes apart carried that drift;
- the UNet call's floating-point work (torch's FlopCounterMode, multiply-adds counted as 2) and the rate each backend
  reaches, beside this machine's fp32 matrix-multiply rate (a 2048^3 GEMM on torch and on onnxruntime): a fp32
  backend cannot beat the GEMM rate by much, which bounds what any fp32 export can gain over PyTorch here.
Writes OUT/bench_export.json and OUT/bench_export.md (the two tables); prints each row as it finishes. What else
ran on the machine is not measured: run it alone.

`--export-only` measures the exports alone (the first table), for bases whose PyTorch pipeline and an onnxruntime
UNet session do not fit in memory together (SDXL: 10.3 GB of fp32 UNet each, on a 24 GB machine); the fp32 sizes
are then the raw graphs' initializers from the exports' reports (`fp32_weight_bytes`), not PyTorch's parameters.

    python tools/bench_export.py --store S --out /tmp/bx-sdxl --export-only                      # SDXL fixture
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
GUIDANCE = 7.5


def _child_export(store: str, profile: str, out: str) -> None:
    """In a fresh process: one export; prints its report and this process's peak RSS as one JSON line."""
    import torch

    from edgecp.export.onnx_export import export_onnx
    from edgecp.memory import PeakMeter

    t0 = time.perf_counter()
    # RSS sampled every 50 ms, its peak kept per stage (the progress callback's phase: "export unet", ...)
    with PeakMeter(torch.device("cpu"), interval=0.05) as meter:
        meter.enter("load")
        report = export_onnx(store, profile, out, progress=lambda ev: meter.enter(ev.phase))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"report": report, "seconds": time.perf_counter() - t0, "peak_rss": peak,
                      "stage_peak_rss": meter.phases}))


def timed(fn, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - t0) / runs


def paired(fa, fb, runs: int, rounds: int = 1, prime_a=None, prime_b=None) -> tuple[float, float]:
    """Mean seconds of fa and of fb over `runs` calls each, timed in `rounds` alternating blocks (a..., b..., a...):
    on a shared host whose speed drifts over minutes, both sides of a ratio see the same moments. Each block starts
    with one untimed call (`prime_a` / `prime_b`, default the timed function itself): the other library's threads
    still spin for a while after its call, and on 2 cores a call timed right after one of the other side's ran
    2.5x slower (tiny UNet: torch 13 -> 33 ms, onnxruntime 2.9 -> 7.6 ms)."""
    rounds = max(1, min(rounds, runs))
    total = [0.0, 0.0]
    for r in range(rounds):
        k = runs // rounds + (r < runs % rounds)
        for side, (f, prime) in enumerate(((fa, prime_a), (fb, prime_b))):
            (prime or f)()
            t0 = time.perf_counter()
            for _ in range(k):
                f()
            total[side] += time.perf_counter() - t0
    return total[0] / runs, total[1] / runs


def gemm_gflops(runs: int = 10, n: int = 2048) -> dict:
    """This machine's fp32 GEMM rate (GFLOP/s) on torch and on onnxruntime's CPU provider, an n x n x n MatMul."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    rate = lambda seconds: round(2 * n**3 / seconds / 1e9, 1)
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "gemm",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])],
                              [numpy_helper.from_array(b.numpy(), "B")])
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    feed = {"A": a.numpy()}
    return {"torch": rate(timed(lambda: a @ b, runs)), "onnxruntime": rate(timed(lambda: sess.run(None, feed), runs))}


def _report_fp32_bytes(exports: dict) -> dict:
    """{largest, whole}: the fp32 bytes of the largest model and of all, from the first export's report (each
    model's raw fp32 graph: `fp32_weight_bytes`; the VAE counted as its decoder and encoder graphs)."""
    for ex in exports.values():
        if "report" in ex:
            sizes = [m["fp32_weight_bytes"] for m in ex["report"]["models"].values()]
            return {"largest": max(sizes), "whole": sum(sizes), "from": "the exports' raw fp32 graphs"}
    raise SystemExit("no export succeeded: nothing to measure")


def _export_row(prof: str, ex: dict, folder: Path, sizes: dict) -> dict:
    """One profile's export figures (the first table)."""
    from edgecp.export.external_data import dir_bytes

    row = {"profile": Path(prof).stem}
    if "error" in ex:
        return {**row, "error": ex["error"]}
    rep = ex["report"]
    row.update({
        "export_s": ex["seconds"] and round(ex["seconds"], 1),
        "peak_rss_gb": ex["peak_rss"] and round(ex["peak_rss"] / 1e9, 2),
        "peak_over_largest_fp32": ex["peak_rss"] and round(ex["peak_rss"] / sizes["largest"], 2),
        "peak_over_whole_fp32": ex["peak_rss"] and round(ex["peak_rss"] / sizes["whole"], 2),
        "stage_peak_rss_gb": {k: round(v / 1e9, 2) for k, v in ex.get("stage_peak_rss", {}).items()},
        "folder_mb": round(dir_bytes(folder) / 1e6, 1),
        "worst_parity": max((m["max_abs_diff"] / m["tolerance"], n) for n, m in rep["models"].items()),
        "gate_psnr_db": rep["image_gate"]["psnr_db"],
        "gate_step_ratio": rep["image_gate"].get("unet_step_ms", {}).get("ratio"),  # the export's own figure
        "fused": {n: m.get("fused", {}) for n, m in rep["models"].items() if m.get("fused")},
        "quantization": rep.get("quantization"), "refused_variants": rep.get("refused_variants"),
        "kept_fp32": {n: m["kept_fp32"] for n, m in rep["models"].items() if m.get("kept_fp32")},
    })
    return row


def _largest_fp32_model_bytes(comps) -> dict:
    sizes = {n: sum(p.numel() * 4 for p in m.parameters())
             for n, m in (("unet", comps.unet), ("text_encoder", comps.text_encoder), ("vae", comps.vae))}
    return {"largest": max(sizes.values()), "whole": sum(sizes.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--out", required=True, type=Path, help="where the exports and the tables go")
    ap.add_argument("--profiles", default="cpu-fp32,cuda-fp16,edge-int8",
                    help="shipped profile names or .toml files, comma-separated; put cpu-fp32 first (the PSNR reference)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default: the base's, at most 256)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--runs", type=int, default=5, help="UNet calls timed per backend")
    ap.add_argument("--image-runs", type=int, default=1,
                    help="whole images timed per backend (their mean), after one 2-step warm-up image each")
    ap.add_argument("--reuse", action="store_true", help="keep exports already in --out (no export figures then)")
    ap.add_argument("--export-only", action="store_true",
                    help="the exports' figures only, no speed table (PyTorch is never loaded beside onnxruntime)")
    ap.add_argument("--child-export", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child_export:
        _child_export(*a.child_export)
        return

    import torch

    from edgecp.adapters import lora
    from edgecp.export.gates import gate_prompt, psnr
    from edgecp.export.ort_runner import OnnxStableDiffusion
    from edgecp.generate import GenerateConfig, torch_generate
    from edgecp.personal import PersonalModel
    from edgecp.store import Store

    a.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    exports: dict[str, dict] = {}
    for prof in a.profiles.split(","):
        folder = a.out / Path(prof).stem  # a shipped profile's name, or a .toml file of your own
        if a.reuse and (folder / "edgecp.json").is_file():
            exports[prof] = {"report": json.loads((folder / "edgecp.json").read_text()), "seconds": None,
                             "peak_rss": None}
            continue
        if folder.exists():
            raise SystemExit(f"{folder} exists: remove it or pass --reuse")
        proc = subprocess.run([sys.executable, __file__, "--store", a.store, "--out", str(a.out),
                               "--child-export", a.store, prof, str(folder)], capture_output=True, text=True)
        if proc.returncode:
            exports[prof] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
            print(f"{prof}: export failed: {exports[prof]['error']}", flush=True)
            continue
        exports[prof] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{prof}: exported in {exports[prof]['seconds']:.0f} s, peak RSS "
              f"{exports[prof]['peak_rss'] / 1e9:.2f} GB; per stage GB: "
              + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in exports[prof]["stage_peak_rss"].items()), flush=True)

    store = Store.open(a.store)
    if a.export_only:
        meta = {"store": a.store, "base": store.info["base"], "export_only": True, "cpu_count": os.cpu_count(),
                "fp32_bytes": _report_fp32_bytes(exports),
                "onnxruntime": __import__("onnxruntime").__version__, "torch": torch.__version__}
        meta["rows"] = [_export_row(prof, exports[prof], a.out / Path(prof).stem, meta["fp32_bytes"])
                        for prof in a.profiles.split(",")]
        for row in meta["rows"]:
            print(json.dumps(row), flush=True)
        (a.out / "bench_export.json").write_text(json.dumps(meta, indent=2))
        (a.out / "bench_export.md").write_text(tables(meta))
        print(tables(meta))
        return
    model = PersonalModel.load(store, device=torch.device("cpu"))
    comps = model.comps
    if lora.has_adapter(comps.unet):
        lora.merge(comps.unet)
    for m in (comps.unet, comps.text_encoder, comps.vae):
        m.eval().float()
    sizes = _largest_fp32_model_bytes(comps)
    size = a.size or min(comps.resolution, 256)
    lat = size // comps.vae_scale
    prompt = gate_prompt([{k: c[k] for k in ("name", "token", "class_word")} for c in model.concepts])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, comps.unet.config.in_channels, lat, lat, generator=g)
    hidden = torch.randn(2, comps.tokenizer.model_max_length, comps.unet.config.cross_attention_dim, generator=g)
    c, cond = hidden, {"encoder_hidden_states": hidden.numpy()}
    if comps.sdxl:  # the packed conditioning PyTorch's UNet takes, and the three inputs the export takes
        from edgecp.model.sdxl import pack, pooled_width, time_ids

        pooled = torch.randn(2, pooled_width(comps.unet.config), generator=g)
        c = pack(hidden, pooled)
        cond.update(text_embeds=pooled.numpy(), time_ids=time_ids(size, size, 2, pooled).numpy())
    t = torch.tensor(500.0)

    def torch_call():
        with torch.inference_mode():
            comps.unet(x, t, c)

    torch_unet = timed(torch_call, a.runs)
    with torch.inference_mode():
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            comps.unet(x, t, c)
    unet_gflop = counter.get_total_flops() / 1e9
    gemm = gemm_gflops()
    print(f"UNet call: {unet_gflop:.1f} GFLOP; PyTorch {unet_gflop / torch_unet:.1f} GFLOP/s; fp32 GEMM on this machine: "
          f"torch {gemm['torch']}, onnxruntime {gemm['onnxruntime']} GFLOP/s", flush=True)
    cfg = GenerateConfig(n=1, seed=0, steps=a.steps, guidance=GUIDANCE, sampler="ddim", size=size)
    torch_generate(comps, prompt, replace(cfg, steps=2), torch.device("cpu"))  # warm-up
    last = {}  # each backend's latest image

    def torch_draw():
        last["torch"] = np.asarray(torch_generate(comps, prompt, cfg, torch.device("cpu"))[0].convert("RGB"))

    print(f"pytorch fp32: UNet call {torch_unet * 1e3:.1f} ms ({a.steps} steps, {size} px, "
          f"{torch.get_num_threads()} threads)", flush=True)

    fp32_img = None
    feeds = {"sample": x.numpy(), "timestep": np.array(500.0, dtype=np.float32), **cond}
    for prof in a.profiles.split(","):
        ex = exports[prof]
        folder = a.out / Path(prof).stem
        row = _export_row(prof, ex, folder, sizes)
        if "error" in ex:
            rows.append(row)
            continue
        pipe = OnnxStableDiffusion(folder, providers=["CPUExecutionProvider"])
        ts = pipe.unet.inputs["timestep"]
        f = {**feeds, "timestep": np.asarray(500.0, dtype=pipe.unet.dtype("timestep")).reshape(
            [1] * len(ts.shape))}
        sess = pipe.unet.session
        onnx_call = lambda s=sess, f=f: s.run(None, f)
        onnx_s, torch_s = paired(onnx_call, torch_call, a.runs, rounds=max(1, a.runs // 5))
        row["unet_ms"], row["torch_unet_ms"] = round(onnx_s * 1e3, 1), round(torch_s * 1e3, 1)
        row["unet_ratio"] = round(onnx_s / torch_s, 3)
        row["unet_gflops_per_s"] = round(unet_gflop / onnx_s, 1)  # fp32-equivalent work per second
        def draw(steps, p=pipe):
            last["onnx"] = np.asarray(p([prompt], steps=steps, seed=0, guidance=GUIDANCE, height=size, width=size)[0])

        draw(2)  # warm-up: every session's first run
        onnx_s, torch_s = paired(lambda: draw(a.steps), torch_draw, a.image_runs, rounds=a.image_runs,
                                 prime_a=onnx_call, prime_b=torch_call)
        img, torch_img = last["onnx"], last["torch"]
        row["image_s"], row["torch_image_s"] = round(onnx_s, 2), round(torch_s, 2)
        row["image_ratio"] = round(onnx_s / torch_s, 3)
        row["psnr_vs_torch_db"] = round(psnr(img, torch_img), 2)
        if row["profile"] == "cpu-fp32":
            fp32_img = img
        row["psnr_vs_onnx_fp32_db"] = None if fp32_img is None else round(psnr(img, fp32_img), 2)
        del pipe, sess
        rows.append(row)
        print(json.dumps(row), flush=True)

    meta = {"store": a.store, "base": store.info["base"], "size": size, "steps": a.steps, "runs": a.runs,
            "image_runs": a.image_runs, "torch_threads": torch.get_num_threads(), "fp32_bytes": sizes, "cpu_count": os.cpu_count(),
            "unet_gflop": round(unet_gflop, 1), "torch_unet_gflops_per_s": round(unet_gflop / torch_unet, 1),
            "gemm_gflops_per_s": gemm,
            "onnxruntime": __import__("onnxruntime").__version__, "torch": torch.__version__, "rows": rows}
    (a.out / "bench_export.json").write_text(json.dumps(meta, indent=2))
    (a.out / "bench_export.md").write_text(tables(meta))
    print(tables(meta))


def tables(meta: dict) -> str:
    gb = lambda v: "-" if v is None else f"{v:.2f}"
    lines = [f"Export ({meta['base'].get('kind', 'base')}, fp32 weights: largest model "
             f"{meta['fp32_bytes']['largest'] / 1e9:.2f} GB, whole {meta['fp32_bytes']['whole'] / 1e9:.2f} GB)", "",
             "| profile | export s | peak RSS GB | x largest | x whole | folder MB | worst parity (diff/tol) | gate PSNR dB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in meta["rows"]:
        if "error" in r:
            lines.append(f"| {r['profile']} | failed: {r['error']} |||||||")
            continue
        lines.append(f"| {r['profile']} | {r['export_s'] or '-'} | {gb(r['peak_rss_gb'])} | "
                     f"{gb(r['peak_over_largest_fp32'])} | {gb(r['peak_over_whole_fp32'])} | {r['folder_mb']} | "
                     f"{r['worst_parity'][0]:.2f} ({r['worst_parity'][1]}) | {r['gate_psnr_db']} |")
    if meta.get("export_only"):
        return "\n".join(lines) + "\n"
    lines += ["", f"Speed on onnxruntime's CPU provider vs PyTorch fp32 ({meta['size']} px, UNet batch 2, "
              f"{meta['steps']} steps, {meta['cpu_count']} cores, torch threads {meta['torch_threads']})", "",
              "| profile | UNet ms ONNX | UNet ms PyTorch | ratio | UNet GFLOP/s ONNX | image s ONNX | image s PyTorch "
              "| ratio | PSNR vs PyTorch dB | PSNR vs ONNX fp32 dB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in meta["rows"]:
        if "error" not in r:
            lines.append(f"| {r['profile']} | {r['unet_ms']} | {r['torch_unet_ms']} | {r['unet_ratio']} | "
                         f"{r.get('unet_gflops_per_s', '-')} | "
                         f"{r['image_s']} | {r['torch_image_s']} | {r['image_ratio']} | {r['psnr_vs_torch_db']} | "
                         f"{'-' if r['psnr_vs_onnx_fp32_db'] is None else r['psnr_vs_onnx_fp32_db']} |")
    if "unet_gflop" in meta:
        lines += ["", f"UNet call: {meta['unet_gflop']} GFLOP (multiply-adds as 2); PyTorch reaches "
                  f"{meta['torch_unet_gflops_per_s']} GFLOP/s. This machine's fp32 GEMM (2048^3): torch "
                  f"{meta['gemm_gflops_per_s']['torch']}, onnxruntime {meta['gemm_gflops_per_s']['onnxruntime']} GFLOP/s. "
                  "int8 and fp16 rows count the same work at fp32 sizes."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
