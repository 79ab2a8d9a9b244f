"""The files desktop tools read (issue 26): a kohya LoRA with bundled embeddings, embedding files, a single-file
checkpoint; read back by diffusers' own loaders (`load_lora_weights`, `load_textual_inversion`, `from_single_file`)
and compared with edgecp's own model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_util import assert_one_line_error, run_cli
from conftest import make_photos, new_store
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from edgecp.errors import EdgecpError
from edgecp.export.webui import factor, rank_for_error


def test_rank_and_error_of_the_svd_factors_by_hand():
    # singular values 10, 5, 1, 0.1, 0.01: ||s|| = sqrt(126.0101) = 11.2254...; the tail after 3 values is
    # sqrt(0.0101) = 0.1005 -> 0.895% <= 1%; after 2 it is sqrt(1.0101) = 1.005 -> 8.95% > 1%
    s = torch.tensor([10.0, 5.0, 1.0, 0.1, 0.01])
    assert rank_for_error(s, 0.01) == 3
    assert rank_for_error(s, 0.09) == 2
    assert rank_for_error(s, 1e-6) == 5
    assert rank_for_error(torch.zeros(4), 0.01) == 1
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((12, 5)))
    v, _ = np.linalg.qr(rng.standard_normal((9, 5)))
    delta = torch.from_numpy(u @ np.diag(s.numpy()) @ v.T).float()
    f = factor(delta, None, 0.01, torch.float32)
    assert f["rank"] == 3 and f["alpha"] == 1.0 and f["down"].shape == (3, 9) and f["up"].shape == (12, 3)
    want = u[:, :3] @ np.diag(s.numpy()[:3]) @ v[:, :3].T  # numpy's truncation, the best rank-3 approximation
    np.testing.assert_allclose((f["alpha"] / 3 * f["up"] @ f["down"]).numpy(), want, atol=1e-5)  # kohya's scale
    assert f["relative_error"] == pytest.approx(np.sqrt(0.0101) / np.sqrt(126.0101), rel=1e-4)
    assert factor(delta, 1, 0.01, torch.float32)["relative_error"] == pytest.approx(np.sqrt(26.0101 / 126.0101), rel=1e-4)


def test_the_bound_holds_after_rounding_or_is_refused_and_the_files_names_stay_the_exports():
    from types import SimpleNamespace

    from edgecp.export.webui import file_stem

    torch.manual_seed(0)
    delta = torch.randn(40, 30) @ torch.diag(torch.logspace(0, -3, 30)) @ torch.randn(30, 30)
    for dtype, bound in ((torch.float16, 0.01), (torch.float32, 1e-5)):
        f = factor(delta, None, bound, dtype)
        assert f["relative_error"] <= bound  # measured on the cast factors
        if f["rank"] > 1:  # and no smaller rank meets it
            assert factor(delta, f["rank"] - 1, bound, dtype)["relative_error"] > bound
    with pytest.raises(EdgecpError, match="cannot be met in fp16") as e:
        factor(delta, None, 1e-6, torch.float16)  # fp16 rounding alone is ~1e-4 of the change
    assert "--precision fp32" in str(e.value) and "\n" not in str(e.value)
    for name, stem in (("my-model", "my-model"), ("embeddings", "edgecp"), ("Edgecp-Export", "edgecp"),
                       ("HOW-TO-USE", "edgecp"), (".hidden", "edgecp")):
        assert file_stem(SimpleNamespace(root=Path("/x") / name)) == stem


def test_openclip_layout_is_what_diffusers_reads_back():
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    from edgecp.model.ldm_layout import text_encoder_to_ldm

    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, max_position_embeddings=12))
    ldm = text_encoder_to_ldm(model.state_dict(), openclip=True)
    assert "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight" in ldm
    back = convert_open_clip_checkpoint(model, ldm)
    want = {k if k.startswith("text_model.") else "text_model." + k: v  # transformers 5 drops the prefix
            for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    assert set(back) == set(want)
    assert all(torch.equal(back[k], want[k]) for k in want)


def unet_out(unet, cond: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, 16, 16, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=cond).sample


def text_out(tokenizer, text_encoder, prompt: str) -> torch.Tensor:
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def diffusers_pipe(base: Path, folder: Path, triggers: list[str], lora: bool = True):
    """A fresh base read by diffusers, with the export's files loaded by diffusers' own loaders."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    if lora:
        lora_file = next(p for p in folder.glob("*.safetensors"))
        sd = load_file(str(lora_file))
        pipe.load_lora_weights({k: v for k, v in sd.items() if not k.startswith("bundle_emb.")})
    for t in triggers:
        pipe.load_textual_inversion(folder / "embeddings" / f"{t}.safetensors", token=t)
    return pipe


