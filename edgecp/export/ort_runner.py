"""Torch-free text-to-image on an exported Stable Diffusion ONNX folder, with onnxruntime.

The folder has the layout optimum's ``ORTStableDiffusionPipeline`` reads (``model_index.json``,
``text_encoder/model.onnx``, ``unet/model.onnx``, ``vae_decoder/model.onnx``, ``tokenizer/``,
``scheduler/scheduler_config.json`` and each model's ``config.json``) and optimum's I/O names:

- text_encoder: ``input_ids`` -> ``last_hidden_state`` (+ ``pooler_output``)
- unet: ``sample``, ``timestep``, ``encoder_hidden_states`` -> ``out_sample``
- vae_decoder: ``latent_sample`` -> ``sample``

SDXL folders (optimum's ``ORTStableDiffusionXLPipeline`` layout) add ``text_encoder_2/`` and ``tokenizer_2/``; both
encoders output ``hidden_states.0 ... hidden_states.L`` and the second ``text_embeds``, and the UNet also takes
``text_embeds`` and ``time_ids``. The runner conditions as diffusers' ``StableDiffusionXLPipeline`` does: the
penultimate hidden states of both encoders concatenated, the second's ``text_embeds`` pooled, time ids
(height, width, 0, 0, height, width) for an image generated at its own size, the negative prompt encoded
like the prompt.

Input dtypes are read from each session (int32 / int64 ids, scalar float or 1-D int64 timesteps, float16 or
float32 tensors), so fp32, fp16 and int8-quantized exports all run. This module imports only numpy,
onnxruntime, tokenizers, PIL and the stdlib: it is what runs on the device.
"""

from __future__ import annotations

import contextlib
import functools
import json
import mmap
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import _pybind_state, build_and_package_info
from PIL import Image
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from edgecp.errors import EdgecpError
from edgecp.export.np_scheduler import NumpyDDIMScheduler, ddim_config
from edgecp.export.protobuf import fields
from edgecp.export.step_graph import STEP_GRAPH
from edgecp.export.update_format import Update, UpdateError, open_update
from edgecp.heap import trim_heap
from edgecp.progress import Progress, emit
from edgecp.sampling import initial_latents  # noqa: F401 (shared with PyTorch; re-exported)

DEFAULT_SCALING_FACTOR = 0.18215  # SD 1.x / 2.x VAE
DEFAULT_MAX_LENGTH = 77  # CLIP's context length
CLIP_EOS = "<|endoftext|>"
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
XL_INPUTS = ("text_embeds", "time_ids")  # an SDXL UNet's added conditioning
COND_INPUTS = ("encoder_hidden_states", *XL_INPUTS)  # per prompt row, the same at every step
ORT_TO_NUMPY: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def default_providers() -> list[str]:
    """CUDA then CPU when onnxruntime has CUDA, else CPU."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def split_providers(providers: Sequence[str | tuple[str, dict]], device_id: int | None = None
                    ) -> tuple[list[str], dict[str, dict]]:
    """(names, name -> options) of a provider list of names or (name, options) pairs; ``device_id`` goes into the
    options of every GPU provider (a different ``device_id`` already there is refused)."""
    names: list[str] = []
    options: dict[str, dict] = {}
    for p in providers:
        name, opts = (p[0], dict(p[1])) if isinstance(p, (tuple, list)) else (p, {})
        if name in GPU_PROVIDERS and device_id is not None:
            if "device_id" in opts and int(opts["device_id"]) != int(device_id):
                raise ValueError(f"device_id={device_id} but the {name} options say device_id={opts['device_id']}; "
                                 "give the GPU once")
            opts["device_id"] = int(device_id)
        names.append(name)
        if opts:
            options[name] = opts
    return names, options


def available_providers(wanted: Sequence[str]) -> list[str]:
    """The providers of ``wanted`` (in its order) that this onnxruntime has; the CPU when it has none of them."""
    have = set(ort.get_available_providers())
    return [p for p in wanted if p in have] or ["CPUExecutionProvider"]


ONNXRUNTIME_DEFAULT_SEVERITY = 2  # warnings: onnxruntime's default logger severity
_severity = [ONNXRUNTIME_DEFAULT_SEVERITY]  # the level the last `log_severity` set, where onnxruntime has no getter


@contextlib.contextmanager
def log_severity(level: int):
    """onnxruntime's default logger at `level` (4: fatal only) inside the block, then the level it found. onnxruntime
    has a setter but (up to 1.32 at least) no getter: where `get_default_logger_severity` is missing, the level found
    is the one the enclosing `log_severity` block set, else onnxruntime's default."""
    getter = getattr(ort, "get_default_logger_severity", None)
    found = getter() if getter is not None else _severity[0]
    ort.set_default_logger_severity(level)
    _severity[0] = level
    try:
        yield
    finally:
        ort.set_default_logger_severity(found)
        _severity[0] = found


