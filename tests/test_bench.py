"""The benchmark harness stays runnable: byte counts by hand, then a smoke run of each benchmark.

No timing is asserted anywhere: CPU numbers in CI only prove the harness produces well-formed rows.
The smoke run uses the aot_eager compile backend, which traces and partitions like Inductor but
skips its C++/Triton code generation, so it stays fast on CI (and on a GPU machine running the suite).
"""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bench import bytecount
from bench import models as model_bench
from bench.__main__ import main
from bench.kernels import DTYPES, MODES, op_bytes, resolve_shapes, shape_for
from bench.providers import OPS, providers_for

# ----- minimum byte counts ------------------------------------------------------------------------


def test_norm_bytes_by_hand():
    # M=4 rows, N=8 channels, bf16 (2 bytes): each (M, N) stream is 64 bytes, weight/bias 16, alpha 2.
    fwd = bytecount.norm_traffic("fwd", 4, 8, 2)
    assert fwd == {"x": 64, "alpha": 2, "weight": 16, "bias": 16, "y": 64}
    assert bytecount.total(fwd) == 162
    # The kernel header's counts are the (M, N) streams alone: 2*M*N*s forward, 3*M*N*s backward.
    assert fwd["x"] + fwd["y"] == 2 * 4 * 8 * 2
    bwd = bytecount.norm_traffic("bwd", 4, 8, 2)
    assert bwd["dy"] + bwd["x"] + bwd["dx"] == 3 * 4 * 8 * 2
    assert bytecount.norm_bytes("bwd", 4, 8, 2) == 192 + 2 + 16 + 2 + 16 + 16  # + alpha, weight, dalpha, dw, db
    assert bytecount.norm_bytes("fwd_bwd", 4, 8, 2) == 162 + 244
    # fp32 weights under bf16 activations count at their own size.
    assert bytecount.norm_bytes("fwd", 4, 8, 2, param_elem=4, alpha_elem=4) == 128 + 4 + 32 + 32


def test_adaln_bytes_by_hand():
    # B=2, L=3, D=4, fp32: each (B, L, D) tensor is 96 bytes, each per-sample (B, D) one 32, alpha 4.
    assert bytecount.adaln_bytes("fwd", 2, 3, 4, 4) == 96 + 96 + 32 + 32 + 4            # x, h, shift, scale, alpha
    assert bytecount.adaln_bytes("fwd", 2, 3, 4, 4, residual=True, gate=True) == 260 + 96 + 96 + 32  # residual, r, gate
    assert bytecount.adaln_bytes("bwd", 2, 3, 4, 4) == 3 * 96 + 3 * 32 + 2 * 4          # dh x dx; scale dshift dscale
    # dh dr r x dx dresidual; scale gate dshift dscale dgate; alpha dalpha
    assert bytecount.adaln_bytes("bwd", 2, 3, 4, 4, residual=True, gate=True) == 6 * 96 + 5 * 32 + 2 * 4
    # No gate: dx is dresidual itself (one write), and x is not needed.
    assert bytecount.adaln_bytes("bwd", 2, 3, 4, 4, residual=True) == 4 * 96 + 3 * 32 + 2 * 4
    assert bytecount.adaln_bytes("fwd_bwd", 2, 3, 4, 4) == 260 + 392
    # bf16 activations with fp32 modulation vectors.
    assert bytecount.adaln_bytes("fwd", 2, 3, 4, 2, mod_elem=4) == 48 + 48 + 32 + 32 + 4


def test_byte_count_errors_and_copy():
    assert bytecount.copy_bytes(10, 4) == 80
    with pytest.raises(ValueError, match="gate"):
        bytecount.adaln_traffic("fwd", 2, 3, 4, 4, gate=True)
    with pytest.raises(ValueError, match="mode"):
        bytecount.norm_traffic("forward", 2, 3, 4)


def test_harness_shapes_use_the_byte_functions():
    assert op_bytes("norm", "fwd", (1024 * 16, 384), torch.bfloat16) == 2 * 16384 * 384 * 2 + 2 + 2 * 384 * 2
    assert op_bytes("adaln_res", "fwd", (2, 3, 4), torch.float32) == 484
    assert shape_for("adaln_res", "mnist-seed") == (1024, 16, 384)
    assert shape_for("adaln", "llm-4k") is None
    assert resolve_shapes("seed") == ["mnist-seed"]


# ----- kernel benchmark smoke run -----------------------------------------------------------------


