"""edgecp.eval.sequences: the photo, procedural and folder sequences share one API and stay reproducible."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgecp.eval.sequences import (
    RESERVED_PHOTOS,
    SIX_TASKS,
    Concept,
    Sequence,
    _crop_box,  # the disjointness rule
    folder_sequence,
    procedural_sequence,
    six_tasks,
)


def _arrays(images: list[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(im) for im in images]


def test_six_tasks_have_distinct_token_safe_names_and_class_words():
    assert len(SIX_TASKS) == 6
    assert len(set(SIX_TASKS.names)) == 6
    assert [c.class_word for c in SIX_TASKS] == ["cat", "cup", "rocket", "astronaut", "horse", "motorcycle"]
    assert {c.source.photo for c in SIX_TASKS} == set(RESERVED_PHOTOS)
    assert six_tasks() == SIX_TASKS and six_tasks() is not SIX_TASKS


@pytest.mark.parametrize("concept", SIX_TASKS, ids=SIX_TASKS.names)
def test_photo_views_have_the_requested_size_count_and_mode(concept):
    train, target = concept.train_views(n=3, size=40), concept.target_views(n=2, size=40)
    assert len(train) == 3 and len(target) == 2
    for im in train + target:
        assert im.mode == "RGB" and im.size == (40, 40)


def test_default_view_counts():
    cat = SIX_TASKS[0]
    assert len(cat.train_views(size=16)) == 6 and len(cat.target_views(size=16)) == 8


def test_train_and_target_views_differ():
    for concept in (SIX_TASKS[1], procedural_sequence(3)[2]):
        train, target = _arrays(concept.train_views(size=32)), _arrays(concept.target_views(size=32))
        assert not any(np.array_equal(t, s) for t in target for s in train)


def test_train_and_target_crop_boxes_never_coincide():
    rng_a, rng_b = np.random.default_rng(0), np.random.default_rng(0)  # even the SAME stream
    train = {_crop_box(rng_a, 30, 40, parity=0) for _ in range(300)}
    target = {_crop_box(rng_b, 30, 40, parity=1) for _ in range(300)}
    assert train.isdisjoint(target)


def test_views_are_reproducible_from_the_seed():
    for concept in (SIX_TASKS[2], procedural_sequence(1)[0]):
        a = _arrays(concept.train_views(n=2, size=24, seed=3))
        b = _arrays(concept.train_views(n=2, size=24, seed=3))
        c = _arrays(concept.train_views(n=2, size=24, seed=4))
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
        assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_horse_silhouette_becomes_a_colour_photo():
    im = np.asarray(SIX_TASKS[4].train_views(n=1, size=32)[0]).astype(int)
    assert im.shape == (32, 32, 3)
    assert (np.abs(im[..., 0] - im[..., 2]) > 20).any()  # not grey


def test_procedural_sequence_has_50_distinct_concepts():
    seq = procedural_sequence()
    assert len(seq) == 50
    assert seq.names[:2] == ["p00", "p01"] and len(set(seq.names)) == 50
    combos = {(c.source.shape, c.source.pattern, c.source.colour, c.source.accent) for c in seq}
    assert len(combos) == 50
    assert all(c.class_word == c.source.shape for c in seq)
    assert procedural_sequence(seed=0) == seq
    assert [c.source for c in procedural_sequence(seed=1)] != [c.source for c in seq]
    first_views = _arrays([c.train_views(n=1, size=24)[0] for c in seq[:10]])
    assert len({a.tobytes() for a in first_views}) == 10
    for im in seq[7].target_views(n=2, size=24):
        assert im.mode == "RGB" and im.size == (24, 24)


def test_slices_stay_sequences():
    assert isinstance(SIX_TASKS[:2], Sequence) and isinstance(SIX_TASKS[0], Concept)


def test_folder_sequence_round_trips_with_write(tmp_path):
    seq = Sequence([SIX_TASKS[3], procedural_sequence(2)[1]])
    root = seq.write(tmp_path / "seq", n_train=2, n_target=3, size=24, seed=1)
    back = folder_sequence(root)
    assert back.names == seq.names
    assert [c.class_word for c in back] == [c.class_word for c in seq]
    for orig, got in zip(seq, back):
        for split, n in (("train", 2), ("target", 3)):
            want = _arrays(orig.views(split, n, 24, seed=1))
            have = _arrays(got.views(split, None, 24))
            assert len(have) == n
            assert all(np.array_equal(w, h) for w, h in zip(want, have))
    with pytest.raises(FileExistsError, match="not empty"):
        seq.write(root)


def test_folder_sequence_follows_order_txt_and_splits_flat_folders(tmp_path):
    for task, count in (("b_task", 5), ("A Task", 2)):
        (tmp_path / task).mkdir()
        for k in range(count):
            Image.new("RGB", (20, 30), (10 * k, 0, 0)).save(tmp_path / task / f"{k}.png")
    seq = folder_sequence(tmp_path)
    assert seq.names == ["a_task", "b_task"] and seq[0].class_word == "object"
    assert len(seq[1].train_views()) == 4 and len(seq[1].target_views()) == 1  # every 4th file is a target
    assert len(seq[0].train_views()) == 1 and len(seq[0].target_views()) == 1
    assert seq[1].train_views(size=16)[0].size == (16, 16)
    (tmp_path / "order.txt").write_text("b_task\nA Task\n")
    assert folder_sequence(tmp_path).names == ["b_task", "a_task"]


def test_folder_sequence_errors_name_the_folder(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        folder_sequence(tmp_path / "missing")
    with pytest.raises(ValueError, match="no task folders"):
        folder_sequence(tmp_path)
    (tmp_path / "dog" / "train").mkdir(parents=True)
    (tmp_path / "dog" / "target").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "dog" / "target" / "0.png")
    with pytest.raises(ValueError, match=r"dog[/\\]train"):
        folder_sequence(tmp_path)
    (tmp_path / "dog" / "train" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no images"):
        folder_sequence(tmp_path)
    (tmp_path / "cat").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "dog" / "train" / "0.png")
    with pytest.raises(ValueError, match=r"cat'"):
        folder_sequence(tmp_path)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="split"):
        SIX_TASKS[0].views("test", 1)
    with pytest.raises(ValueError, match="concept name"):
        Concept("My Dog", "dog", SIX_TASKS[0].source)
    with pytest.raises(ValueError, match="n must be"):
        procedural_sequence(0)
