"""Benchmark concept sequences: ordered lists of concepts, each with training views and held-out target views.

Three sources, one API (:class:`Concept`, :class:`Sequence`):

- :data:`SIX_TASKS`: six real photos that ship with scikit-image (cat, coffee cup, rocket, astronaut, horse,
  motorcycle), a stand-in for paper 000's six-task Custom Concept sequence that needs no download.
- :func:`procedural_sequence`: up to hundreds of generated objects (shape x pattern x two colours), a stand-in
  for paper 000's 50-concept sequence (Sec. 4.2, Fig. 5).
- :func:`folder_sequence`: a user's own sequence, ``root/<task>/train/*.png`` and
  ``root/<task>/target/*.png``.

Held-out targets. Paper 000 measures MMD/KID/CLIP I2I against each concept's real target images. A bundled
photo is ONE photo, so true held-out photos do not exist: its targets are augmentations too, made disjoint
from the training views: crop boxes, flips and colour jitter come from a separate random stream per split, and
the box offsets are forced to different parities ((x0 + y0) even for train, odd for target), so no target crop
box can equal a training crop box whatever ``n`` and ``seed`` are. Targets therefore measure "the same object,
framed differently", which is weaker than a held-out photo; use :func:`folder_sequence` for real held-out
data.

Everything here is numpy + Pillow + scikit-image; nothing imports torch. Every draw is seeded, from a named
stream of :mod:`edgecp.seeds` (the concepts' views, the procedural picks).
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps
from skimage import data as skdata

from edgecp import seeds
from edgecp.images import IMAGE_SUFFIXES, fit_square, open_rgb
from edgecp.world.data import RESERVED_PHOTOS

__all__ = [
    "RESERVED_PHOTOS",
    "SIX_TASKS",
    "SPLITS",
    "Concept",
    "FolderSource",
    "PhotoSource",
    "ProceduralSource",
    "Sequence",
    "ViewSource",
    "folder_sequence",
    "procedural_sequence",
    "six_tasks",
]

SPLITS = ("train", "target")
DEFAULT_VIEWS = {"train": 6, "target": 8}
_SPLIT_STREAM = {"train": seeds.TRAIN_VIEWS, "target": seeds.TARGET_VIEWS}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_RESAMPLE = Image.Resampling.LANCZOS


# ----------------------------------------------------------------------------------------------------------
# Concept and Sequence
# ----------------------------------------------------------------------------------------------------------


class ViewSource(Protocol):
    """Where a concept's pixels come from: ``views(split, n, size, seed)`` -> RGB images of size x size."""

    def views(self, split: str, n: int | None, size: int, seed: int) -> list[Image.Image]: ...


