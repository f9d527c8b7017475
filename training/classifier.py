"""Evaluation of generated digits: a small CNN classifier, conditional accuracy, and a feature FID.

The classifier is trained once per dataset and cached (``<data-dir>/classifier-<source>-<size>.pt``,
reused only for the same classes, counts, size and image contents).
Conditional accuracy is the share of generated images that it assigns to the prompted label. The
FID is the Frechet distance between Gaussians fitted to its penultimate-layer features (128-d) of
generated and of real held-out images: Inception features mean nothing on 32x32 digits, and a
classifier trained on the same domain is the usual substitute for MNIST, so the numbers compare
runs of this project with each other, not with published ImageNet FIDs.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import ImageSet, to_model_range

FEATURE_DIM = 128


class DigitClassifier(nn.Module):
    """Two conv stages (16 and 32 channels, 3x3, max-pool) and a 128-unit hidden layer: ~99% on full
    MNIST in two epochs, and cheap enough to train on a 2-core CPU in well under a minute.

    >>> import torch
    >>> net = DigitClassifier(in_channels=1, num_classes=10, image_size=32)
    >>> net(torch.randn(4, 1, 32, 32)).shape, net.features(torch.randn(4, 1, 32, 32)).shape
    (torch.Size([4, 10]), torch.Size([4, 128]))
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4 (two 2x pools), got {image_size}")
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(32 * (image_size // 4) ** 2, FEATURE_DIM)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features (N, 128) of images in [-1, 1]."""
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random shifts of up to 2 px and small rotations/scales per image, so the classifier judges
    generated digits by shape rather than by exact placement."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=generator) - 0.5) * (2 * 10 * torch.pi / 180)
    scale = 1 + (torch.rand(n, generator=generator) - 0.5) * 0.2
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * (2 * 2 / (x.shape[-1] / 2))
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Pad with the background value (-1), not 0 (mid-grey), by shifting to [0, 2] and back.
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def train_classifier(train: ImageSet, test: ImageSet, epochs: int | None = None, batch_size: int = 128,
                     seed: int = 0, device: str | torch.device = "cpu", log: bool = True) -> tuple[DigitClassifier, float]:
    """Train the classifier on ``train``; returns (model in eval mode, accuracy on ``test``)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    # Aim at ~120k example visits (2 epochs of full MNIST); small sets get more epochs, capped at 15.
    epochs = epochs or max(2, min(15, round(120_000 / len(train))))
    net = DigitClassifier(train.channels, len(train.class_names), train.image_size).to(device)
    batch_size = min(batch_size, len(train))
    steps = epochs * (len(train) // batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    start = time.time()
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=g)
        for i in range(len(train) // batch_size):
            idx = order[i * batch_size:(i + 1) * batch_size]
            x = _augment(to_model_range(train.images[idx]), g).to(device)
            loss = F.cross_entropy(net(x), train.labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    acc = accuracy(net, test.images, test.labels, device)
    if log:
        print(f"[eval] classifier trained on {len(train)} images ({epochs} epochs, {time.time() - start:.0f} s): "
              f"{100 * acc:.2f}% on {len(test)} held-out images", file=sys.stderr)
    return net, acc


@torch.no_grad()
def _batched(net: DigitClassifier, images: Tensor, fn, device, batch: int = 500) -> Tensor:
    outs = []
    for i in range(0, images.shape[0], batch):
        x = images[i:i + batch]
        x = to_model_range(x) if x.dtype == torch.uint8 else x.float()
        outs.append(fn(x.to(device)).float().cpu())
    return torch.cat(outs)


def predict(net: DigitClassifier, images: Tensor, device="cpu") -> Tensor:
    """Predicted labels of images (uint8 [0, 255] or float [-1, 1])."""
    return _batched(net, images, lambda x: net(x).argmax(1), device).long()


def accuracy(net: DigitClassifier, images: Tensor, labels: Tensor, device="cpu") -> float:
    return (predict(net, images, device) == labels.cpu()).float().mean().item()


def conditional_accuracy(net: DigitClassifier, images: Tensor, prompted: Tensor, device="cpu") -> float:
    """Share of generated ``images`` that the classifier assigns to their ``prompted`` labels."""
    return accuracy(net, images, prompted, device)


def features(net: DigitClassifier, images: Tensor, device="cpu") -> Tensor:
    return _batched(net, images, net.features, device)


def frechet_distance(feat_a: Tensor, feat_b: Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) of Gaussians fitted to two feature sets.

    The trace of the matrix square root comes from the identity
    Tr((S_a S_b)^1/2) = Tr((S_a^1/2 S_b S_a^1/2)^1/2), whose inner matrix is symmetric PSD, so two
    symmetric eigendecompositions in float64 give it (``_trace_sqrt_product_eigh``). It stays exact
    when a covariance is singular (generated digits' features have rank ~80 of 128), where
    scipy.linalg.sqrtm of the non-symmetric product warns; on such a case the two agree to 1e-9.

    >>> import torch
    >>> a = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    >>> abs(frechet_distance(a, a)) < 1e-9       # zero up to float64 rounding, which may leave it just below 0
    True
    """
    a, b = feat_a.double(), feat_b.double()
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"features must be (N, D) with the same D and N >= 2, got {tuple(a.shape)} and {tuple(b.shape)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    tr_covmean = _trace_sqrt_product_eigh(cov_a, cov_b)
    return float(((mu_a - mu_b) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_covmean)


def _trace_sqrt_product_eigh(cov_a: Tensor, cov_b: Tensor) -> float:
    """Tr((A B)^1/2) for symmetric PSD A, B, via S = A^1/2 B A^1/2 (similar to A B, and symmetric)."""
    w, v = torch.linalg.eigh(cov_a)
    sqrt_a = (v * w.clamp(min=0).sqrt()) @ v.T
    return float(torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum())


def classifier_cache_path(data_dir: str, source: str, image_size: int) -> str:
    key = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in source)[-80:]
    return os.path.join(data_dir, f"classifier-{key}-{image_size}.pt")


def data_fingerprint(*sets: ImageSet) -> str:
    """SHA-256 of the images and labels of `sets`: a folder whose images were replaced by others of the
    same count and classes has another fingerprint (~0.1 s for MNIST's 70,000 digits)."""
    digest = hashlib.sha256()
    for s in sets:
        for t in (s.images, s.labels):
            digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_or_train_classifier(train: ImageSet, test: ImageSet, data_dir: str, device="cpu",
                             log: bool = True) -> tuple[DigitClassifier, float, str]:
    """The cached classifier for this dataset, training and caching it first if needed.

    Returns (classifier in eval mode, its held-out accuracy, cache path). A cache written for other
    data (other classes, channels, size or contents) or unreadable is retrained, with a notice.
    """
    path = classifier_cache_path(data_dir, train.source, train.image_size)
    expect = {"source": train.source, "class_names": list(train.class_names), "in_channels": train.channels,
              "image_size": train.image_size, "num_train": len(train), "num_heldout": len(test),
              "data_sha256": data_fingerprint(train, test)}
    if os.path.exists(path):
        try:
            state = load_checkpoint(path)
            if state.get("classifier_config") == expect:
                net = DigitClassifier(train.channels, len(train.class_names), train.image_size)
                net.load_state_dict(state["model"])
                return net.to(device).eval(), float(state["heldout_accuracy"]), path
            reason = "it was trained on other data"
        except CheckpointError as e:
            reason = str(e)
        if log:
            print(f"[eval] retraining the classifier: cached {path!r} unusable ({reason})", file=sys.stderr)
    net, acc = train_classifier(train, test, device=device, log=log)
    save_checkpoint({"model": {k: v.cpu() for k, v in net.state_dict().items()}, "classifier_config": expect,
                     "heldout_accuracy": acc}, path)
    return net, acc, path
