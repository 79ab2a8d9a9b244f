import torch

from edgecp.model.tokenizer import VOCAB_SIZE, write_clip_tokenizer
from edgecp.model.tokens import ConceptEmbedding, PersonalTokenTable, bake_tokens


def test_clip_tokenizer_gives_the_real_clip_ids(tmp_path):
    tok = write_clip_tokenizer(tmp_path)
    # ids of OpenAI CLIP / every SD 1.x tokenizer
    assert tok("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert len(tok) == VOCAB_SIZE
    assert tok.model_max_length == 77


def test_concept_embedding_trains_only_its_row():
    torch.manual_seed(0)
    base = torch.nn.Embedding(10, 4)
    emb = ConceptEmbedding(base)
    base.requires_grad_(False)
    frozen = emb.add_row(torch.ones(4), trainable=False)
    train = emb.add_row(torch.zeros(4), trainable=True)
    assert (frozen, train) == (10, 11)
    ids = torch.tensor([[1, 10, 11, 3]])
    out = emb(ids)
    assert torch.equal(out[0, 0], base.weight[1]) and torch.equal(out[0, 1], torch.ones(4))
    out.sum().backward()
    assert emb.rows[1].grad is not None and torch.all(emb.rows[1].grad == 1)
    assert emb.rows[0].grad is None and base.weight.grad is None


def test_bake_tokens_gives_the_same_embeddings(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    from edgecp.model.tokens import concept_embedding

    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=8))
    concept_embedding(te).add_row(torch.randn(8), trainable=False)
    ids = torch.tensor([[0, 20, 5, 1]])
    before = te(ids)[0]
    base = te.get_input_embeddings().base.weight.detach().clone()
    assert bake_tokens(te) == 64  # the export's personal table: 64 rows reserved (issue 25)
    baked = te.get_input_embeddings()
    assert isinstance(baked, PersonalTokenTable) and baked.personal.shape == (64, 8)
    assert torch.equal(baked.base.weight, base) and te.config.vocab_size == 20 + 64  # the vocabulary table as it was
    assert torch.count_nonzero(baked.personal[1:]) == 0  # unused rows are zero
    assert torch.allclose(te(ids)[0], before)
