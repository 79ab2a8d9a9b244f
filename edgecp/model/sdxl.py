"""Stable Diffusion XL's conditioning, carried through edgecp's one-tensor text interface.

Every job of edgecp (training, the DC-score phases, the Fisher, DSC, CNS, Custom Diffusion's merge, the forgetting
check, the bench) passes a prompt's conditioning as ONE tensor `c` of shape (B, T, D): it is tiled for the k concepts
of a DC call, indexed by row, chunked, cached per phase, and handed to the UNet as `unet(x_t, t, c)`. SDXL's UNet
needs three things instead (diffusers' `StableDiffusionXLPipeline.encode_prompt` and `_get_add_time_ids`):
- `encoder_hidden_states`: the penultimate hidden states of both text encoders, concatenated (77 x (768 + 1280));
- `text_embeds`: the pooled, projected output of the second encoder (1280);
- `time_ids`: (original height, original width, crop top, crop left, target height, target width).

edgecp packs the first two into one tensor, **(B, 77 + 1, 2048)**: the 77 hidden-state rows, then one row whose first
1280 entries are the pooled embedding (the rest zero). `install_packed_conditioning` puts a forward pre-hook on the
SDXL UNet that unpacks a packed `c` into the hidden states and `added_cond_kwargs` before diffusers' forward runs, so
every `unet(x, t, c)` of edgecp, `torch.func.functional_call` (DSC's teachers) and gradient checkpointing see SDXL's
real inputs. A call that passes `added_cond_kwargs` itself (diffusers' SDXL pipeline in `generate`) is left alone.
Code that reads the prompt's token rows (Custom Diffusion's features `c[:, :n]`) never reaches the packed row,
which comes after all 77.

The time ids are edgecp's choice where the papers are silent (001 trains SDXL and does not say): the latent's own
size in pixels as both original and target size, crop (0, 0), which is what diffusers' SDXL pipeline passes when
generating at that size, so training and sampling condition alike. diffusers' DreamBooth SDXL script records each
photo's size before resizing instead; edgecp resizes every photo to a square and has no other size to give.

The concept token goes into both text encoders, as diffusers' SDXL textual-inversion script does: `<name>` is added to
both tokenizers (they share CLIP's vocabulary, so it gets the same id in each), and its embedding is ONE parameter
of width 768 + 1280 (`DualConceptEmbedding`) whose two slices are the rows of the two encoders. A concept trains,
stores (`tokens.safetensors`, one row per token) and protects one vector, as on SD 1.x/2.x.

Written by hand: diffusers has no single-tensor form of SDXL's conditioning, and edgecp's DC phases need one.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.tokenization_utils_base import BatchEncoding

from edgecp.model.tokens import ConceptEmbedding, PersonalTokenTable, lookup, personal_rows

TIME_IDS = 6  # original (h, w), crop (top, left), target (h, w)


def is_sdxl_config(config) -> bool:
    """Whether a UNet config (dict or diffusers FrozenDict) is SDXL's: text and time added conditioning."""
    get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
    return get("addition_embed_type") == "text_time"


def pooled_width(config) -> int:
    """The pooled text embedding's width an SDXL UNet expects (1280 for SDXL): its added-embedding input minus the six
    time ids' Fourier features."""
    return int(config["projection_class_embeddings_input_dim"]) - TIME_IDS * int(config["addition_time_embed_dim"])


