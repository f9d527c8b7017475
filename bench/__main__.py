"""python -m bench {kernels,models} [options]; see --help of each."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from . import kernels, models

    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    kernels.add_arguments(sub.add_parser("kernels", help="norm / adaLN kernels against their baselines"))
    models.add_arguments(sub.add_parser("models", help="PixArt-alpha and FLUX training and sampling steps"))
    args = ap.parse_args(argv)
    if args.command == "kernels":
        section = kernels.run(args)
        return 1 if any(r["status"] == "error" for r in section["rows"]) else 0
    section = models.run(args)
    return 1 if any(r["status"] == "error" for r in section.get("rows", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
