"""The sm_90 static facts: every kernel compiles for Hopper with no spills, no 64-bit division, 16-byte
main-stream accesses and one load round trip per iteration; side traffic within its bounds.

Compiles ahead of time on the CPU (no GPU needed): see dyt_kernels/inspect.py. The suite imports the
package under TRITON_INTERPRET=1, where kernels are interpreted functions that cannot be compiled,
so the report runs in a subprocess without it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The report's quick cases, plus every kernel variant the launchers can pick (weight/bias/alpha
# flags, channels-first rows, split samples, per-token modulation, fp32/bf16/fp16), for the hard facts.
_SCRIPT = r"""
import json, sys, torch
from dataclasses import asdict, replace
from dyt_kernels import inspect as di
from dyt_kernels.ops import dyt as D, modulate as Mo, plan as P

rows = di.report(di.QUICK_CASES)
H, f32, bf16 = P.HOPPER, torch.float32, torch.bfloat16
specs = {}
for dt in (f32, bf16, torch.float16):
    for flags in (D.Flags(True, True, False, False), D.Flags(False, False, True, False), D.Flags(True, False, True, True),
                  D.Flags(False, True, False, True)):
        M, N, C = (192, 3136, 96) if flags.per_row else (4096, 1152, 1152)
        specs[f"dyt fwd {dt} {flags}"] = D.plan_forward(M, N, C, dt, (f32, f32, f32), flags, H).spec
        specs[f"dyt bwd {dt} {flags}"] = D.plan_backward(M, N, C, dt, (f32, f32, f32), flags, H).spec
    # parameters in x's dtype (a module moved with .to(dtype)): the build `bench kernels` times
    for direction, plan in (("fwd", D.plan_forward), ("bwd", D.plan_backward)):
        specs[f"dyt {direction} {dt} params {dt}"] = plan(4096, 1152, 1152, dt, (dt,) * 3,
                                                          D.Flags(True, True, False, False), H).spec
    for flags in (D.Flags(True, True, False, False), D.Flags(False, False, True, False)):
        for direction, plan in (("fwd", D.plan_forward), ("bwd", D.plan_backward)):
            # x's rows in three levels (head views of d = 64): the JIT marks the level strides
            # divisible by 16, as it does a row stride
            s = plan(4096, 64, 64, dt, (f32, f32, f32), flags, H, False, 3).spec
            specs[f"dyt {direction} levels {dt} {flags}"] = replace(
                s, divisible=s.divisible + ("stride_xm", "stride_x1", "stride_x0"))
    for tok in (False, True):
        for res, gate, affine in ((False, False, True), (True, False, False), (True, True, True)):
            ff = Mo.FwdFlags(res, gate, affine, affine, affine)
            specs[f"mod fwd {dt} {ff} tok={tok}"] = Mo.plan_forward(3, 1000, 768, dt, (dt,) * 4 + (f32,) * 3, ff, H).spec
            bf = Mo.BwdFlags(res, res, gate, gate, affine, affine, affine, tok, tok, gate and tok)
            for B, L in ((3, 1000), (512, 16)):   # samples split over programs, and whole samples
                p = Mo.plan_backward(B, L, 768, dt, (dt, dt, dt, f32, f32, f32, dt), bf, H)
                specs[f"mod bwd {dt} {bf} B={B} split={p.split}"] = p.spec
facts = {name: asdict(di.code_facts(spec)[0]) for name, spec in specs.items()}
facts["finish"] = asdict(di.code_facts(di._finish_spec(6))[0])
odd = D.plan_forward(64, 383, 383, bf16, (f32, f32, f32), D.Flags(True, True, False, False), H).spec
odd_facts = di.code_facts(odd)[0]
json.dump({"rows": [{**asdict(r), "side_pct": r.side_pct} for r in rows], "facts": facts,
           "odd": asdict(odd_facts), "odd_vector_ok": odd_facts.vector_ok(), "table": di.format_table(rows),
           "triton": __import__("triton").__version__}, open(sys.argv[1], "w"))
