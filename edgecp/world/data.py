"""The tiny world's captioned images, drawn from a seed (numpy + Pillow; scikit-image only for its photos).

Two kinds of 64x64 RGB example:

- **scenes** (85 %): one group of 1-3 equal shapes (circle, square, triangle, star, ring, cross, diamond,
  hexagon) of one colour, size (small / large) and pattern (plain, striped, dotted, checkered) at one
  position (left, right, top, bottom, center), or (12 % of scenes) two single shapes side by side
  ("a red circle on the left and a blue square on the right"), on a background (a plain colour, a gradient,
  noise, grass under a sky, a beach). The caption is built from exactly the drawn attributes, with some
  paraphrase variety ("a photo of two small red circles on the left, blue background", "a large blue striped
  star in the center on a noisy gray background", ...); a few words (size, position, background) are
  sometimes left out, never contradicted.
- **photos** (15 %): random crops of the photos bundled with scikit-image under captions that name what they
  show ("a photo of bricks", "a photo of coins", "a photo of a person" for the LFW faces), and the bare
  caption "a photo" for some of them. The photos reserved as personalization concepts (:data:`RESERVED`, plus
  ``cat``, which is the same picture as ``chelsea``) are never loaded.

Example ``i`` of seed ``s`` depends on ``(s, i)`` only, so ``make_dataset(n, s)`` is a prefix of
``make_dataset(m, s)`` for ``n <= m`` and of the stream :func:`iter_batches` (``s``, start 0).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from skimage import data as skdata

from edgecp import seeds

__all__ = [
    "RESERVED",
    "EXCLUDED_PHOTOS",
    "PHOTO_CAPTIONS",
    "SIZE",
    "SHAPES",
    "COLOURS",
    "PATTERNS",
    "POSITIONS",
    "SIZES",
    "COUNTS",
    "BACKGROUNDS",
    "PHOTO_FRACTION",
    "PAIR_FRACTION",
    "SAMPLE_CAPTIONS",
    "Group",
    "Scene",
    "Example",
    "photo_sources",
    "make_example",
    "canonical_caption",
    "make_dataset",
    "iter_batches",
]

SIZE = 64  # pixels

# the six photos the benchmark personalizes (eval/sequences.py reads this list): never in the tiny world
RESERVED_PHOTOS: tuple[str, ...] = ("chelsea", "coffee", "rocket", "astronaut", "horse", "stereo_motorcycle")
RESERVED = frozenset(RESERVED_PHOTOS)
"""scikit-image photos reserved as personalization concepts: never part of the pretraining world."""
EXCLUDED_PHOTOS = RESERVED | {"cat"}  # skimage.data.cat() is chelsea under another name

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon")
PLURAL = {s: s + "s" for s in SHAPES} | {"cross": "crosses"}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 40),
    "purple": (130, 50, 170),
    "orange": (245, 135, 25),
    "pink": (245, 135, 190),
    "brown": (115, 70, 35),
    "white": (242, 242, 242),
    "black": (18, 18, 18),
    "gray": (128, 128, 128),
}
PATTERNS = ("plain", "striped", "dotted", "checkered")
POSITIONS = ("left", "right", "top", "bottom", "center")
SIZES = ("small", "large")
COUNTS = {1: "one", 2: "two", 3: "three"}
BACKGROUNDS = ("plain", "gradient", "noise", "grass", "beach")
PHOTO_FRACTION = 0.15
PAIR_FRACTION = 0.12

# scikit-image photos (names in skimage.data) and what their captions call them
PHOTO_CAPTIONS: dict[str, tuple[str, ...]] = {
    "brick": ("a photo of bricks", "a photo of a brick wall"),
    "grass": ("a photo of grass",),
    "gravel": ("a photo of gravel", "a photo of stones"),
    "camera": ("a photo of a man with a camera", "a photo of a person with a camera"),
    "coins": ("a photo of coins",),
    "moon": ("a photo of the moon",),
    "page": ("a photo of a page of text", "a photo of a printed page"),
    "text": ("a photo of text", "a photo of letters"),
    "immunohistochemistry": ("a microscope image of stained tissue",),
    "retina": ("a photo of a retina", "a photo of an eye fundus"),
    "colorwheel": ("a color wheel", "a photo of a color wheel"),
    "logo": ("a logo", "a photo of a logo"),
    "hubble_deep_field": ("a photo of galaxies", "a photo of galaxies in space"),
    "clock": ("a photo of a clock",),
    "cell": ("a microscope image of a cell",),
    "checkerboard": ("a checkerboard", "a black and white checkerboard"),
    "binary_blobs": ("black and white blobs", "a picture of black and white blobs"),
    "lfw_subset": ("a photo of a person", "a photo of a face", "a photo of a person's face"),
}
GRAYSCALE = {"brick", "grass", "gravel", "camera", "coins", "moon", "page", "text", "clock", "cell", "lfw_subset"}
BARE_PHOTO_P = 0.15  # share of photo examples captioned just "a photo"

SAMPLE_CAPTIONS = (
    "a photo of a large red circle in the center, white background",
    "a photo of a large blue square in the center, yellow background",
    "a photo of a large yellow star in the center, blue background",
    "a photo of two small white circles on the left, black background",
    "a photo of a large green triangle on the right, white background",
    "a photo of a large orange ring at the top, grass and sky background",
    "a photo of bricks",
    "a photo of the moon",
)
"""Fixed captions for sample grids: one per row of ``tools/train_tiny_world.py``'s ``samples.png``."""

