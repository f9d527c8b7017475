"""python -m bench {kernels,models,host} [options]; see --help of each."""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["host"] and "--device" not in argv and "interpreter" in argv:
        # --stub interpreter stubs the interpreter's launcher, which Triton only uses when
        # TRITON_INTERPRET is set before the kernels are decorated (dyt_kernels' import).
        import torch
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    from . import host, kernels, models

    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    kernels.add_arguments(sub.add_parser("kernels", help="norm / adaLN kernels against their baselines"))
    models.add_arguments(sub.add_parser("models", help="PixArt-alpha and FLUX training and sampling steps"))
    host.add_arguments(sub.add_parser("host", help="host time per call of each op, beside eager DyT and LayerNorm"))
    args = ap.parse_args(argv)
    if args.command == "kernels":
        section = kernels.run(args)
        return 1 if any(r["status"] == "error" for r in section["rows"]) else 0
    if args.command == "host":
        host.run(args)
        return 0
    section = models.run(args)
    return 1 if any(r["status"] == "error" for r in section.get("rows", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
