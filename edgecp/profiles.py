"""Device profiles: what an export targets (precision, execution providers, parity tolerance).

Shipped profiles live in `profiles/*.toml` at the top of the project; a path to a .toml file works too.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path

from edgecp.errors import EdgecpError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# profiles/ at the top of a checkout; in an installed wheel, the copies edgecp/shipped_profiles (a link to it in git)
_CHECKOUT = Path(__file__).resolve().parent.parent / "profiles"
PROFILES_DIR = _CHECKOUT if _CHECKOUT.is_dir() else Path(__file__).resolve().parent / "shipped_profiles"
PRECISIONS = ("fp32", "fp16", "int8")
QUANTIZATIONS = ("dynamic", "static")


@dataclass(frozen=True)
class DeviceProfile:
    """One target device. Tensor gate: every exported model must satisfy max|onnx - torch| <= atol + rtol * max|torch|.
    Image gate: one image through the export and through PyTorch (same prompt, seed, `gate_steps`) must agree to a
    PSNR of at least `min_psnr` dB (0 turns the gate off)."""

    name: str
    description: str
    precision: str = "fp32"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    opset: int = 17
    atol: float = 1e-3
    rtol: float = 0.0
    vae_encoder: bool = True
    default_steps: int = 25
    min_psnr: float = 30.0  # image gate: dB between the export's and PyTorch's image (same prompt, seed, steps)
    gate_steps: int = 4     # denoising steps of the image gate
    gate_size: int = 256    # the gate image's side in pixels, at most the base's resolution (SD1.5: 256, not 512)
    optimize: bool = False  # onnxruntime.transformers' SD fusions (attention, GroupNorm, ...) before fp16/int8
    # int8 only, tried in order until one passes both gates: "static" (QDQ: Conv, MatMul and Gemm with per-channel int8
    # weights and uint8 activations whose ranges come from a calibration run) and/or "dynamic" (MatMul/Gemm weights;
    # activations quantized at run time). A string is one variant.
    quantization: tuple[str, ...] = ("dynamic",)
    calibration_steps: int = 8  # static int8: denoising steps per calibration prompt (base and concept prompts)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise EdgecpError(f"profile '{self.name}': precision '{self.precision}' is unknown: use one of {', '.join(PRECISIONS)}")
        if not self.providers:
            raise EdgecpError(f"profile '{self.name}': providers is empty: e.g. providers = [\"CPUExecutionProvider\"]")
        if self.atol < 0 or self.rtol < 0:
            raise EdgecpError(f"profile '{self.name}': atol and rtol must be >= 0")
        if not 14 <= self.opset <= 23:
            raise EdgecpError(f"profile '{self.name}': opset {self.opset} must be between 14 and 23")
        if self.min_psnr < 0:
            raise EdgecpError(f"profile '{self.name}': min_psnr {self.min_psnr} must be >= 0 dB (0 turns the image gate off)")
        if self.gate_size < 8:
            raise EdgecpError(f"profile '{self.name}': gate_size {self.gate_size} must be >= 8 pixels")
        if self.optimize and self.precision == "int8":
            raise EdgecpError(f"profile '{self.name}': optimize = true works with fp32 and fp16 only (the int8 quantizer "
                              "cannot infer the shapes of onnxruntime's fused operators): remove optimize")
        quant = (self.quantization,) if isinstance(self.quantization, str) else tuple(self.quantization)
        bad = [q for q in quant if q not in QUANTIZATIONS]
        if bad or not quant or len(set(quant)) < len(quant):
            raise EdgecpError(f"profile '{self.name}': quantization {list(quant)} must list some of "
                              f"{', '.join(QUANTIZATIONS)}, each once (tried in order), e.g. [\"static\", \"dynamic\"]")
        if quant != ("dynamic",) and self.precision != "int8":
            raise EdgecpError(f"profile '{self.name}': quantization needs precision = \"int8\" (not "
                              f"{self.precision}): set precision or remove quantization")
        object.__setattr__(self, "quantization", quant)
        if self.calibration_steps < 1:
            raise EdgecpError(f"profile '{self.name}': calibration_steps {self.calibration_steps} must be >= 1")
        if self.gate_steps < 1:
            raise EdgecpError(f"profile '{self.name}': gate_steps {self.gate_steps} must be >= 1")
        object.__setattr__(self, "providers", tuple(self.providers))

    def tolerance(self, ref_max_abs: float) -> float:
        return self.atol + self.rtol * ref_max_abs


def parse_profile(text: str, source: str) -> DeviceProfile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise EdgecpError(f"profile '{source}' is not valid TOML: {e}") from None
    valid = {f.name for f in fields(DeviceProfile)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise EdgecpError(f"profile '{source}': unknown key '{unknown[0]}': valid keys are {', '.join(sorted(valid))}")
    for key in ("name", "description"):
        if key not in data:
            raise EdgecpError(f"profile '{source}' lacks '{key}'")
    try:
        return DeviceProfile(**data)
    except TypeError as e:
        raise EdgecpError(f"profile '{source}': {e}") from None


def profile_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PROFILES_DIR.glob("*.toml"))}


def load_profile(name_or_path: str) -> DeviceProfile:
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.is_file():
        return parse_profile(p.read_text(), str(p))
    files = profile_files()
    if name_or_path not in files:
        raise EdgecpError(f"unknown profile '{name_or_path}': shipped profiles are {', '.join(files)} (or pass a .toml path)")
    prof = parse_profile(files[name_or_path].read_text(), name_or_path)
    if prof.name != name_or_path:
        raise EdgecpError(f"profile file '{files[name_or_path]}' names itself '{prof.name}': make name match the file name")
    return prof
