"""Validating and reading the user's images. Everything is checked before anything is written."""

from __future__ import annotations

import warnings
from pathlib import Path

from edgecp.errors import EdgecpError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
MIN_SIDE = 32
MAX_PIXELS = 64_000_000


def expand_image_args(args: list[str | Path]) -> list[Path]:
    """Files as given; folders expanded to the image files they hold (sorted). Errors name the path."""
    out: list[Path] = []
    for a in args:
        p = Path(a).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise EdgecpError(
                    f"folder '{a}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): pass image files or a folder of them"
                )
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise EdgecpError(f"image '{a}' does not exist: check the path")
    if not out:
        raise EdgecpError("no images given: pass at least one image file or folder")
    seen: set[Path] = set()
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]


def validate_image(path: Path) -> tuple[int, int]:
    """Decode the whole file; return (width, height) or raise naming the file and the rule it breaks."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                w, h = im.size
    except Image.DecompressionBombWarning:
        raise EdgecpError(f"image '{path}' is too large to be a photo: resize it below {MAX_PIXELS} pixels") from None
    except Exception as e:
        raise EdgecpError(f"image '{path}' cannot be decoded ({type(e).__name__}): pass a PNG, JPEG or WebP file") from None
    if min(w, h) < MIN_SIDE:
        raise EdgecpError(f"image '{path}' is {w}x{h} px: images must be at least {MIN_SIDE} px on each side")
    if w * h > MAX_PIXELS:
        raise EdgecpError(f"image '{path}' is {w}x{h} px: resize it below {MAX_PIXELS} pixels")
    return w, h


def validate_images(args: list[str | Path]) -> list[Path]:
    paths = expand_image_args(args)
    for p in paths:
        validate_image(p)
    return paths


def load_square(path: Path, size: int):
    """RGB image, shorter side resized to `size`, centre-cropped: a float tensor (3, size, size) in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        im = ImageOps.fit(im, (size, size), method=Image.Resampling.BICUBIC)
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