def cuda_usable() -> bool:
    """onnxruntime's CUDA provider is installed and starts here (a GPU, its driver, CUDA and cuDNN)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    with log_severity(4):  # a provider that cannot load logs errors: the library does not print
        try:
            sess = ort.InferenceSession(str(STEP_GRAPH), providers=["CUDAExecutionProvider"])
            return "CUDAExecutionProvider" in sess.get_providers()
        except Exception:  # onnxruntime raises its own error types when the provider cannot load
            return False


def cuda_major() -> str | None:
    """The CUDA major version this onnxruntime-gpu was built for (its build info records it); None on CPU builds."""
    cuda = getattr(build_and_package_info, "cuda_version", None)
    return cuda.split(".")[0] if cuda else None


def cuda_unusable_message() -> str:
    """Why a listed CUDA provider did not start, with the versions this build needs and how to get them."""
    major = cuda_major()
    need = f"CUDA {major}.x and cuDNN 9" if major else "CUDA and cuDNN"
    fix = (f"pip install nvidia-cuda-runtime-cu{major} nvidia-cublas-cu{major} nvidia-cudnn-cu{major}" if major
           else "install onnxruntime-gpu instead of onnxruntime")
    return (
        f"CUDAExecutionProvider is listed by onnxruntime {ort.__version__} but could not start (it needs an NVIDIA "
        f"GPU and driver, {need}): {fix}, or use providers=['CPUExecutionProvider']"
    )


def read_json(path: Path, required: bool = False) -> dict[str, Any]:
    """A JSON file as a dict; ``{}`` when absent unless ``required``."""
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path} is missing; export the model again so the folder is complete")
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def numpy_dtype(ort_type: str) -> type[np.generic]:
    """The numpy dtype of an onnxruntime type string such as ``tensor(float16)``."""
    if ort_type not in ORT_TO_NUMPY:
        raise ValueError(f"ONNX input type {ort_type} is not supported; use one of {', '.join(ORT_TO_NUMPY)}")
    return ORT_TO_NUMPY[ort_type]


def fixed_dim(shape: Sequence[Any], axis: int) -> int | None:
    """The size of ``axis`` when the model fixes it, None when it is dynamic (a name or None)."""
    if axis >= len(shape):
        return None
    return shape[axis] if isinstance(shape[axis], int) and shape[axis] > 0 else None


def timestep_array(t: int, ort_type: str, shape: Sequence[Any]) -> np.ndarray:
    """Timestep as the UNet declares it: a scalar (optimum today) or a 1-D array (older exports)."""
    dtype = numpy_dtype(ort_type)
    if len(shape) == 0:
        return np.array(t, dtype=dtype)  # ()
    return np.full((fixed_dim(shape, 0) or 1,), t, dtype=dtype)  # (1,) or the exported size


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, 3, H, W) floats in [-1, 1] -> RGB PIL images."""
    x = np.clip(images.astype(np.float32) / 2 + 0.5, 0.0, 1.0)
    x = (x.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)  # (B, H, W, 3)
    return [Image.fromarray(img) for img in x]


# ---------------------------------------------------------------------------------------------- tokenizer


def _token_content(value: Any) -> str | None:
    """A special token as saved by transformers: a string, or an AddedToken dict with ``content``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _pick(folder: Path, overlay: Mapping[str, Path] | None, name: str) -> Path:
    """folder/name, or the file an update carries in its place (``overlay``: file name -> path)."""
    return (overlay or {}).get(name, folder / name)


def special_tokens(folder: Path, overlay: Mapping[str, Path] | None = None) -> dict[str, str]:
    """pad/eos/bos/unk from ``tokenizer_config.json``, then ``special_tokens_map.json``, then CLIP's."""
    found: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg = read_json(_pick(folder, overlay, name))
        for key in ("pad_token", "eos_token", "bos_token", "unk_token"):
            token = _token_content(cfg.get(key))
            if token is not None and key not in found:
                found[key] = token
    found.setdefault("eos_token", CLIP_EOS)
    found.setdefault("bos_token", "<|startoftext|>")
    found.setdefault("unk_token", found["eos_token"])
    found.setdefault("pad_token", found["eos_token"])
    return found


def clip_tokenizer_from_vocab(folder: Path, tokens: dict[str, str], overlay: Mapping[str, Path] | None = None
                              ) -> Tokenizer:
    """CLIP's BPE tokenizer from ``vocab.json`` + ``merges.txt`` (folders saved without ``tokenizer.json``).

    Same pipeline as transformers' ``CLIPTokenizer``: NFC, whitespace squeeze, lowercase, CLIP's split regex,
    byte-level BPE with ``</w>`` word ends, ``<|startoftext|> ... <|endoftext|>`` around the ids.
    """
    vocab = read_json(_pick(folder, overlay, "vocab.json"), required=True)
    lines = _pick(folder, overlay, "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    bos, eos = tokens["bos_token"], tokens["eos_token"]
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=tokens["unk_token"],
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    split = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys((bos, eos))])
    tok.post_processor = processors.RobertaProcessing(
        (eos, tok.token_to_id(eos)), (bos, tok.token_to_id(bos)), trim_offsets=False, add_prefix_space=False
    )
    return tok


def load_tokenizer(folder: Path, max_length: int | None = None, overlay: Mapping[str, Path] | None = None
                   ) -> tuple[Tokenizer, int]:
    """The pipeline's tokenizer, padding and truncating to ``max_length`` (default: ``model_max_length``, 77).
    ``overlay``: file name -> path of the files an update carries in place of the folder's.

    Returns (tokenizer, max_length). Ids equal transformers'
    ``tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True).input_ids``.
    """
    pick = functools.partial(_pick, folder, overlay)
    if pick("tokenizer.json").is_file():
        tokens = special_tokens(folder, overlay)
        tok = Tokenizer.from_file(str(pick("tokenizer.json")))
    elif pick("vocab.json").is_file() and pick("merges.txt").is_file():
        tokens = special_tokens(folder, overlay)
        tok = clip_tokenizer_from_vocab(folder, tokens, overlay)
    else:
        raise FileNotFoundError(
            f"{folder} has neither tokenizer.json nor vocab.json + merges.txt; "
            "save the CLIP tokenizer there with tokenizer.save_pretrained()"
        )
    if max_length is None:
        max_length = int(
            read_json(pick("tokenizer_config.json")).get("model_max_length", DEFAULT_MAX_LENGTH)
        )
        if max_length > 100_000:  # transformers' "no limit" sentinel
            max_length = DEFAULT_MAX_LENGTH
    pad = tokens["pad_token"]
    pad_id = tok.token_to_id(pad)
    if pad_id is None:
        raise ValueError(
            f"pad token {pad!r} of {folder} is not in its vocabulary; fix pad_token in tokenizer_config.json"
        )
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad)
    return tok, max_length


