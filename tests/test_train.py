import json

import torch
from conftest import make_photos
from safetensors.torch import load_file

from edgecp.adapters import lora
from edgecp.errors import EdgecpError
from edgecp.model.base import load_components, resolve_base
from edgecp.personal import PersonalModel
from edgecp.store import Store


def test_lora_sequential_starts_task_n_from_the_lora_of_task_n_minus_1(store_copy, tmp_path, monkeypatch):
    import edgecp.train as train

    seen = {}
    real = train._train_loop

    def spy(ctx, method, progress, *rest):
        seen["start"] = lora.adapter_state(ctx.comps.unet)
        return real(ctx, method, progress, *rest)

    monkeypatch.setattr(train, "_train_loop", spy)
    prev = load_file(str(store_copy / "versions" / "v0002" / "adapter.safetensors"))
    train.add_concept(store_copy, "gamma", make_photos(tmp_path / "g", seed=5), class_word="cup")
    assert set(seen["start"]) == set(prev)
    assert all(torch.equal(seen["start"][k], prev[k]) for k in prev)
    new = load_file(str(store_copy / "versions" / "v0003" / "adapter.safetensors"))
    assert any(not torch.equal(new[k], prev[k]) for k in prev)  # and it trained


def test_training_moves_only_the_adapter_and_the_new_token(trained_store):
    store = Store.open(trained_store)
    model = PersonalModel.load(store, device=torch.device("cpu"))
    base = load_components(resolve_base("tiny"))
    base_sd = base.unet.state_dict()
    for name, p in model.comps.unet.named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(p, base_sd[key]), name
    te = model.comps.text_encoder.get_input_embeddings()
    assert torch.equal(te.base.weight, base.text_encoder.get_input_embeddings().weight)
    assert len(te.rows) == 2
    init_dog = base.text_encoder.get_input_embeddings().weight[base.tokenizer("dog", add_special_tokens=False).input_ids].mean(0)
    assert not torch.allclose(te.rows[0], init_dog)  # the token was trained from its class word


def test_a_changed_base_is_refused(store_copy, tmp_path):
    info = json.loads((store_copy / "store.json").read_text())
    info["base"]["sha256"] = "0" * 64
    (store_copy / "store.json").write_text(json.dumps(info))
    try:
        from edgecp.train import add_concept

        add_concept(store_copy, "gamma", make_photos(tmp_path / "g"))
    except EdgecpError as e:
        assert "has changed" in str(e) and "new store" in str(e)
    else:
        raise AssertionError("a different base was accepted")
    assert Store.open(store_copy).head == "v0002" and not (store_copy / "staging").exists()