# On a GPU machine Liger would autotune 18 configs per shape, dtype and pass (about a minute at the
# smoke shapes); the GPU script benchmarks it in its own stage. Off CUDA its rows record why it skipped.
SKIPPED_HERE = {"liger_dyt"} if torch.cuda.is_available() else set()


@pytest.fixture(scope="module")
def kernel_smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_kernels")
    skip = ["--skip-providers", ",".join(sorted(SKIPPED_HERE))] if SKIPPED_HERE else []
    rc = main(["kernels", "--smoke", "--out", str(out), "--compile-backend", "aot_eager", *skip])
    docs = sorted(out.glob("*.json"))
    assert len(docs) == 1, f"expected one results file, got {docs}"
    return rc, out, json.loads(docs[0].read_text())


def test_kernel_smoke_rows_complete(kernel_smoke):
    rc, _, doc = kernel_smoke
    sec = doc["kernels"]
    rows = sec["rows"]
    assert rc == 0, [r for r in rows if r["status"] == "error"]
    shapes = resolve_shapes("smoke")
    want = {(op, p.name, s, d, m) for op in OPS for p in providers_for(op) if p.name not in SKIPPED_HERE
            for s in shapes for d in DTYPES if d in sec["config"]["dtypes"] for m in MODES}
    got = {(r["op"], r["provider"], r["shape_name"], r["dtype"], r["mode"]) for r in rows}
    assert got == want
    for r in rows:
        if r["status"] == "ok":
            assert r["time_ms"] > 0 and r["gbps"] > 0 and r["copy_gbps"] > 0 and r["pct_copy"] > 0
            assert r["bytes"] == op_bytes(r["op"], r["mode"], tuple(r["shape"]), DTYPES[r["dtype"]])
        else:
            assert r["status"] == "skipped" and r["reason"]
    # Only a provider that names why may be missing: Liger off CUDA or not installed.
    assert {r["provider"] for r in rows if r["status"] != "ok"} <= {"liger_dyt"}
    for key in ("device_name", "torch", "triton", "date", "git_commit", "driver"):
        assert key in sec["env"]


def test_kernel_smoke_speedups(kernel_smoke):
    _, _, doc = kernel_smoke
    sec = doc["kernels"]
    ours = [r for r in sec["rows"] if r["ours"] and r["status"] == "ok"]
    assert ours
    for r in ours:
        others = {b["provider"] for b in sec["rows"] if b["status"] == "ok" and not b["ours"]
                  and all(b[k] == r[k] for k in ("op", "shape_name", "dtype", "mode"))}
        assert set(r["speedup_vs"]) == others
        assert all(v > 0 for v in r["speedup_vs"].values())


