"""A resumable concept: `add-concept --resumable` keeps what it needs to continue after a crash, a kill or an
out-of-memory error, in STORE/resumable/, until the concept commits or the user abandons it.

What it holds (one concept per store at a time):
- `concept.json`: the name, class and init words, the training settings, the version the concept was started on
  (HEAD then; a resume refuses if HEAD has moved), the photos' sha256s (never a path outside the store), the
  checkpoint interval;
- `photos/NNNN.<ext>` and `photos/NNNN.txt` (the caption, when the photo had one): the staged copies. They are the
  person's photos: they stay until the concept commits or `add-concept --abandon` deletes them, and `add-concept`
  says so when it starts; `edgecp verify` and `history` show a pending concept. (Their latents would decode back to
  the photos, so keeping latents instead would protect nothing: the photos are kept, and re-encoded on resume.)
- `checkpoint-NNNNNN.safetensors` + `checkpoint.json` (written last, naming the file and its sha256): the trainable
  tensors (adapter, token row), the optimizer's state, the RNG states (the trainer's generator, torch's global
  generator, CUDA's), GradScaler's state, the losses so far, the phase and the iteration. Safetensors and JSON
  only: nothing is unpickled.

Checkpoints are written before the first iteration, every `checkpoint_every` iterations, at the end of training,
and when SIGINT or SIGTERM arrives (after the iteration in progress: a half-applied optimizer step is never
saved). A second signal interrupts at once; the last checkpoint stays. The phases after training (Fisher, DSC,
merges) are not checkpointed: they draw from their own seeded generators, so a resume reruns them from the end of
training and gets the same result. A resume continues from the checkpoint with everything restored, so a
deterministic CPU run commits the same tensors as an uninterrupted one (tests/test_resumable.py).

Without a pending resumable concept, recovery purges staging as before: nothing of a failed plain `add-concept`
survives it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

from edgecp.atomic import fsync_dir, write_atomic, write_json_atomic
from edgecp.captions import SUFFIX as CAPTION_SUFFIX
from edgecp.errors import DamagedStoreError, EdgecpError
from edgecp.integrity import sha256_file

FOLDER = "resumable"
CONCEPT = "concept.json"
PHOTOS = "photos"
CKPT_META = "checkpoint.json"
FORMAT = "edgecp-resumable/1"
DEFAULT_EVERY = 50  # iterations between checkpoints (our choice: SD's adapters and AdamW state are a few MB to
# ~250 MB for Custom Diffusion's K/V; at most 50 iterations, a minute or two on a GPU, are lost to a crash)


class ConceptInterrupted(EdgecpError):
    """SIGINT / SIGTERM during a resumable concept's training: a checkpoint was written; exit 130 / 143."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def folder(store) -> Path:
    return store.root / FOLDER


def pending(store) -> dict | None:
    """The pending concept's concept.json (with "checkpoint": the iteration of its last checkpoint, or None), or
    None when there is none. A link in place of the folder, or a damaged concept.json, is refused."""
    d = folder(store)
    if d.is_symlink():
        raise DamagedStoreError(f"'{d}' is a symbolic link: edgecp never follows one; move it away, then retry")
    if not d.exists():
        return None
    if not d.is_dir():
        raise DamagedStoreError(f"'{d}' is not a folder: move it away, then retry")
    try:
        info = json.loads((d / CONCEPT).read_text())
        if info.get("format") != FORMAT or not isinstance(info.get("name"), str):
            raise ValueError("not a resumable concept")
    except (OSError, ValueError) as e:
        raise DamagedStoreError(f"the resumable concept in '{d}' is damaged ({type(e).__name__}): drop it with "
                                f"`edgecp add-concept --abandon --store {store.root}`") from None
    meta = read_checkpoint_meta(d)
    return {**info, "checkpoint": meta["step"] if meta else None}


