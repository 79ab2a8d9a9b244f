"""Captions: `NAME.txt` beside an image is its caption (kohya, ai-toolkit and OneTrainer read the same layout).

Choices (also in docs/architecture.md):
- The placeholder for the concept is `[name]`, as ai-toolkit writes `[trigger]`: it becomes the concept's token
  followed by its class word (`[name]` in "a photo of [name] on a beach" -> "a photo of <my-dog> dog on a
  beach"), exactly as `<name>` expands in prompts (`edgecp.prompts.expand`: no class word when the caption says it
  right after). A caption without the placeholder gets it at its start ("[name], " + caption), as ai-toolkit adds
  its trigger word, so that every caption names what is learned.
- Images without a caption file use the method's prompt (the paper's, e.g. "a photo of a <my-dog> dog").
- Captions meet the training in one place only: the denoising loss of the training phase (each image's rows use
  its caption). Every phase that compares concepts by their prompts (the DC scores of DC-EWC's Fisher phase and of
  DSC, EWC's Fisher phase, CNS's importance, Custom Diffusion's token rows) keeps the paper's prompt: the DC score
  ranks c_n against c_0 and the earlier concepts' prompts, which are fixed per concept; a per-image caption there
  would compare an image's description, not the concept.
- The caption's text is read once and kept in memory (and, for a resumable concept, staged beside its photo, so it
  is purged with it); the manifest records its sha256 and length in bytes, never its text.
- A caption file must be UTF-8 text of 1 to MAX_CAPTION characters after stripping whitespace; anything else is
  refused in one line naming the file.
"""

from __future__ import annotations

from pathlib import Path

from edgecp.errors import EdgecpError
from edgecp.prompts import expand

PLACEHOLDER = "[name]"
MAX_CAPTION = 2000  # characters: CLIP reads 77 tokens, so anything longer is cut by the tokenizer anyway
SUFFIX = ".txt"


def caption_file(image: Path) -> Path:
    """`photo.jpg` -> `photo.txt` (the caption beside it, whether or not it exists)."""
    return Path(image).with_suffix(SUFFIX)


def read_caption(image: Path) -> str | None:
    """The caption of `image` (None when it has none); refuses an unreadable, empty, non-UTF-8 or huge file."""
    f = caption_file(image)
    if f.is_symlink() and not f.exists():
        raise EdgecpError(f"caption '{f}' is a broken link: fix it or delete it")
    if not f.exists():
        return None
    if not f.is_file():
        raise EdgecpError(f"caption '{f}' is not a file: remove it, or put the caption text in a file of that name")
    raw = f.read_bytes()
    if len(raw) > 4 * MAX_CAPTION:
        raise EdgecpError(f"caption '{f}' is {len(raw):,} bytes: a caption is one line of at most {MAX_CAPTION} characters")
    try:
        text = raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise EdgecpError(f"caption '{f}' is not UTF-8 text: save it as UTF-8") from None
    if not text:
        raise EdgecpError(f"caption '{f}' is empty: write the caption (e.g. 'a photo of [name] on a beach') or delete "
                          "the file to use the method's prompt")
    if len(text) > MAX_CAPTION:
        raise EdgecpError(f"caption '{f}' has {len(text):,} characters: shorten it to at most {MAX_CAPTION}")
    return " ".join(text.split())  # one line: newlines and runs of spaces become single spaces


def caption_prompt(caption: str, token: str, class_word: str | None) -> str:
    """The training prompt of one caption: `[name]` -> the concept's token (+ class word); prepended when absent."""
    if PLACEHOLDER not in caption:
        caption = f"{PLACEHOLDER}, {caption}"
    # the caption's own angle brackets are words, not concept names: hidden from `expand`, then put back
    text = caption.replace("<", "\x01").replace(">", "\x02").replace(PLACEHOLDER, f"<{_MARKER}>")
    out = expand(text, [{"name": _MARKER, "token": token, "class_word": class_word}])
    return out.replace("\x01", "<").replace("\x02", ">")


_MARKER = "edgecp-caption-concept"