# ---------------------------------------------------------------------------------------------- CPU kernels
# An export made where CUDA starts (cuda-fp16) keeps onnxruntime.transformers' CUDA-only fusions: com.microsoft
# GroupNorm, SkipGroupNorm, NhwcConv, BiasSplitGelu, BiasAdd, and MultiHeadAttention with packed QKV/KV. onnxruntime's
# CPU provider has no kernel for the first five (the session does not open: NOT_IMPLEMENTED) and its
# MultiHeadAttention refuses packed inputs at the first run. The runner reads the graph's operators before it opens a
# CPU-only session and refuses in one line naming the profile to export instead. The graph is read with a small
# protobuf reader (the runtime install has no `onnx` package), from a memory map, skipping weights.

MSFT = "com.microsoft"


@functools.lru_cache(maxsize=1)
def cpu_kernels() -> frozenset[tuple[str, str]]:
    """(op_type, domain) of every operator onnxruntime's CPU provider has a kernel for ("" is the ONNX domain)."""
    return frozenset((k.op_name, k.domain) for k in _pybind_state.get_all_opkernel_def()
                     if k.provider == "CPUExecutionProvider")


def _fields(buf, start: int, end: int):
    """(field number, (start, end)) of the length-delimited fields of one protobuf message in buf[start:end]."""
    return ((f, v) for f, wire, v in fields(buf, start, end) if wire == 2)


@dataclass(frozen=True)
class Node:
    op_type: str
    domain: str  # "" for the ONNX domain (also when the file says "ai.onnx")
    inputs: tuple[str, ...]


def graph_nodes(path: Path) -> list[Node]:
    """Every node of an ONNX model file, subgraphs (If/Loop bodies) and model-local functions included, read without
    the onnx package. Field numbers: onnx.proto's ModelProto.graph 7, .functions 25; GraphProto.node 1;
    FunctionProto.node 7; NodeProto.input 1, .op_type 4, .attribute 5, .domain 7; AttributeProto.g 6, .graphs 11."""
    nodes: list[Node] = []

    def text(buf, span) -> str:
        return bytes(buf[span[0]:span[1]]).decode("utf-8")

    def node(buf, span) -> None:
        op, domain, inputs = "", "", []
        for field, v in _fields(buf, *span):
            if field == 4:
                op = text(buf, v)
            elif field == 7:
                domain = text(buf, v)
            elif field == 1:
                inputs.append(text(buf, v))
            elif field == 5:
                for af, av in _fields(buf, *v):
                    if af in (6, 11):
                        graph(buf, av)
        nodes.append(Node(op, "" if domain == "ai.onnx" else domain, tuple(inputs)))

    def graph(buf, span, node_field: int = 1) -> None:
        for field, v in _fields(buf, *span):
            if field == node_field:
                node(buf, v)

    if path.stat().st_size == 0:
        return nodes
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for field, v in _fields(buf, 0, len(buf)):
            if field == 7:
                graph(buf, v)
            elif field == 25:
                graph(buf, v, node_field=7)
    return nodes


def local_functions(path: Path) -> set[tuple[str, str]]:
    """(name, domain) of the model-local functions (nodes that call them need no kernel)."""
    found: set[tuple[str, str]] = set()
    if path.stat().st_size == 0:
        return found
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for field, v in _fields(buf, 0, len(buf)):
            if field == 25:
                parts = {pf: bytes(buf[pv[0]:pv[1]]).decode("utf-8") for pf, pv in _fields(buf, *v) if pf in (1, 10)}
                found.add((parts.get(1, ""), parts.get(10, "")))
    return found


def cpu_unsupported(path: Path) -> list[str]:
    """The operators of `path` that onnxruntime's CPU provider cannot run, by name, in graph order: a custom-domain
    operator without a CPU kernel, and MultiHeadAttention with packed QKV or KV (its value input absent, onnxruntime's
    contract for both packings), which the CPU kernel refuses. Operators of the ONNX domain are not checked:
    onnxruntime runs one without a kernel through its ONNX function body (LayerNormalization, GroupNormalization)."""
    kernels, functions = cpu_kernels(), local_functions(path)
    found: dict[str, None] = {}
    for n in graph_nodes(path):
        if n.domain in ("", "ai.onnx.ml") or (n.op_type, n.domain) in functions:
            continue
        if (n.op_type, n.domain) not in kernels:
            found[f"{n.op_type} ({n.domain})"] = None
        elif n.op_type == "MultiHeadAttention" and n.domain == MSFT and len([x for x in n.inputs[:3] if x]) < 3:
            found[f"MultiHeadAttention with packed QKV/KV ({MSFT})"] = None
    return list(found)


def check_cpu_kernels(path: Path, providers: Sequence[str], name: str) -> None:
    """Refuse, in one line, a model that a CPU-only session cannot run (see `cpu_unsupported`); other provider lists
    pass (CUDA runs those operators; onnxruntime hands the rest to the CPU)."""
    if set(providers) != {"CPUExecutionProvider"}:
        return
    missing = cpu_unsupported(path)
    if missing:
        raise EdgecpError(cpu_refusal(path, name, missing))


def cpu_refusal(path: Path, name: str, missing: Sequence[str]) -> str:
    meta = read_json(path.parent.parent / "edgecp.json") if path.parent.parent.is_dir() else {}
    profile = meta.get("profile")
    made = f"export '{path.parent.parent}' (profile {profile})" if profile else f"'{path.parent.parent}'"
    store = meta.get("store") if isinstance(meta.get("store"), str) else "STORE"
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return (f"{made}: {name}/model.onnx uses {shown}, which onnxruntime's CPU provider cannot run (CUDA-only "
            f"fusions): run it where CUDA starts (onnxruntime-gpu, an NVIDIA GPU), or export for the CPU with "
            f"`edgecp export --store {store} --profile cpu-fp32` (or edge-int8)")


