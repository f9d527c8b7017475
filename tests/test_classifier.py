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