@dataclass(frozen=True)
class Concept:
    """One task of a sequence: a token-safe ``name`` (``^[a-z][a-z0-9_]*$``), the ``class_word`` that prompts
    may put after the learned token ("a photo of <name> cat"), and the source of its views."""

    name: str
    class_word: str
    source: ViewSource = field(repr=False)

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(
                f"concept name '{self.name}' must match {_NAME_RE.pattern} (lowercase, token-safe)"
            )
        if not self.class_word.strip():
            raise ValueError(f"concept '{self.name}' needs a non-empty class word")

    def views(self, split: str, n: int | None = None, size: int = 64, seed: int = 0) -> list[Image.Image]:
        """``n`` RGB ``size`` x ``size`` images of ``split`` ("train" or "target").

        ``n=None`` means the default count (6 train, 8 target) for generated views and every file for a folder
        concept; a folder concept returns at most the files it has.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} but is '{split}'")
        if n is not None and n < 1:
            raise ValueError(f"n must be >= 1 but is {n}")
        if size < 8:
            raise ValueError(f"size must be >= 8 pixels but is {size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 but is {seed}")
        return self.source.views(split, n, size, seed)

    def train_views(self, n: int | None = None, size: int = 64, seed: int = 0) -> list[Image.Image]:
        """Training views (default 6): what ``add_concept`` learns from."""
        return self.views("train", n, size, seed)

    def target_views(self, n: int | None = None, size: int = 64, seed: int = 0) -> list[Image.Image]:
        """Held-out target views (default 8), disjoint from the training views: what metrics compare
        against."""
        return self.views("target", n, size, seed)


class Sequence(list[Concept]):
    """An ordered list of concepts, learned one after another. Names must be unique."""

    def __getitem__(self, index):  # a slice stays a Sequence (so ``SIX_TASKS[:3].write(...)`` works)
        got = super().__getitem__(index)
        return Sequence(got) if isinstance(index, slice) else got

    @property
    def names(self) -> list[str]:
        return [c.name for c in self]

    def write(
        self,
        folder: str | Path,
        *,
        n_train: int | None = None,
        n_target: int | None = None,
        size: int = 64,
        seed: int = 0,
    ) -> Path:
        """Write ``folder/<name>/{train,target}/NNN.png``, ``folder/<name>/class_word.txt`` and
        ``folder/order.txt`` (the task order), the layout :func:`folder_sequence` reads back. Returns
        ``folder``.

        Refuses to write into a task folder that already holds files, so stale images never mix in.
        """
        names = self.names
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"concept names must be unique in a sequence but {dupes} repeat")
        root = Path(folder)
        for concept in self:
            task = root / concept.name
            if task.exists() and any(task.iterdir()):
                raise FileExistsError(
                    f"'{task}' already exists and is not empty: write the sequence to a new folder"
                )
        root.mkdir(parents=True, exist_ok=True)
        for concept in self:
            task = root / concept.name
            for split, n in (("train", n_train), ("target", n_target)):
                out = task / split
                out.mkdir(parents=True, exist_ok=True)
                for k, img in enumerate(concept.views(split, n, size, seed)):
                    img.save(out / f"{k:03d}.png")
            (task / "class_word.txt").write_text(concept.class_word + "\n", encoding="utf-8")
        (root / "order.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
        return root


def _rng(seed: int, split: str, key: str) -> np.random.Generator:
    """A generator per (seed, split, concept): train and target never share a stream."""
    return seeds.numpy_stream(seed, _SPLIT_STREAM[split], zlib.crc32(key.encode()))


def _count(split: str, n: int | None) -> int:
    return DEFAULT_VIEWS[split] if n is None else n


# ----------------------------------------------------------------------------------------------------------
# The six scikit-image photos
# ----------------------------------------------------------------------------------------------------------

"""scikit-image ``data`` photos used as benchmark concepts; other generators (prior/pretraining images) must
not use them."""


def _horse_rgb(silhouette: np.ndarray) -> np.ndarray:
    """scikit-image's horse is a boolean silhouette (False = horse). Paint a brown horse under a pale sky
    above a strip of grass, with softened edges. (H, W) bool -> (H, W, 3) uint8."""
    h, w = silhouette.shape
    t = np.linspace(0.0, 1.0, h)[:, None, None]  # (H, 1, 1)
    sky = (1 - t) * np.array([150.0, 190.0, 235.0]) + t * np.array([225.0, 235.0, 245.0])  # (H, 1, 3)
    bg = np.broadcast_to(sky, (h, w, 3)).copy()
    bg[int(0.93 * h) :] = (105.0, 150.0, 75.0)
    shade = (1 - 0.35 * t) * np.array([120.0, 78.0, 45.0])  # (H, 1, 3), darker towards the hooves
    horse = np.broadcast_to(shade, (h, w, 3))
    mask = Image.fromarray((~silhouette).astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(1.0))
    a = np.asarray(mask, dtype=np.float64)[..., None] / 255.0  # (H, W, 1)
    return np.clip(a * horse + (1 - a) * bg, 0, 255).astype(np.uint8)


@functools.cache
def _photo(name: str) -> np.ndarray:
    """A bundled scikit-image photo as (H, W, 3) uint8 (read-only)."""
    if name not in RESERVED_PHOTOS:
        raise ValueError(f"unknown photo '{name}': expected one of {RESERVED_PHOTOS}")
    if name == "horse":
        img = _horse_rgb(skdata.horse())
    elif name == "stereo_motorcycle":
        img = skdata.stereo_motorcycle()[0]  # (left, right, disparity): the left view
    else:
        img = getattr(skdata, name)()
    img = np.ascontiguousarray(img[..., :3], dtype=np.uint8)
    img.setflags(write=False)
    return img


def _crop_box(rng: np.random.Generator, h: int, w: int, parity: int) -> tuple[int, int, int, int]:
    """A square box (x0, y0, x1, y1) of side 60-100% of the shorter side with ``(x0 + y0) % 2 == parity``."""
    short = min(h, w)
    while True:
        side = int(round(rng.uniform(0.6, 1.0) * short))
        x0 = int(rng.integers(0, w - side + 1))
        y0 = int(rng.integers(0, h - side + 1))
        if (x0 + y0) % 2 == parity:
            return x0, y0, x0 + side, y0 + side


def _jitter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Mild colour jitter: brightness, contrast and saturation each scaled by a factor in [0.9, 1.1]."""
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(float(rng.uniform(0.9, 1.1)))
    return img