# ---------------------------------------------------------------------------------------------- sessions


GRAPH_OPTIMIZATION = ("all", "basic", "disabled")  # onnxruntime's ORT_ENABLE_ALL (default), _BASIC, ORT_DISABLE_ALL


def session_options(optimization: str = "all", arena: bool = True) -> ort.SessionOptions:
    """Quiet session options. "basic": no layout or fusion passes; "disabled": none, and the nodes run in
    onnxruntime's priority order (onnxruntime's calibrator; an fp16 graph on the CPU). On the CPU an fp16 graph gets
    a Cast to fp32 in front of every weight of an op without an fp16 kernel: "all" and "basic" fold those into fp32
    copies of the weights beside the fp16 ones (SDXL's UNet: 14.9 GB at "basic"); "disabled" casts each weight as
    its node runs, and in priority order each cast runs beside its consumer, where the default order runs them all
    first (SDXL's UNet: 5.7 GB, 17.0 GB in the default order; the same image, and faster than "basic", which folds
    10 GB at load).
    ``arena=False``: no CPU memory arena, whose blocks otherwise grow run after run where a model's tensors change
    shape or are cast per run (an fp16 UNet on the CPU); an fp32 UNet peaks the same either way and runs faster with
    it (docs/export/README.md)."""
    if optimization not in GRAPH_OPTIMIZATION:
        raise ValueError(f"optimization={optimization!r}: use one of {GRAPH_OPTIMIZATION}")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the library does not print
    options.enable_cpu_mem_arena = arena
    if optimization == "basic":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    elif optimization == "disabled":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return options


def _probe_options() -> ort.SessionOptions:
    options = session_options("disabled")
    options.add_session_config_entry("session.disable_prepacking", "1")
    return options


@dataclass(frozen=True)
class Arg:
    """A graph input as onnxruntime describes it (name, "tensor(float)", shape with str/None for dynamic axes)."""

    name: str
    type: str
    shape: list[Any]


def ort_value(array: np.ndarray) -> ort.OrtValue:
    """`array` as an OrtValue on the CPU, wrapped without a copy when it is C-contiguous (its memory must outlive the
    value). Not `np.ascontiguousarray`, which turns a 0-d array (an int8 graph's scale) into shape [1]."""
    return ort.OrtValue.ortvalue_from_numpy(array if array.flags.c_contiguous else np.array(array, order="C"))


class OnnxModel:
    """One onnxruntime session: casts feeds to the declared dtypes, splits batches for a fixed-batch model."""

    def __init__(self, path: Path, providers: list[str], name: str, optimization: str = "all",
                 open_now: bool = True, arena: bool = True, provider_options: dict[str, dict] | None = None,
                 initializers: Mapping[str, np.ndarray] | None = None):
        """``provider_options``: provider name -> its options (e.g. CUDA's ``device_id``), for every session.
        ``initializers``: name -> array that every session uses in place of the graph's initializer of that name
        (an update's tensors, checked against the graph by ``update_format.open_update``); onnxruntime then does not
        read the graph's own copy of them (``SessionOptions.add_external_initializers``: they enter the graph before
        its optimizer runs; each must be an external-data initializer of the graph)."""
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: the {name} of an exported folder is <folder>/{name}/model.onnx"
            )
        self.name = name
        check_cpu_kernels(path, providers, name)  # a CUDA-only export on the CPU: one line, not NOT_IMPLEMENTED
        options = [dict((provider_options or {}).get(p, {})) for p in providers]

        # onnxruntime reads these while the session lives: the values (and the arrays they wrap) stay referenced here
        self._initializers = [(k, ort_value(v)) for k, v in (initializers or {}).items()]

        def open_session() -> ort.InferenceSession:
            opts = session_options(optimization, arena)
            if self._initializers:
                opts.add_external_initializers([k for k, _ in self._initializers], [v for _, v in self._initializers])
            try:
                return ort.InferenceSession(str(path), sess_options=opts, providers=providers,
                                            provider_options=options)
            except Exception as e:  # onnxruntime's NotImplemented: an operator the check above does not know
                if type(e).__name__ != "NotImplemented" or set(providers) != {"CPUExecutionProvider"}:
                    raise
                op = re.search(r"implementation for (\S+)", str(e))
                raise EdgecpError(cpu_refusal(path, name, [op.group(1) if op else "an operator"])) from None

        self._open = open_session
        # open=False: the graph's inputs and outputs from an unoptimized CPU session that leaves the weights unread
        # (mapped, never touched); the real session opens at first use
        self._session: ort.InferenceSession | None = self._open() if open_now else None
        # (a graph with CUDA-only operators cannot open on the CPU: its probe runs on the providers asked for)
        probe = ["CPUExecutionProvider"] if open_now or not cpu_unsupported(path) else providers
        meta = self._session or ort.InferenceSession(str(path), sess_options=_probe_options(), providers=probe,
                                                     provider_options=[dict((provider_options or {}).get(p, {}))
                                                                       for p in probe])
        # plain copies: onnxruntime's NodeArg objects keep their session (and its weights) alive
        self.inputs = {i.name: Arg(i.name, i.type, list(i.shape)) for i in meta.get_inputs()}
        self.output_names = [o.name for o in meta.get_outputs()]
        self.output_types = [o.type for o in meta.get_outputs()]
        # the providers that started, in onnxruntime's order (those asked for, until a session opens)
        self.providers = self._session.get_providers() if open_now else list(providers)
        del meta

    @property
    def session(self) -> ort.InferenceSession:
        """The onnxruntime session, opened again if ``release`` dropped it."""
        if self._session is None:
            self._session = self._open()
        return self._session

    def release(self) -> None:
        """Drop the session (its weights); the next use opens it again (``reduce_memory``)."""
        if self._session is not None:
            self._session = None
            trim_heap()  # the weights leave the RSS before the next model's session grows it

    def require_outputs(self, names: Sequence[str]) -> None:
        missing = [n for n in names if n not in self.output_names]
        if missing:
            raise ValueError(
                f"{self.name}/model.onnx has outputs {self.output_names[:4]}... but not {missing}; export SDXL's "
                "encoders as optimum-cli export onnx and edgecp export do"
            )

    def require_inputs(self, names: Sequence[str]) -> None:
        missing = [n for n in names if n not in self.inputs]
        if missing:
            raise ValueError(
                f"{self.name}/model.onnx has inputs {list(self.inputs)} but not {missing}; "
                "export it with optimum's input names (optimum-cli export onnx or edgecp export)"
            )

    def output_index(self, name: str) -> int:
        """Position of output ``name``; the first output when the export named it otherwise."""
        return self.output_names.index(name) if name in self.output_names else 0

    def shape(self, name: str) -> list[Any]:
        return list(self.inputs[name].shape)

    def dtype(self, name: str) -> type[np.generic]:
        return numpy_dtype(self.inputs[name].type)

    def fixed_batch(self, name: str) -> int | None:
        return fixed_dim(self.shape(name), 0)

    def run(self, output: str, feeds: dict[str, np.ndarray], batched: Sequence[str]) -> np.ndarray:
        """Output ``output`` (floats as float32); ``batched`` feeds are split when the batch is fixed."""
        return self.run_outputs([output], feeds, batched)[0]

    def run_outputs(self, outputs: Sequence[str], feeds: dict[str, np.ndarray], batched: Sequence[str]
                    ) -> list[np.ndarray]:
        """Outputs ``outputs`` (each by name, floats as float32) of one run; ``batched`` feeds are split when the batch
        is fixed."""
        feeds = {k: np.asarray(v, dtype=self.dtype(k), order="C") for k, v in feeds.items()}
        n = feeds[batched[0]].shape[0]
        chunk = self.fixed_batch(batched[0]) or n
        if n % chunk:
            raise ValueError(
                f"{self.name}/model.onnx has a fixed batch of {chunk}, which does not divide {n}; "
                "export it with a dynamic batch axis or use a batch that is a multiple of it"
            )
        names = [self.output_names[self.output_index(o)] for o in outputs]
        parts = []
        for start in range(0, n, chunk):  # one call when the batch axis is dynamic
            part = {k: (v[start : start + chunk] if k in batched else v) for k, v in feeds.items()}
            parts.append(self.session.run(names, part))
        outs = [np.concatenate([p[i] for p in parts]) if len(parts) > 1 else parts[0][i] for i in range(len(names))]
        return [o.astype(np.float32) if np.issubdtype(o.dtype, np.floating) else o for o in outs]


