"""Issue 24: on the papers' bases, the papers' numbers; the tiny world's calibration on the tiny world only.

The paper numbers below are typed from the papers (../shared/papers), each with its section, and compared with
what `edgecp init` writes into store.json on an SD 1.5-layout base (the SD 1.x configuration edgecp ships, with
empty weight files: init reads the architecture and hashes the files, it loads no weights).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_util import run_cli
from conftest import make_photos, new_store
from safetensors.torch import save_file

from edgecp.api import init_store
from edgecp.methods import defaults, method_class, method_names
from edgecp.model.single_file import config_folder

WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
           "text_encoder": "model.safetensors"}


def layout_base(tmp_path, family: str = "sd1", unet: dict | None = None):
    base = tmp_path / f"base-{family}"
    shutil.copytree(config_folder(family), base)
    for sub, name in WEIGHTS.items():
        save_file({}, str(base / sub / name))
    if unet:
        cfg = json.loads((base / "unet" / "config.json").read_text())
        (base / "unet" / "config.json").write_text(json.dumps({**cfg, **unet}))
    return base


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return layout_base(tmp_path_factory.mktemp("sd15"))


def info(tmp_path, base, method, **kw):
    return init_store(tmp_path / f"s-{method}-{base.name}", str(base), method=method, **kw).info


# -- paper 000 on SD 1.x -----------------------------------------------------------------------------------------
def test_000_rows_get_000s_numbers_on_sd15(tmp_path, sd15):
    i = info(tmp_path, sd15, "dsc-ewc-dc")
    assert i["defaults"]["set"] == "paper" and i["defaults"]["family"] == "sd1"
    t, a, p, m = i["train"], i["adapter"], i["prior"], i["method"]["params"]
    assert t["steps"] == 1000  # Sec. 4: "we train all the models for 1000 iterations"
    assert t["batch_size"] == 1 and t["grad_accum"] == 8  # App. H: "batch size to 1", "accumulation steps to 8"
    assert t["lr"] == 5e-4 and t["token_lr"] == 5e-4  # App. H: "5e-4 for all LoRA-based methods"
    assert a["kind"] == "lora" and a["rank"] == 16  # App. H: "we set the LoRA rank to 16"
    assert set(a["targets"]) == {"attn2.to_k", "attn2.to_v"}  # Sec. 3.1: C-LoRA's key and value projections
    assert p["prompt"] == "a photo of a person" and p["num_images"] == 200  # App. H: "200 images", "a photo of a person"
    assert p["guidance"] == 7.5  # App. H: "classifier guidance scale to 7.5"
    assert p["sampler"] == "ddpm" and p["steps"] == 50  # Sec. 4: "DDPM sampling with 50 inference steps"
    assert m["ewc_weight"] == 1e6  # App. H: "the EWC loss coefficient to 1e6"
    assert m["k"] == 5 and m["tau"] == 1.0 and m["tau_teacher"] == 0.05  # Sec. 4
    assert m["gamma"] == 0.1 and m["lam"] == 1.5  # Sec. 4: "gamma and lambda are set to 0.1 and 1.5"
    assert m["delta"] == 0.5  # App. H.2.2: "use delta = 0.5"
    assert m["consolidation_ratio"] == 0.2  # Sec. 4: "1/5th of that of the training iterations"
    assert m["fisher_update"] == "mean"  # App. I: online EWC, "a running average over tasks"
    assert m["dc_reduction"] == "sum" and m["teacher_reduction"] == "sum"  # Eq. 3: ||eps - eps_theta||^2
    assert m["mse_reduction"] == "sum"  # Eq. 6: L_MSE(a, b) = ||a - b||_2^2
    assert i["token_init"] == "ktn"  # App. A: CD's "rare token embedding initialization"


def test_000_baselines_on_sd15(tmp_path, sd15):
    assert info(tmp_path, sd15, "c-lora")["method"]["params"]["weight"] == 1e8  # App. H: "a coefficient of 1e8"
    for name in ("custom-diffusion", "textual-inversion", "cd-ewc"):  # App. H: "5e-6 for all non-LoRA methods"
        t = info(tmp_path, sd15, name)["train"]
        assert t["lr"] == 5e-6 and t["token_lr"] == 5e-6, name
    v = info(tmp_path, sd15, "vera-ewc-dc")["adapter"]
    assert v["kind"] == "vera" and v["rank"] == 256  # App. G.1: "the default rank setup of 256"


@pytest.mark.parametrize("name", ["merge-reinit", "merge-orthogonal", "magmax"])
def test_001_rows_get_001s_setup_on_sd15(tmp_path, sd15, name):
    i = info(tmp_path, sd15, name)
    t, a = i["train"], i["adapter"]
    assert t["lr"] == 1e-5 and t["steps"] == 850 and t["batch_size"] == 1  # 001 Sec. 4: "1e-5, 850 train steps, 1"
    assert t["grad_accum"] == 1
    assert t["prior_weight"] == 0.0  # 001 Sec. 4: "we don't leverage the prior preservation regularization"
    assert a["rank"] == 64  # 001 Sec. 4: "set r = 64"
    assert set(a["targets"]) == {f"attn{i}.to_{p}" for i in (1, 2) for p in ("q", "k", "v", "out.0")}  # W^Q,K,V,O
    assert a["init"] == "gaussian"  # 001 Sec. 3 (2): "A ~ N(0, I), B = 0"


def test_sd2_is_a_paper_base_and_sdxl_or_a_reduced_layout_is_scale_free(tmp_path):
    assert info(tmp_path, layout_base(tmp_path, "sd2-base"), "ewc-dc")["defaults"]["set"] == "paper"
    narrow = layout_base(tmp_path, "sd1", unet={"block_out_channels": [32, 64, 64, 64]})
    i = info(tmp_path, narrow, "ewc-dc")
    assert i["defaults"] == {"set": "scale-free", "family": "other", "why": defaults.WHY["scale-free"]}
    assert i["method"]["params"]["ewc_weight"] is None and i["method"]["params"]["ewc_strength"] == 0.8
    assert defaults.unet_family({"addition_embed_type": "text_time", "block_out_channels": [320, 640, 1280],
                                 "cross_attention_dim": 2048}) == "sdxl"


# -- the tiny world ----------------------------------------------------------------------------------------------
def test_tiny_keeps_its_calibrated_values(tmp_path):
    i = init_store(tmp_path / "t", "tiny", method="dsc-ewc-dc").info
    assert i["defaults"]["set"] == "tiny" and i["token_init"] is None
    assert {k: i["train"][k] for k in ("steps", "batch_size", "grad_accum", "lr", "token_lr")} == \
        {"steps": 150, "batch_size": 4, "grad_accum": 1, "lr": 3e-3, "token_lr": 5e-3}  # validation-rates.md
    m = i["method"]["params"]
    assert m["ewc_strength"] == 10.0 and m["ewc_weight"] is None  # docs/bench/issue10/validation.md
    assert (m["dc_reduction"], m["teacher_reduction"], m["mse_reduction"]) == ("mean", "sum", "mean")
    assert init_store(tmp_path / "cd", "tiny", method="custom-diffusion").info["train"]["lr"] == 3e-5
    assert init_store(tmp_path / "c", "tiny", method="c-lora").info["method"]["params"]["strength"] == 0.1
    # every source names a paper, the validation file, or says it is edgecp's choice
    for name in method_names():
        for sec, key, by_set in defaults.table(name):
            for dset, st in by_set.items():
                if st is not None:
                    assert any(w in st.source for w in ("validation.md", "validation-rates.md", "edgecp's choice", "000 ", "001 ", "003 ",
                                                        "scale-free:")), (name, dset, sec, key, st.source)


def test_user_flags_win_and_a_rank_keeps_alpha_equal(tmp_path, sd15):
    i = info(tmp_path, sd15, "lora-ewc", train={"lr": 1e-4}, adapter={"rank": 8}, method_params={"ewc_weight": 3.0})
    assert i["train"]["lr"] == 1e-4 and i["adapter"]["rank"] == 8 and i["adapter"]["alpha"] == 8.0
    assert i["method"]["params"]["ewc_weight"] == 3.0


def test_every_hyperparameter_of_every_method_has_a_source():
    for name in method_names():
        fields = set(getattr(method_class(name).Params, "__dataclass_fields__", {}))
        for dset in defaults.SETS:
            d = defaults.defaults(name, dset)
            assert set(d["method"]) == fields, (name, dset)
            for rows in d.values():
                assert all(st.source for st in rows.values())


def test_methods_show_prints_values_and_sources(capsys):
    code, out, _ = run_cli(capsys, "methods", "show", "dsc-ewc-dc")
    assert code == 0
    for text in ("the paper set", "the tiny set", "the scale-free set", "1e+06", "000 App. H", "validation",
                 "method.mse_reduction", "ktn"):
        assert text in out, text
    code, _, err = run_cli(capsys, "methods", "show", "no-such")
    assert code != 0 and "unknown method 'no-such'" in err


def test_architecture_doc_carries_the_generated_table():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "architecture.md").read_text()
    assert defaults.markdown() in doc, "regenerate it: python tools/defaults_table.py"


# -- what the defaults change in training --------------------------------------------------------------------------
def test_gaussian_init_draws_a_from_a_unit_normal():
    from diffusers import UNet2DConditionModel

    from edgecp.adapters import lora
    from edgecp.config import AdapterConfig

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), cross_attention_dim=32,
                                layers_per_block=1, norm_num_groups=8, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    lora.attach(unet, AdapterConfig(rank=16, alpha=16.0, targets=("to_q", "to_k"), init="gaussian"), seed=3)
    a = torch.cat([p.flatten() for n, p in lora.adapter_parameters(unet).items() if ".lora_A." in n])
    b = torch.cat([p.flatten() for n, p in lora.adapter_parameters(unet).items() if ".lora_B." in n])
    assert abs(float(a.std()) - 1.0) < 0.05 and abs(float(a.mean())) < 0.05 and torch.all(b == 0)


def test_no_prior_images_without_the_prior_loss_and_the_store_token_init(tmp_path):
    from edgecp.store import Store
    from edgecp.train import add_concept

    store = new_store(tmp_path / "s", train={"prior_weight": 0.0, "steps": 2})
    s = Store.open(tmp_path / "s")
    with s.writer():
        s.write_info({**s.info, "token_init": "ktn"})
    m = add_concept(tmp_path / "s", "alpha", make_photos(tmp_path / "p", n=2), class_word="dog")
    assert m["concepts"][0]["init_word"] == "ktn"
    assert not any(store.root.joinpath("priors").glob("*/done.json"))


def test_set_method_takes_the_stores_defaults_set(tmp_path, sd15):
    from edgecp.api import set_method

    root = tmp_path / "s"
    init_store(root, str(sd15), method="lora-sequential")
    info = set_method(root, "ewc-dc").info
    assert info["method"]["params"]["ewc_weight"] == 1e6 and info["method"]["params"]["dc_reduction"] == "sum"
    info = set_method(root, "magmax", params=None, adapter={"rank": 32}).info
    assert info["adapter"]["rank"] == 32 and info["adapter"]["init"] == "gaussian"  # 001's init, the user's rank