def pack(hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(B, T, D) hidden states and (B, P) pooled embedding -> (B, T + 1, D), the pooled row last (P <= D)."""
    b, _, d = hidden.shape
    if pooled.shape[-1] > d:
        raise ValueError(f"pooled width {pooled.shape[-1]} exceeds the hidden width {d}: cannot pack")
    row = hidden.new_zeros(b, 1, d)
    row[:, 0, : pooled.shape[-1]] = pooled.to(hidden.dtype)
    return torch.cat([hidden, row], dim=1)


def unpack(cond: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `pack`: (hidden states (B, T, D), pooled (B, width))."""
    return cond[:, :-1], cond[:, -1, :width]


def time_ids(height: int, width: int, batch: int, like: torch.Tensor) -> torch.Tensor:
    """(batch, 6) SDXL time ids for an image of height x width pixels, uncropped, generated at its own size."""
    ids = torch.tensor([height, width, 0, 0, height, width], dtype=like.dtype, device=like.device)
    return ids.expand(batch, TIME_IDS)


def install_packed_conditioning(unet: nn.Module, vae_scale: int) -> None:
    """Let `unet(x, t, packed)` run an SDXL UNet (module docstring). Idempotent; the hook is the instance's own, so a
    `copy.deepcopy` of the UNet (a DSC teacher) keeps it. `vae_scale` turns the latent's size into pixels."""
    if getattr(unet, "_edgecp_packed", False):
        return
    width = pooled_width(unet.config)

    def hook(_module, args, kwargs):
        if kwargs.get("added_cond_kwargs") is not None:
            return None  # diffusers' SDXL pipeline: its own conditioning
        args = list(args)
        cond = args[2] if len(args) >= 3 else kwargs.get("encoder_hidden_states")
        if cond is None:
            return None
        hidden, pooled = unpack(cond, width)
        if len(args) >= 3:
            args[2] = hidden
        else:
            kwargs["encoder_hidden_states"] = hidden
        sample = args[0] if args else kwargs["sample"]
        h, w = sample.shape[-2] * vae_scale, sample.shape[-1] * vae_scale
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids(h, w, sample.shape[0], pooled)}
        return tuple(args), kwargs

    unet.register_forward_pre_hook(hook, with_kwargs=True)
    unet._edgecp_packed = True


