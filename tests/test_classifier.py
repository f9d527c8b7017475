"""Tests for training/classifier.py: the feature FID's matrix square root against scipy and known values."""
from __future__ import annotations

import pytest
import torch

from training.classifier import _trace_sqrt_product_eigh, frechet_distance


def test_frechet_distance_eigh_matches_scipy_and_known_values():
    pytest.importorskip("scipy")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g) @ torch.randn(6, 6, generator=g)
    b = torch.randn(400, 6, generator=g) @ torch.randn(6, 6, generator=g) + 0.5
    import scipy.linalg
    ca, cb = torch.cov(a.double().T), torch.cov(b.double().T)
    assert abs(_trace_sqrt_product_eigh(ca, cb) - scipy.linalg.sqrtm((ca @ cb).numpy()).real.trace()) < 1e-6
    # A singular covariance (generated samples' features are rank-deficient): still the same trace.
    low = torch.randn(400, 3, generator=g) @ torch.randn(3, 6, generator=g)
    cl = torch.cov(low.double().T)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns that the product is singular
        ref = scipy.linalg.sqrtm((cl @ cb).numpy()).real.trace()
    assert abs(_trace_sqrt_product_eigh(cl, cb) - ref) < 1e-6 * abs(ref)
    assert abs(frechet_distance(a, a)) < 1e-6
    # Same covariance, shifted mean: the distance is exactly the squared shift.
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5, 0.0, 0.0])
    assert abs(frechet_distance(a, a + shift) - float((shift ** 2).sum())) < 1e-6


def test_the_cached_classifier_is_retrained_when_the_images_change(tmp_path, monkeypatch):
    """The cache is keyed by the data's contents too: a folder whose images were replaced by others of
    the same count and classes gets a classifier trained on them. Before, the key was the source,
    class names, counts, channels and size, and evaluation reused a classifier of the old images."""
    from training import classifier as C
    from training.data import ImageSet
    trained = []

    def fake_train(train, test, **_):   # (training itself is not what is tested: count the trainings)
        trained.append(train)
        return C.DigitClassifier(train.channels, len(train.class_names), train.image_size).eval(), 0.5
    monkeypatch.setattr(C, "train_classifier", fake_train)
    g = torch.Generator().manual_seed(0)
    names = [str(i) for i in range(10)]

    def folder(images):
        return (ImageSet(images[:30], torch.arange(30) % 10, names, "folder:/data/digits"),
                ImageSet(images[30:], torch.arange(10), names, "folder:/data/digits"))
    first = torch.randint(0, 256, (40, 1, 16, 16), dtype=torch.uint8, generator=g)
    C.load_or_train_classifier(*folder(first), str(tmp_path), log=False)
    C.load_or_train_classifier(*folder(first.clone()), str(tmp_path), log=False)
    assert len(trained) == 1   # the same data: the cache serves it
    C.load_or_train_classifier(*folder(first.flip(-1)), str(tmp_path), log=False)
    assert len(trained) == 2 and torch.equal(trained[1].images, first.flip(-1)[:30])
