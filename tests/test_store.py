import os

import pytest

from edgecp.errors import EdgecpError, StoreLockedError
from edgecp.store import Store


def _store(tmp_path):
    return Store.create(tmp_path / "s", {"base": {"kind": "tiny", "locator": "tiny", "sha256": "x"},
                                         "method": {"name": "lora-sequential", "params": {}}, "adapter": {},
                                         "train": {}, "prior": {}})


def test_commit_moves_head_and_keeps_parent(tmp_path):
    s = _store(tmp_path)
    assert s.head == "v0000" and s.concepts() == []
    with s.writer():
        v = s.commit({"a.bin": b"123"}, {"concepts": [{"name": "x"}]})
    assert v == "v0001" == s.head
    assert s.manifest()["parent"] == "v0000"
    assert (s.version_dir() / "a.bin").read_bytes() == b"123"


@pytest.mark.parametrize("crash_at", ["version", "head"])
def test_crash_during_commit_leaves_the_old_version(tmp_path, monkeypatch, crash_at):
    s = _store(tmp_path)
    real_rename, real_replace = os.rename, os.replace

    def boom(*a, **k):
        raise OSError("simulated crash")

    if crash_at == "version":
        monkeypatch.setattr(os, "rename", boom)
    else:
        monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"), s.writer():
        s.commit({"a.bin": b"1"}, {"concepts": [{"name": "x"}]})
    monkeypatch.setattr(os, "rename", real_rename)
    monkeypatch.setattr(os, "replace", real_replace)
    s2 = Store.open(s.root)
    assert s2.head == "v0000" and s2.concepts() == []
    with s2.writer():  # recovery removes the orphan of the interrupted commit
        pass
    assert s2.versions() == ["v0000"]
    assert not [p for p in (s.root / "versions").iterdir() if p.name.startswith(".")]


def test_second_writer_is_refused(tmp_path):
    s = _store(tmp_path)
    with s.writer(), pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
        with Store.open(s.root).writer():
            pass
    with s.writer():  # released
        pass


def test_open_missing_store_says_how_to_create_one(tmp_path):
    with pytest.raises(EdgecpError, match="edgecp init"):
        Store.open(tmp_path / "nope")


def test_create_refuses_non_empty_folder(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "f").write_text("x")
    with pytest.raises(EdgecpError, match="not empty"):
        _store(tmp_path)
