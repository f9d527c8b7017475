"""What a run leaves on disk besides checkpoints: sample grids with their prompts, the loss curve and
its values, metrics.json. Each file is written whole (a temporary name, then a rename), so an
interruption leaves the previous version or none, never a truncated one."""
from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any, Iterator

import numpy as np
import torch


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path beside ``path`` to write to; renamed to ``path`` when the block succeeds."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp-{os.getpid()}{ext}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def save_grid(images: torch.Tensor, prompts: list[str], path_png: str) -> None:
    """8-wide (or sqrt-wide) PNG grid via torchvision, and the prompts row by row in a .txt beside it."""
    from torchvision.utils import save_image
    nrow = 8 if len(prompts) >= 64 else max(1, math.ceil(math.sqrt(len(prompts))))
    with atomic_path(path_png) as tmp:
        save_image((images + 1) / 2, tmp, nrow=nrow, padding=2, pad_value=1.0)
    rows = [" ".join(p if p else '""' for p in prompts[r:r + nrow]) for r in range(0, len(prompts), nrow)]
    write_text(os.path.splitext(path_png)[0] + ".txt", "\n".join(rows) + "\n")


def save_losses(losses: list[float], out_dir: str, title: str) -> None:
    """losses.txt (one repr per line: exact floats) and loss_curve.png."""
    write_text(os.path.join(out_dir, "losses.txt"), "\n".join(repr(v) for v in losses) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.5, alpha=0.35, label="loss")
    if len(losses) >= 20:
        w = max(10, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, lw=1.5, label=f"mean of {w}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(os.path.join(out_dir, "loss_curve.png")) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_json(path: str, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2))