def test_kernel_smoke_markdown_and_charts(kernel_smoke):
    _, out, doc = kernel_smoke
    stem = f"{doc['device_slug']}-{doc['date']}"
    md = (out / f"{stem}.md").read_text()
    assert "## Kernel benchmarks" in md and "| shape | mode |" in md and "Speedup of ours" in md
    pytest.importorskip("matplotlib")
    for name in (f"{stem}.png", f"{stem}-speedup.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_qknorm_is_opt_in_and_benchmarks_head_views(tmp_path):
    """`--ops qknorm` (not in a default run): x is a (B, H, L, d) head view of a fused qkv projection,
    its bytes a norm's over B*L*H rows of d, and a smoke run gives every provider's rows."""
    from bench.providers import ALL_OPS, make_inputs
    assert "qknorm" in ALL_OPS and "qknorm" not in OPS
    x = make_inputs("qknorm", (2, 5, 3, 8), torch.float32, torch.device("cpu"))["x"]
    assert x.shape == (2, 3, 5, 8) and x.stride() == (5 * 72, 8, 72, 1) and x.is_leaf and x.requires_grad
    assert op_bytes("qknorm", "fwd", (2, 5, 3, 8), torch.float32) == op_bytes("norm", "fwd", (30, 8), torch.float32)
    rc = main(["kernels", "--smoke", "--out", str(tmp_path), "--ops", "qknorm", "--dtypes", "fp32",
               "--providers", "dyt_eager,ours", "--modes", "fwd"])
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["kernels"]["rows"]
    assert rc == 0 and {(r["provider"], r["status"]) for r in rows} == {("dyt_eager", "ok"), ("ours", "ok")}
    assert {r["op"] for r in rows} == {"qknorm"}


def test_kernel_merge_keeps_other_rows(kernel_smoke, tmp_path):
    """A later run for one provider replaces that provider's rows and keeps the rest of the table."""
    _, out, doc = kernel_smoke
    stem = f"{doc['device_slug']}-{doc['date']}"
    (tmp_path / f"{stem}.json").write_text((out / f"{stem}.json").read_text())
    rc = main(["kernels", "--smoke", "--out", str(tmp_path), "--providers", "ours", "--ops", "norm",
               "--dtypes", "fp32", "--merge"])
    assert rc == 0
    merged = json.loads((tmp_path / f"{stem}.json").read_text())["kernels"]
    key = lambda r: (r["op"], r["provider"], r["shape_name"], r["dtype"], r["mode"])  # noqa: E731
    assert sorted(map(key, merged["rows"])) == sorted(map(key, doc["kernels"]["rows"]))
    assert merged["config"]["merged_rows"] == len(doc["kernels"]["rows"]) - 2 * len(MODES)
    assert len(merged["speedups"]) == len(doc["kernels"]["speedups"])


def test_kernel_run_stopped_by_sigterm_still_lists_every_case(tmp_path, monkeypatch):
    """SIGTERM (a stage timeout) mid-run: the rows measured so far stay, every case not reached is a
    skipped row that says why, and the results file is written."""
    import os
    import signal

    from bench import kernels
    real, calls = kernels.bench_provider, {"n": 0}

    def bench_then_sigterm(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(kernels, "bench_provider", bench_then_sigterm)
    rc = main(["kernels", "--smoke", "--out", str(tmp_path), "--ops", "norm", "--dtypes", "fp32",
               "--providers", "torch_layernorm,ours"])
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())["kernels"]
    rows = doc["rows"]
    assert rc == 0 and doc["stopped"] == "stopped by SIGTERM (stage timeout)"
    cases = {(r["provider"], r["shape_name"]) for r in rows}
    assert cases == {(p, s) for p in ("torch_layernorm", "ours") for s in resolve_shapes("smoke")}
    assert len(rows) == len(cases) * len(MODES)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == len(MODES)  # the first case finished; the second was stopped inside
    assert all(r["reason"] == doc["stopped"] for r in rows if r["status"] != "ok")


# ----- model benchmark ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("_dyt_fwd_kernel", True),
    ("_modulate_bwd_kernel", True),
    ("triton_poi_fused_add_mul_tanh_3", True),
    ("triton_per_fused_native_layer_norm_backward_7", True),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>", True),
    ("void GammaBetaBackwardCUDAKernel<c10::BFloat16>", True),
    ("dyt_kernels::dyt_modulate_fwd", True),
    ("triton_poi_fused_gelu_tanh_backward_2", False),
    ("sm90_xmma_gemm_bf16bf16_bf16f32", False),
    ("aten::add_", False),
])
def test_norm_kernel_matching_rule(name, expected):
    assert model_bench.is_norm_kernel(name) is expected


