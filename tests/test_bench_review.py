"""The benchmark harness measures what its rows say: checks from a review for silently wrong numbers.

No timing is asserted (CPU numbers prove nothing); each test checks what a row's label promises.
"""
from bench import models as model_bench
from test_bench import _models_args, _stand_in_builder

COUNTING_BACKEND = "bench_review_counting"


def _counting_backend(log: list):
    """A torch.compile backend (aot_eager underneath) that logs, per graph it compiles, the config
    the builder last built; registered once under a name, as the harness takes a backend by name."""
    from torch._dynamo import list_backends, lookup_backend, register_backend

    if COUNTING_BACKEND not in list_backends(exclude_tags=()):
        def counting(gm, example_inputs):
            _counting_backend.log.append(_counting_backend.current)
            return lookup_backend("aot_eager")(gm, example_inputs)
        register_backend(counting, name=COUNTING_BACKEND)
    _counting_backend.log, _counting_backend.current = log, None


def test_each_compiled_model_config_compiles_its_own_model(tmp_path):
    """Every compiled config traces its own model. Before, dynamo's cache outlived the config: a later
    config whose model had the same structure (a fresh instance; the guards check its parameters'
    metadata, not its identity) ran the graph traced for the earlier one: no compile in its
    first_step_s, and the earlier config's trace-time state. That state includes dyt_kernels'
    use_backend, which torch < mid-2026 (the GPU image's 2.11) reads at trace time as a constant,
    unguarded: a standalone script there compiles DyT under "auto", then a fresh instance under
    use_backend("triton"), and the second still traces the pointwise route, so "compiled-kernel"
    could have timed "compiled"'s code under its own label."""
    log: list = []
    _counting_backend(log)
    built = []

    def builder(name, **kw):
        built.append(name)
        _counting_backend.current = name
        return _stand_in_builder(name, **kw)
    # pixart and flux stand-ins are the same model: the second config's dynamo guards pass.
    sec = model_bench.run(_models_args(tmp_path, "--models", "pixart,flux", "--norms", "dyt", "--step-kinds", "train",
                                       "--compile", "compiled", "--compile-backend", COUNTING_BACKEND),
                          builder=builder)
    assert [r["status"] for r in sec["rows"]] == ["ok", "ok"], sec["rows"]
    assert built == ["pixart", "flux"]
    assert set(log) == {"pixart", "flux"}, f"graphs compiled per config: {log}"


def test_a_row_timed_by_the_fallback_timer_is_marked_with_its_speedups():
    """A provider whose CUDA-graph capture fails is timed with do_bench (its row's timer_note says so)
    while the rest of its row is graph-replayed: at the seed's shapes do_bench times the host's
    launches (a few µs a call beside a few µs of kernel), so a speedup across the two timers is not
    a speedup. Before, the Markdown table and the speedup table showed such a pair like any other,
    and the JSON's speedup entry did not say the timers differed."""
    from bench import report
    from bench.kernels import _speedups

    def row(provider, ours, ms, timer, note=None):
        return {"status": "ok", "op": "norm", "provider": provider, "label": provider, "ours": ours,
                "shape_name": "mnist-seed", "shape": [16384, 384], "dtype": "bf16", "mode": "fwd", "time_ms": ms,
                "gbps": 1.0, "pct_copy": 1.0, "timer": timer, "timer_note": note}
    rows = [row("torch_layernorm", False, 0.010, "cuda_graph(rotate=4)"),
            row("dyt_eager", False, 0.030, "do_bench"),   # the same fallback on both sides: comparable
            row("ours", True, 0.030, "do_bench", "cuda graph capture failed (RuntimeError: x); timed with do_bench")]
    rows[1]["timer_note"] = rows[2]["timer_note"]
    sp = {s["baseline"]: s for s in _speedups(rows)}
    assert sp["torch_layernorm"].get("timers") == ["cuda_graph(rotate=4)", "do_bench"]
    assert "timers" not in sp["dyt_eager"]
    text = "\n".join(report._kernels_md({"rows": rows, "speedups": list(sp.values())}))
    assert "| mnist-seed | bf16 | fwd | 0.33× † | 1.00× |" in text, text
    assert "| 10.0 µs · 1 · 1% | 30.0 µs · 1 · 1% † | 30.0 µs · 1 · 1% † |" in text, text
    assert "† timed with do_bench" in text