def penultimate_state(model: OnnxModel) -> str:
    """The output of an SDXL text encoder that diffusers' pipeline conditions on, `hidden_states[-2]`: the second
    highest of its ``hidden_states.i`` outputs (optimum's names, 0 the token embeddings)."""
    found = sorted((int(n.rsplit(".", 1)[1]), n) for n in model.output_names if re.fullmatch(r"hidden_states\.\d+", n))
    if len(found) < 2:
        raise ValueError(f"{model.name}/model.onnx has no hidden_states.N outputs ({model.output_names[:4]}...): export "
                         "SDXL's encoders with every hidden state, as optimum-cli export onnx and edgecp export do")
    return found[-2][1]


# ---------------------------------------------------------------------------------------------- pipeline


def check_size(height: int, width: int, factor: int) -> None:
    """Height and width must be positive multiples of the VAE factor."""
    if height <= 0 or width <= 0 or height % factor or width % factor:
        raise ValueError(
            f"height={height}, width={width}: both must be positive multiples of {factor} "
            f"(the VAE downsampling factor of this model); e.g. {max(factor, height // factor * factor)}"
            f"x{max(factor, width // factor * factor)}"
        )


class OnnxStableDiffusion:
    """Stable Diffusion 1.x / 2.x / XL text-to-image from an exported ONNX folder, DDIM sampling, no torch.

    ``providers``: onnxruntime's names in order of preference, or (name, options) pairs as onnxruntime takes them;
    default CUDA (when onnxruntime-gpu is installed) then CPU. A GPU provider that onnxruntime lists but cannot
    start (no driver, CUDA or cuDNN) raises ValueError with what is missing when asked for explicitly; by default the
    runner falls back to the CPU and says why in ``provider_note`` (onnxruntime itself would fall back silently after
    logging).

    ``io_binding``: keep the latents, the text states and the UNet's output on the provider's device for the whole
    denoising loop (onnxruntime IO binding; guidance and the DDIM step run there as the small graph of
    ``step_graph.py``), so no tensor crosses to the host per step but the timestep and seven coefficients. Default:
    on when the UNet runs on CUDA. The loop falls back to the host path when the UNet's sample or output is not
    float32 or its batch is fixed (``io_binding_used`` tells after a call).

    ``optimization``: onnxruntime's graph optimization level, "all" (default), "basic" or "disabled" (see
    ``session_options``).

    ``reduce_memory``: hold one model's session at a time, each opened when its stage starts and dropped when it
    ends (text encoder, UNet, VAE decoder), as Apple's Core ML Stable Diffusion pipeline does with ``reduceMemory``,
    and without onnxruntime's CPU memory arena (see ``session_options``): the peak is the largest model instead of
    all three, for a few seconds of loading per image.

    ``arena``: onnxruntime's CPU memory arena on or off; default on, off with ``reduce_memory``. An fp32 or int8
    graph peaks the same either way and runs faster with it; an fp16 graph on the CPU grows it run after run.

    ``device_id``: the GPU (CUDA's ``device_id`` provider option, given to every session, the step graph's
    included); default: the providers' own options, else onnxruntime's (0). The IO-bound loop allocates its tensors
    on the GPU the UNet's session reports (``self.device_id``).

    A model with operators that onnxruntime's CPU provider has no kernel for (the CUDA-only fusions of a
    ``cuda-fp16`` export made where CUDA starts) is refused with an EdgecpError naming the profile to export instead
    when the sessions run on the CPU alone (``check_cpu_kernels``).

    ``update``: a concept update of this export (a folder ``edgecp export --update-for`` wrote, or an
    ``update_format.Update`` already checked): the sessions use its tensors in place of the base's initializers and
    the tokenizer its files; the folder is only read. It is checked against the base before any session opens
    (``update_format.open_update``: the base's model hashes, the update's files and each tensor's sha256, and each
    tensor's name, dtype and shape against the base graph); any problem raises ValueError in one line.
    """

    def __init__(self, folder: str | Path, providers: list[str] | None = None, io_binding: bool | None = None,
                 optimization: str = "all", reduce_memory: bool = False, arena: bool | None = None,
                 device_id: int | None = None, update: str | Path | Update | None = None):
        self.folder = Path(folder)
        self.optimization = optimization
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder} is not a folder; pass the directory an ONNX export wrote")
        try:  # checked before any session opens: a wrong base or a damaged update runs nothing
            self.update = open_update(self.folder, update) if isinstance(update, (str, Path)) else update
        except UpdateError as e:
            raise ValueError(str(e)) from None
        explicit = providers is not None
        providers, self.provider_options = split_providers(providers if explicit else default_providers(), device_id)
        self.provider_note: str | None = None
        unknown = [p for p in providers if p not in ort.get_available_providers()]
        if unknown:
            raise ValueError(
                f"providers {unknown} are not available in this onnxruntime; "
                f"use some of {ort.get_available_providers()}"
            )
        self.providers = providers
        self._read_configs()
        self.reduce_memory = reduce_memory
        self.arena = not reduce_memory if arena is None else bool(arena)
        self._open_models(providers, explicit)
        self.tokenizer, self.max_length = load_tokenizer(
            self.folder / "tokenizer", fixed_dim(self.text_encoder.shape("input_ids"), 1), self._overlay("tokenizer"))
        if self.sdxl:
            self.tokenizer_2, _ = load_tokenizer(self.folder / "tokenizer_2",
                                                 fixed_dim(self.text_encoder_2.shape("input_ids"), 1),
                                                 self._overlay("tokenizer_2"))
        sample_shape = self.unet.shape("sample")
        self.latent_channels = int(self.unet_config.get("in_channels", fixed_dim(sample_shape, 1) or 4))
        self.default_size = self._default_size(sample_shape)
        on_gpu = self.unet.providers[0] in GPU_PROVIDERS
        self.device = "cuda" if on_gpu else "cpu"
        self.device_id = self._started_device_id() if on_gpu else 0
        self.io_binding = on_gpu if io_binding is None else bool(io_binding)
        self.io_binding_used = False
        self._step_session: ort.InferenceSession | None = None

    def _overlay(self, folder: str) -> dict[str, Path] | None:
        """file name -> path of the files an update carries for `folder` (None without an update)."""
        if not self.update:
            return None
        return {rel.split("/", 1)[1]: path for rel, path in self.update.files.items() if rel.startswith(folder + "/")}

    def _read_configs(self) -> None:
        """model_index.json, the scheduler's config (checked now, not mid-generation) and the models' configs."""
        self.model_index = read_json(self.file("model_index.json"))
        # as diffusers' StableDiffusionPipeline samples with it (no x0 clipping, steps_offset 1; see ddim_config):
        # an optimum export of SD 2.x 768-v ships an Euler config without clip_sample, whose DDIM default is True
        self.scheduler_config = ddim_config(
            read_json(self.file("scheduler/scheduler_config.json"), required=True))
        NumpyDDIMScheduler.from_config(self.scheduler_config)  # fail now, not mid-generation
        self.unet_config = read_json(self.file("unet/config.json"))
        self.vae_config = read_json(self.file("vae_decoder/config.json"))
        self.scaling_factor = float(self.vae_config.get("scaling_factor", DEFAULT_SCALING_FACTOR))
        self.vae_scale_factor = 2 ** (
            len(self.vae_config.get("block_out_channels", (128, 256, 512, 512))) - 1
        )

    def _open_models(self, providers: list[str], explicit: bool) -> None:
        """The three models' sessions (with ``reduce_memory``, their inputs only: each opens at its stage), their
        inputs checked against what this runner feeds."""
        self.text_encoder = self._first_session(providers, explicit)
        self._done_with(self.text_encoder)
        providers = self.providers
        now = not self.reduce_memory
        self.unet = OnnxModel(self.folder / "unet" / "model.onnx", providers, "unet", self.optimization, now,
                              self.arena, self.provider_options, self.tensors("unet"))
        self.vae_decoder = OnnxModel(self.folder / "vae_decoder" / "model.onnx", providers, "vae_decoder",
                                     self.optimization, now, self.arena, self.provider_options,
                                     self.tensors("vae_decoder"))
        self.text_encoder.require_inputs(["input_ids"])
        self.vae_decoder.require_inputs(["latent_sample"])
        second = self.folder / "text_encoder_2" / "model.onnx"
        self.sdxl = any(n in self.unet.inputs for n in XL_INPUTS) or second.is_file()
        self.text_encoder_2 = None
        if self.sdxl:
            if not second.is_file():
                raise ValueError(f"unet/model.onnx takes SDXL's {list(XL_INPUTS)} but {second} is missing; pass the "
                                 "whole folder an SDXL export wrote (optimum's ORTStableDiffusionXLPipeline layout)")
            self.text_encoder_2 = OnnxModel(second, providers, "text_encoder_2", self.optimization, now, self.arena,
                                            self.provider_options, self.tensors("text_encoder_2"))
            self.text_encoder_2.require_inputs(["input_ids"])
            self.text_encoder_2.require_outputs(["text_embeds"])
            self.penultimate = {m.name: penultimate_state(m) for m in (self.text_encoder, self.text_encoder_2)}
            self._done_with(self.text_encoder_2)
        inputs = UNET_INPUTS + XL_INPUTS * self.sdxl
        self.unet.require_inputs(inputs)
        extra = [n for n in self.unet.inputs if n not in inputs]
        if extra:
            raise ValueError(
                f"unet/model.onnx also needs inputs {extra} (LCM style); this runner supports Stable Diffusion "
                f"1.x / 2.x UNets with inputs {list(UNET_INPUTS)} and SDXL's with {list(XL_INPUTS)} as well"
            )

    def file(self, rel: str) -> Path:
        """A file of the export: the update's copy when it carries one (``update``), else the folder's."""
        return self.update.file(self.folder, rel) if self.update else self.folder / rel

    def tensors(self, model: str) -> dict[str, np.ndarray] | None:
        """The update's initializers of `model` (None without an update)."""
        return self.update.tensors.get(model) if self.update else None

    def _done_with(self, model: OnnxModel) -> None:
        if self.reduce_memory:
            model.release()

    def _first_session(self, providers: list[str], explicit: bool) -> OnnxModel:
        """The text encoder's session, which also tells whether a GPU provider really started."""
        path = self.folder / "text_encoder" / "model.onnx"
        wants_gpu = any(p in GPU_PROVIDERS for p in providers)
        # a GPU provider that cannot start logs errors: the library does not print
        with log_severity(4) if wants_gpu else contextlib.nullcontext():
            model = OnnxModel(path, providers, "text_encoder", self.optimization, arena=self.arena,
                              provider_options=self.provider_options, initializers=self.tensors("text_encoder"))
        started = model.providers
        if "CUDAExecutionProvider" in providers and "CUDAExecutionProvider" not in started:
            if explicit:
                raise ValueError(cuda_unusable_message())
            self.provider_note = cuda_unusable_message() + "; running on the CPU"
            providers = [p for p in providers if p not in GPU_PROVIDERS] or ["CPUExecutionProvider"]
            model = OnnxModel(path, providers, "text_encoder", self.optimization, arena=self.arena,
                              provider_options=self.provider_options, initializers=self.tensors("text_encoder"))
        self.providers = providers
        return model

    def _started_device_id(self) -> int:
        """The GPU the UNet's session runs on: its provider's ``device_id`` as onnxruntime reports it (the option
        asked for until the session opens)."""
        provider = self.unet.providers[0]
        session = self.unet._session or self.text_encoder._session
        reported = session.get_provider_options().get(provider, {}) if session is not None else {}
        return int(reported.get("device_id", self.provider_options.get(provider, {}).get("device_id", 0)))

    def _default_size(self, sample_shape: list[Any]) -> tuple[int, int] | None:
        """(height, width): unet/config.json ``sample_size`` (or a static export) times the VAE factor."""
        size = self.unet_config.get("sample_size")
        if isinstance(size, int):
            return size * self.vae_scale_factor, size * self.vae_scale_factor
        if isinstance(size, (list, tuple)) and len(size) == 2:
            return size[0] * self.vae_scale_factor, size[1] * self.vae_scale_factor
        h, w = fixed_dim(sample_shape, 2), fixed_dim(sample_shape, 3)
        return (h * self.vae_scale_factor, w * self.vae_scale_factor) if h and w else None

    def _resolve_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        if height is None or width is None:
            if self.default_size is None:
                raise ValueError(
                    f"{self.folder}/unet/config.json has no sample_size; pass height= and width= explicitly"
                )
            height = self.default_size[0] if height is None else height
            width = self.default_size[1] if width is None else width
        check_size(height, width, self.vae_scale_factor)
        return height, width

    def encode_text(self, prompts: list[str]) -> np.ndarray:
        """(B, L, D) float32 CLIP hidden states of ``prompts`` (SD 1.x / 2.x; SDXL: ``condition``)."""
        ids = np.array([e.ids for e in self.tokenizer.encode_batch(prompts)], dtype=np.int64)  # (B, L)
        return self.text_encoder.run("last_hidden_state", {"input_ids": ids}, ["input_ids"])

    def condition(self, prompts: list[str], height: int, width: int) -> dict[str, np.ndarray]:
        """The UNet's conditioning inputs of ``prompts`` (each row of the batch): ``encoder_hidden_states``, and on
        SDXL ``text_embeds`` and ``time_ids`` as diffusers' StableDiffusionXLPipeline makes them (module docstring).
        Each encoder's session is dropped after its run when ``reduce_memory``."""
        if not self.sdxl:
            return {"encoder_hidden_states": self.encode_text(prompts)}
        states, pooled = [], None
        for model, tok, pools in ((self.text_encoder, self.tokenizer, False),
                                  (self.text_encoder_2, self.tokenizer_2, True)):  # the second's text_embeds pool
            ids = np.array([e.ids for e in tok.encode_batch(prompts)], dtype=np.int64)
            outs = model.run_outputs([self.penultimate[model.name], *["text_embeds"] * pools], {"input_ids": ids},
                                     ["input_ids"])
            self._done_with(model)
            states.append(outs[0])
            pooled = outs[1] if pools else pooled
        time_ids = np.tile(np.array([height, width, 0, 0, height, width], np.float32), (len(prompts), 1))
        return {"encoder_hidden_states": np.concatenate(states, axis=-1), "text_embeds": pooled, "time_ids": time_ids}

    def predict_noise(self, latents: np.ndarray, t: int, text: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
        """UNet output (B, C, h, w) float32 for latents (B, C, h, w) and text (B, L, D), or the conditioning inputs
        of ``condition`` (each with B rows)."""
        ts = self.unet.inputs["timestep"]
        cond = text if isinstance(text, dict) else {"encoder_hidden_states": text}
        feeds = {"sample": latents, "timestep": timestep_array(t, ts.type, ts.shape), **cond}
        return self.unet.run("out_sample", feeds, ["sample", *cond])

    def decode(self, latents: np.ndarray) -> list[Image.Image]:
        """Latents (B, C, h, w) -> B PIL images (H = h * factor)."""
        images = self.vae_decoder.run(
            "sample", {"latent_sample": latents / self.scaling_factor}, ["latent_sample"]
        )  # (B, 3, H, W)
        return to_pil(images)

    def __call__(
        self,
        prompts: list[str],
        *,
        steps: int = 25,
        guidance: float = 7.5,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str = "",
        callback: Progress | None = None,
    ) -> list[Image.Image]:
        """One image per prompt; ``callback`` gets a ProgressEvent ("sample", step, steps) after each denoising step."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("prompts is empty; pass at least one prompt")
        height, width = self._resolve_size(height, width)
        scheduler = NumpyDDIMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps)

        batch = len(prompts)
        use_cfg = guidance > 1.0  # as diffusers: guidance <= 1 means no unconditional pass
        # (2B, L, D) unconditional first, as diffusers; (B, L, D) without guidance
        text = self.condition([negative_prompt] * batch + prompts if use_cfg else prompts, height, width)
        self._done_with(self.text_encoder)
        f = self.vae_scale_factor
        latents = initial_latents(seed, batch, self.latent_channels, height // f, width // f)
        latents = latents * np.float32(scheduler.init_noise_sigma)  # (B, C, h, w)

        self.io_binding_used = self.io_binding and self._can_bind()
        if self.io_binding_used:
            latents = self._bound_loop(latents, text, scheduler, guidance if use_cfg else 1.0, use_cfg, callback)
        else:
            latents = self._host_loop(latents, text, scheduler, guidance, use_cfg, callback)
        self._done_with(self.unet)
        images = self.decode(latents)
        self._done_with(self.vae_decoder)
        return images

    def _host_loop(self, latents: np.ndarray, text: dict[str, np.ndarray], scheduler: NumpyDDIMScheduler, guidance: float,
                   use_cfg: bool, callback: Progress | None) -> np.ndarray:
        """The denoising loop through host memory; returns the final latents."""
        batch, steps = len(latents), len(scheduler.timesteps)
        for i, t in enumerate(scheduler.timesteps):
            model_in = np.concatenate([latents, latents]) if use_cfg else latents
            noise = self.predict_noise(model_in, int(t), text)
            if use_cfg:
                uncond, cond = noise[:batch], noise[batch:]
                noise = uncond + np.float32(guidance) * (cond - uncond)
            latents = scheduler.step(noise, t, latents)
            if callback is not None:
                emit(callback, "sample", i + 1, steps)
        return latents

    # ------------------------------------------------------------------------------------------ IO binding

    def _can_bind(self) -> bool:
        """The bound loop feeds float32 tensors of any batch straight to the UNet and the step graph."""
        float32 = all(self.unet.inputs[n].type == "tensor(float)" for n in ("sample", *COND_INPUTS)
                      if n in self.unet.inputs)
        out_type = self.unet.output_types[self.unet.output_index("out_sample")]
        return float32 and out_type == "tensor(float)" and self.unet.fixed_batch("sample") is None

    def step_session(self) -> ort.InferenceSession:
        """The guidance + DDIM step graph (shipped with edgecp) on the UNet's providers."""
        if self._step_session is None:
            providers = self.unet.providers  # and the GPU it runs on: the bound tensors live there
            self._step_session = ort.InferenceSession(
                str(STEP_GRAPH), sess_options=session_options(), providers=providers,
                provider_options=[dict(self.provider_options.get(p, {})) for p in providers])
        return self._step_session

    def _bound_loop(self, latents: np.ndarray, text: dict[str, np.ndarray], scheduler: NumpyDDIMScheduler, guidance: float,
                    use_cfg: bool, callback: Progress | None) -> np.ndarray:
        """The denoising loop with every large tensor on ``self.device``; returns the final latents (host)."""
        dev, dev_id = self.device, self.device_id  # the UNet's GPU (its session's device_id), never a fixed 0
        unet, step = self.unet.session, self.step_session()
        out_name = self.unet.output_names[self.unet.output_index("out_sample")]
        ts = self.unet.inputs["timestep"]
        cond_v = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v, dtype=np.float32), dev, dev_id)
                  for k, v in text.items()}
        lat_v = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(latents), dev, dev_id)
        model_in = np.concatenate([latents, latents]) if use_cfg else latents
        in_v = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(model_in), dev, dev_id)
        steps = len(scheduler.timesteps)
        for i, t in enumerate(scheduler.timesteps):
            io = unet.io_binding()
            io.bind_ortvalue_input("sample", in_v)
            io.bind_cpu_input("timestep", timestep_array(int(t), ts.type, ts.shape))
            for k, v in cond_v.items():
                io.bind_ortvalue_input(k, v)
            io.bind_output(out_name, dev, dev_id)
            unet.run_with_iobinding(io)
            noise_v = io.get_outputs()[0]
            coef, clip = scheduler.step_coefficients(int(t))
            sio = step.io_binding()
            sio.bind_ortvalue_input("noise", noise_v)
            sio.bind_ortvalue_input("latents", lat_v)
            sio.bind_cpu_input("coef", np.append(coef, np.float32(guidance)).astype(np.float32))
            sio.bind_cpu_input("clip", clip)
            sio.bind_output("latents_out", dev, dev_id)
            sio.bind_output("model_in", dev, dev_id)
            step.run_with_iobinding(sio)
            lat_v, in_v = sio.get_outputs()
            if callback is not None:
                emit(callback, "sample", i + 1, steps)
        return lat_v.numpy()