def check_against_edgecp(store: Path, out: Path, base: Path, ratio: float) -> dict:
    """diffusers' reading of the webui export against edgecp's own model: the text encoder's output for each concept's
    prompt (trigger word vs edgecp's token), and the UNet's output for one input, within `ratio` of how far the
    concepts move that output from the base's."""
    from edgecp.personal import PersonalModel
    from edgecp.store import Store

    model = PersonalModel.load(Store.open(store), device=torch.device("cpu"))
    triggers = [f"edgecp-{c['name']}" for c in model.concepts]
    pipe = diffusers_pipe(base, out, triggers)
    comps = model.comps
    for c, t in zip(model.concepts, triggers):
        ours = text_out(comps.tokenizer, comps.text_encoder, f"a photo of {c['token']} {c['class_word']}")
        theirs = text_out(pipe.tokenizer, pipe.text_encoder, f"a photo of {t} {c['class_word']}")
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    cond = text_out(comps.tokenizer, comps.text_encoder, "a photo of a dog")
    ours, theirs = unet_out(comps.unet, cond), unet_out(pipe.unet, cond)
    plain = unet_out(diffusers_pipe(base, out, [], lora=False).unet, cond)
    moved = float((ours - plain).abs().max())  # what the concepts change: the error is measured against it
    assert moved > 0
    assert float((ours - theirs).abs().max()) <= ratio * moved
    return json.loads((out / "edgecp-export.json").read_text())


def test_webui_export_of_a_lora_store(trained_store, tmp_path, capsys):
    from edgecp.model.tiny import tiny_path

    out = tmp_path / "webui"
    code, stdout, err = run_cli(capsys, "export", "--store", trained_store, "--format", "webui", "--out", out)
    assert code == 0, err
    assert "HOW-TO-USE.txt" in stdout.replace("\n", "")
    assert sorted(p.name for p in out.iterdir()) == ["HOW-TO-USE.txt", "edgecp-export.json", "embeddings",
                                                    "trained.json", "trained.safetensors"]
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == ["edgecp-alpha.safetensors",
                                                                     "edgecp-beta.safetensors"]
    with safe_open(str(out / "trained.safetensors"), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    assert all(k.startswith(("lora_unet_", "bundle_emb.")) for k in keys)
    downs = [k for k in keys if k.endswith(".lora_down.weight")]
    assert downs and all(k.replace("lora_down.weight", "alpha") in keys for k in downs)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in downs
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "16"
    assert float(meta["ss_network_alpha"]) == 16.0 and meta["edgecp_method"] == "lora-sequential"
    assert meta["modelspec.trigger_phrase"] == "edgecp-alpha, edgecp-beta"
    tokens = load_file(str(trained_store / "versions" / "v0002" / "tokens.safetensors"))
    for name in ("alpha", "beta"):  # A1111's bundle and the embedding file hold the concept's row
        row = tokens[f"<{name}>"].reshape(1, -1)
        assert torch.equal(tensors[f"bundle_emb.edgecp-{name}.string_to_param.*"], row)
        assert torch.equal(load_file(str(out / "embeddings" / f"edgecp-{name}.safetensors"))["emb_params"], row)
    a1111 = json.loads((out / "trained.json").read_text())
    assert a1111["activation text"] == "edgecp-alpha edgecp-beta"
    how = (out / "HOW-TO-USE.txt").read_text()
    assert "a photo of edgecp-alpha dog <lora:trained:1>" in how and "embedding:edgecp-beta" in how
    report = check_against_edgecp(trained_store, out, tiny_path(), ratio=0.01)
    assert report["lora"]["path"] == "exact" and report["lora"]["max_relative_error"] < 2e-3
    assert report["image_check"]["psnr_db"] >= 40

    # overwrite only an earlier webui export; bad values get one line and leave the export as it was
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()  # what diffusers' loaders above wrote
    for args, needles in ((["--rank", "0"], ["--rank 0", "1 to 4096"]), (["--max-error", "1.5"], ["--max-error 1.5"]),
                          (["--precision", "fp8"], ["fp8", "fp16 or fp32"]), ([], ["--overwrite"]),
                          (["--update-for", tmp_path], ["--update-for"])):
        code, _, err = run_cli(capsys, "export", "--store", trained_store, "--format", "webui", "--out", out, *args)
        assert_one_line_error(code, err, *needles)
    code, _, err = run_cli(capsys, "export", "--store", trained_store, "--format", "checkpoint", "--out", out,
                           "--overwrite")
    assert_one_line_error(code, err, "no earlier edgecp checkpoint export")
    for args, needles in ((["--format", "webui", "--profile", "cpu-fp32"], ["--profile is for --format onnx"]),
                          (["--format", "onnx", "--rank", "4"], ["--rank is for --format webui"]),
                          (["--format", "diffusers", "--precision", "fp32"], ["--precision is for"]),
                          (["--format", "checkpoint", "--max-error", "0.1"], ["--max-error is for --format webui"])):
        code, _, err = run_cli(capsys, "export", "--store", trained_store, "--out", tmp_path / "x", *args)
        assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "x").exists()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    code, _, err = run_cli(capsys, "export", "--store", trained_store, "--format", "webui", "--out",
                           trained_store / "versions" / "w")
    assert_one_line_error(code, err, "inside the store")
    link = tmp_path / "link"
    link.symlink_to(out)
    code, _, err = run_cli(capsys, "export", "--store", trained_store, "--format", "webui", "--out", link,
                           "--overwrite", "--rank", "2", "--precision", "fp32")
    assert code == 0, err
    assert link.is_symlink() and link.resolve() == out.resolve()  # the real folder was replaced, not the link
    report = json.loads((out / "edgecp-export.json").read_text())
    assert report["lora"]["rank_max"] == 2 and report["lora"]["path"] == "svd" and report["lora"]["precision"] == "fp32"