def create(store, info: dict, photos: list[Path], captions: list[str | None]) -> Path:
    """Stage the photos (and captions) in a new STORE/resumable/ with concept.json, atomically (a temporary folder
    renamed into place). Call inside `store.writer()`."""
    d = folder(store)
    if d.exists() or d.is_symlink():
        raise EdgecpError(f"store '{store.root}' already has a resumable concept: resume it or abandon it first")
    tmp = Path(tempfile.mkdtemp(prefix=".resumable-tmp-", dir=store.root))
    try:
        (tmp / PHOTOS).mkdir()
        for i, (p, cap) in enumerate(zip(photos, captions)):
            shutil.copyfile(p, tmp / PHOTOS / f"{i:04d}{p.suffix.lower()}")
            if cap is not None:
                (tmp / PHOTOS / f"{i:04d}{CAPTION_SUFFIX}").write_text(cap + "\n", encoding="utf-8")
        write_json_atomic(tmp / CONCEPT, {"format": FORMAT, **info})
        fsync_dir(tmp)
        os.rename(tmp, d)
        fsync_dir(store.root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return d


def staged_photos(store) -> tuple[list[Path], list[str | None]]:
    """The staged photos in order, and their captions, checked against the sha256s concept.json recorded."""
    d = folder(store)
    info = json.loads((d / CONCEPT).read_text())
    photos = sorted(p for p in (d / PHOTOS).iterdir() if p.suffix != CAPTION_SUFFIX and not p.is_symlink())
    want = [i["sha256"] for i in info["images"]]
    if [sha256_file(p) for p in photos] != want:
        raise DamagedStoreError(f"the staged photos in '{d / PHOTOS}' are not the ones the concept started with: "
                                f"drop it with `edgecp add-concept --abandon --store {store.root}` and start again")
    captions = []
    for p in photos:
        c = p.with_suffix(CAPTION_SUFFIX)
        captions.append(c.read_text(encoding="utf-8").strip() if c.is_file() and not c.is_symlink() else None)
    return photos, captions


def remove(store) -> bool:
    """Delete STORE/resumable/ (the staged photos with it); a link there is removed, never followed."""
    d = folder(store)
    if not d.exists() and not d.is_symlink():
        return False
    if d.is_symlink() or not d.is_dir():
        d.unlink()
        return True
    trash = store.root / f".resumable-trash-{os.getpid()}-{int(time.time() * 1000)}"
    os.rename(d, trash)  # gone from its place in one step: a crash mid-delete leaves a trash folder recovery removes
    shutil.rmtree(trash, ignore_errors=True)
    fsync_dir(store.root)
    return True


# -- checkpoints -----------------------------------------------------------------------------------------------
def read_checkpoint_meta(d: Path) -> dict | None:
    try:
        meta = json.loads((d / CKPT_META).read_text())
    except (OSError, ValueError):
        return None
    name = meta.get("file", "")
    if not isinstance(name, str) or Path(name).name != name or not name.startswith("checkpoint-"):
        return None
    return meta


def write_checkpoint(d: Path, tensors: dict, meta: dict) -> None:
    """The tensors file under a new name (`atomic.write_atomic`), then checkpoint.json naming it, then the older
    tensors files go: a crash at any point leaves the previous checkpoint or the new one, whole. The sha256 is of the
    bytes written, computed in memory: the file is not read back."""
    from safetensors.torch import save

    name = f"checkpoint-{meta['step']:06d}-{time.time_ns() % 10**9:09d}.safetensors"
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    write_atomic(d / name, lambda f: f.write(data))
    write_json_atomic(d / CKPT_META, {**meta, "file": name, "sha256": hashlib.sha256(data).hexdigest(),
                                      "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    for old in d.glob("checkpoint-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def read_checkpoint(d: Path) -> tuple[dict, dict] | None:
    """(tensors, meta) of the last checkpoint, its bytes checked; None when none was written. The file is read once:
    the bytes that are hashed are the bytes that are loaded."""
    from safetensors.torch import load

    meta = read_checkpoint_meta(d)
    if meta is None:
        return None
    f = d / meta["file"]
    data = f.read_bytes() if f.is_file() and not f.is_symlink() else None
    if data is None or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise DamagedStoreError(f"the checkpoint '{f}' does not match checkpoint.json: drop the concept with "
                                "`edgecp add-concept --abandon` and start again")
    return load(data), meta


def trainer_state(trainer, step: int, losses: list[float], extra: dict) -> tuple[dict, dict]:
    """Everything the training loop needs to continue at `step` as if it had never stopped."""
    import torch

    opt = trainer.opt
    tensors, groups = {}, []
    idx = 0
    state = opt.state
    opt_meta = {}
    for group in opt.param_groups:
        groups.append(len(group["params"]))
        for p in group["params"]:
            tensors[f"param.{idx}"] = p.detach()
            scalars = {}
            for k, v in state.get(p, {}).items():
                if torch.is_tensor(v):
                    tensors[f"opt.{idx}.{k}"] = v
                else:
                    scalars[k] = v
            opt_meta[str(idx)] = scalars
            idx += 1
    tensors["rng.trainer"] = trainer.gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and trainer.ctx.device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(trainer.ctx.device)
    meta = {"phase": "train", "step": step, "losses": losses, "groups": groups, "optimizer_scalars": opt_meta,
            "skipped": trainer.skipped,
            "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None, **extra}
    return tensors, meta


def restore_trainer(trainer, tensors: dict, meta: dict) -> None:
    """Put a checkpoint back into a freshly built trainer (same model, same method, same settings)."""
    import torch

    opt = trainer.opt
    groups = [len(g["params"]) for g in opt.param_groups]
    if groups != meta["groups"]:
        raise EdgecpError("the checkpoint does not fit this training (its parameter groups differ): the store's "
                          "method or settings changed; drop it with `edgecp add-concept --abandon`")
    idx = 0
    with torch.no_grad():
        for group in opt.param_groups:
            for p in group["params"]:
                saved = tensors[f"param.{idx}"]
                if saved.shape != p.shape:
                    raise EdgecpError(f"the checkpoint's tensor {idx} has shape {tuple(saved.shape)}, the model's "
                                      f"{tuple(p.shape)}: drop it with `edgecp add-concept --abandon`")
                p.copy_(saved.to(p.device, p.dtype))
                st = {k[len(f"opt.{idx}."):]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"opt.{idx}.")}
                st.update(meta["optimizer_scalars"].get(str(idx), {}))
                if st:
                    if "step" in st and torch.is_tensor(st["step"]):
                        st["step"] = st["step"].cpu()  # AdamW keeps `step` on the CPU unless capturable/fused
                    opt.state[p] = st
                idx += 1
    trainer.gen.set_state(tensors["rng.trainer"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and trainer.ctx.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], trainer.ctx.device)
    trainer.skipped = meta.get("skipped", 0)
    if trainer.scaler is not None and meta.get("scaler"):
        trainer.scaler.load_state_dict(meta["scaler"])


# -- signals -----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def deferred_signals():
    """For the block: SIGINT and SIGTERM set a flag (yielded: a dict, "signal" -> the number) instead of stopping the
    process, so the loop can finish its iteration and write a checkpoint; a second signal raises at once
    (KeyboardInterrupt). The previous handlers come back on exit. Outside the main thread Python allows no handler:
    nothing is changed there (a signal then stops the process as before, and the last checkpoint stays)."""
    caught: dict = {}
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(signum, _frame):
        if "signal" in caught:
            raise KeyboardInterrupt
        caught["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
