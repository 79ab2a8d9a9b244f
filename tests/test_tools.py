"""The measurement scripts run (their numbers are for people to read, not asserted as timings)."""

import importlib.util
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_iterations_times_every_path_with_synthetic_concepts():
    bench = _load("bench_iterations")
    ticks = []
    r = bench.measure(3, iters=1, warmup=0, batch=1, k=5, device=torch.device("cpu"), tick=lambda: ticks.append(1))
    assert set(r) == {"plain", "ewc-dc", "dsc", "c-lora", "ewc", "default"} and all(v > 0 for v in r.values())
    assert r["default"] == r["ewc"] + 0.2 * (r["ewc-dc"] + r["dsc"])
    assert len(ticks) == 5


def test_dc_entropy_measures_both_reductions_on_a_base():
    r = _load("dc_entropy").measure_base("tiny", 64, trials=1, taus=[0.05], images=1)
    s = r["scores"]
    assert r["latent_elements"] == 4 * 16 * 16 and set(s) == {"mean@tau=0.05", "sum@tau=0.05"}
    assert 0 <= s["sum@tau=0.05"]["entropy"] <= s["mean@tau=0.05"]["entropy"] <= 1.0987  # ln 3 at most


def test_bench_methods_reports_time_and_bytes(tmp_path):
    bench = _load("bench_methods")
    ticks = []
    r = bench.run_method("lora-ewc", steps=1, work=tmp_path, tick=lambda: ticks.append(1))
    assert len(ticks) == 3 and r["train"] > 0 and r["fisher"] > 0 and r["dsc"] == 0
    assert r["version_bytes"] > 0 and r["store_bytes"] >= r["version_bytes"]


def test_sd_fixture_writes_a_loadable_base_whose_shape_matches(tmp_path):
    """tools/make_sd_fixture.py (the SD 1.5 architecture; here its narrow preset): the header-read shape counts
    every parameter of the loaded model, by kind."""
    from edgecp.model.base import BaseSpec, load_components
    from edgecp.model.shape import base_shape

    counts = _load("make_sd_fixture").write_fixture(tmp_path / "mini", "sd15-mini", log=lambda *_: None)
    spec = BaseSpec("folder", str(tmp_path / "mini"), tmp_path / "mini")
    comps = load_components(spec)
    shape = base_shape(spec)
    unet = comps.unet
    convs = sum(m.weight.numel() for m in unet.modules() if isinstance(m, torch.nn.Conv2d))
    linears = sum(m.weight.numel() for n, m in unet.named_modules()
                  if isinstance(m, torch.nn.Linear) and not n.endswith(("attn2.to_k", "attn2.to_v")))
    assert shape.unet_params == sum(p.numel() for p in unet.parameters()) == counts["unet"]
    assert (shape.unet_conv, shape.unet_linear) == (convs, linears)
    assert shape.text == counts["text_encoder"] and shape.vae == counts["vae"]
    assert shape.unet.block_out_channels == (32, 64, 128, 128) and shape.vae_scale == 8


def test_merge_bench_pools_runs_of_several_folders(tmp_path):
    import json

    from edgecp.eval.bench import TABLE_COLUMNS

    def write(folder, runs):
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"sequence": ["a", "b"], "runs": runs}))

    def run(method, seed, a_mmd):
        return {"method": method, "seed": seed, "metrics": {**{k: 0.5 for k in TABLE_COLUMNS}, "A_MMD": a_mmd}}

    write(tmp_path / "x", [run("m1", 0, 0.010), run("m2", 0, 0.030)])
    write(tmp_path / "y", [run("m1", 1, 0.020)])
    merged = _load("merge_bench").merge([tmp_path / "x", tmp_path / "y"])
    assert list(merged["summary"]) == ["m1", "m2"]
    assert merged["summary"]["m1"]["A_MMD"]["mean"] == 0.015 and abs(merged["summary"]["m1"]["A_MMD"]["std"] - 0.005) < 1e-12
    assert merged["summary"]["m2"]["A_MMD"] == {"mean": 0.03, "std": 0.0}


def test_live_bytes_counts_new_storages_once_and_drops_dead_ones():
    """By hand: 1000 fp32 (4000 B) and 500 bf16 (1000 B) alive together, then the first dies and a view of the
    second adds nothing; a view of a tensor made before counting adds nothing either."""
    LiveBytes = _load("count_activations").LiveBytes
    w = torch.ones(4096)
    with LiveBytes(w) as meter:
        a = torch.zeros(1000)
        b = torch.zeros(500, dtype=torch.bfloat16)
        assert meter.live == 5000
        del a
        assert meter.live == 1000
        b.view(10, 50).t()
        w.view(64, 64).t()
        c = torch.empty(250)
        assert meter.live == 2000
        del b, c
    assert meter.peak == 5000 and meter.live == 0


def test_cuda_activation_coefficients_cover_the_counted_bytes_on_the_tiny_base(tmp_path):
    """The planner's CUDA activation model (fitted on counts of the tiny, sdxl-mini and SDXL bases) against a fresh
    count on the tiny base, for training with checkpointing, sampling and the VAE: never below it, and within 40%
    (the tiny VAE's encoder holds 4 values a row, SDXL's 5)."""
    import json

    from edgecp.model.base import resolve_base
    from edgecp.model.shape import base_shape
    from edgecp.planner import CUDA_ACTIVATIONS, _activation_bytes

    out, md = tmp_path / "c.json", tmp_path / "c.md"
    assert _load("count_activations").main(["--base", "tiny", "--resolution", "128", "--phases", "train,sample,vae",
                                            "--out", str(out), "--md", str(md)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    shape = base_shape(resolve_base("tiny"))
    latent = 128 // shape.vae_scale
    for counted, predicted in [
        (row["train_counted_bytes"], _activation_bytes(shape, latent, 1, True, "bf16", kind="cuda")),
        (row["sample_counted_bytes"], _activation_bytes(shape, latent, 2, False, "bf16", grad=False, kind="cuda")),
        (row["decode_counted_bytes"], CUDA_ACTIVATIONS.vae_bytes("decode", "bf16") * row["vae_px"]),
        (row["encode_counted_bytes"], CUDA_ACTIVATIONS.vae_bytes("encode", "bf16") * row["vae_px"]),
    ]:
        assert counted <= predicted <= 1.4 * counted, (counted, predicted)
    assert row["predicted"]["cuda"]["train"] == _activation_bytes(shape, latent, 1, True, "bf16", kind="cuda")
    assert md.read_text().count("\n| ") == 5  # the separator, then one line per phase