@pytest.mark.parametrize("method", ["custom-diffusion", "vera-sequential"])
def test_full_weight_and_vera_changes_are_factored_within_the_bound(method, tmp_path):
    from edgecp.adapters import lora
    from edgecp.export.webui import export_webui, kohya_key
    from edgecp.model.base import load_components, resolve_base
    from edgecp.model.tiny import tiny_path
    from edgecp.personal import PersonalModel
    from edgecp.store import Store
    from edgecp.train import add_concept

    store = tmp_path / "s"
    new_store(store, method=method)
    add_concept(store, "alpha", make_photos(tmp_path / "p", seed=1), class_word="dog")
    report = export_webui(store, tmp_path / "out")
    assert report["lora"]["path"] == "svd" and report["lora"]["max_relative_error"] <= 0.01
    assert report["lora"]["max_error_bound"] == 0.01
    # independent of the exporter's own sums: the merged UNet's weights minus the base's
    model = PersonalModel.load(Store.open(store), device=torch.device("cpu"))
    if lora.has_adapter(model.comps.unet):
        lora.merge(model.comps.unet)
    merged = dict(model.comps.unet.named_parameters())
    base = dict(load_components(resolve_base("tiny")).unet.named_parameters())
    sd = load_file(str(tmp_path / "out" / "s.safetensors"))
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all(k.endswith(".weight") for k in changed)
    for k in changed:
        key = kohya_key(k.removesuffix(".weight"))
        down, up = sd[f"{key}.lora_down.weight"].double(), sd[f"{key}.lora_up.weight"].double()
        carried = float(sd[f"{key}.alpha"]) / down.shape[0] * up @ down
        want = (merged[k] - base[k]).double()
        assert float(torch.linalg.norm(carried - want) / torch.linalg.norm(want)) <= 0.0101, k
    check_against_edgecp(store, tmp_path / "out", tiny_path(), ratio=0.03)


def test_a_change_a_lora_cannot_carry_is_refused_in_one_line():
    from edgecp.export.webui import check_linear
    from edgecp.model.base import load_components, resolve_base

    unet = load_components(resolve_base("tiny")).unet
    check_linear(unet, {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.zeros(1, 1)}, "m")
    for key in ("conv_in.weight", "down_blocks.0.attentions.0.norm.weight", "nope.weight"):
        with pytest.raises(EdgecpError, match="cannot carry") as e:
            check_linear(unet, {key: torch.zeros(1, 1)}, "cns")
        assert key in str(e.value) and "\n" not in str(e.value)
    from edgecp.adapters import lora
    from edgecp.config import AdapterConfig

    lora.attach(unet, AdapterConfig(kind="lora", rank=2, alpha=2.0, targets=("proj_in",)))  # a 1x1 conv here
    with pytest.raises(EdgecpError, match="adapts .*proj_in.*cannot carry"):
        check_linear(unet, {}, "lora-sequential")


