"""The torch-free ONNX runner: imports without torch, tokenizes like transformers, matches diffusers.

A tiny Stable Diffusion (random weights, diffusers-test sizes) is exported once per module in optimum's
layout; the export helper lives here because the real exporter is `edgecp.export.onnx_export`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from onnx import TensorProto, helper
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from edgecp.export.ort_runner import OnnxStableDiffusion, initial_latents, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SCHEDULER = {  # SD 1.x's noise schedule
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
WORDS = [
    "a",
    "photo",
    "of",
    "cat",
    "dog",
    "red",
    "blue",
    "sks",
    "on",
    "the",
    "beach",
    "painting",
    "in",
    "style",
]


# --------------------------------------------------------------------------------------------- fixtures


def byte_chars() -> list[str]:
    """GPT-2 / CLIP byte-to-unicode table: the 256 base symbols of the BPE."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_vocab(words: list[str] = WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-shaped vocabulary: byte symbols, their ``</w>`` forms, merges spelling ``words``, 2 specials."""
    chars = byte_chars()
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        cur = pieces[0]
        for p in pieces[1:]:
            if (cur, p) not in merges:
                merges.append((cur, p))
                tokens.append(cur + p)
            cur += p
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def tiny_components() -> dict:
    """Random tiny SD parts (the sizes of diffusers' pipeline tests)."""
    vocab, merges = tiny_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
        attention_head_dim=2,
    ).eval()
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=16,
    ).eval()
    torch.manual_seed(0)
    eos = vocab["<|endoftext|>"]
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=eos,
            pad_token_id=eos,
        )
    ).eval()
    scheduler = DDIMScheduler(**SCHEDULER)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


class _TextEncoder(torch.nn.Module):
    def __init__(self, model: CLIPTextModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):
        out = self.model(input_ids=input_ids, return_dict=True)
        return out.last_hidden_state, out.pooler_output


class _Unet(torch.nn.Module):
    def __init__(self, model: UNet2DConditionModel):
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor):
        return self.vae.decode(latent_sample, return_dict=False)[0]


def _export(module: torch.nn.Module, args: tuple, path: Path, inputs: dict, outputs: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of diffusers' shape checks
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes={k: v for k, v in {**inputs, **outputs}.items() if v},
            opset_version=17,
            dynamo=False,
        )


def export_tiny_folder(parts: dict, folder: Path) -> Path:
    """Write `parts` as optimum writes an ORTStableDiffusionPipeline folder (names, axes, configs)."""
    unet, vae, te = parts["unet"], parts["vae"], parts["text_encoder"]
    _export(
        _TextEncoder(te),
        (torch.zeros(1, 77, dtype=torch.int64),),
        folder / "text_encoder" / "model.onnx",
        {"input_ids": {0: "batch_size", 1: "sequence_length"}},
        {"last_hidden_state": {0: "batch_size", 1: "sequence_length"}, "pooler_output": {0: "batch_size"}},
    )
    _export(
        _Unet(unet),
        (torch.randn(2, 4, 8, 8), torch.tensor(1.0), torch.randn(2, 77, 32)),
        folder / "unet" / "model.onnx",
        {
            "sample": {0: "batch_size", 2: "height", 3: "width"},
            "timestep": {},
            "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
        },
        {"out_sample": {0: "batch_size", 2: "height", 3: "width"}},
    )
    _export(
        _VaeDecoder(vae),
        (torch.randn(1, 4, 8, 8),),
        folder / "vae_decoder" / "model.onnx",
        {"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"}},
        {"sample": {0: "batch_size", 2: "latent_height * 2", 3: "latent_width * 2"}},
    )
    te.config.save_pretrained(folder / "text_encoder")
    unet.save_config(folder / "unet")
    vae.save_config(folder / "vae_decoder")
    parts["scheduler"].save_pretrained(folder / "scheduler")
    parts["tokenizer"].save_pretrained(folder / "tokenizer")
    pipe = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_config(folder)  # model_index.json, as optimum's main_export does
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    parts = tiny_components()
    return parts, export_tiny_folder(parts, tmp_path_factory.mktemp("tiny-onnx"))


