"""The real CLIP BPE tokenizer, built offline from the vocabulary file that ships with edgecp.

`bpe_simple_vocab_16e6.txt.gz` is OpenAI CLIP's BPE merge list (as redistributed in open_clip, MIT licence,
see LICENSE.open_clip.txt). transformers' `CLIPTokenizer` wants `vocab.json` + `merges.txt`; we derive both
exactly as CLIP does (256 byte symbols, the same with ``</w>``, one token per merge, two special tokens),
which yields the 49,408-token vocabulary of every Stable Diffusion 1.x text encoder. Written by hand because
no installed library builds a CLIP tokenizer without downloading it.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

BPE_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    with gzip.open(BPE_PATH) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_clip_tokenizer(folder: str | Path, model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """Write a CLIP tokenizer to `folder` (the layout of a diffusers pipeline's `tokenizer/`) and return it.
    `pad_token`: SD 1.x pads with <|endoftext|>, SD 2.x (OpenCLIP) with "!"."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    tok = CLIPTokenizer(
        vocab=vocab,
        merges=[tuple(m.split()) for m in merges],
        model_max_length=model_max_length,
        pad_token=pad_token,
    )
    tok.save_pretrained(folder)
    # vocab.json + merges.txt too, for tools that read the slow-tokenizer files
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return tok
