#!/usr/bin/env python
"""Train, sample and evaluate DyT / LayerNorm PixArt-alpha and FLUX on MNIST.

    python train_mnist.py                                  # DyT PixArt-alpha: `small` on CPU, `seed` on CUDA
    python train_mnist.py --model flux --norm layernorm    # its LayerNorm FLUX twin
    torchrun --nproc_per_node 2 train_mnist.py ...         # DDP, one process per GPU (gloo on CPU)
    python train_mnist.py sample --checkpoint runs/pixart-dyt-small/checkpoint.pt --prompts "2 seven 0"
    python train_mnist.py eval --checkpoint runs/pixart-dyt-small/checkpoint.pt --eval-samples 1000

Outputs of `train` under --out: checkpoint.pt (model, EMA, optimizer, scheduler, step, config, RNG
states; atomically replaced, with a checksum), samples_XXXXXXX.png + .txt (8x8 grid, EMA weights, and
its prompts), loss_curve.png, losses.txt, metrics.json (conditional accuracy with and without guidance,
feature FID, wall time).

This file is the command only: the work is done by the training package beside it (training/loop.py,
sampling.py, evaluate.py; flags in training/parsers.py). Exit codes: 0 done, 1 the run failed (a
non-finite loss), 2 bad input (a flag, a config file, a checkpoint, a data folder; one line says which),
128 + N stopped by signal N (130 Ctrl-C, 143 SIGTERM) after saving what can be resumed.
"""
from __future__ import annotations

import os
import sys
from typing import Any

# Idle OpenMP threads sleep instead of spinning. On a CPU shared with other jobs, spinning threads
# that wait at each parallel region's barrier for a descheduled sibling made 2-thread training steps
# 5-7x slower than with this setting (measured on this project's 2-core machines); a user's own
# OMP_WAIT_POLICY still wins. It has to be set before torch starts its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from training.errors import RunFailed, UsageError  # noqa: E402
from training.interrupt import Interrupted, handle_signals  # noqa: E402
from training.parsers import COMMANDS, build_parser  # noqa: E402

PROG = "train_mnist.py"


def run_command(argv: list[str]) -> dict[str, Any]:
    """Parse ``argv`` (a command, or train's flags alone) and run the command; errors propagate."""
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["train", *argv]  # plain `python train_mnist.py [flags]` trains, as README says
    top, commands = build_parser(PROG)
    if argv[0] not in COMMANDS:
        top.parse_args(argv)  # -h / --help: prints the commands and exits
    command = argv[0]
    values, given = commands[command].parse(argv[1:])
    if command == "train":
        from training.loop import train
        return train(values, given)
    if command == "sample":
        from training.sampling import sample_command
        return sample_command(values)
    from training.evaluate import eval_command
    return eval_command(values)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the command; a usage error, a failed run or a signal ends the process with one line on
    stderr and its exit code (see the module docstring), never a traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = f"{PROG} " + (argv[0] if argv and argv[0] in COMMANDS else "train")
    try:
        with handle_signals():
            return run_command(argv)
    except UsageError as e:
        print(f"{prog}: error: {e} (see {prog} --help)", file=sys.stderr)
        raise SystemExit(2) from None
    except RunFailed as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except Interrupted as e:
        resume = f"; resume with: python {PROG} --resume {e.resume_from}" if e.resume_from else ""
        print(f"{prog}: {e}{resume}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None


if __name__ == "__main__":
    main()
