"""fold_dyt_affine on models built to catch it out: where folding a DyT's weight and bias into the
Linears that read its output would change what the model computes, it must leave that DyT alone and
say why; where it folds, the model's outputs must stay what they were.

Each model's DyT output goes only into a Linear as far as the Linear's own call can tell, but the
model reads the Linear's (or the DyT's) parameters elsewhere, or keeps the DyT output where the
returned value does not show it. Tolerance where a fold happens: 64 fp32 eps of the output's scale,
as in test_convert.py (one rounding per folded weight, summed over 8 terms at O(1) gain); a wrong
fold is off by O(1).
"""
from __future__ import annotations

import dataclasses


import torch
import torch.nn.functional as F
from torch import nn

from dyt_kernels import DyT, dyt, fold_dyt_affine, use_backend
from helpers import FP32_EPS, max_abs
from library_models import randomize_


def _fold(model: nn.Module, *inputs):
    """Fold a randomized copy in eval mode; return (report, output before, output after)."""
    model = randomize_(model).eval()
    with use_backend("torch"):
        want = model(*inputs)
        report = fold_dyt_affine(model, *inputs)
        got = model(*inputs)
    return report, want, got


def _assert_same(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=64 * FP32_EPS * max_abs(want))


class LinearWeightAlsoRead(nn.Module):
    """norm -> fc, and fc's weight (or bias) read again outside fc's own call."""

    def __init__(self, other_use: str):
        super().__init__()
        self.norm, self.fc, self.other_use = DyT(8), nn.Linear(8, 8), other_use
        self.fc_weight_t = self.fc.weight.t()        # a view made once, read in forward

    def forward(self, x):
        y = self.fc(self.norm(x))
        if self.other_use == "F.linear without bias":
            return y + F.linear(x, self.fc.weight)
        if self.other_use == "matmul":
            return y + x @ self.fc.weight.T
        if self.other_use == "bias":
            return y + self.fc.bias
        return y + x @ self.fc_weight_t                  # "view made at init"


def test_fold_leaves_a_dyt_whose_linear_weight_is_read_elsewhere():
    """Before: folded, and the other read saw W * weight (off by O(1)), no error."""
    for other_use in ("F.linear without bias", "matmul", "bias", "view made at init"):
        report, want, got = _fold(LinearWeightAlsoRead(other_use), torch.randn(3, 8))
        assert report.folded == {}, other_use
        assert "fc" in report.left["norm"] and "elsewhere" in report.left["norm"], (other_use, report.left)
        _assert_same(got, want)


class BiasFreeWeightCalledDirectly(nn.Module):
    """A bias-free Linear applied through F.linear(h, fc.weight) by its parent: the call never reads
    fc.bias, so a bias the fold gives fc would not be added."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc = DyT(8), nn.Linear(8, 8, bias=False)

    def forward(self, x):
        return F.linear(self.norm(x), self.fc.weight)


def test_fold_leaves_a_dyt_read_by_a_linear_weight_outside_the_linear():
    """Before: folded, fc gained a bias the parent's F.linear never adds: off by W @ bias."""
    report, want, got = _fold(BiasFreeWeightCalledDirectly(), torch.randn(3, 8))
    assert report.folded == {} and "norm" in report.left, report.left
    _assert_same(got, want)


def test_fold_still_folds_a_plain_norm_linear_pair_with_the_same_reads():
    """The checks above do not refuse the ordinary case: fc called as a module, weight read for metadata."""

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = DyT(8), nn.Linear(8, 8, bias=False)

        def forward(self, x):
            assert self.fc.weight.shape == (8, 8)
            return self.fc(self.norm(x)) * 2

    report, want, got = _fold(Plain(), torch.randn(3, 8))
    assert report.folded == {"norm": ["fc"]}
    _assert_same(got, want)


class DyTWeightAlsoRead(nn.Module):
    """norm -> fc, and the norm's weight and bias also used by hand (as a fused adaLN path reads them)."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc = DyT(8), nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.norm(x)) + dyt(x, self.norm.alpha, self.norm.weight, self.norm.bias)


def test_fold_leaves_a_dyt_whose_weight_is_read_outside_its_forward():
    """Before: folded; the fold drops norm.weight and norm.bias, so the hand-made call got None for
    them and computed tanh(alpha x) (off by O(1)), no error."""
    report, want, got = _fold(DyTWeightAlsoRead(), torch.randn(3, 8))
    assert report.folded == {} and "outside its own forward" in report.left["norm"], report.left
    _assert_same(got, want)


def test_fold_folds_dyts_that_share_a_weight():
    """Tied DyT parameters read by each DyT's own forward are not 'read elsewhere'."""
    model = nn.Sequential(DyT(8), nn.Linear(8, 8), DyT(8), nn.Linear(8, 8))
    model[2].weight = model[0].weight
    report, want, got = _fold(model, torch.randn(3, 8))
    assert report.folded == {"0": ["1"], "2": ["3"]}
    _assert_same(got, want)


@dataclasses.dataclass
class Output:                       # a plain dataclass: not a tuple, list or dict-like
    logits: torch.Tensor
    hidden: torch.Tensor


class ReturnsNormOutputInADataclass(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc = DyT(8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.norm(x)
        return Output(self.fc(h), h)


class KeepsNormOutput(nn.Module):
    """Stores the norm's output for its caller (features for distillation, a probe), returns fc's."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc = DyT(8), nn.Linear(8, 8)

    def forward(self, x):
        self.features = self.norm(x)
        return self.fc(self.features)


def test_fold_leaves_a_dyt_whose_output_outlives_the_run():
    """Before: folded; the dataclass's hidden (the model's stored features) became tanh(alpha x)
    instead of the DyT output, no error."""
    x = torch.randn(3, 8)
    report, want, got = _fold(ReturnsNormOutputInADataclass(), x)
    assert report.folded == {} and "outlives" in report.left["norm"], report.left
    _assert_same(got.hidden, want.hidden)
    _assert_same(got.logits, want.logits)

    model = randomize_(KeepsNormOutput()).eval()
    want = model(x), model.features
    report = fold_dyt_affine(model, x)
    assert report.folded == {} and "outlives" in report.left["norm"], report.left
    got = model(x), model.features
    _assert_same(got[0], want[0])
    _assert_same(got[1], want[1])