@dataclass(frozen=True)
class PhotoSource:
    """Augmented views of one bundled photo: random square crops (60-100% of the shorter side), horizontal
    flips (p = 0.5) and mild colour jitter; train and target boxes never coincide (see the module
    docstring)."""

    photo: str

    def views(self, split: str, n: int | None, size: int, seed: int) -> list[Image.Image]:
        src = Image.fromarray(_photo(self.photo))
        rng = _rng(seed, split, self.photo)
        parity = 0 if split == "train" else 1
        out = []
        for _ in range(_count(split, n)):
            box = _crop_box(rng, src.height, src.width, parity)
            img = src.resize((size, size), _RESAMPLE, box=box)
            if rng.random() < 0.5:
                img = ImageOps.mirror(img)
            out.append(_jitter(img, rng))
        return out


_SIX = (
    ("cat", "cat", "chelsea"),
    ("cup", "cup", "coffee"),
    ("rocket", "rocket", "rocket"),
    ("astronaut", "astronaut", "astronaut"),
    ("horse", "horse", "horse"),
    ("motorcycle", "motorcycle", "stereo_motorcycle"),
)


def six_tasks() -> Sequence:
    """A fresh copy of the six-task photo sequence (cat, cup, rocket, astronaut, horse, motorcycle)."""
    return Sequence(Concept(name, word, PhotoSource(photo)) for name, word, photo in _SIX)


SIX_TASKS: Sequence = six_tasks()
"""The six-task sequence of scikit-image photos, in order. Treat as read-only; :func:`six_tasks` gives a
copy."""


# ----------------------------------------------------------------------------------------------------------
# Procedural concepts
# ----------------------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star", "cross", "crescent")
PATTERNS = ("solid", "stripes", "dots", "checker", "rings")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "orange": (240, 140, 20),
    "yellow": (235, 210, 30),
    "green": (40, 160, 60),
    "teal": (20, 150, 150),
    "blue": (40, 80, 210),
    "purple": (130, 50, 170),
    "pink": (235, 110, 170),
    "brown": (120, 75, 40),
    "black": (25, 25, 25),
}


@dataclass(frozen=True)
class ProceduralSource:
    """A generated object: ``shape`` filled with ``pattern`` in colours ``colour`` / ``accent`` ("solid"
    draws an ``accent`` border), the pattern's period ``1 / freq`` of the object and its angle fixed per
    concept. Each view draws it at a random position, scale (45-75% of the frame) and rotation (+-25 degrees)
    on a random pale, slightly noisy background."""

    shape: str
    pattern: str
    colour: str
    accent: str
    freq: int
    angle: float

    @property
    def key(self) -> str:
        return f"{self.shape}-{self.pattern}-{self.colour}-{self.accent}-{self.freq}-{self.angle:.1f}"

    def views(self, split: str, n: int | None, size: int, seed: int) -> list[Image.Image]:
        rng = _rng(seed, split, self.key)
        return [self._draw(rng, size) for _ in range(_count(split, n))]

    def _draw(self, rng: np.random.Generator, size: int) -> Image.Image:
        big = 2 * size  # render at 2x, then downsample: antialiased edges
        side = max(8, int(round(rng.uniform(0.45, 0.75) * big)))
        angle = float(rng.uniform(-25, 25))
        obj = _pattern(self, side).rotate(angle, Image.Resampling.BICUBIC)
        mask = _shape_mask(self.shape, side).rotate(angle, Image.Resampling.BILINEAR)
        canvas = Image.fromarray(_background(rng, big))
        x, y = (int(v) for v in rng.integers(0, big - side + 1, size=2))
        canvas.paste(obj, (x, y), mask)
        return canvas.resize((size, size), _RESAMPLE)


def _background(rng: np.random.Generator, side: int) -> np.ndarray:
    """A pale tinted background with a soft vertical gradient and faint noise: (side, side, 3) uint8."""
    top = rng.uniform(195, 245, size=3)
    bottom = top - rng.uniform(0, 30)
    t = np.linspace(0.0, 1.0, side)[:, None, None]  # (S, 1, 1)
    bg = (1 - t) * top + t * bottom + rng.normal(0, 4, size=(side, side, 3))  # (S, S, 3)
    return np.clip(bg, 0, 255).astype(np.uint8)