class _StandInModel(nn.Module):
    """The models interface (encode_prompts, forward(x, t, cond)) around one adaLN block."""

    def __init__(self, norm, in_channels=1, image_size=32, hidden=32, patch=8):
        super().__init__()
        from dyt_kernels import ModulatedDyT
        self.patch, self.norm_kind = patch, norm
        self.embed = nn.Linear(in_channels * patch * patch, hidden)
        self.text = nn.Embedding(16, hidden)
        self.ada = nn.Linear(hidden, 2 * hidden)
        self.dyt = ModulatedDyT(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(2 * hidden, hidden))
        self.out = nn.Linear(hidden, in_channels * patch * patch)

    def encode_prompts(self, prompts):
        idx = torch.tensor([len(p) for p in prompts], device=self.embed.weight.device)
        return self.text(idx)

    def forward(self, x, t, cond):
        from dyt_kernels import layernorm_modulate
        B, C, H, W = x.shape
        p = self.patch
        tokens = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)
        h = self.embed(tokens)
        shift, scale = self.ada(cond + t[:, None]).chunk(2, dim=-1)
        n = self.dyt(h, shift, scale) if self.norm_kind == "dyt" else layernorm_modulate(h, shift, scale)
        h = h + self.mlp(n)
        out = self.out(h).reshape(B, H // p, W // p, C, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(B, C, H, W)


def _stand_in_builder(name, preset="seed", norm="dyt", in_channels=1, image_size=32, **overrides):
    assert name in ("pixart", "flux") and preset in ("seed", "small")
    return _StandInModel(norm, in_channels, image_size)


def _models_args(out, *extra):
    import argparse
    ap = argparse.ArgumentParser()
    model_bench.add_arguments(ap)
    return ap.parse_args(["--smoke", "--out", str(out), "--device", "cpu", *extra])


def test_models_bench_with_stand_in(tmp_path):
    sec = model_bench.run(_models_args(tmp_path, "--models", "pixart", "--compile-backend", "aot_eager"),
                          builder=_stand_in_builder)
    rows = [r for r in sec["rows"] if r["status"] == "ok"]
    assert {(r["norm"], r["mode"], r["step"]) for r in rows} == {
        (n, c, k) for n in ("layernorm", "dyt") for c in ("eager", "compiled") for k in ("train", "sample")}
    # Off CUDA the kernel-only modes are listed with the reason they did not run.
    skipped = {(r["norm"], r["mode"]): r["reason"] for r in sec["rows"] if r["status"] != "ok"}
    assert set(skipped) == {("dyt", "compiled-kernel"), ("layernorm", "compiled-kernel"),
                            ("dyt", "reduce-overhead"), ("layernorm", "reduce-overhead"),
                            ("dyt", "eager-graphs"), ("layernorm", "eager-graphs")}, skipped
    assert "needs CUDA" in skipped[("dyt", "reduce-overhead")]
    assert "needs CUDA" in skipped[("dyt", "eager-graphs")]
    assert "norm=dyt" in skipped[("layernorm", "compiled-kernel")]
    for r in rows:
        assert r["steps_per_s"] > 0 and r["kernel_ms_per_step"] > 0
        assert 0 < r["norm_share"] <= 1, r["matched"]
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert doc["models"]["matching_rule"]
    assert "## Model benchmarks" in next(tmp_path.glob("*.md")).read_text()


def test_models_bench_skips_without_models(tmp_path, monkeypatch):
    why = "the models package is not importable: ModuleNotFoundError: No module named 'einops'"
    monkeypatch.setattr(model_bench, "load_builder", lambda: (None, why))
    sec = model_bench.run(_models_args(tmp_path))
    assert sec["status"] == "skipped" and sec["reason"] == why
    assert "Skipped" in next(tmp_path.glob("*.md")).read_text()


def test_models_bench_real_models(tmp_path):
    pytest.importorskip("einops", reason="the models need the train extra: pip install -e .[train]")
    # One block per stack keeps this a few seconds; the compiled path is covered by the stand-in above.
    shallow = ["--override", "pixart:depth=1", "--override", "flux:depth_double=1", "--override", "flux:depth_single=1"]
    sec = model_bench.run(_models_args(tmp_path, "--compile", "eager", *shallow))
    assert len(sec["rows"]) == 2 * 2 * 2
    assert [r for r in sec["rows"] if r["status"] != "ok"] == []
    assert all(r["steps_per_s"] > 0 and r["norm_share"] > 0 for r in sec["rows"])


def test_predictions_are_current_and_complete():
    """bench/predictions.json comes from the kernels' current code (regenerate with
    `python -m bench.predict` after changing a kernel, a plan or the model) and covers every
    non-smoke case the GPU script benchmarks, for both GPU models."""
    from bench import predict
    doc = json.loads(predict.PATH.read_text())
    assert doc["source_hash"] == predict.source_hash(), "stale: run python -m bench.predict"
    preds = doc["predictions"]
    for shape_name in resolve_shapes("all"):
        for op in OPS:
            if shape_for(op, shape_name) is None:
                continue
            for dt in ("bf16", "fp32"):
                for gpu in ("H100", "H200"):
                    entry = preds[predict.key(op, shape_name, dt, gpu)]
                    for mode in MODES:
                        assert 0 < entry[mode]["fraction_of_copy"] <= 1 and entry[mode]["time_us"] > 0
    assert predict.gpu_model_of("NVIDIA H200") == "H200" and predict.gpu_model_of("NVIDIA H100 80GB HBM3") == "H100"


def test_prediction_rows_render(tmp_path):
    """An "ours" row that carries a prediction shows up in the predicted-vs-measured table."""
    from bench import report
    sec = {"copy_peak": {"gbps": 3000.0}, "config": {"predictions_for": "H100"},
           "rows": [{"status": "ok", "op": "norm", "shape_name": "mnist-seed", "shape": [16384, 384], "dtype": "bf16",
                     "mode": "fwd", "gbps": 2400.0, "predicted_pct_peak_copy": 77.0}]}
    text = "\n".join(report._predictions_md(sec))
    assert "| norm | mnist-seed 16384×384 | bf16 | fwd | 77% | 80% | +3 |" in text


def test_host_bench_on_cpu(tmp_path):
    """python -m bench host: every op and mode timed beside the eager DyT and F.layer_norm, with the
    interpreter's launcher stubbed (the suite runs under TRITON_INTERPRET=1)."""
    import argparse

    from bench import host
    from dyt_kernels.backend import INTERPRETER
    if not INTERPRETER:
        pytest.skip("the stubbed-launch measurement needs the interpreter (a GPU run times real launches)")
    import triton.runtime.interpreter as interp
    run = interp.InterpretedFunction.run
    try:
        sec = host.run(argparse.Namespace(calls=5, rounds=2, out=str(tmp_path), device="cpu", stub="interpreter"))
    finally:
        interp.InterpretedFunction.run = run
    keys = {(r["op"], r["mode"], r["provider"]) for r in sec["rows"]}
    for op, eager in host.EAGER.items():
        for mode in ("fwd", "fwd+bwd"):
            assert (op, mode, "ours") in keys and (op, mode, eager) in keys
    assert ("DyT module", "fwd", "nn.LayerNorm") in keys
    assert all(r["vs_eager"] == 1.0 for r in sec["rows"] if r["provider"] == host.EAGER[r["op"]])
    assert ("dyt", "no_grad", "ours") in keys and ("dyt", "no_grad", "eager DyT (4 ops)") in keys
    assert all(r["us_per_call"] > 0 for r in sec["rows"])
    assert "## Host time per call" in next(tmp_path.glob("*.md")).read_text()


def test_host_bench_stopped_by_its_stage_timeout_keeps_the_rounds_it_finished(tmp_path, monkeypatch):
    """gpu_check gives `bench host` a stage timeout (SIGTERM): the rounds finished before it are written,
    each row the best of them, and the report says the run was cut short (before, nothing was written)."""
    import argparse
    import os
    import signal

    from bench import host
    from dyt_kernels.backend import INTERPRETER
    if not INTERPRETER:
        pytest.skip("the stubbed-launch measurement needs the interpreter (a GPU run times real launches)")
    import triton.runtime.interpreter as interp
    write, sent = host.report.write_section, []

    def write_then_term(*args, **kwargs):   # the stage's timeout arrives right after round 1 is saved
        paths = write(*args, **kwargs)
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return paths
    monkeypatch.setattr(host.report, "write_section", write_then_term)
    previous = signal.getsignal(signal.SIGTERM)
    run = interp.InterpretedFunction.run
    try:
        sec = host.run(argparse.Namespace(calls=2, rounds=50, out=str(tmp_path), device="cpu", stub="interpreter"))
    finally:
        interp.InterpretedFunction.run = run
    assert signal.getsignal(signal.SIGTERM) is previous
    assert sec["stopped"].endswith("after 1 of 50 rounds") and sec["rounds_done"] == 1
    keys = {(r["op"], r["mode"], r["provider"]) for r in sec["rows"]}
    assert {(op, mode, who) for op, eager in host.EAGER.items() for mode in ("fwd", "fwd+bwd")
            for who in ("ours", eager)} <= keys
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert doc["host"]["rows"] == sec["rows"]
    assert "after 1 of 50 rounds" in next(tmp_path.glob("*.md")).read_text()


def test_host_bench_times_the_jit_launcher_beside_direct_launches():
    """On CUDA every "ours" row is timed again with direct launches off, restored after each call."""
    from bench import host
    from dyt_kernels.ops import direct
    seen = []
    fns = {("dyt", "fwd", "ours"): lambda: seen.append(direct.enabled()), ("dyt", "fwd", "eager"): lambda: None}
    extra = host._jit_launcher(fns)
    assert list(extra) == [("dyt", "fwd", "ours, JIT launcher")]
    previous = direct.set_enabled(True)
    try:
        extra[("dyt", "fwd", "ours, JIT launcher")]()
        assert seen == [False] and direct.enabled()
    finally:
        direct.set_enabled(previous)


def test_host_bench_with_the_stub_driver(tmp_path):
    """python -m bench host (CPU, --stub driver): Triton's own launcher runs with the GPU stubbed out,
    kernels compiled for sm_90; every op is timed with direct launches and through the JIT launcher.
    A subprocess: TRITON_INTERPRET must be unset before dyt_kernels is imported."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "bench", "host", "--device", "cpu", "--calls", "3", "--rounds", "1",
                          "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    sec = doc["host"]
    assert sec["config"]["stub"] == "driver" and "stub driver" in sec["config"]["note"]
    keys = {(r["op"], r["mode"], r["provider"]) for r in sec["rows"]}
    for op in ("dyt", "dyt_modulate"):
        for mode in ("fwd", "fwd+bwd"):
            assert (op, mode, "ours") in keys and (op, mode, "ours, JIT launcher") in keys
    assert all(r["us_per_call"] > 0 for r in sec["rows"])
