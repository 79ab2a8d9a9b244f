"""Concept tokens: one new token `<name>` per concept, its embedding a small trainable row.

The text encoder's token table stays frozen and untouched; new rows live in `ConceptEmbedding`, so a concept
trains (and stores) D numbers instead of the whole 49,408 x D table, and earlier concepts' rows stay frozen.
Written by hand because transformers only offers resizing the whole table.
"""

from __future__ import annotations

import torch
from torch import nn

from edgecp.errors import EdgecpError


def token_of(name: str) -> str:
    return f"<{name}>"


class ConceptEmbedding(nn.Module):
    """Token embedding = frozen base table for ids < V, one parameter row per concept token for ids >= V."""

    def __init__(self, base: nn.Embedding):
        super().__init__()
        self.base = base
        self.base_vocab = base.num_embeddings
        self.rows = nn.ParameterList()

    @property
    def weight(self) -> torch.Tensor:  # for code that reads `.weight` (e.g. tied heads, resizing)
        return torch.cat([self.base.weight, *[r[None] for r in self.rows]]) if len(self.rows) else self.base.weight

    def base_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The frozen table's rows `ids` (SDXL's `DualConceptEmbedding`: both tables' rows, concatenated)."""
        return self.base.weight[ids]

    def add_row(self, vec: torch.Tensor, trainable: bool) -> int:
        # fp32 master row even when the frozen table is held in 16 bits (a memory plan)
        row = vec.detach().clone().to(device=self.base.weight.device, dtype=torch.float32)
        self.rows.append(nn.Parameter(row, requires_grad=trainable))
        return self.base_vocab + len(self.rows) - 1

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return lookup(self.base, ids, torch.stack(list(self.rows)) if len(self.rows) else None)


def lookup(base: nn.Embedding, ids: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """(B, T, D) embeddings of `ids`: the frozen `base` table below its vocabulary size V, row `id - V` of `extra`
    (n, D) from V on (None: no rows yet)."""
    vocab = base.num_embeddings
    out = base(ids.clamp(max=vocab - 1))
    if extra is None:
        return out
    rel = ids - vocab
    new = extra[rel.clamp(min=0, max=extra.shape[0] - 1)].to(out.dtype)
    return torch.where((rel >= 0)[..., None], new, out)


def concept_embedding(text_encoder) -> ConceptEmbedding:
    """The text encoder's ConceptEmbedding, installing one around the original table on first use."""
    emb = text_encoder.get_input_embeddings()
    if not isinstance(emb, ConceptEmbedding):
        emb = ConceptEmbedding(emb)
        text_encoder.set_input_embeddings(emb)
    return emb


def word_embedding(tokenizer, text_encoder, word: str) -> torch.Tensor:
    """Mean input embedding of `word`'s BPE tokens (the initialisation of a new concept token)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise EdgecpError(f"class word '{word}' has no tokens: pass a plain word such as 'dog'")
    return concept_embedding(text_encoder).base_rows(torch.tensor(ids)).mean(0)


def add_concept_token(tokenizer, text_encoder, name: str, init: torch.Tensor, trainable: bool) -> int:
    """Add `<name>` to the tokenizer and its row to the text encoder; the two ids must agree."""
    emb = concept_embedding(text_encoder)
    token = token_of(name)
    if len(tokenizer) != emb.base_vocab + len(emb.rows):
        raise EdgecpError(
            f"tokenizer has {len(tokenizer)} tokens but the text encoder {emb.base_vocab + len(emb.rows)}: "
            "this base's tokenizer and text encoder do not match"
        )
    if tokenizer.add_tokens([token]) != 1:
        raise EdgecpError(f"token '{token}' already exists in the base tokenizer: choose another concept name")
    row = emb.add_row(init, trainable)
    assert tokenizer.convert_tokens_to_ids(token) == row, "tokenizer and embedding ids diverged"
    return row


def load_concept_tokens(tokenizer, text_encoder, concepts: list[dict], tensors: dict[str, torch.Tensor]) -> None:
    """Install the committed concepts' tokens (frozen), in manifest order."""
    for c in concepts:
        add_concept_token(tokenizer, text_encoder, c["name"], tensors[c["token"]], trainable=False)


PERSONAL_ROWS = 64  # an export's reserve of personal token rows (edgecp's choice: 64 concepts, 197 KB at SD1.5 fp32)


def personal_rows(n_tokens: int) -> int:
    """Rows of the personal table an export with `n_tokens` concept tokens gets: PERSONAL_ROWS, or the next multiple
    of it for a store that outgrew the reserve (its updates then need a new base export)."""
    return max(1, -(-n_tokens // PERSONAL_ROWS)) * PERSONAL_ROWS


class PersonalTokenTable(nn.Module):
    """The exported token embedding: the base vocabulary's table (`base.weight`, V rows, identical in every version of
    the store) and a fixed-size table of personal rows (`personal`, R rows; row i is token id V + i, unused rows
    zero). A version's concepts change only `personal`, so an update of an export replaces that one tensor and never
    the ~152 MB base table (issue 25). Ids >= V + R cannot come from the export's tokenizer."""

    def __init__(self, base: nn.Embedding, rows: torch.Tensor, reserve: int):
        super().__init__()
        self.base = base
        self.base_vocab = base.num_embeddings
        personal = torch.zeros(reserve, base.embedding_dim, dtype=base.weight.dtype)
        personal[: len(rows)] = rows.to(base.weight.dtype)
        self.personal = nn.Parameter(personal, requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids.clamp(max=self.base_vocab - 1))
        rel = ids - self.base_vocab
        new = self.personal[rel.clamp(min=0, max=self.personal.shape[0] - 1)]
        return torch.where((rel >= 0)[..., None], new, out)


def bake_tokens(text_encoder) -> int:
    """Replace ConceptEmbedding by a PersonalTokenTable (for export): the base table plus `personal_rows(n)` rows, the
    concept rows first. Returns the number of personal rows."""
    emb = text_encoder.get_input_embeddings()
    if isinstance(emb, ConceptEmbedding):
        base, rows = emb.base, [r.detach() for r in emb.rows]
    elif isinstance(emb, PersonalTokenTable):
        return emb.personal.shape[0]
    else:
        base, rows = emb, []
    table = torch.stack(rows) if rows else torch.zeros(0, base.embedding_dim)
    baked = PersonalTokenTable(base, table, personal_rows(len(rows)))
    baked.requires_grad_(False)
    text_encoder.set_input_embeddings(baked)
    text_encoder.config.vocab_size = baked.base_vocab + baked.personal.shape[0]
    return baked.personal.shape[0]