def _polygon(c: float, r: float, radii: list[float], start_deg: float = -90.0) -> list[tuple[float, float]]:
    """Points at angles evenly spaced from ``start_deg``, at distances ``r * radii[k]`` from centre (c, c)."""
    k = len(radii)
    pts = []
    for i, rad in enumerate(radii):
        a = math.radians(start_deg + 360.0 * i / k)
        pts.append((c + r * rad * math.cos(a), c + r * rad * math.sin(a)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, c: float, r: float, fill, cut) -> None:
    """Draw ``shape`` centred at (c, c) within radius ``r`` in colour ``fill``; ``cut`` paints the crescent's
    bite."""
    if shape == "circle":
        draw.ellipse((c - r, c - r, c + r, c + r), fill=fill)
    elif shape == "square":
        draw.polygon(_polygon(c, r, [1.0] * 4, start_deg=-45.0), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(c, r, [1.0] * 3), fill=fill)
    elif shape == "diamond":
        draw.polygon([(c, c - r), (c + 0.62 * r, c), (c, c + r), (c - 0.62 * r, c)], fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(c, r, [1.0] * 6), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(c, r, [1.0, 0.45] * 5), fill=fill)
    elif shape == "cross":
        a = 0.34 * r
        draw.rectangle((c - a, c - r, c + a, c + r), fill=fill)
        draw.rectangle((c - r, c - a, c + r, c + a), fill=fill)
    elif shape == "crescent":
        draw.ellipse((c - r, c - r, c + r, c + r), fill=fill)
        o = 0.45 * r
        draw.ellipse((c - r + o, c - r - 0.15 * r, c + r + o, c + r - 0.15 * r), fill=cut)
    else:
        raise ValueError(f"unknown shape '{shape}': expected one of {SHAPES}")


def _shape_mask(shape: str, side: int) -> Image.Image:
    """The shape's alpha mask, side x side (radius 0.45 side, so a rotation never clips it)."""
    mask = Image.new("L", (side, side), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, side / 2, 0.45 * side, 255, 0)
    return mask


def _pattern(spec: ProceduralSource, side: int) -> Image.Image:
    """The object's fill, side x side RGB, in object coordinates (it scales and rotates with the object)."""
    c1 = np.array(COLOURS[spec.colour], dtype=np.float64)
    c2 = np.array(COLOURS[spec.accent], dtype=np.float64)
    if spec.pattern == "solid":  # the colour inside an accent border
        inner, border = COLOURS[spec.colour], COLOURS[spec.accent]
        img = Image.new("RGB", (side, side), border)
        _draw_shape(ImageDraw.Draw(img), spec.shape, side / 2, 0.45 * side * 0.78, inner, border)
        return img
    period = side / spec.freq
    yy, xx = np.mgrid[:side, :side].astype(np.float64) - side / 2  # (S, S) each, centred
    th = math.radians(spec.angle)
    u = xx * math.cos(th) + yy * math.sin(th)
    v = -xx * math.sin(th) + yy * math.cos(th)
    if spec.pattern == "stripes":
        sel = np.floor(u / period) % 2 == 0
    elif spec.pattern == "checker":
        sel = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    elif spec.pattern == "dots":
        du = (u % period) - period / 2
        dv = (v % period) - period / 2
        sel = du**2 + dv**2 > (0.3 * period) ** 2
    elif spec.pattern == "rings":
        sel = np.floor(np.hypot(xx, yy) / (0.5 * period)) % 2 == 0
    else:
        raise ValueError(f"unknown pattern '{spec.pattern}': expected one of {PATTERNS}")
    rgb = np.where(sel[..., None], c1, c2)  # (S, S, 3)
    return Image.fromarray(rgb.astype(np.uint8))


def procedural_sequence(n: int = 50, seed: int = 0) -> Sequence:
    """``n`` distinct generated concepts "p00", "p01", ...: each a distinct (shape, pattern, colour, accent)
    combination drawn without replacement (8 shapes x 5 patterns x 10 x 9 colour pairs = 3600), with a pattern
    frequency (3-5 periods across the object) and angle of its own; class word = the shape's name."""
    combos = [
        (s, p, c1, c2) for s in SHAPES for p in PATTERNS for c1 in COLOURS for c2 in COLOURS if c1 != c2
    ]
    if not 1 <= n <= len(combos):
        raise ValueError(f"n must be in [1, {len(combos)}] but is {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0 but is {seed}")
    rng = seeds.numpy_stream(seed, seeds.PROCEDURAL_CONCEPTS)
    picks = rng.choice(len(combos), size=n, replace=False)
    width = max(2, len(str(n - 1)))
    seq = Sequence()
    for i, k in enumerate(picks):
        shape, pattern, colour, accent = combos[int(k)]
        spec = ProceduralSource(
            shape, pattern, colour, accent, freq=int(rng.integers(3, 6)), angle=float(rng.uniform(0, 180))
        )
        seq.append(Concept(f"p{i:0{width}d}", shape, spec))
    return seq


# ----------------------------------------------------------------------------------------------------------
# A user's folders
# ----------------------------------------------------------------------------------------------------------


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _load_square(path: Path, size: int) -> Image.Image:
    """The image, upright (EXIF), RGB, centre-cropped to a square and resized to size x size."""
    return fit_square(open_rgb(path), size, _RESAMPLE)


@dataclass(frozen=True)
class FolderSource:
    """Real images from disk: no augmentation, ``seed`` unused, files in sorted order, at most ``n``."""

    train: tuple[Path, ...]
    target: tuple[Path, ...]

    def views(self, split: str, n: int | None, size: int, seed: int) -> list[Image.Image]:
        paths = self.train if split == "train" else self.target
        return [_load_square(p, size) for p in (paths if n is None else paths[:n])]


def _token_name(folder_name: str) -> str:
    """A folder name made token-safe: lowercase, runs of other characters -> "_", a leading letter."""
    name = re.sub(r"[^a-z0-9]+", "_", folder_name.lower()).strip("_")
    return name if name[:1].isalpha() else f"c_{name}"


def _split_files(task: Path) -> tuple[list[Path], list[Path]]:
    """(train, target) files of one task folder: its train/ and target/ subfolders, or else its own images
    split 75/25 deterministically (every 4th file in sorted order is a target; the last one if fewer than
    4)."""
    train_dir, target_dir = task / "train", task / "target"
    if train_dir.is_dir() or target_dir.is_dir():
        out = []
        for d in (train_dir, target_dir):
            files = _images_in(d) if d.is_dir() else []
            if not files:
                raise ValueError(
                    f"folder '{d}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): a task with train/ "
                    "needs target/ too, each with at least one image"
                )
            out.append(files)
        return out[0], out[1]
    files = _images_in(task)
    if not files:
        raise ValueError(
            f"folder '{task}' holds no images: put them in '{task}/train' and '{task}/target', "
            f"or directly in '{task}' to split them 75/25"
        )
    if len(files) < 2:
        raise ValueError(f"folder '{task}' holds 1 image: at least 2 are needed to split train and target")
    target_idx = {i for i in range(len(files)) if i % 4 == 3} or {len(files) - 1}
    train = [f for i, f in enumerate(files) if i not in target_idx]
    target = [f for i, f in enumerate(files) if i in target_idx]
    return train, target


def folder_sequence(root: str | Path) -> Sequence:
    """A user's sequence from ``root/<task>/train/*`` and ``root/<task>/target/*`` (or ``root/<task>/*``,
    split 75/25). Task order: ``root/order.txt`` (one folder name per line) if present, else sorted folder
    names. Class word: ``root/<task>/class_word.txt`` if present, else "object". Names: folder names made
    token-safe. Errors name the folder at fault."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"sequence folder '{root}' does not exist or is not a folder")
    order = root / "order.txt"
    if order.is_file():
        task_names = [line.strip() for line in order.read_text(encoding="utf-8").splitlines() if line.strip()]
        for t in task_names:
            if not (root / t).is_dir():
                raise ValueError(f"'{order}' lists task '{t}' but folder '{root / t}' does not exist")
    else:
        task_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not task_names:
        raise ValueError(
            f"sequence folder '{root}' holds no task folders: expected '{root}/<task>/train/*.png' and "
            f"'{root}/<task>/target/*.png'"
        )
    seq = Sequence()
    seen: dict[str, str] = {}
    for t in task_names:
        task = root / t
        name = _token_name(t)
        if name in seen:
            raise ValueError(f"folders '{root / seen[name]}' and '{task}' both map to concept name '{name}'")
        seen[name] = t
        train, target = _split_files(task)
        word_file = task / "class_word.txt"
        word = word_file.read_text(encoding="utf-8").strip() if word_file.is_file() else ""
        seq.append(Concept(name, word or "object", FolderSource(tuple(train), tuple(target))))
    return seq