def pool_at_end_of_text(text_encoder: nn.Module, tokenizer) -> None:
    """Make the encoder pool at the end-of-text token even when a prompt holds an added concept token.

    SDXL's text encoder configs say `eos_token_id: 2` (written before transformers PR #24773), and CLIP then pools at
    `input_ids.argmax()`: the highest id, which is the end-of-text token (49407) until a concept token (49408 and up)
    is in the prompt, and then the concept token. Setting the model's `eos_token_id` to the tokenizer's makes it pool
    at the first end-of-text token: the same position for every prompt without an added token (so the base model's
    outputs do not change), and the right one for prompts with one. Only this model instance is changed."""
    model = getattr(text_encoder, "text_model", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if model is not None and getattr(model, "eos_token_id", None) == 2 and eos is not None and eos != 2:
        model.eos_token_id = eos


class DualTokenizer:
    """SDXL's two CLIP tokenizers behind the one-tokenizer interface edgecp's jobs use.

    With `return_tensors="pt"` the ids of both are stacked, (B, 2, T): row 0 for the first encoder, row 1 for the
    second (which pads with "!" where the first pads with <|endoftext|>). Without tensors (the token lists of
    `word_embedding` and `prompt_rows`) it answers with the first tokenizer, whose ids the second shares. Tokens are
    added to both, and must get the same id in each."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, text, **kwargs):
        if kwargs.get("return_tensors") == "pt":
            a = self.first(text, **kwargs).input_ids
            b = self.second(text, **kwargs).input_ids
            return BatchEncoding({"input_ids": torch.stack([a, b], dim=1)})
        return self.first(text, **kwargs)

    def add_tokens(self, tokens) -> int:
        n = self.first.add_tokens(tokens)
        m = self.second.add_tokens(tokens)
        if n != m or len(self.first) != len(self.second):
            raise ValueError("SDXL's two tokenizers disagree on the added tokens: the base's tokenizers do not match")
        return n

    def convert_tokens_to_ids(self, tokens):
        return self.first.convert_tokens_to_ids(tokens)

    def __len__(self) -> int:
        return len(self.first)

    def __getattr__(self, name):  # model_max_length, pad_token_id, ...: the first tokenizer's
        if name in ("first", "second"):
            raise AttributeError(name)
        return getattr(self.first, name)


class _RowView(nn.Module):
    """One encoder's token embedding: its frozen base table, and its slice [lo, hi) of the shared concept rows."""

    def __init__(self, base: nn.Embedding, owner: DualConceptEmbedding, lo: int, hi: int):
        super().__init__()
        self.base = base
        self.base_vocab = base.num_embeddings
        self._owner = [owner]  # not a submodule: the rows are registered once, in the owner
        self.lo, self.hi = lo, hi

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self._owner[0].rows
        return lookup(self.base, ids, torch.stack(list(rows))[:, self.lo : self.hi] if len(rows) else None)


class DualConceptEmbedding(ConceptEmbedding):
    """The concept rows of both SDXL encoders: one parameter of width D1 + D2 per concept (module docstring). `base`
    is the first encoder's table (its vocabulary size is the id of the first concept), `base_2` the second's."""

    def __init__(self, first: nn.Module, second: nn.Module):
        base1, base2 = first.get_input_embeddings(), second.get_input_embeddings()
        if base1.num_embeddings != base2.num_embeddings:
            raise ValueError("SDXL's two text encoders have token tables of different sizes")
        super().__init__(base1)
        self.base_2 = base2
        d1, d2 = base1.embedding_dim, base2.embedding_dim
        first.set_input_embeddings(_RowView(base1, self, 0, d1))
        second.set_input_embeddings(_RowView(base2, self, d1, d1 + d2))

    @property
    def weight(self) -> torch.Tensor:
        raise AttributeError("SDXL's concept rows span two tables: read `base.weight` and `base_2.weight`")

    def base_rows(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.base.weight[ids], self.base_2.weight[ids].to(self.base.weight.dtype)], dim=-1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("DualConceptEmbedding is read through each encoder's own view")


class DualTextEncoder(nn.Module):
    """SDXL's two text encoders as one module: `forward(ids (B, 2, T))` returns `(packed,)`, the packed conditioning of
    the module docstring (penultimate hidden states of both, concatenated; the second's pooled projection)."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.text_encoder = first
        self.text_encoder_2 = second
        self.concepts = DualConceptEmbedding(first, second)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_encoder.dtype

    @property
    def config(self):
        return self.text_encoder.config

    def gradient_checkpointing_enable(self) -> None:
        """Checkpointing in both encoders (the concept token trains through both), the way each offers it."""
        for te in (self.text_encoder, self.text_encoder_2):
            (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()

    def get_input_embeddings(self) -> DualConceptEmbedding:
        return self.concepts

    def set_input_embeddings(self, emb) -> None:
        raise RuntimeError("SDXL's concept rows are installed at construction (DualConceptEmbedding)")

    def forward(self, ids: torch.Tensor):
        if ids.dim() != 3 or ids.shape[1] != 2:
            raise ValueError(f"SDXL text ids must be (B, 2, T) from DualTokenizer, got {tuple(ids.shape)}")
        o1 = self.text_encoder(ids[:, 0], output_hidden_states=True)
        o2 = self.text_encoder_2(ids[:, 1], output_hidden_states=True)
        hidden = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2].to(o1.hidden_states[-2].dtype)], dim=-1)
        return (pack(hidden, o2.text_embeds),)


def bake_dual_tokens(text_encoder: DualTextEncoder) -> int:
    """For export: each SDXL encoder's token table becomes a `PersonalTokenTable` holding its slice of the concept
    rows (the first encoder's 768 columns, the second's 1280), so each encoder is a plain CLIP model again and exports
    on its own (optimum's `text_encoder` and `text_encoder_2`). Both tables get the same number of personal rows
    (the tokenizers share the ids); returns it. Idempotent."""
    first, second = text_encoder.text_encoder, text_encoder.text_encoder_2
    done = [te.get_input_embeddings() for te in (first, second)]
    if all(isinstance(e, PersonalTokenTable) for e in done):
        return done[0].personal.shape[0]
    emb = text_encoder.concepts
    rows = torch.stack([r.detach() for r in emb.rows]) if len(emb.rows) else None
    reserve = personal_rows(len(emb.rows))
    d1 = emb.base.embedding_dim
    for te, base, lo, hi in ((first, emb.base, 0, d1), (second, emb.base_2, d1, d1 + emb.base_2.embedding_dim)):
        table = rows[:, lo:hi] if rows is not None else torch.zeros(0, hi - lo)
        baked = PersonalTokenTable(base, table, reserve)
        baked.requires_grad_(False)
        te.set_input_embeddings(baked)
        te.config.vocab_size = baked.base_vocab + reserve
    return reserve
