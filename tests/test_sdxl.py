"""SDXL (issue 28): the packed conditioning against diffusers' own SDXL pipeline, the concept token in both encoders,
training and generation on the sdxl-mini fixture, the planner's view of SDXL, and what SDXL does not have yet."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_photos
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def _fixture_tool():
    spec = importlib.util.spec_from_file_location("make_sd_fixture", ROOT / "tools" / "make_sd_fixture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdxl") / "sdxl-mini"
    _fixture_tool().write_fixture(out, "sdxl-mini", log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def comps(sdxl_base):
    from edgecp.model.base import load_components, resolve_base

    return load_components(resolve_base(str(sdxl_base)))


def _reference_pipeline(sdxl_base):
    """diffusers' own SDXL pipeline on the fixture, loaded on its own (no edgecp code in between)."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(sdxl_base), use_safetensors=True)


def test_fixture_has_sdxl_layout(sdxl_base):
    index = json.loads((sdxl_base / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for d in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (sdxl_base / d).is_dir(), d
    unet = json.loads((sdxl_base / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time" and unet["transformer_layers_per_block"] == [1, 2, 2]


def test_full_sdxl_preset_has_sdxl_base_parameter_counts():
    """The `sdxl` preset's UNet and encoders have SDXL base 1.0's parameter counts (built on the meta device: no memory)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tool = _fixture_tool()
    unet_cfg, _vae, _t1, t2 = tool.PRESETS["sdxl"]
    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_cfg)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**t2))
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 2567.5
    assert round(sum(p.numel() for p in te2.parameters()) / 1e6, 1) == 694.7


def test_packed_conditioning_matches_diffusers_sdxl_encode_prompt(sdxl_base, comps):
    """edgecp's one-tensor text (both encoders' penultimate states + the pooled row) carries exactly what diffusers'
    StableDiffusionXLPipeline.encode_prompt makes, and the UNet's hook gives diffusers' UNet call with the pipeline's
    time ids for that size."""
    from edgecp.model.sdxl import pooled_width, unpack
    from edgecp.personal import encode_text

    pipe = _reference_pipeline(sdxl_base)
    prompts = ["a photo of a dog", "a red mug on a table"]
    with torch.no_grad():
        ref_embeds, _, ref_pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
        packed = encode_text(comps, prompts, torch.device("cpu"))
    hidden, pooled = unpack(packed, pooled_width(comps.unet.config))
    assert packed.shape == (2, 78, ref_embeds.shape[-1])
    torch.testing.assert_close(hidden, ref_embeds)
    torch.testing.assert_close(pooled, ref_pooled)

    size = 64
    x = torch.randn(2, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500])
    add_time_ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=torch.float32,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    with torch.no_grad():
        ref = pipe.unet(x, t, ref_embeds, added_cond_kwargs={"text_embeds": ref_pooled,
                                                             "time_ids": add_time_ids.repeat(2, 1)}).sample
        ours = comps.unet(x, t, packed).sample
    torch.testing.assert_close(ours, ref)


def test_concept_token_is_one_row_read_by_both_encoders(sdxl_base):
    from edgecp.model.base import load_components, resolve_base
    from edgecp.model.tokens import add_concept_token, concept_embedding, word_embedding
    from edgecp.personal import encode_text

    comps = load_components(resolve_base(str(sdxl_base)))
    te = comps.text_encoder
    d1 = te.text_encoder.config.hidden_size
    d2 = te.text_encoder_2.config.hidden_size
    init = word_embedding(comps.tokenizer, te, "dog")
    dog = comps.tokenizer("dog", add_special_tokens=False).input_ids
    torch.testing.assert_close(init[:d1], te.text_encoder.get_input_embeddings().base.weight[dog].mean(0))
    torch.testing.assert_close(init[d1:], te.text_encoder_2.get_input_embeddings().base.weight[dog].mean(0))
    row_id = add_concept_token(comps.tokenizer, te, "zorb", init, trainable=True)
    assert row_id == 49408 and comps.tokenizer.second.convert_tokens_to_ids("<zorb>") == 49408
    row = concept_embedding(te).rows[-1]
    assert row.shape == (d1 + d2,)
    out = encode_text(comps, ["a photo of <zorb> dog"], torch.device("cpu"))
    out.pow(2).sum().backward()
    assert row.grad is not None and row.grad[:d1].abs().sum() > 0 and row.grad[d1:].abs().sum() > 0
    # each encoder reads its own slice: its embedding of the token is the row's slice
    ids = torch.tensor([[row_id]])
    torch.testing.assert_close(te.text_encoder.get_input_embeddings()(ids)[0, 0], row.detach()[:d1])
    torch.testing.assert_close(te.text_encoder_2.get_input_embeddings()(ids)[0, 0], row.detach()[d1:])


def test_pooled_embedding_is_taken_at_end_of_text_with_a_concept_token(comps):
    """SDXL configs say eos_token_id 2, and CLIP then pools at argmax(ids): a concept token (id >= 49408) would take
    the end-of-text token's place. edgecp pools at the first end-of-text token (a slow reference by position)."""
    te2 = comps.text_encoder.text_encoder_2
    tok = comps.tokenizer.second
    assert te2.config.eos_token_id == 2  # the config as SDXL ships it
    ids = tok(["a photo of a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids[0, 4] = 49408 if len(tok) > 49408 else ids[0, 4]
    if len(tok) <= 49408:
        from edgecp.model.tokens import add_concept_token, word_embedding

        add_concept_token(comps.tokenizer, comps.text_encoder, "pooltest",
                          word_embedding(comps.tokenizer, comps.text_encoder, "dog"), trainable=False)
        ids[0, 4] = 49408
    with torch.no_grad():
        out = te2(ids, output_hidden_states=True)
    eot = int((ids[0] == tok.eos_token_id).nonzero()[0])
    expected = te2.text_projection(out.last_hidden_state[0, eot])
    torch.testing.assert_close(out.text_embeds[0], expected)


def test_training_generation_and_reload_on_sdxl(sdxl_base, tmp_path):
    """Two concepts with the paper's own method on SDXL: DC scores, Fisher and DSC run on the packed conditioning; the
    version reloads with the token in both encoders; generation is seeded and sees the concept."""
    from edgecp.api import init_store
    from edgecp.generate import GenerateConfig, generate_from_store
    from edgecp.store import Store
    from edgecp.train import add_concept

    root = tmp_path / "s"
    init_store(root, str(sdxl_base), method="dsc-ewc-dc",
               train={"steps": 2, "resolution": 64, "grad_accum": 1}, prior={"num_images": 1, "steps": 2})
    store = Store.open(root)
    assert store.family == "sdxl" and store.info["defaults"]["set"] == "scale-free"
    add_concept(root, "alpha", make_photos(tmp_path / "a", seed=1), class_word="dog")
    m = add_concept(root, "beta", make_photos(tmp_path / "b", seed=2), class_word="mug")
    assert [c["name"] for c in m["concepts"]] == ["alpha", "beta"]
    assert m["concepts"][-1]["seconds"]["total"] > 0
    cfg = GenerateConfig(n=1, steps=2, size=64, seed=3)

    def pixels(prompt: str, out: str) -> np.ndarray:
        path, _grid = generate_from_store(root, prompt, cfg, tmp_path / f"out-{out}")
        return np.asarray(Image.open(path), dtype=np.float32)

    a, b, c = pixels("a photo of <alpha> dog", "a"), pixels("a photo of <alpha> dog", "b"), pixels("a photo of a dog", "c")
    assert a.shape == (64, 64, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("method", ["lora-sequential", "custom-diffusion", "cns", "merge-orthogonal", "c-lora",
                                    "textual-inversion"])
def test_methods_run_on_sdxl(sdxl_base, tmp_path, method):
    from edgecp.api import init_store
    from edgecp.train import add_concept

    root = tmp_path / "s"
    # the mini fixture's attention layers are 32-128 wide: 001's rank 64 does not fit an orthogonal init there
    adapter = {"rank": 4, "alpha": 4.0} if method == "merge-orthogonal" else None
    init_store(root, str(sdxl_base), method=method, adapter=adapter,
               train={"steps": 1, "resolution": 64, "grad_accum": 1}, prior={"num_images": 1, "steps": 2})
    add_concept(root, "alpha", make_photos(tmp_path / "a", seed=1), class_word="dog")
    m = add_concept(root, "beta", make_photos(tmp_path / "b", seed=2), class_word="mug")
    assert len(m["concepts"]) == 2


def test_planner_reads_sdxl_shape(sdxl_base):
    from edgecp.model.base import resolve_base
    from edgecp.model.shape import base_shape
    from edgecp.planner import UNetShape

    shape = base_shape(resolve_base(str(sdxl_base)))
    te1 = sum(f.stat().st_size for f in (sdxl_base / "text_encoder").glob("*.safetensors")) // 4
    te2 = sum(f.stat().st_size for f in (sdxl_base / "text_encoder_2").glob("*.safetensors")) // 4
    assert abs(shape.text - (te1 + te2)) < 1e-3 * (te1 + te2)  # both encoders (headers aside)
    assert shape.unet.level_layers == (1, 2, 2)
    # SDXL's real depths: the lowest level's 10-deep transformers count 10 times (hand count at latent 128)
    xl = UNetShape.from_config(_fixture_tool().SDXL_UNET)
    _, u_attn, _ = xl.units(128)
    hand = 5 * 640 * 64 * 64 * 2 + 5 * 1280 * 32 * 32 * 10 + 1280 * 32 * 32 * 10
    assert u_attn == hand
    assert [b for _, _, b, _ in xl.transformer_blocks(128)] == [10, 60]


def test_sdxl_single_file_is_read_offline_and_matches_the_folder(sdxl_base, comps, tmp_path, monkeypatch):
    """An SDXL checkpoint in the original layout (both encoders under conditioner.embedders): the family comes from the
    header, diffusers converts it offline with edgecp's shipped configs, and the model equals the folder's. The mini
    fixture is narrower than SDXL, so here the config folder is the fixture's own (the real `sdxl` configs are checked
    against the `sdxl` preset below)."""
    import edgecp.model.base as base_mod
    from edgecp.model.base import load_components, resolve_base
    from edgecp.model.ldm_layout import pipeline_to_single_file
    from edgecp.model.single_file import CONFIGS, detect_family
    from edgecp.personal import encode_text

    f = tmp_path / "sdxl-mini.safetensors"
    pipeline_to_single_file(sdxl_base, f)
    assert detect_family(f) == "sdxl"
    fixture_configs = tmp_path / "configs"
    for d in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler", "tokenizer", "tokenizer_2"):
        (fixture_configs / d).mkdir(parents=True)
        for g in (sdxl_base / d).glob("*.json"):
            (fixture_configs / d / g.name).write_bytes(g.read_bytes())
        for g in (sdxl_base / d).glob("*.txt"):
            (fixture_configs / d / g.name).write_bytes(g.read_bytes())
    (fixture_configs / "model_index.json").write_bytes((sdxl_base / "model_index.json").read_bytes())
    monkeypatch.setattr(base_mod, "config_folder", lambda family: fixture_configs)
    single = load_components(resolve_base(str(f)))
    assert single.sdxl
    prompts = ["a photo of a dog"]
    with torch.no_grad():
        a, b = encode_text(comps, prompts, torch.device("cpu")), encode_text(single, prompts, torch.device("cpu"))
        torch.testing.assert_close(a, b)
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(single.unet(x, torch.tensor([7]), b).sample, comps.unet(x, torch.tensor([7]), a).sample)
    # the shipped configs are SDXL base 1.0's (the preset's values)
    shipped = json.loads((CONFIGS / "sdxl" / "unet" / "config.json").read_text())
    for k, v in _fixture_tool().SDXL_UNET.items():
        assert shipped[k] == (list(v) if isinstance(v, tuple) else v), k


def test_sdxl_refiner_single_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    from edgecp.errors import EdgecpError
    from edgecp.model.single_file import UNET_KEY, XL_REFINER_KEY, detect_family

    f = tmp_path / "refiner.safetensors"
    save_file({UNET_KEY: torch.zeros(384, 4, 3, 3), XL_REFINER_KEY: torch.zeros(4)}, str(f))
    with pytest.raises(EdgecpError, match="SDXL refiner"):
        detect_family(f)


def test_lifecycle_on_an_sdxl_store(sdxl_base, tmp_path):
    """The store identity and the lifecycle commands work on SDXL unchanged: history, verify, exact removal (C-LoRA
    keeps each concept's LoRA apart), rollback, gc; a version with the removed concept loads without its token."""
    from edgecp.api import init_store
    from edgecp.lifecycle import gc, history, remove_concept, rollback, verify
    from edgecp.personal import PersonalModel
    from edgecp.store import Store
    from edgecp.train import add_concept

    root = tmp_path / "s"
    init_store(root, str(sdxl_base), method="c-lora", train={"steps": 1, "resolution": 64, "grad_accum": 1},
               prior={"num_images": 1, "steps": 2})
    add_concept(root, "alpha", make_photos(tmp_path / "a", seed=1), class_word="dog")
    add_concept(root, "beta", make_photos(tmp_path / "b", seed=2), class_word="mug")
    assert verify(root)["ok"]
    done = remove_concept(root, "alpha")
    assert done["mode"] == "exact" and done["concepts"] == ["beta"]
    store = Store.open(root)
    model = PersonalModel.load(store, device=torch.device("cpu"))
    assert len(model.comps.tokenizer) == 49409 and model.comps.tokenizer.convert_tokens_to_ids("<beta>") == 49408
    assert len(model.comps.tokenizer.second) == 49409
    rollback(root, "v0002")
    assert [r["version"] for r in history(root)["versions"]][-1] == "v0003"
    assert verify(root)["ok"]
    gone = gc(root)
    assert gone["deleted"] == ["v0003"]
    assert Store.open(root).head == "v0002" and verify(root)["ok"]


def test_packed_conditioning_stays_on_the_callers_device(sdxl_base):
    """The meta device fails like CUDA when a CPU tensor joins it: the time ids and the pooled row must be made where
    the packed tensor lives (a CPU-made time-ids tensor would raise here)."""
    from edgecp.model.base import load_components, resolve_base

    comps = load_components(resolve_base(str(sdxl_base)))
    unet = comps.unet.to("meta")
    x = torch.empty(2, 4, 8, 8, device="meta")
    cond = torch.empty(2, 78, unet.config.cross_attention_dim, device="meta")
    out = unet(x, torch.tensor([3, 4], device="meta"), cond).sample
    assert out.device.type == "meta" and out.shape == x.shape


def test_fp16_plan_on_sdxl_keeps_the_vae_fp32_and_says_so(sdxl_base, tmp_path, monkeypatch):
    """An fp16 plan (a 7.x GPU; CPU autocast to fp16 stands in) trains SDXL with finite results, the VAE encodes in
    fp32 outside the autocast, and the plan's line says why."""
    import dataclasses

    import edgecp.train as train
    from edgecp.api import init_store

    real = train.plan_add_concept
    plans = []

    def fp16(*a, **k):
        plans.append(dataclasses.replace(real(*a, **k), weights="fp16", compute="fp16"))
        return plans[-1]

    monkeypatch.setattr(train, "plan_add_concept", fp16)
    seen = []
    orig = train.encode_images

    def spy(comps, *a, **k):
        seen.append(comps.vae.dtype)
        return orig(comps, *a, **k)

    monkeypatch.setattr(train, "encode_images", spy)
    root = tmp_path / "s"
    init_store(root, str(sdxl_base), method="ewc-dc", train={"steps": 2, "resolution": 64, "grad_accum": 1},
               prior={"num_images": 1, "steps": 2})
    m = train.add_concept(root, "aa", make_photos(tmp_path / "p"), class_word="dog")
    assert seen and set(seen) == {torch.float32}
    assert "VAE fp32 (SD/SDXL VAEs overflow in fp16)" in plans[-1].line()
    assert m["concepts"][-1]["memory"]["plan"]["compute"] == "fp16"
    assert all(v == v for v in m["concepts"][-1]["metrics"].values() if isinstance(v, float))


def test_the_8bit_plan_with_checkpointing_trains_sdxl_and_its_token(sdxl_base, tmp_path):
    """The 8-bit plan with gradient checkpointing in the UNet and in both text encoders (the token trains through
    both): what the planner picks for SDXL under a budget. A CPU-sized run of SDXL at 256 px found the missing
    `gradient_checkpointing_enable` of the joined encoders."""
    from edgecp.api import init_store
    from edgecp.model.tokens import concept_embedding
    from edgecp.personal import PersonalModel, read_tensors
    from edgecp.store import Store
    from edgecp.train import add_concept

    root = tmp_path / "s"
    init_store(root, str(sdxl_base), method="ewc-dc", train={"steps": 2, "resolution": 64, "grad_accum": 1},
               prior={"num_images": 1, "steps": 2})
    m = add_concept(root, "aa", make_photos(tmp_path / "p"), class_word="dog",
                    plan_force={"weights": "int8", "gradient_checkpointing": True})
    plan = m["concepts"][-1]["memory"]["plan"]
    assert plan["weights"] == "int8" and plan["gradient_checkpointing"] is True
    store = Store.open(root)
    row = read_tensors(store.version_dir(), "tokens.safetensors")["<aa>"]
    model = PersonalModel.load(store, device=torch.device("cpu"))
    init = concept_embedding(model.comps.text_encoder).base_rows(torch.tensor(
        model.comps.tokenizer("ktn", add_special_tokens=False).input_ids)).mean(0)
    assert row.shape == init.shape and not torch.allclose(row, init)  # the token trained, both halves