def test_checkpoint_round_trip(trained_store, tmp_path, capsys, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from edgecp.adapters import lora
    from edgecp.generate import GenerateConfig, torch_generate
    from edgecp.model.single_file import TOKEN_ROWS, detect_family
    from edgecp.model.tiny import tiny_path
    from edgecp.personal import PersonalModel
    from edgecp.store import Store

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "ck"
    code, _, err = run_cli(capsys, "export", "--store", trained_store, "--format", "checkpoint", "--out", out,
                           "--precision", "fp32")
    assert code == 0, err
    ckpt = out / "trained.safetensors"
    assert detect_family(ckpt) == "tiny"
    report = json.loads((out / "edgecp-export.json").read_text())
    assert report["image_check"]["psnr_db"] >= 60 and report["checkpoint"]["tokens"] == ["<alpha>", "<beta>"]
    # diffusers' own single-file loader reads the merged weights (the token rows are keys it ignores)
    pipe = StableDiffusionPipeline.from_single_file(str(ckpt), config=str(tiny_path()), local_files_only=True,
                                                    safety_checker=None)
    model = PersonalModel.load(Store.open(trained_store), device=torch.device("cpu"))
    lora.merge(model.comps.unet)
    ours = model.comps.unet.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in pipe.unet.state_dict().items())
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == len(pipe.tokenizer)  # the base vocabulary
    assert "<alpha>" not in pipe.tokenizer.get_vocab()
    # edgecp init --base on it: the concepts' tokens are words of the new base, and it draws the store's image
    new = tmp_path / "new"
    code, _, err = run_cli(capsys, "init", new, "--base", ckpt, "--train", "steps=1", "--prior-images", "1")
    assert code == 0, err
    cfg = GenerateConfig(n=1, steps=3, size=64)
    theirs = PersonalModel.load(Store.open(new), device=torch.device("cpu"))
    prompt = "a photo of a <alpha> dog and a <beta> mug"
    a = np.asarray(torch_generate(model.comps, prompt, cfg, "cpu")[0], dtype=np.int16)
    b = np.asarray(torch_generate(theirs.comps, prompt, cfg, "cpu")[0], dtype=np.int16)
    assert np.abs(a - b).max() <= 1
    # a store on the checkpoint learns on: its checkpoint carries the base's tokens and its own, the base's size kept
    from edgecp.train import add_concept

    add_concept(new, "gamma", make_photos(tmp_path / "g", seed=3), class_word="cat")
    code, _, err = run_cli(capsys, "export", "--store", new, "--format", "checkpoint", "--out", tmp_path / "ck2")
    assert code == 0, err
    ck2 = json.loads((tmp_path / "ck2" / "edgecp-export.json").read_text())["checkpoint"]
    assert ck2["tokens"] == ["<alpha>", "<beta>", "<gamma>"] and ck2["family"] == "tiny"
    with safe_open(str(tmp_path / "ck2" / "new.safetensors"), framework="pt") as f:
        table = f.get_slice("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight").get_shape()
        assert f.metadata()["edgecp_family"] == "tiny"
    assert table[0] == len(pipe.tokenizer)
    # a checkpoint whose token rows its metadata does not list is refused at init, in one line
    with safe_open(str(ckpt), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    sd[TOKEN_ROWS + "<gamma>"] = sd[TOKEN_ROWS + "<alpha>"].clone()
    save_file(sd, str(tmp_path / "edited.safetensors"), metadata={"edgecp_tokens": '["<alpha>", "<beta>"]'})
    code, _, err = run_cli(capsys, "init", tmp_path / "bad", "--base", tmp_path / "edited.safetensors")
    assert_one_line_error(code, err, "edited.safetensors", "edgecp_tokens")
    assert not (tmp_path / "bad").exists()


def test_sd2_layout_base_exports_for_the_tools(tmp_path):
    from test_sd2_scheduler import make_sd2_base

    from edgecp.api import init_store
    from edgecp.export.checkpoint import export_checkpoint
    from edgecp.export.webui import export_webui
    from edgecp.train import add_concept

    base = make_sd2_base(tmp_path / "sd2-768-v")
    store = tmp_path / "s"
    init_store(store, str(base), method="lora-sequential", train={"steps": 3}, prior={"num_images": 2, "steps": 2})
    add_concept(store, "alpha", make_photos(tmp_path / "p", seed=1), class_word="dog")
    export_webui(store, tmp_path / "w")
    check_against_edgecp(store, tmp_path / "w", base, ratio=0.01)
    # a reduced SD 2.x layout (linear projections at the tiny size) has no single-file family to be read back as
    with pytest.raises(EdgecpError, match="cannot be read back as a base") as e:
        export_checkpoint(store, tmp_path / "c", precision="fp32")
    assert "\n" not in str(e.value) and not (tmp_path / "c").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".c-")] == []