_POS_ANCHOR = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
               "center": (0.5, 0.5)}
_POS_PHRASES = {"left": ("on the left",), "right": ("on the right",), "top": ("at the top",),
                "bottom": ("at the bottom",), "center": ("in the center", "in the middle")}
_RADIUS = {("small", 1): (5, 7), ("small", 2): (5, 7), ("small", 3): (5, 7),
           ("large", 1): (11, 15), ("large", 2): (10, 12)}  # no three large shapes: they do not fit
_PAIR_RADIUS = {"small": (5, 8), "large": (10, 12)}
# reference colours of the scenic backgrounds: a shape must stand out from all of them
_SCENIC_REFS = {"grass": ((60, 140, 50), (150, 190, 240)), "beach": ((150, 190, 240), (30, 90, 170), (220, 200, 150))}
_MIN_CONTRAST = 100.0
_SCENE_TEMPLATES = (  # {g}: the objects with their positions, {bg}: the background noun phrase
    ("a photo of {g}, {bg}", 4),
    ("a photo of {g} on a {bg}", 2),
    ("{g} on a {bg}", 1),
    ("{g}, {bg}", 1),
    ("an image of {g}, {bg}", 1),
    ("a picture of {g} on a {bg}", 1),
    ("a {bg} with {g}", 1),
)
_NO_BG_TEMPLATES = (("a photo of {g}", 3), ("{g}", 1), ("an image of {g}", 1))
_P_DROP = {"size": 0.15, "position": 0.1, "background": 0.1, "pattern": 0.05}


@dataclass(frozen=True)
class Group:
    """``count`` equal shapes drawn around one position."""

    shape: str
    colour: str
    size: str
    pattern: str
    count: int
    position: str


@dataclass(frozen=True)
class Scene:
    """What an example shows: ``kind`` is "shapes" or "photo"."""

    kind: str
    groups: tuple[Group, ...] = ()
    background: str | None = None  # one of BACKGROUNDS
    bg_colour: str | None = None  # for plain / gradient / noise backgrounds
    photo: str | None = None  # the skimage.data name for photos


@dataclass
class Example:
    image: np.ndarray  # (64, 64, 3) uint8
    caption: str
    scene: Scene
    mask: np.ndarray = field(repr=False)  # (64, 64) uint8: 0 background, g+1 where group g covers the pixel


# ----------------------------------------------------------------------------------------------------------
# precomputed pieces: shape alpha masks, pattern masks, noise banks, photo crops
# ----------------------------------------------------------------------------------------------------------