"""


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "facts.json"
    subprocess.run([sys.executable, "-c", _SCRIPT, str(out)], check=True, env=_env(), cwd=ROOT, timeout=900)
    return json.loads(out.read_text())


def test_no_spills_no_64_bit_division(result):
    bad = [f"{name}: spill {f['spill_bytes']} B, div64 {f['div64']}" for name, f in result["facts"].items()
           if f["spill_bytes"] or f["div64"]]
    assert not bad, "\n".join(bad)


def test_one_load_round_trip_per_iteration(result):
    """Every load of an iteration (or of a program, for the forwards) issues before the first use."""
    bad = [f"{name}: {f['round_trips']} round trips" for name, f in result["facts"].items()
           if name != "finish" and f["round_trips"] != 1]
    assert not bad, "\n".join(bad)


def test_backwards_loop_and_forwards_do_not(result):
    for name, f in result["facts"].items():
        if name != "finish":
            assert f["has_loop"] == (" bwd " in name), name


def test_16_byte_main_stream_accesses(result):
    """128-bit loads and stores, no 2-byte scalar ones, for hidden sizes that allow them. The one
    exception: a scalar alpha in a 2-byte dtype is one 2-byte load per program (a 'params bf16/fp16'
    build), outside the main streams."""
    def vector_ok(name, f):
        scalar_alpha = 1 if name.endswith(("params torch.bfloat16", "params torch.float16")) else 0
        narrow = sum(n for k, n in list(f["loads"].items()) + list(f["stores"].items()) if ".U16" in k or ".S16" in k)
        return (narrow <= scalar_alpha and any(".128" in k for k in f["loads"])
                and any(".128" in k for k in f["stores"]))
    bad = [f"{name}: loads {f['loads']}, stores {f['stores']}" for name, f in result["facts"].items()
           if name != "finish" and not vector_ok(name, f)]
    assert not bad, "\n".join(bad)


def test_check_catches_scalar_accesses(result):
    """A hidden size that breaks 16-byte alignment (D = 383, bf16) is reported as not vectorized, so
    the check above can fail."""
    assert not result["odd_vector_ok"], result["odd"]["loads"]
    assert any(".U16" in k for k in result["odd"]["loads"])


def test_tanh_form_follows_output_dtype(result):
    for name, f in result["facts"].items():
        if name == "finish":
            continue
        want = "polynomial + ex2.approx" if "torch.float32" in name else "tanh.approx.f32"
        assert f["tanh"] == want, (name, f["tanh"])


def test_launches_and_side_traffic(result):
    """Forward one launch, backward two; the fp32 partial sums stay within 5% of the minimum bytes at
    the seed's shapes and 2% at 8192 x 4096."""
    bound = {"dyt bf16 16384x384": 5.0, "modulate bf16 1024x16x384 +res+gate": 5.0, "dyt bf16 8192x4096": 2.0}
    for r in result["rows"]:
        assert r["launches"] == (1 if r["direction"] == "fwd" else 2)
        assert r["side_pct"] <= bound.get(r["case"], 5.0), (r["case"], r["direction"], r["side_pct"])


def test_backward_grids_are_one_wave(result):
    """Persistent reductions fill the SMs once (programs per SM from the compiled registers), no tail."""
    for r in result["rows"]:
        if r["direction"] == "bwd":
            assert 0.9 <= r["waves"] <= 1.0, (r["case"], r["waves"])
            assert r["programs_per_sm"] >= 1


def test_estimates_are_fractions(result):
    for r in result["rows"]:
        assert 0.0 < r["est_fraction"] <= 1.0, r


def test_command_prints_table_and_dumps(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dyt_kernels.inspect", "--quick", "--dump", str(tmp_path)],
                         capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "| case | dir | launches |" in out.stdout and "est. % of copy" in out.stdout
    names = {p.name for p in tmp_path.iterdir()}
    assert any(n.startswith("dyt_bwd_kernel") and n.endswith(".sass") for n in names), names
    assert any(n.startswith("modulate_fwd_kernel") and n.endswith(".ptx") for n in names), names
    assert any(n.startswith("finish_kernel") for n in names), names


# The Triton whose ptxas made the tables in README and docs/PERFORMANCE.md: another version allocates
# registers differently, so the tables are checked only under it.
DOCS_TRITON = "3.8."


def test_docs_tables_show_the_report_as_it_is(result):
    """Every row of the quick report stands in docs/PERFORMANCE.md exactly as inspect prints it, and in
    README's shorter table (same values, fewer columns) where README has that row: a kernel change that
    moves registers, occupancy or the estimate shows up here instead of leaving the docs behind."""
    if not result["triton"].startswith(DOCS_TRITON):
        pytest.skip(f"the tables were made with Triton {DOCS_TRITON}x, this is {result['triton']}")
    rows = [line for line in result["table"].splitlines() if line.startswith(("| dyt", "| modulate"))]
    assert len(rows) == 2 * 5
    performance = (ROOT / "docs" / "PERFORMANCE.md").read_text().splitlines()
    stale = [row for row in rows if row not in performance]
    readme = {tuple(_cells(line)[:2]): line for line in (ROOT / "README.md").read_text().splitlines()
              if line.startswith(("| dyt", "| modulate"))}
    for row in rows:
        c = _cells(row)
        short = "| " + " | ".join([*c[:4], c[4].split("(")[1].rstrip(")"), c[5], *c[7:11], c[13]]) + " |"
        if tuple(c[:2]) in readme and readme[tuple(c[:2])] != short:
            stale.append(f"README: {short}")
    assert not stale, ("the static report has changed; refresh README's and docs/PERFORMANCE.md's tables "
                       "from python -m dyt_kernels.inspect:\n" + "\n".join(stale))


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]
