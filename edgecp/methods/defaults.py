"""Every default a store starts with, each with its value and its source (issue 24).

Three sets, chosen by the base's family when the store is made (`init_store`), and recorded in store.json:
- "paper": the bases the papers used, SD 1.x and SD 2.x (000 trains SD v1.4). Every value is the paper's literal
  number or formula: 000 for its own rows and baselines, 001 for its merging rows (001 trains SDXL; its setup
  is taken as printed), 003 where it gives one.
- "tiny": the embedded tiny base. Its values were chosen on the procedural validation sequence, never on the six
  photo tasks (`docs/bench/issue10/validation.md`), or are edgecp's choice where the tiny world only needs speed.
- "scale-free": any other base (SDXL for 000's rows, the reduced fixtures, a base no paper used). The paper's
  values, except its two absolute penalty weights, which depend on SD 1.4's gradient scale: they take the
  normalised forms (`ewc_strength`, C-LoRA `strength`), whose derivation is stated at each entry.

Each entry is a `Setting(value, source)`; `resolve(method, set)` gives the values for `init_store`, `table()` the
rows of `edgecp methods show` and of docs/architecture.md's table. A user's flag always wins over a default.

How edgecp's loss normalisation meets 000's absolute weights (the "paper" set): the denoising loss is the
per-element mean of (eps - eps_theta)^2, as in the Custom Diffusion / diffusers training scripts 000 builds on
(diffusers' `F.mse_loss(..., reduction="mean")`); the Fisher is the mean over the Fisher iterations of the squared
gradient of that loss over one optimizer step (batch 1 x accumulation 8, as training steps). With
`ewc_weight=1e6` that raw Fisher is used unnormalised, so the penalty is 000's lambda * sum F (theta - theta*)^2.
C-LoRA's 1e8 multiplies L_forget of 000's Eq. 2 as printed (`weight`). 000 does not say whether the Fisher phase
accumulates gradients: edgecp mirrors the training step (its choice).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgecp.errors import EdgecpError
from edgecp.methods import method_class, method_names

PAPER, TINY, SCALE_FREE = "paper", "tiny", "scale-free"
SETS = (PAPER, TINY, SCALE_FREE)
PAPER_FAMILIES = ("sd1", "sd2", "sd2-base", "sd2-v")


@dataclass(frozen=True)
class Setting:
    value: object
    source: str


# -- sources -------------------------------------------------------------------------------------------------
S000_IMPL = "000 Sec. 4, Implementation"
S000_H = "000 App. H"
S000_EVAL = "000 Sec. 4, Evaluation"
S000_EQ3 = "000 Eq. 3: ||eps - eps_theta(x_t, c_i, t)||^2, a squared norm"
S000_EQ6 = "000 Eq. 6: L_MSE(a, b) = ||a - b||_2^2, a squared norm"
S001 = "001 Sec. 4"
TINY_VAL = "calibrated on the tiny world: docs/bench/issue10/validation.md (procedural sequence, seed 0)"
TINY_SPEED = "edgecp's choice for the tiny world: the demo and tests need seconds (not validated)"
MINE = "edgecp's choice"
TINY_RATES = ("calibrated on the tiny world: docs/bench/issue24/validation-rates.md (procedural sequence, seed 0; "
              "the lowest A_MMD of 3e-4/1e-3/3e-3/1e-2 on lora-sequential, applied to every method without a "
              "full-weight rate; within one seed's interval of 1e-3)")
TINY_RATES_CD = ("calibrated on the tiny world: docs/bench/issue24/validation-rates.md (procedural sequence, seed 0; "
                 "the lowest A_MMD of 1e-5/3e-5/1e-4/3e-4 on custom-diffusion, applied to the CD family and CNS, which "
                 "train the same full K/V weights; within one seed's interval of 1e-4)")
EWC_DERIVATION = ("scale-free: 000's 1e6 at SD 1.4 scale is about 0.8 in units of the task loss (b * D / L = "
                  "8 * 16384 / 0.1; methods/ewc.py); the tiny world's calibrated 10 is not carried to other bases")
CLORA_DERIVATION = ("scale-free: strength x the task's starting loss per unit of L_forget (methods/clora.py); 000's "
                    "1e8 has no conversion without SD 1.4's LoRA magnitudes, so the tiny world's calibrated 0.1")


def s(value, source: str) -> Setting:
    return Setting(value, source)


# -- which set a base gets --------------------------------------------------------------------------------------
def unet_family(config: dict) -> str:
    """sd1 | sd2 | sdxl | other, from a diffusers UNet config (the architecture, not the file's name)."""
    blocks = tuple(config.get("block_out_channels") or ())
    cross = config.get("cross_attention_dim")
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if blocks == (320, 640, 1280, 1280) and cross == 768:
        return "sd1"
    if blocks == (320, 640, 1280, 1280) and cross == 1024:
        return "sd2"
    return "other"


def set_for(family: str) -> str:
    if family == "tiny":
        return TINY
    return PAPER if family in PAPER_FAMILIES else SCALE_FREE


WHY = {
    PAPER: "an SD 1.x/2.x base, as the papers used: the papers' own numbers",
    TINY: "the embedded tiny base: values calibrated on the procedural validation sequence, or chosen for speed",
    SCALE_FREE: "a base no paper used: the papers' values, with the penalty weights in their scale-free form",
}


# -- the groups of methods ---------------------------------------------------------------------------------
ROWS_001 = ("merge-reinit", "merge-orthogonal", "magmax")
NON_LORA = ("custom-diffusion", "custom-diffusion-sequential", "cd-ewc", "textual-inversion", "cns")
CD_FAMILY = ("custom-diffusion", "custom-diffusion-sequential", "cd-ewc")
QKVO = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
        "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
KV = ("attn2.to_k", "attn2.to_v")


def train_defaults(method: str, dset: str) -> dict[str, Setting]:
    if dset == TINY:
        full_weight = method in CD_FAMILY or method == "cns"
        lr = s(3e-5, TINY_RATES_CD) if full_weight else s(3e-3, TINY_RATES)
        token = 5e-3
        return {
            "steps": s(150, TINY_SPEED), "batch_size": s(4, TINY_SPEED), "grad_accum": s(1, TINY_SPEED),
            "lr": lr, "token_lr": s(token, TINY_SPEED),
            "prior_weight": s(1.0, MINE + ": Custom Diffusion's prior_loss_weight 1.0"),
        }
    if method in ROWS_001:
        return {
            "steps": s(850, S001 + ": '850 train steps'"), "batch_size": s(1, S001 + ": 'a batch size of 1'"),
            "grad_accum": s(1, S001 + ": no accumulation is named"),
            "lr": s(1e-5, S001 + ": 'The learning rate is set to 1e-5'"),
            "token_lr": s(0.0, S001 + ": 'distinct DreamBooth tokens' (a rare-token identifier, not trained)"),
            "prior_weight": s(0.0, S001 + ": 'we don't leverage the prior preservation regularization'"),
        }
    non_lora = method in NON_LORA
    lr = 5e-6 if non_lora else 5e-4
    lr_src = S000_H + (": '5e-6 for all non-LoRA methods'" if non_lora else ": '5e-4 for all LoRA-based methods'")
    if method == "cns":
        lr_src = MINE + ": 003 gives CNS no rate; 000 App. H's 5e-6 for non-LoRA methods (CNS trains base weights)"
    if method.startswith("vera"):
        lr_src = MINE + ": 000 App. H's 5e-4 for LoRA-based methods (App. G.1 gives VeRA no rate of its own)"
    return {
        "steps": s(1000, S000_IMPL + ": 1000 iterations, following CD"),
        "batch_size": s(1, S000_H + ": 'batch size to 1'"),
        "grad_accum": s(8, S000_H + ": 'gradient accumulation steps to 8'"),
        "lr": s(lr, lr_src),
        "token_lr": s(lr, lr_src + " (the token trains with the method's rate)"),
        "prior_weight": s(1.0, MINE + ": 000 follows CD's prior regularisation, whose prior_loss_weight is 1.0"),
    }


def adapter_defaults(method: str, dset: str) -> dict[str, Setting]:
    cls = method_class(method)
    if cls.adapter_kind == "none":
        return {"kind": s("none", MINE + ": the method trains no adapter")}
    if cls.adapter_kind == "vera":
        return {"kind": s("vera", "000 App. G.1"), "rank": s(256, "000 App. G.1: 'the default rank setup of 256'"),
                "alpha": s(256.0, MINE + ": alpha = rank (peft's VeRA has no alpha scaling)"),
                "targets": s(KV, "000 Sec. 3.1: C-LoRA's key and value projections")}
    if method in ROWS_001 and dset != TINY:
        return {"kind": s("lora", S001), "rank": s(64, S001 + ": 'set r = 64'"),
                "alpha": s(64.0, MINE + ": alpha = rank, scale 1"),
                "targets": s(QKVO, S001 + ": W^Q, W^K, W^V and W^O of both self- and cross-attention"),
                "init": s("gaussian", S001 + ": 'A ~ N(0, I), B = 0'")}
    return {"kind": s("lora", S000_H), "rank": s(16, S000_H + ": 'we set the LoRA rank to 16'"),
            "alpha": s(16.0, MINE + ": alpha = rank, scale 1, as diffusers' LoRA attention processors apply it"),
            "targets": s(KV, "000 Sec. 3.1: C-LoRA's key and value projections of cross-attention")}


def prior_defaults(method: str, dset: str) -> dict[str, Setting]:
    if dset == TINY:
        return {"prompt": s("a photo", TINY_SPEED), "num_images": s(8, TINY_SPEED), "steps": s(10, TINY_SPEED),
                "guidance": s(7.5, S000_H), "sampler": s("base", TINY_SPEED)}
    return {"prompt": s("a photo of a person", S000_H + ": 'using the prompt \"a photo of a person\"'"),
            "num_images": s(200, S000_H + ": 'an auxiliary dataset of 200 images'"),
            "steps": s(50, MINE + ": App. H names no sampler for the prior set; 000 samples with DDPM, 50 steps"),
            "guidance": s(7.5, S000_H + ": 'the classifier guidance scale to 7.5'"),
            "sampler": s("ddpm", S000_EVAL + ": 'DDPM sampling with 50 inference steps'")}


def token_defaults(method: str, dset: str) -> dict[str, Setting]:
    """Where the concept's new token starts (`init_word`; None: its class word)."""
    if dset == TINY:
        return {"init_word": s(None, TINY_SPEED + ": the class word")}
    if method in ROWS_001:
        return {"init_word": s("sks", S001 + ": DreamBooth tokens (Ruiz et al.'s rare identifier 'sks')")}
    return {"init_word": s("ktn", "000 App. A: 'rare token embedding initialization', as CD (Kumari et al.'s "
                                  "--initializer_token, first entry 'ktn')")}


def method_defaults(method: str, dset: str) -> dict[str, Setting]:
    """The method's own hyperparameters (its Params dataclass)."""
    cls = method_class(method)
    fields = getattr(cls.Params, "__dataclass_fields__", {})
    out: dict[str, Setting] = {}
    ewc = "ewc_strength" in fields
    if ewc:
        if dset == PAPER:
            out["ewc_weight"] = s(1e6, S000_H + ": 'the EWC loss coefficient to 1e6' (raw Fisher)")
            out["ewc_strength"] = s(0.0, MINE + ": unused while ewc_weight is set")
        elif dset == TINY:
            out["ewc_strength"] = s(10.0, TINY_VAL)
            out["ewc_weight"] = s(None, MINE + ": unset, the normalised Fisher and ewc_strength apply")
        else:
            out["ewc_strength"] = s(0.8, EWC_DERIVATION)
            out["ewc_weight"] = s(None, MINE + ": unset, the normalised Fisher and ewc_strength apply")
        out["fisher_update"] = s("mean", "000 App. I: online EWC, 'a running average over tasks'")
        out["fisher_decay"] = s(1.0, MINE + ": unused with fisher_update=mean")
        out["consolidation_ratio"] = s(0.2, S000_IMPL + ": 'the number of consolidation iterations to 1/5th'")
    if "k" in fields:
        out["k"] = s(5, S000_IMPL + ": 'The cardinality of c_k for EWC is set to 5'")
        out["delta"] = s(0.5, "000 App. H.2.2: 'use delta = 0.5'")
        out["tau"] = s(1.0, S000_IMPL + ": 'tau is set to 1.0 for all but the teacher LoRA'")
    if "gamma" in fields:
        out["gamma"] = s(0.1, S000_IMPL + ": 'gamma and lambda are set to 0.1 and 1.5'")
        out["lam"] = s(1.5, S000_IMPL + ": 'gamma and lambda are set to 0.1 and 1.5'")
        out["tau_teacher"] = s(0.05, S000_IMPL + ": 'the teacher LoRA in DSC where we set tau to 0.05'")
        out["tau_student"] = s(1.0, S000_IMPL + ": tau 1.0 for all but the teachers")
        out["consolidation_ratio"] = s(0.2, S000_IMPL + ": 'the number of consolidation iterations to 1/5th'")
    if "dc_reduction" in fields:
        if dset == TINY:
            out["dc_reduction"] = s("mean", TINY_VAL + " (Eq. 3 per element: 'sum' everywhere collapsed the method)")
        else:
            out["dc_reduction"] = s("sum", S000_EQ3)
    if "teacher_reduction" in fields:
        out["teacher_reduction"] = s("sum", S000_EQ3 + (" (also " + TINY_VAL + ")" if dset == TINY else ""))
    if "mse_reduction" in fields:
        out["mse_reduction"] = s("mean", TINY_VAL + ": the MSE per element as validated") if dset == TINY else \
            s("sum", S000_EQ6)
    if "strength" in fields:  # C-LoRA
        if dset == PAPER:
            out["weight"] = s(1e8, S000_H + ": 'a coefficient of 1e8 for the self-regularization loss'")
            out["strength"] = s(0.0, MINE + ": unused while weight is set")
        else:
            out["strength"] = s(0.1, TINY_VAL if dset == TINY else CLORA_DERIVATION)
            out["weight"] = s(None, MINE + ": unset, the scale-free strength applies")
    if "top_fraction" in fields:  # CNS
        out["top_fraction"] = s(0.3, "003 Supp. 'a threshold of 30%' per row")
        out["reg_weight"] = s(1.0, MINE + ": 003 gives no weight; the C-LoRA scale-free form at 1 (not validated)")
        out["selection_batches"] = s(8, MINE + ": 003 gives no count")
    if "weights" in fields:  # lora-merge
        out["weights"] = s("mean", MINE + ": w_i = 1/n, C-LoRA's LoRA-merge baseline as 000 runs it")
    missing = set(fields) - set(out)
    if missing:  # a new hyperparameter must be given a source here
        raise EdgecpError(f"{method}: no default source for {', '.join(sorted(missing))} (edgecp/methods/defaults.py)")
    return out


def defaults(method: str, dset: str) -> dict[str, dict[str, Setting]]:
    """Every default of `method` under set `dset`, by section (train, adapter, prior, token, method)."""
    if dset not in SETS:
        raise EdgecpError(f"defaults set '{dset}' is unknown: use {', '.join(SETS)}")
    method = method_class(method).name
    return {"train": train_defaults(method, dset), "adapter": adapter_defaults(method, dset),
            "prior": prior_defaults(method, dset), "token": token_defaults(method, dset),
            "method": method_defaults(method, dset)}


def resolve(method: str, dset: str) -> dict[str, dict]:
    """The values alone, by section."""
    return {sec: {k: v.value for k, v in rows.items()} for sec, rows in defaults(method, dset).items()}


def table(method: str) -> list[tuple[str, str, dict[str, Setting]]]:
    """(section, key, {set: Setting}) for every hyperparameter of `method`, in every set."""
    by_set = {d: defaults(method, d) for d in SETS}
    rows = []
    for sec in by_set[PAPER]:
        keys = list(dict.fromkeys(k for d in SETS for k in by_set[d][sec]))
        for k in keys:
            rows.append((sec, k, {d: by_set[d][sec].get(k) for d in SETS}))
    return rows


def all_methods() -> list[str]:
    return method_names()


def shown(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def markdown(methods: list[str] | None = None) -> str:
    """docs/architecture.md's defaults table: one row per (method, hyperparameter), the three sets side by side."""
    lines = ["| method | setting | paper (SD 1.x/2.x) | source | tiny | source | scale-free | source |",
             "|---|---|---|---|---|---|---|---|"]
    for m in methods or all_methods():
        for sec, key, by_set in table(m):
            cells = []
            for d in SETS:
                st = by_set[d]
                cells += ["", ""] if st is None else [shown(st.value), st.source]
            lines.append(f"| {m} | {sec}.{key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
