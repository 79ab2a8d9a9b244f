"""The files besides the graphs, in the folder layout optimum's ONNX Stable Diffusion pipelines read.

    OUT/text_encoder/ OUT/unet/ OUT/vae_decoder/ OUT/vae_encoder/   model.onnx (+ model.onnx_data), config.json
    OUT/tokenizer/ OUT/scheduler/ OUT/model_index.json
    SDXL: OUT/text_encoder_2/ and OUT/tokenizer_2/ as well, and the index names StableDiffusionXLPipeline

transformers 5 saves only `tokenizer.json`; transformers 4's slow `CLIPTokenizer`, which optimum's ORT pipelines
load (optimum-onnx pins transformers < 4.58), needs `vocab.json` and `merges.txt`: they are derived from
tokenizer.json, the concept tokens with its ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers

from edgecp.errors import EdgecpError


def write_configs(folder: Path, comps, names: list[str]) -> None:
    """tokenizer/, scheduler/, per-model config.json and model_index.json as optimum's ORT SD pipeline reads them."""
    if comps.sdxl:
        tokenizers = {"tokenizer": comps.tokenizer.first, "tokenizer_2": comps.tokenizer.second}
        encoders = {"text_encoder": comps.text_encoder.text_encoder, "text_encoder_2": comps.text_encoder.text_encoder_2}
    else:
        tokenizers, encoders = {"tokenizer": comps.tokenizer}, {"text_encoder": comps.text_encoder}
    for name, tok in tokenizers.items():
        tok.save_pretrained(folder / name)
        write_clip_vocab_files(folder / name)
    comps.scheduler.save_pretrained(folder / "scheduler")
    for name, te in encoders.items():
        te.config.to_json_file(str(folder / name / "config.json"))
    comps.unet.save_config(folder / "unet")
    for name in names:
        if name.startswith("vae_"):
            comps.vae.save_config(folder / name)
    (folder / "model_index.json").write_text(json.dumps(model_index(comps), indent=2))


def model_index(comps) -> dict:
    """What optimum's exporter writes (the diffusers pipeline's config); its ORT loader adds the vae_* parts itself."""
    if comps.sdxl:
        return {
            "_class_name": "StableDiffusionXLPipeline",
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "force_zeros_for_empty_prompt": True,
            "scheduler": ["diffusers", type(comps.scheduler).__name__],
            "text_encoder": ["transformers", type(comps.text_encoder.text_encoder).__name__],
            "text_encoder_2": ["transformers", type(comps.text_encoder.text_encoder_2).__name__],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "requires_safety_checker": False,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(comps.scheduler).__name__],
        "text_encoder": ["transformers", type(comps.text_encoder).__name__],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def write_clip_vocab_files(folder: Path) -> None:
    """Beside tokenizer.json (what transformers 5 writes), the files transformers 4's slow `CLIPTokenizer` reads,
    as diffusers' SD folders ship them: vocab.json, merges.txt, special_tokens_map.json, added_tokens.json and a
    tokenizer_config.json with `added_tokens_decoder`. The concept tokens become added tokens with the ids of
    tokenizer.json, so every reader gives a concept prompt the same ids. Derived from tokenizer.json (the single
    source), not re-tokenized."""
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    bpe = tj["model"]
    if bpe.get("type") != "BPE":
        raise EdgecpError(f"tokenizer in '{folder}' is {bpe.get('type')}, not CLIP's BPE: export needs a CLIP tokenizer")
    vocab = bpe["vocab"]
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    decoder, added = {}, {}
    for t in tj["added_tokens"]:
        decoder[str(t["id"])] = {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        if t["content"] not in vocab:
            added[t["content"]] = t["id"]
    (folder / "added_tokens.json").write_text(json.dumps(added, indent=2, ensure_ascii=False), encoding="utf-8")
    special = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if isinstance(cfg.get(k), str)}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    v4 = {"add_prefix_space": False, "clean_up_tokenization_spaces": True, "do_lower_case": True, "errors": "replace",
          "model_max_length": cfg.get("model_max_length", 77), "tokenizer_class": "CLIPTokenizer",
          **special, "added_tokens_decoder": decoder}
    # transformers 5's own keys stay (it reads them back); the v4 keys are what a v4 reader needs
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, **v4}, indent=2, ensure_ascii=False),
                                                  encoding="utf-8")
