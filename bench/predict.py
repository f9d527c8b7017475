"""The static model's predictions for the kernel benchmark's cases, written beside the measurements.

    python -m bench.predict [--out bench/predictions.json]

For every (op, shape, dtype) the kernel benchmark runs, dyt_kernels.inspect compiles our kernels
for sm_90a (on the CPU, no GPU needed) and perfmodel.py estimates time and fraction of copy
bandwidth, for an H100 and an H200. The JSON is committed; `bench kernels` attaches the prediction
for its device to each "ours" row, so the first GPU run tests the model too. Regenerate it whenever
a kernel or a launch plan changes: the file records a hash of the code it was computed from, and
tests/test_bench.py fails when that code has changed since.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

PATH = Path(__file__).resolve().parent / "predictions.json"
OPS = {"norm": "dyt", "adaln": "modulate", "adaln_res": "modulate"}


SOURCES = ("ops/dyt.py", "ops/modulate.py", "ops/finish.py", "ops/plan.py", "ops/primitives.py", "perfmodel.py",
           "inspect.py")


def source_hash() -> str:
    """A hash of the kernel, plan and model code the predictions come from."""
    import hashlib

    import dyt_kernels
    root = Path(dyt_kernels.__file__).resolve().parent
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((root / name).read_bytes())
    return digest.hexdigest()[:16]


def key(op: str, shape_name: str, dtype: str, gpu: str) -> str:
    return f"{op}/{shape_name}/{dtype}/{gpu}"


def compute(shape_names=None, dtypes=("bf16", "fp32")) -> dict:
    from dyt_kernels import inspect, perfmodel

    from .kernels import DTYPES, SHAPES, shape_for

    gpus = {"H100": perfmodel.H100, "H200": perfmodel.H200}
    out = {}
    for shape_name, (group, _) in SHAPES.items():
        if (shape_names is None and group == "smoke") or (shape_names and shape_name not in shape_names):
            continue
        for op in OPS:
            shape = shape_for(op, shape_name)
            if shape is None:
                continue
            for dt in dtypes:
                case = inspect.Case(OPS[op], shape_name, DTYPES[dt], tuple(shape), op == "adaln_res")
                for gpu_name, gpu in gpus.items():
                    out[key(op, shape_name, dt, gpu_name)] = inspect.predict(case, gpu)
    return out


def load() -> dict:
    try:
        return json.loads(PATH.read_text())["predictions"]
    except (OSError, ValueError, KeyError):
        return {}


def gpu_model_of(device_name: str | None) -> str:
    return "H200" if device_name and "H200" in device_name else "H100"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(PATH))
    args = ap.parse_args(argv)
    doc = {"note": "estimates from python -m dyt_kernels.inspect's model (docs/PERFORMANCE.md), sm_90a code "
                   "compiled on a CPU; fraction_of_copy is min bytes / time / copy bandwidth",
           "torch": torch.__version__, "source_hash": source_hash(), "predictions": compute()}
    Path(args.out).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(doc['predictions'])} predictions to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