def _unit_polygon(shape: str) -> list[list[tuple[float, float]]]:
    """Polygons in unit coordinates (x right, y down, shape within [-1, 1]^2); rings are handled apart."""
    if shape == "square":
        return [[(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)]]
    if shape == "triangle":
        return [[(0.0, -0.95), (0.98, 0.75), (-0.98, 0.75)]]
    if shape == "diamond":
        return [[(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)]]
    if shape == "hexagon":
        return [[(np.cos(a), np.sin(a)) for a in np.arange(6) * np.pi / 3]]
    if shape == "star":
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return [list(zip(rad * np.cos(ang), rad * np.sin(ang)))]
    if shape == "cross":
        w = 0.3
        return [[(-w, -0.95), (w, -0.95), (w, 0.95), (-w, 0.95)], [(-0.95, -w), (0.95, -w), (0.95, w), (-0.95, w)]]
    raise ValueError(shape)


@functools.cache
def _alpha(shape: str, r: int) -> np.ndarray:
    """Anti-aliased coverage (2r+1, 2r+1) float32 in [0, 1] of `shape` with radius `r` pixels (4x supersampled)."""
    ss, side = 4, 2 * r + 1
    big = Image.new("L", (side * ss, side * ss), 0)
    d = ImageDraw.Draw(big)
    half = (r + 0.5) * ss

    def px(u: float, v: float) -> tuple[float, float]:
        return (half + u * half, half + v * half)

    if shape in ("circle", "ring"):
        d.ellipse([px(-1, -1), px(1, 1)], fill=255)
        if shape == "ring":
            d.ellipse([px(-0.55, -0.55), px(0.55, 0.55)], fill=0)
    else:
        for poly in _unit_polygon(shape):
            d.polygon([px(u, v) for u, v in poly], fill=255)
    a = np.asarray(big.resize((side, side), Image.Resampling.BOX), dtype=np.float32) / 255.0
    a.setflags(write=False)
    return a