@pytest.fixture(scope="module")
def runner(tiny: tuple[dict, Path]) -> OnnxStableDiffusion:
    return OnnxStableDiffusion(tiny[1], providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------- tests


def test_import_needs_no_torch_diffusers_transformers() -> None:
    code = (
        "import sys\n"
        "for name in ('torch', 'diffusers', 'transformers'):\n"
        "    sys.modules[name] = None  # any import of them now raises\n"
        "import edgecp.export.ort_runner, edgecp.export.np_scheduler\n"
        "from edgecp.export.ort_runner import OnnxStableDiffusion, initial_latents\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_initial_latents() -> None:
    a = initial_latents(3, 2, 4, 5, 6)
    assert a.dtype == np.float32 and a.shape == (2, 4, 5, 6)
    np.testing.assert_array_equal(a, initial_latents(3, 2, 4, 5, 6))
    np.testing.assert_array_equal(a[:1], initial_latents(3, 1, 4, 5, 6))  # image 0 of a batch = batch of one
    assert not np.array_equal(a, initial_latents(4, 2, 4, 5, 6))


PROMPTS = [
    "a photo of sks dog",
    "A  RED cat, on the beach!!  ",
    "",
    "painting in the style of 42 blue dogs’ café ünïcode <|endoftext|> x",
    " ".join(["a photo of a red cat"] * 30),  # longer than 77 tokens: truncated, ends with <|endoftext|>
]


def _assert_same_ids(folder: Path, reference: CLIPTokenizer, max_length: int = 77) -> None:
    tok, length = load_tokenizer(folder)
    assert length == max_length
    ours = [e.ids for e in tok.encode_batch(PROMPTS)]
    ref = reference(PROMPTS, padding="max_length", max_length=max_length, truncation=True).input_ids
    assert ours == ref


def test_tokenizer_matches_transformers(tmp_path: Path) -> None:
    vocab, merges = tiny_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tok.save_pretrained(tmp_path / "fast")
    assert (
        json.loads((tmp_path / "fast" / "tokenizer_config.json").read_text())["pad_token"] == "<|endoftext|>"
    )
    _assert_same_ids(tmp_path / "fast", tok)
    # SD 2.x pads with "!" (id 0), not <|endoftext|>: the configured pad token is used
    tok_sd2 = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="!")
    tok_sd2.save_pretrained(tmp_path / "sd2")
    _assert_same_ids(tmp_path / "sd2", tok_sd2)
    assert load_tokenizer(tmp_path / "sd2")[0].encode("a").ids[-1] == 0
    # folders from older exports have vocab.json + merges.txt and no tokenizer.json
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (slow / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", "utf-8"
    )
    (slow / "tokenizer_config.json").write_text(
        json.dumps(
            {"model_max_length": 77, "pad_token": {"content": "<|endoftext|>", "__type": "AddedToken"}}
        ),
        encoding="utf-8",
    )
    _assert_same_ids(slow, tok)


def test_tokenizer_matches_transformers_on_real_clip_vocab(tmp_path: Path) -> None:
    import edgecp.model.tokenizer as clip
    tok = clip.write_clip_tokenizer(tmp_path)
    _assert_same_ids(tmp_path, tok)
    (tmp_path / "tokenizer.json").unlink()  # the vocab.json + merges.txt path on the 49,408 tokens
    _assert_same_ids(tmp_path, tok)


def test_generate(runner: OnnxStableDiffusion) -> None:
    calls: list[tuple[int, int]] = []
    prompts = ["a photo of sks dog", "a red cat"]
    images = runner(prompts, steps=2, seed=1, height=16, width=24, callback=lambda ev: calls.append((ev.step, ev.total)))
    assert calls == [(1, 2), (2, 2)]
    assert len(images) == 2
    for img in images:
        assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (24, 16)
        assert np.asarray(img).std() > 0  # not constant
    again = runner(prompts, steps=2, seed=1, height=16, width=24)
    other = runner(prompts, steps=2, seed=2, height=16, width=24)
    for a, b, c in zip(images, again, other):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_default_size_and_size_errors(runner: OnnxStableDiffusion) -> None:
    assert runner.vae_scale_factor == 2 and runner.default_size == (16, 16)  # sample_size 8 x 2
    (img,) = runner(["a cat"], steps=1, guidance=1.0)  # no guidance: single UNet pass per step
    assert img.size == (16, 16)
    with pytest.raises(ValueError, match=r"height=17, width=16.*multiples of 2"):
        runner(["a cat"], steps=1, height=17, width=16)


def test_matches_diffusers_pipeline(tiny: tuple[dict, Path], runner: OnnxStableDiffusion) -> None:
    """Same latents, same schedule, CFG with the negative prompt: ORT output = diffusers output."""
    parts, _ = tiny
    pipe = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    prompts, kw = (
        ["a photo of sks dog", "a blue cat on the beach"],
        {"guidance": 5.0, "negative_prompt": "painting"},
    )
    latents = torch.from_numpy(initial_latents(7, 2, 4, 8, 12))
    with torch.no_grad():
        ref = pipe(
            prompts,
            num_inference_steps=3,
            guidance_scale=kw["guidance"],
            negative_prompt=[kw["negative_prompt"]] * 2,
            height=16,
            width=24,
            latents=latents,
            output_type="np",
        ).images  # (2, 16, 24, 3) in [0, 1]
    ours = runner(prompts, steps=3, seed=7, height=16, width=24, **kw)
    ours = np.stack([np.asarray(i, dtype=np.float32) / 255 for i in ours])
    assert np.abs(ours - ref).max() <= 1.5 / 255  # uint8 rounding


def _legacy_unet(path: Path) -> None:
    """Rewrite unet/model.onnx like an older optimum export: 1-D int64 timestep, and a fixed batch of 1."""
    model = onnx.load(str(path))
    for inp in model.graph.input:
        if inp.name in ("sample", "encoder_hidden_states"):
            inp.type.tensor_type.shape.dim[0].dim_value = 1
        if inp.name == "timestep":
            inp.CopyFrom(helper.make_tensor_value_info("timestep", TensorProto.INT64, [1]))
    for node in model.graph.node:
        node.input[:] = ["timestep_scalar" if i == "timestep" else i for i in node.input]
    model.graph.initializer.append(helper.make_tensor("squeeze_axes", TensorProto.INT64, [1], [0]))
    prologue = [
        helper.make_node("Cast", ["timestep"], ["timestep_float"], to=TensorProto.FLOAT),
        helper.make_node("Squeeze", ["timestep_float", "squeeze_axes"], ["timestep_scalar"]),
    ]
    nodes = prologue + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.mark.parametrize("variant", ["fp16", "int8", "legacy"])
def test_variants_run(
    variant: str, tiny: tuple[dict, Path], runner: OnnxStableDiffusion, tmp_path: Path
) -> None:
    """fp16 and int8 exports, and a legacy UNet (int64 1-D timestep, fixed batch 1), run and stay close."""
    folder = Path(shutil.copytree(tiny[1], tmp_path / variant))
    models = [folder / m / "model.onnx" for m in ("text_encoder", "unet", "vae_decoder")]
    if variant == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        for m in models:
            onnx.save(convert_float_to_float16(onnx.load(str(m)), keep_io_types=False), str(m))
    elif variant == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        for m in models[:2]:
            quantize_dynamic(str(m), str(m), weight_type=QuantType.QInt8)
    else:
        _legacy_unet(models[1])
    ort_runner = OnnxStableDiffusion(folder, providers=["CPUExecutionProvider"])
    if variant == "fp16":
        assert ort_runner.unet.inputs["timestep"].type == "tensor(float16)"
        assert ort_runner.text_encoder.inputs["input_ids"].type == "tensor(int64)"
    prompts, kw = ["a photo of sks dog", "a red cat"], {"steps": 2, "seed": 3, "height": 16, "width": 24}
    got = np.stack([np.asarray(i, np.float32) for i in ort_runner(prompts, **kw)])
    ref = np.stack([np.asarray(i, np.float32) for i in runner(prompts, **kw)])
    assert got.shape == (2, 16, 24, 3) and got.std() > 0
    tolerance = {"fp16": 1.0, "int8": 6.0, "legacy": 0.5}[variant]  # mean |diff| in uint8 levels
    assert np.abs(got - ref).mean() <= tolerance


def test_folder_errors(tiny: tuple[dict, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a folder"):
        OnnxStableDiffusion(tmp_path / "nope")
    folder = Path(shutil.copytree(tiny[1], tmp_path / "broken"))
    (folder / "unet" / "model.onnx").unlink()
    with pytest.raises(FileNotFoundError, match=r"unet.model\.onnx"):
        OnnxStableDiffusion(folder, providers=["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="NoSuchExecutionProvider"):
        OnnxStableDiffusion(tiny[1], providers=["NoSuchExecutionProvider"])


def test_listed_but_unusable_cuda_provider_is_named(tiny: tuple[dict, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu lists CUDAExecutionProvider even without a GPU, driver, CUDA or cuDNN, and then falls back to
    the CPU after logging. The runner says so: an error when CUDA was asked for, a note and the CPU by default."""
    import onnxruntime as ort

    _, folder = tiny
    real = ort.get_available_providers
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU build's "provider not in available provider names"
        with pytest.raises(ValueError, match=r"CUDAExecutionProvider is listed by onnxruntime .* could not start .*"
                                             r"providers=\['CPUExecutionProvider'\]"):
            OnnxStableDiffusion(folder, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        fallback = OnnxStableDiffusion(folder)
    assert fallback.providers == ["CPUExecutionProvider"]
    assert fallback.unet.session.get_providers() == ["CPUExecutionProvider"]
    assert fallback.provider_note.endswith("; running on the CPU") and "could not start" in fallback.provider_note


# --------------------------------------------------------------------------------------------- IO binding


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip_sample", [False, True])
def test_step_graph_matches_diffusers_ddim(prediction_type: str, clip_sample: bool) -> None:
    """The on-device guidance + DDIM step graph against diffusers' DDIMScheduler.step on the guided output."""
    import onnxruntime as ort

    from edgecp.export.np_scheduler import NumpyDDIMScheduler
    from edgecp.export.step_graph import STEP_GRAPH

    cfg = {**SCHEDULER, "prediction_type": prediction_type, "clip_sample": clip_sample}
    ours, ref = NumpyDDIMScheduler(cfg), DDIMScheduler(**cfg)
    ours.set_timesteps(7)
    ref.set_timesteps(7)
    sess = ort.InferenceSession(str(STEP_GRAPH), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    lat = rng.standard_normal((2, 4, 6, 5)).astype(np.float32) * 3  # x0 leaves [-1, 1]: the clip matters
    for guided, g in ((True, 6.0), (False, 1.0)):
        noise = rng.standard_normal((4 if guided else 2, 4, 6, 5)).astype(np.float32)
        u, c = noise[:2], noise[-2:]
        e = u + np.float32(g) * (c - u)
        for t in ref.timesteps:
            want = ref.step(torch.from_numpy(e), t, torch.from_numpy(lat)).prev_sample.numpy()
            coef, clip = ours.step_coefficients(int(t))
            got, model_in = sess.run(None, {"noise": noise, "latents": lat, "clip": clip,
                                            "coef": np.append(coef, np.float32(g)).astype(np.float32)})
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            assert model_in.shape == noise.shape
            for k in range(noise.shape[0] // 2):  # the next UNet input: the new latents once per half
                np.testing.assert_array_equal(model_in[2 * k : 2 * k + 2], got)


def test_shipped_step_graph_is_what_build_writes() -> None:
    from edgecp.export.step_graph import STEP_GRAPH, build

    assert STEP_GRAPH.read_bytes() == build().SerializeToString(), "run python -m edgecp.export.step_graph"


def test_io_binding_loop_matches_host_loop(tiny: tuple[dict, Path], runner: OnnxStableDiffusion) -> None:
    """The device-resident loop (IO binding + step graph; here on the CPU provider) draws the host loop's images."""
    bound = OnnxStableDiffusion(tiny[1], providers=["CPUExecutionProvider"], io_binding=True)
    assert not runner.io_binding and bound.io_binding  # default: only on a GPU provider
    for kw in ({"guidance": 5.0, "negative_prompt": "painting"}, {"guidance": 1.0}):
        calls: list[tuple[int, int]] = []
        a = runner(["a photo of sks dog", "a blue cat"], steps=3, seed=5, height=16, width=24, **kw)
        b = bound(["a photo of sks dog", "a blue cat"], steps=3, seed=5, height=16, width=24,
                  callback=lambda ev, calls=calls: calls.append((ev.step, ev.total)), **kw)
        assert bound.io_binding_used and not runner.io_binding_used and calls == [(1, 3), (2, 3), (3, 3)]
        for x, y in zip(a, b):
            assert np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max() <= 1  # float32 rounding


def test_reduce_memory_holds_one_session_at_a_time_and_draws_the_same_images(
    tiny: tuple[dict, Path], runner: OnnxStableDiffusion
) -> None:
    """``reduce_memory``: every session is dropped after construction and after its stage; while one stage runs, no
    other model's session is open; the images equal the default runner's."""
    lean = OnnxStableDiffusion(tiny[1], providers=["CPUExecutionProvider"], reduce_memory=True)
    models = (lean.text_encoder, lean.unet, lean.vae_decoder)
    assert all(m._session is None for m in models)
    open_during: list[list[str]] = []
    run_unet = lean.unet.run

    def spy(*args: object, **kwargs: object) -> np.ndarray:
        open_during.append([m.name for m in models if m._session is not None])
        return run_unet(*args, **kwargs)

    lean.unet.run = spy  # type: ignore[method-assign]
    a = runner(["a photo of sks dog"], steps=2, seed=3, height=16, width=16)
    b = lean(["a photo of sks dog"], steps=2, seed=3, height=16, width=16)
    assert open_during == [[], ["unet"]]  # the text encoder closed; the UNet opened at its first call, then kept
    assert all(m._session is None for m in models)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


# --------------------------------------------------------------------------------------------- CUDA-only graphs


def _msft_model(path: Path, node: onnx.NodeProto, inputs: list, initializers: tuple = ()) -> Path:
    """A one-node com.microsoft model (opset 17 + com.microsoft 1), saved to `path`."""
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=list(initializers))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]),
              str(path))
    return path


def _group_norm(path: Path) -> Path:
    node = helper.make_node("GroupNorm", ["x", "gamma", "beta"], ["y"], domain="com.microsoft", activation=1,
                            epsilon=1e-5, groups=2, channels_last=1)
    return _msft_model(path, node, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 4])],
                       (helper.make_tensor("gamma", TensorProto.FLOAT, [4], [1.0] * 4),
                        helper.make_tensor("beta", TensorProto.FLOAT, [4], [0.0] * 4)))


def _packed_qkv(path: Path) -> Path:
    node = helper.make_node("MultiHeadAttention", ["qkv", "", ""], ["y"], domain="com.microsoft", num_heads=2)
    return _msft_model(path, node, [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, 4, 2, 3, 8])])


