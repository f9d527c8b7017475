"""The sm_90 static check: every main kernel compiles for Hopper with no spills and 16-byte accesses.

Compiles ahead of time on the CPU (no GPU needed): see dyt_kernels/inspect.py. The suite imports
the package under TRITON_INTERPRET=1, where kernels are interpreted functions that cannot be
compiled, so the check runs in a subprocess without it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = """
import json, sys, torch
from dataclasses import asdict
from dyt_kernels import inspect as di
quick = di.inspect_kernels(quick=True)
odd = di.inspect_kernels(cases=[("dyt D=383", torch.bfloat16, di.dyt_case(64, 383, torch.bfloat16))])
json.dump({"quick": [asdict(r) for r in quick], "odd": [asdict(r) for r in odd],
           "odd_vector_ok": [r.vector_ok() for r in odd], "quick_vector_ok": [r.vector_ok() for r in quick]},
          open(sys.argv[1], "w"))
"""


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "reports.json"
    subprocess.run([sys.executable, "-c", _SCRIPT, str(out)], check=True, env=_env(), cwd=ROOT, timeout=600)
    return json.loads(out.read_text())


class _R:
    def __init__(self, d, ok):
        self.__dict__.update(d)
        self.ok = ok


@pytest.fixture(scope="module")
def reports(result):
    return [_R(d, ok) for d, ok in zip(result["quick"], result["quick_vector_ok"])]


def test_every_kernel_family_is_covered(reports):
    names = {r.kernel for r in reports}
    assert names == {"dyt_fwd_kernel", "dyt_bwd_kernel", "modulate_fwd_kernel", "modulate_bwd_kernel"}


def test_no_spills_and_16_byte_accesses(reports):
    bad = [f"{r.kernel} [{r.case}, {r.dtype}]: spill {r.spill_bytes} B, loads {r.loads}, stores {r.stores}"
           for r in reports if r.spill_bytes or not r.ok]
    assert not bad, "\n".join(bad)
    assert all(r.registers <= 255 for r in reports)


def test_tanh_form_follows_output_dtype(reports):
    for r in reports:
        want = "tanh.approx.f32" if r.dtype in ("bf16", "fp16") else "libdevice (ex2-based)"
        assert r.tanh == want, (r.kernel, r.case, r.dtype, r.tanh)


def test_check_catches_scalar_accesses(result):
    """A hidden size that breaks 16-byte alignment (D = 383, bf16) must be reported as not vectorized,
    so the check above can fail."""
    assert result["odd"] and not result["odd_vector_ok"][0], result["odd"][0]["loads"]
    assert any(k.endswith(".b16") for k in result["odd"][0]["loads"])


def test_command_prints_table():
    out = subprocess.run([sys.executable, "-m", "dyt_kernels.inspect", "--quick"], capture_output=True, text=True,
                         env=_env(), cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "| kernel |" in out.stdout and "modulate_bwd_kernel" in out.stdout
