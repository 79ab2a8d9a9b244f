"""Validating, reading and purging the user's images. Everything is checked before anything is written.

Choices the issue left to us (also in docs/architecture.md):
- Duplicates are found by content (sha256), so hard links, copies and a file given twice count once.
- At most MAX_IMAGES images per concept (the papers use 3-20); more is refused with the number and the limit.
- Transparent images are composited on mid grey (128, 128, 128), which is 0 in the model's [-1, 1] pixel range:
  the neutral value, neither the white nor the black a photo editor might have hidden under the alpha.
- 16- and 32-bit greyscale (PIL modes I;16*, I, F) are scaled to 8 bits by their bit depth, not clipped.
- `--purge-source` deletes every file given (a folder: every image file in it, as listed before training), byte-
  identical copies included: a copy is the trained photo. A symbolic link: the photo it points to and the link. The
  report names every path deleted and every file kept, with why: a file whose bytes changed since it was read, one
  that could not be deleted, and the other hard links of a deleted photo (found in the folders of the given files;
  where they are elsewhere, their number).
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from edgecp.errors import EdgecpError
from edgecp.integrity import sha256_file

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
MIN_SIDE = 32
MAX_PIXELS = 64_000_000
MAX_IMAGES = 100
NEUTRAL_GREY = (128, 128, 128)


def expand_image_args(args: list[str | Path]) -> list[Path]:
    """Files as given; folders expanded to the image files they hold (sorted), each file once. Errors name the path."""
    out = given_files(args)
    seen: set[Path] = set()
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]


def given_files(args: list[str | Path]) -> list[Path]:
    """Every file the arguments name: files as given, folders expanded to their image files (sorted); a file named
    twice, or a link beside its target, stays in (what `--purge-source` deletes). Errors name the path."""
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
    return out


def dedupe_by_content(paths: list[Path]) -> list[Path]:
    """The first of each set of files with the same bytes (hard links, copies)."""
    seen: set[str] = set()
    out = []
    for p in paths:
        h = sha256_file(p)
        if h not in seen:
            seen.add(h)
            out.append(p)
    return out


def validate_image(path: Path) -> tuple[int, int]:
    """Decode the whole file; return (width, height) or raise naming the file and the rule it breaks."""
    too_large = f"image '{path}' is too large: resize it to at most {MAX_PIXELS:,} pixels (e.g. 8000x8000)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size  # from the header: refuse a huge image before decoding it
                if w * h > MAX_PIXELS:
                    raise EdgecpError(f"image '{path}' is {w}x{h} px ({w * h:,} pixels), too large: resize it to "
                                      f"at most {MAX_PIXELS:,} pixels")
                im.load()
    except EdgecpError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise EdgecpError(too_large) from None
    except Exception as e:
        raise EdgecpError(f"image '{path}' cannot be decoded ({type(e).__name__}): pass a PNG, JPEG or WebP file") from None
    if min(w, h) < MIN_SIDE:
        raise EdgecpError(f"image '{path}' is {w}x{h} px: images must be at least {MIN_SIDE} px on each side")
    if w * h > MAX_PIXELS:
        raise EdgecpError(f"image '{path}' is {w}x{h} px: resize it below {MAX_PIXELS} pixels")
    return w, h


def validate_images(args: list[str | Path]) -> list[Path]:
    """The distinct (by content) images among `args`, each decoded once; errors name the file and the rule."""
    paths = dedupe_by_content(expand_image_args(args))
    if len(paths) > MAX_IMAGES:
        raise EdgecpError(f"{len(paths)} images given, at most {MAX_IMAGES} per concept are accepted: pass the 3-20 "
                          "best photos of the concept")
    for p in paths:
        validate_image(p)
    return paths


def to_rgb(im):
    """A PIL image as 8-bit RGB: high-bit-depth greyscale scaled by its depth, transparency composited on grey."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16"):
            a = a / 257.0
        elif im.mode == "I":  # 32-bit integer: PNG 16-bit greyscale often loads as "I"
            a = a / 257.0 if a.max() > 255 else a
        else:  # float: [0, 1] or [0, 255]
            a = a * 255.0 if a.max() <= 1.0 else a
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info) or \
            (im.mode in ("L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, NEUTRAL_GREY + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def purge_sources(paths: list[Path], trained: set[str] | None = None) -> dict:
    """Delete the user's photos after the commit: every path of `paths` (`given_files`: copies and links included).
    A symbolic link: the photo it points to, then the link. With `trained` (the sha256s learned), a regular file
    whose bytes are not among them (changed since it was read) is kept.

    Returns {"deleted": [...], "not_deleted": [{"path", "reason"}]}: never claims a deletion that did not happen,
    and names every file kept, the surviving hard links of a deleted photo included (looked for in the folders of
    the given files; counted where they are elsewhere)."""
    deleted: list[str] = []
    kept: list[dict] = []
    done: set[str] = set()
    links: dict[tuple[int, int], dict] = {}  # inode of a deleted photo with other hard links -> its path, counts
    folders: list[Path] = []
    for p in paths:
        targets = [p.resolve(), p] if p.is_symlink() else [p]
        for t in targets:
            key = str(t)
            if key in done:
                continue
            done.add(key)
            folders += [t.parent] if t.parent not in folders else []
            try:
                st = t.lstat()
                if trained is not None and stat.S_ISREG(st.st_mode) and sha256_file(t) not in trained:
                    kept.append({"path": key, "reason": "its bytes changed since edgecp read it, so it is not the "
                                                        "photo that was learned: not deleted"})
                    continue
                t.unlink()
            except FileNotFoundError:
                kept.append({"path": key, "reason": "not found (deleted meanwhile?)"})
                continue
            except OSError as e:
                via = f"the photo {p} points to; " if t != p else ""
                kept.append({"path": key, "reason": f"{via}{type(e).__name__}: {e.strerror or e}"})
                continue
            deleted.append(key)
            ident = (st.st_dev, st.st_ino)
            if stat.S_ISREG(st.st_mode) and ident in links:  # another given name of the same photo
                links[ident]["deleted"] += 1
            elif stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                links[ident] = {"path": key, "nlink": st.st_nlink, "deleted": 1}
    for (dev, ino), entry in links.items():
        left = entry["nlink"] - entry["deleted"]
        if left <= 0:
            continue
        found = [f for d in folders for f in _entries(d) if _same_inode(f, dev, ino)]
        for f in found:
            kept.append({"path": str(f), "reason": f"a hard link to {entry['path']} that was not given: the photo's "
                                                   "bytes survive here"})
        if left > len(found):
            where = ", ".join(str(d) for d in folders)
            kept.append({"path": entry["path"], "reason": f"its bytes survive in {left - len(found)} other hard "
                                                          f"link(s) outside the folders searched ({where})"})
    return {"deleted": deleted, "not_deleted": kept}


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder / e.name for e in os.scandir(folder))
    except OSError:
        return []


def _same_inode(path: Path, dev: int, ino: int) -> bool:
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (dev, ino)


def open_rgb(path: Path):
    """The image at `path`, upright (EXIF) and RGB (alpha composited, 16-bit scaled: `to_rgb`)."""
    with Image.open(path) as im:
        return to_rgb(ImageOps.exif_transpose(im))


def fit_square(im, size: int, resample=None):
    """The one square crop: centre-cropped to a square and resized to size x size (PIL's `ImageOps.fit`). Bicubic
    unless the caller names its resampler (the bench's views keep Lanczos, so its numbers stay bit-identical)."""
    return ImageOps.fit(im, (size, size), method=Image.Resampling.BICUBIC if resample is None else resample)