def test_graph_reader_matches_onnx(tiny: tuple[dict, Path], tmp_path: Path) -> None:
    """The runtime's protobuf reader (no onnx package on a device) lists the nodes onnx.load lists, subgraphs and
    model-local functions included."""
    from edgecp.export.ort_runner import graph_nodes, local_functions

    def reference(graph: onnx.GraphProto) -> list:
        out = []
        for n in graph.node:
            for a in n.attribute:
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    out += reference(g)
            out.append((n.op_type, n.domain, tuple(n.input)))
        return out

    for part in ("unet", "text_encoder", "vae_decoder"):
        path = tiny[1] / part / "model.onnx"
        got = [(n.op_type, n.domain, n.inputs) for n in graph_nodes(path)]
        assert sorted(got) == sorted(reference(onnx.load(str(path)).graph)) and len(got) > 20
    then = helper.make_graph([helper.make_node("Neg", ["x"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("BiasSplitGelu", ["x", "b"], ["e"], domain="com.microsoft")], "else",
                              [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    fn = helper.make_function("edgecp.test", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                              [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
             helper.make_node("Twice", ["x"], ["z"], domain="edgecp.test")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, functions=[fn], opset_imports=[helper.make_opsetid("", 17),
                                                                   helper.make_opsetid("edgecp.test", 1)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    got = {(n.op_type, n.domain) for n in graph_nodes(tmp_path / "m.onnx")}
    assert got == {("If", ""), ("Neg", ""), ("BiasSplitGelu", "com.microsoft"), ("Twice", "edgecp.test"), ("Add", "")}
    assert local_functions(tmp_path / "m.onnx") == {("Twice", "edgecp.test")}


def test_cuda_only_operators_are_refused_on_the_cpu_in_one_line(tiny: tuple[dict, Path], tmp_path: Path) -> None:
    """A cuda-fp16 export made where CUDA starts keeps GroupNorm (and friends) and packed QKV; onnxruntime's CPU
    provider cannot open the first (NOT_IMPLEMENTED, a traceback through generate) and fails the second at its first
    run. The runner refuses both before opening, naming the profile to export instead."""
    import onnxruntime as ort

    from edgecp.errors import EdgecpError
    from edgecp.export.ort_runner import check_cpu_kernels, cpu_kernels, cpu_unsupported

    gn, qkv = _group_norm(tmp_path / "gn" / "model.onnx"), _packed_qkv(tmp_path / "qkv" / "model.onnx")
    with pytest.raises(Exception, match="NOT_IMPLEMENTED.*GroupNorm") as e:  # the reference: onnxruntime itself
        ort.InferenceSession(str(gn), providers=["CPUExecutionProvider"])
    assert type(e.value).__name__ == "NotImplemented"
    packed = ort.InferenceSession(str(qkv), providers=["CPUExecutionProvider"])  # opens, then fails when run
    with pytest.raises(Exception, match="Packed QKV .* not implemented for CPU"):
        packed.run(None, {"qkv": np.zeros((1, 4, 2, 3, 8), np.float32)})
    fused = {"GroupNorm", "SkipGroupNorm", "NhwcConv", "BiasSplitGelu", "BiasAdd"}
    assert not {(op, "com.microsoft") for op in fused} & cpu_kernels()
    assert {("MultiHeadAttention", "com.microsoft"), ("Conv", "")} <= cpu_kernels()
    assert cpu_unsupported(gn) == ["GroupNorm (com.microsoft)"]
    assert cpu_unsupported(qkv) == ["MultiHeadAttention with packed QKV/KV (com.microsoft)"]
    assert cpu_unsupported(tiny[1] / "unet" / "model.onnx") == []
    check_cpu_kernels(gn, ["CUDAExecutionProvider", "CPUExecutionProvider"], "unet")  # CUDA runs it: no refusal

    for make in (_group_norm, _packed_qkv):
        folder = tmp_path / make.__name__ / "export"
        shutil.copytree(tiny[1], folder)
        make(folder / "unet" / "model.onnx")
        (folder / "edgecp.json").write_text(json.dumps({"profile": "cuda-fp16", "store": "/home/me/my-model"}))
        for reduce_memory in (False, True):
            with pytest.raises(EdgecpError) as err:
                OnnxStableDiffusion(folder, providers=["CPUExecutionProvider"], reduce_memory=reduce_memory)
            line = str(err.value)
            assert "\n" not in line and "(profile cuda-fp16)" in line and "unet/model.onnx" in line
            assert "edgecp export --store /home/me/my-model --profile cpu-fp32" in line


class _Binding:
    """An IO binding that records the device of every output and binds it on the CPU (no GPU here)."""

    def __init__(self, real: object, seen: list) -> None:
        self.real, self.seen = real, seen

    def bind_output(self, name: str, device_type: str = "cpu", device_id: int = 0) -> None:
        self.seen.append(("bind_output", device_type, device_id))
        self.real.bind_output(name, "cpu", 0)

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


def test_the_gpu_index_reaches_every_session_and_the_bound_loop(tiny: tuple[dict, Path], runner: OnnxStableDiffusion,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """device_id=1: every session (the step graph's too) gets CUDA's device_id 1, and the IO-bound loop allocates
    its tensors and outputs on cuda:1 (it hard-coded device 0). CUDA is faked: sessions run on the CPU and report
    CUDA as started with the options they were given, as onnxruntime-gpu's do."""
    import onnxruntime as ort

    real_session, real_value = ort.InferenceSession, ort.OrtValue.ortvalue_from_numpy
    made: list[tuple[str, dict]] = []
    seen: list[tuple[str, str, int]] = []

    class FakeCudaSession:
        def __init__(self, path: str, sess_options: object = None, providers: list | None = None,
                     provider_options: list | None = None) -> None:
            self.options = dict(zip(providers or [], provider_options or [{} for _ in providers or []]))
            made.append((Path(path).parent.name if Path(path).name == "model.onnx" else "step", self.options))
            self.real = real_session(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

        def get_providers(self) -> list[str]:
            return list(self.options)

        def get_provider_options(self) -> dict:
            return {p: {k: str(v) for k, v in o.items()} for p, o in self.options.items()}

        def io_binding(self) -> _Binding:
            return _Binding(self.real.io_binding(), seen)

        def run_with_iobinding(self, binding: _Binding, *args: object) -> None:
            self.real.run_with_iobinding(binding.real, *args)

        def __getattr__(self, name: str) -> object:
            return getattr(self.real, name)

    def ortvalue_from_numpy(array: np.ndarray, device_type: str = "cpu", device_id: int = 0) -> object:
        seen.append(("ortvalue", device_type, device_id))
        return real_value(array, "cpu", 0)

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: providers)
    monkeypatch.setattr(ort, "InferenceSession", FakeCudaSession)
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", staticmethod(ortvalue_from_numpy))
    pipe = OnnxStableDiffusion(tiny[1], providers=providers, device_id=1)
    assert (pipe.device, pipe.device_id, pipe.io_binding) == ("cuda", 1, True)
    images = pipe(["a photo of sks dog"], steps=2, seed=3, height=16, width=16)
    assert {name for name, _ in made} == {"text_encoder", "unet", "vae_decoder", "step"}
    assert all(opts["CUDAExecutionProvider"] == {"device_id": 1} for _, opts in made)
    assert pipe.io_binding_used and len(seen) == 3 + 2 * 3 and set(seen) == {("ortvalue", "cuda", 1),
                                                                             ("bind_output", "cuda", 1)}
    want = runner(["a photo of sks dog"], steps=2, seed=3, height=16, width=16)
    assert np.abs(np.asarray(images[0], dtype=int) - np.asarray(want[0], dtype=int)).max() <= 1
    with pytest.raises(ValueError, match="device_id=1 but the CUDAExecutionProvider options say device_id=0"):
        OnnxStableDiffusion(tiny[1], providers=[("CUDAExecutionProvider", {"device_id": 0})], device_id=1)