@functools.lru_cache(maxsize=1)
def _patterns() -> dict[str, list[np.ndarray]]:
    """Pattern masks over the canvas (bool, (64, 64)): True where the pattern's second colour shows."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    out: dict[str, list[np.ndarray]] = {"striped": [], "dotted": [], "checkered": []}
    for period in (5, 6):
        for phase in range(0, period, 2):
            out["striped"] += [((yy + phase) % period) < period // 2, ((xx + phase) % period) < period // 2,
                               ((xx + yy + phase) % (period + 1)) < (period + 1) // 2,
                               ((xx - yy + phase + 64) % (period + 1)) < (period + 1) // 2]
            out["checkered"].append((((xx + phase) // period) + ((yy + phase) // period)) % 2 == 0)
            c = period / 2.0
            dx = (xx + phase) % period - c + 0.5
            dy = (yy + phase) % period - c + 0.5
            out["dotted"].append(dx * dx + dy * dy <= (period * 0.28) ** 2)
    return out


@functools.lru_cache(maxsize=1)
def _noise_banks() -> tuple[np.ndarray, np.ndarray]:
    """Fixed noise fields to slice from: fine N(0, 1) (16, 96, 96, 3) and coarse smooth N(0, ~1) (16, 96, 96)."""
    rng = seeds.numpy_stream(seeds.WORLD_NOISE)
    fine = rng.standard_normal((16, 96, 96, 3)).astype(np.float32)
    coarse = np.stack([
        np.asarray(Image.fromarray(rng.standard_normal((12, 12)).astype(np.float32)).resize(
            (96, 96), Image.Resampling.BICUBIC)) for _ in range(16)
    ]).astype(np.float32)
    coarse /= coarse.std()
    return fine, coarse


@functools.lru_cache(maxsize=1)
def _ramps() -> list[np.ndarray]:
    t = np.linspace(0.0, 1.0, SIZE, dtype=np.float32)
    v = np.broadcast_to(t[:, None], (SIZE, SIZE))
    h = np.broadcast_to(t[None, :], (SIZE, SIZE))
    dg = (v + h) / 2
    return [np.ascontiguousarray(x)[..., None] for x in (v, 1 - v, h, 1 - h, dg, 1 - dg)]


def _load_photo(name: str) -> list[np.ndarray]:
    """A bundled photo as a list of (H, W, 3) uint8 arrays (several for the LFW faces / blobs)."""
    if name in EXCLUDED_PHOTOS:
        raise ValueError(f"'{name}' is reserved as a personalization concept")
    if name == "lfw_subset":
        faces = skdata.lfw_subset()[:100]  # the first 100 are faces, the rest are not
        return [np.repeat((f * 255).round().astype(np.uint8)[..., None], 3, -1) for f in faces]
    if name == "binary_blobs":
        return [np.repeat((skdata.binary_blobs(length=192, blob_size_fraction=0.12, rng=k) * 225 + 15)
                          .astype(np.uint8)[..., None], 3, -1) for k in range(4)]
    img = getattr(skdata, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, -1)
    if img.shape[-1] == 4:  # the logo: composite on white
        a = img[..., 3:4].astype(np.float32) / 255.0
        img = (img[..., :3] * a + 255 * (1 - a)).round()
    return [np.ascontiguousarray(img[..., :3], dtype=np.uint8)]


@functools.lru_cache(maxsize=1)
def _photo_pool() -> dict[str, list[np.ndarray]]:
    """For each available photo: resized copies whose shorter side is 64 / f, f = 1, 0.6, 0.35 of the view."""
    pool: dict[str, list[np.ndarray]] = {}
    for name in PHOTO_CAPTIONS:
        try:
            arrays = _load_photo(name)
        except Exception:  # a photo that needs an optional download (pooch) in this scikit-image: skip it
            continue
        views = []
        for a in arrays:
            im = Image.fromarray(a)
            short = min(im.size)
            fracs = (1.0,) if short < 64 else (1.0, 0.6, 0.35)
            for f in fracs:
                target = max(SIZE, int(round(SIZE / f)))
                if name != "lfw_subset" and target > short:
                    continue  # never upsample a view of a real photo beyond its resolution... except tiny faces
                s = target / short
                views.append(np.asarray(im.resize((max(SIZE, round(im.width * s)), max(SIZE, round(im.height * s))),
                                                  Image.Resampling.LANCZOS if s < 1 else Image.Resampling.BICUBIC)))
        if views:
            pool[name] = views
    return pool


def photo_sources() -> tuple[str, ...]:
    """The scikit-image photos this installation provides to the world (never one of :data:`EXCLUDED_PHOTOS`)."""
    return tuple(_photo_pool())


# ----------------------------------------------------------------------------------------------------------
# drawing
# ----------------------------------------------------------------------------------------------------------

def _dist(a, b) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


def _choice(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _weighted(rng: np.random.Generator, items):
    w = np.array([x[1] for x in items], dtype=np.float64)
    return items[int(rng.choice(len(items), p=w / w.sum()))][0]


def _jittered(rng: np.random.Generator, name: str, amount: float = 14.0) -> np.ndarray:
    return np.clip(np.array(COLOURS[name], np.float32) + rng.uniform(-amount, amount, 3), 0, 255).astype(np.float32)


def _noise(rng: np.random.Generator, coarse: bool = False) -> np.ndarray:
    fine_bank, coarse_bank = _noise_banks()
    k, y, x = int(rng.integers(16)), int(rng.integers(33)), int(rng.integers(33))
    if coarse:
        return coarse_bank[k, y:y + SIZE, x:x + SIZE, None]
    return fine_bank[k, y:y + SIZE, x:x + SIZE]


def _background(rng: np.random.Generator, kind: str, colour: str | None) -> np.ndarray:
    if kind == "plain":
        img = np.broadcast_to(_jittered(rng, colour), (SIZE, SIZE, 3)) + 2.0 * _noise(rng)
    elif kind == "gradient":
        c1 = _jittered(rng, colour)
        towards = 255.0 if colour in ("black", "brown", "purple", "blue") or rng.random() < 0.3 else 0.0
        c2 = c1 + float(rng.uniform(0.4, 0.6)) * (towards - c1)
        img = c1 + _choice(rng, _ramps()) * (c2 - c1) + 2.0 * _noise(rng)
    elif kind == "noise":
        sigma = float(rng.uniform(22, 38))
        img = _jittered(rng, colour) + sigma * (0.6 * _noise(rng) + 0.8 * _noise(rng, coarse=True))
    elif kind == "grass":
        horizon = int(rng.integers(34, 47))
        t = np.linspace(0, 1, horizon, dtype=np.float32)[:, None, None]
        sky = (1 - t) * np.array([95, 150, 225], np.float32) + t * np.array([195, 220, 245], np.float32)
        img = np.empty((SIZE, SIZE, 3), np.float32)
        img[:horizon] = sky + rng.uniform(-10, 10, 3).astype(np.float32)
        grass = np.array([60, 140, 50], np.float32) + rng.uniform(-12, 12, 3).astype(np.float32)
        g = grass + 18 * _noise(rng, coarse=True) + 14 * _noise(rng)
        img[horizon:] = g[horizon:] * np.linspace(1.0, 0.75, SIZE - horizon, dtype=np.float32)[:, None, None]
    elif kind == "beach":
        h1, h2 = int(rng.integers(18, 27)), int(rng.integers(36, 45))
        img = np.empty((SIZE, SIZE, 3), np.float32)
        t = np.linspace(0, 1, h1, dtype=np.float32)[:, None, None]
        img[:h1] = (1 - t) * np.array([110, 165, 230], np.float32) + t * np.array([190, 215, 245], np.float32)
        waves = np.array([30, 90, 170], np.float32) + 20 * _noise(rng, coarse=True) * np.array([0.3, 0.6, 1.0], np.float32)
        img[h1:h2] = waves[h1:h2] + 6 * _noise(rng)[h1:h2]
        sand = np.array([222, 200, 150], np.float32) + rng.uniform(-10, 10, 3).astype(np.float32)
        img[h2:] = (sand + 8 * _noise(rng) + 6 * _noise(rng, coarse=True))[h2:]
    else:
        raise ValueError(kind)
    out = np.empty((SIZE, SIZE, 3), np.float32)
    out[...] = img
    return out


def _centres(rng: np.random.Generator, g: Group, r: int) -> list[tuple[int, int]]:
    ax, ay = _POS_ANCHOR[g.position]
    ax, ay = ax * SIZE + rng.uniform(-3, 3), ay * SIZE + rng.uniform(-3, 3)
    d = 2 * r + float(rng.uniform(3, 6))
    if g.position in ("left", "right"):
        axis = "v"
    elif g.position in ("top", "bottom"):
        axis = "h"
    else:
        axis = "v" if rng.random() < 0.5 else "h"
    if g.count == 1:
        offs = [(0.0, 0.0)]
    elif g.count == 2:
        offs = [(-d / 2, 0.0), (d / 2, 0.0)]
    elif rng.random() < 0.5:
        offs = [(-d, 0.0), (0.0, 0.0), (d, 0.0)]
    else:  # a little triangle of three
        h = d * 0.45
        offs = [(-d / 2, h), (d / 2, h), (0.0, -h)]
    if axis == "v":
        offs = [(b, a) for a, b in offs]
    lo, hi = r + 1, SIZE - r - 2
    return [(int(np.clip(round(ax + ox), lo, hi)), int(np.clip(round(ay + oy), lo, hi))) for ox, oy in offs]


def _paint(img: np.ndarray, mask: np.ndarray, label: int, rng: np.random.Generator, g: Group, r: int) -> None:
    alpha = _alpha(g.shape, r)
    colour = _jittered(rng, g.colour)
    if g.pattern != "plain":
        second = np.array((18, 18, 18) if g.colour in ("white", "yellow", "pink", "gray") else (242, 242, 242),
                          np.float32)
        pat = _choice(rng, _patterns()[g.pattern])
    side = 2 * r + 1
    for cx, cy in _centres(rng, g, r):
        x0, y0 = cx - r, cy - r
        region = img[y0:y0 + side, x0:x0 + side]
        if g.pattern == "plain":
            fill = colour
        else:
            fill = np.where(pat[y0:y0 + side, x0:x0 + side, None], second, colour)
        region += alpha[..., None] * (fill - region)
        mask[y0:y0 + side, x0:x0 + side][alpha > 0.5] = label


def _sample_scene(rng: np.random.Generator) -> Scene:
    background = _weighted(rng, (("plain", 45), ("gradient", 15), ("noise", 15), ("grass", 15), ("beach", 10)))
    bg_colour = _choice(rng, tuple(COLOURS)) if background in ("plain", "gradient", "noise") else None
    refs = [COLOURS[bg_colour]] if bg_colour else list(_SCENIC_REFS[background])
    if background == "noise":
        refs = refs + [COLOURS["gray"]] if bg_colour in ("white", "black") else refs
    allowed = tuple(c for c, v in COLOURS.items() if all(_dist(v, ref) >= _MIN_CONTRAST for ref in refs))

    def group(position: str, count: int, size: str, shape: str | None = None, colour: str | None = None) -> Group:
        pattern = "plain"
        if size == "large" and rng.random() < 0.3:
            pattern = _choice(rng, PATTERNS[1:])
        return Group(shape or _choice(rng, SHAPES), colour or _choice(rng, allowed), size, pattern, count, position)

    if rng.random() < PAIR_FRACTION:
        positions = ("left", "right") if rng.random() < 0.6 else ("top", "bottom")
        a = group(positions[0], 1, _choice(rng, SIZES))
        while True:  # the second object differs from the first in shape or colour (or both)
            b = group(positions[1], 1, _choice(rng, SIZES))
            if (b.shape, b.colour) != (a.shape, a.colour):
                break
        groups = (a, b)
    else:
        count = int(_weighted(rng, ((1, 60), (2, 25), (3, 15))))
        size = "small" if count == 3 else _choice(rng, SIZES)
        groups = (group(_choice(rng, POSITIONS), count, size),)
    return Scene("shapes", groups, background, bg_colour)


def _group_phrase(rng: np.random.Generator, g: Group, drop: dict[str, bool]) -> str:
    words = ["a" if g.count == 1 and rng.random() < 0.8 else COUNTS[g.count]]
    if not drop["size"]:
        words.append(g.size)
    words.append(g.colour)
    if g.pattern != "plain" and not drop["pattern"]:
        words.append(g.pattern)
    words.append(g.shape if g.count == 1 else PLURAL[g.shape])
    if not drop["position"]:
        words.append(_choice(rng, _POS_PHRASES[g.position]))
    return " ".join(words)


def _bg_phrase(rng: np.random.Generator, scene: Scene) -> str:
    if scene.background == "plain":
        return f"{scene.bg_colour} background"
    if scene.background == "gradient":
        return f"{scene.bg_colour} gradient background"
    if scene.background == "noise":
        return f"noisy {scene.bg_colour} background"
    if scene.background == "grass":
        return _choice(rng, ("grass and sky background", "grass and sky background", "grassy field background"))
    return _choice(rng, ("beach background", "beach and sea background"))


def _scene_caption(rng: np.random.Generator, scene: Scene) -> str:
    drop = {k: bool(rng.random() < p) for k, p in _P_DROP.items()}
    if len(scene.groups) == 2:
        drop["position"] = False  # "a red circle and a blue square" would lose which is where: keep it
    g = " and ".join(_group_phrase(rng, grp, drop) for grp in scene.groups)
    if drop["background"]:
        text = _weighted(rng, _NO_BG_TEMPLATES).format(g=g)
    else:
        text = _weighted(rng, _SCENE_TEMPLATES).format(g=g, bg=_bg_phrase(rng, scene))
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def canonical_caption(scene: Scene, **overrides) -> str:
    """The full, fixed-wording caption of a one-group shapes scene, with attributes optionally replaced.

    ``canonical_caption(scene, colour="blue")`` describes the same scene with a blue shape: the evaluation
    compares an image against such one-attribute variants. Overrides: shape, colour, size, pattern, count,
    position (of the group) and bg_colour (plain / gradient / noise backgrounds only).
    """
    if scene.kind != "shapes" or len(scene.groups) != 1:
        raise ValueError("canonical captions are defined for one-group shapes scenes")
    g = scene.groups[0]
    a = {"shape": g.shape, "colour": g.colour, "size": g.size, "pattern": g.pattern, "count": g.count,
         "position": g.position, "bg_colour": scene.bg_colour}
    unknown = set(overrides) - set(a)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}")
    a.update(overrides)
    g2 = Group(a["shape"], a["colour"], a["size"], a["pattern"], int(a["count"]), a["position"])
    words = ["a" if g2.count == 1 else COUNTS[g2.count], g2.size, g2.colour]
    if g2.pattern != "plain":
        words.append(g2.pattern)
    words += [g2.shape if g2.count == 1 else PLURAL[g2.shape], _POS_PHRASES[g2.position][0]]
    bg_scene = Scene("shapes", (g2,), scene.background, a["bg_colour"])
    text = f"a photo of {' '.join(words)}, {_bg_phrase(seeds.numpy_stream(seeds.CAPTION_WORDING), bg_scene)}"
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _photo_example(rng: np.random.Generator) -> Example:
    pool = _photo_pool()
    names = tuple(pool)
    name = _choice(rng, names)
    view = _choice(rng, pool[name])
    h, w = view.shape[:2]
    y, x = int(rng.integers(h - SIZE + 1)), int(rng.integers(w - SIZE + 1))
    crop = view[y:y + SIZE, x:x + SIZE].astype(np.float32)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = crop * float(rng.uniform(0.9, 1.1)) + float(rng.uniform(-8, 8))
    if rng.random() < BARE_PHOTO_P:
        caption = "a photo"
    else:
        caption = _choice(rng, PHOTO_CAPTIONS[name])
        if name in GRAYSCALE and caption.startswith("a photo of ") and rng.random() < 0.2:
            caption = "a black and white photo of " + caption[len("a photo of "):]
    image = np.clip(crop, 0, 255).round().astype(np.uint8)
    return Example(image, caption, Scene("photo", photo=name), np.zeros((SIZE, SIZE), np.uint8))


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(key=(int(seed) & (2**64 - 1)) << 64 | int(index)))


def make_example(seed: int, index: int, photo_fraction: float = PHOTO_FRACTION) -> Example:
    """Example `index` of the world drawn from `seed` (depends on nothing else)."""
    rng = _rng(seed, index)
    if photo_fraction > 0 and rng.random() < photo_fraction and _photo_pool():
        return _photo_example(rng)
    scene = _sample_scene(rng)
    img = _background(rng, scene.background, scene.bg_colour)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    for k, g in enumerate(scene.groups):
        lo, hi = _PAIR_RADIUS[g.size] if len(scene.groups) == 2 else _RADIUS[(g.size, g.count)]
        _paint(img, mask, k + 1, rng, g, int(rng.integers(lo, hi + 1)))
    image = np.clip(img, 0, 255).round().astype(np.uint8)
    return Example(image, _scene_caption(rng, scene), scene, mask)


def make_dataset(n: int, seed: int, *, start: int = 0, photo_fraction: float = PHOTO_FRACTION,
                 return_examples: bool = False):
    """`n` images (n, 64, 64, 3) uint8 and their captions: examples ``start .. start + n - 1`` of `seed`.

    With ``return_examples=True`` the third element is the list of :class:`Example` (scene, mask).
    """
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    captions: list[str] = []
    examples = []
    for i in range(n):
        ex = make_example(seed, start + i, photo_fraction)
        images[i] = ex.image
        captions.append(ex.caption)
        if return_examples:
            examples.append(ex)
    return (images, captions, examples) if return_examples else (images, captions)


def iter_batches(batch_size: int, seed: int, *, start: int = 0, stop: int | None = None,
                 photo_fraction: float = PHOTO_FRACTION) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Stream (images, captions) batches of examples ``start, start + 1, ...`` (forever unless `stop`)."""
    i = start
    while stop is None or i < stop:
        n = batch_size if stop is None else min(batch_size, stop - i)
        yield make_dataset(n, seed, start=i, photo_fraction=photo_fraction)
        i += n
