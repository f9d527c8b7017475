"""Kernel benchmarks: every provider of bench/providers.py, forward / backward / forward+backward.

For each (dtype, shape, op, provider, mode) one row: median time, GB/s over the op's minimum bytes
(bench/bytecount.py), the bandwidth of a `y.copy_(x)` moving the same bytes timed the same way in
the same run, and, on fwd_bwd rows, the peak memory of one forward+backward. "ours" rows also carry
the speedup against every other provider of the op.

Modes, all with inputs that require grad (a training step's forward):
    fwd       the forward alone
    bwd       the backward alone: one forward outside the timing, then backward(retain_graph=True)
    fwd_bwd   forward then backward

A run has an optional time budget: rows it cannot reach are written as skipped, and the results so
far are saved after every op group, so a run stopped by `timeout` (SIGTERM) still leaves its numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import bytecount, predict, report
from .runctl import Budget, Stop, choices, compile_settings, stop_on_sigterm, stop_requested
from .providers import ALL_OPS, OPS, Context, Provider, make_inputs, providers_for
from .timing import TimerConfig, clear_grads, rotation, sync, time_calls, use_graph

MODES = bytecount.MODES
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# name -> (set, {op: shape}); norm shapes are (rows, channels), adaLN shapes (B, L, D), QK-norm head
# views (B, L, H, d).
SHAPES = {
    "mnist-seed": ("seed", {"norm": (1024 * 16, 384), "adaln": (1024, 16, 384),     # seed: 1024 x 16 tokens x 384
                            "qknorm": (1024, 16, 6, 64)}),                           # 6 heads of 64
    "pixart-xl": ("prod", {"norm": (4 * 4096, 1152), "adaln": (4, 4096, 1152)}),     # 1024 px: 4096 tokens, B=4
    "flux": ("prod", {"norm": (2 * 4608, 3072), "adaln": (2, 4608, 3072),            # 4096 image + 512 text, B=2
                      "qknorm": (2, 4608, 24, 128)}),                                # 24 heads of 128
    "llm-4k": ("prod", {"norm": (16384, 4096)}),
    "llm-8k": ("prod", {"norm": (16384, 8192)}),
    "smoke-a": ("smoke", {"norm": (24, 64), "adaln": (2, 12, 64), "qknorm": (2, 12, 2, 32)}),
    "smoke-b": ("smoke", {"norm": (48, 96), "adaln": (3, 16, 96), "qknorm": (3, 16, 3, 32)}),
}


def shape_for(op: str, name: str):
    shapes = SHAPES[name][1]
    return shapes.get(op, shapes.get("adaln") if op == "adaln_res" else None)


def op_traffic(op: str, mode: str, shape: tuple, dtype: torch.dtype) -> dict:
    elem = torch.empty((), dtype=dtype).element_size()
    if op == "norm":
        return bytecount.norm_traffic(mode, *shape, elem)
    if op == "qknorm":   # a norm over B*L*H rows of d, read in place from the head view
        B, L, H, d = shape
        return bytecount.norm_traffic(mode, B * L * H, d, elem)
    return bytecount.adaln_traffic(mode, *shape, elem, residual=op == "adaln_res", gate=op == "adaln_res")


def op_bytes(op: str, mode: str, shape: tuple, dtype: torch.dtype) -> int:
    return bytecount.total(op_traffic(op, mode, shape, dtype))


def resolve_shapes(spec: str) -> list[str]:
    if spec == "all":
        return [n for n, (s, _) in SHAPES.items() if s != "smoke"]
    if spec in ("seed", "prod", "smoke"):
        return [n for n, (s, _) in SHAPES.items() if s == spec]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    bad = [n for n in names if n not in SHAPES]
    if bad:
        raise SystemExit(f"unknown shape(s) {bad}; use seed, prod, all, smoke or names from {list(SHAPES)}")
    return names


@dataclass(frozen=True)
class Case:
    """One (dtype, shape, op, provider) the run plans: the rows of its modes come from one bench_provider call."""
    dname: str
    sname: str
    op: str
    shape: tuple
    provider: Provider

    def base(self) -> dict:
        p = self.provider
        return {"op": self.op, "provider": p.name, "label": p.label, "ours": p.ours, "shape_name": self.sname,
                "shape": list(self.shape), "dtype": self.dname}

    def rows(self, modes: list[str], status: str, reason: str) -> list[dict]:
        return [dict(self.base(), mode=m, status=status, reason=reason) for m in modes]


def plan_cases(dtypes: list[str], shapes: list[str], ops: list[str], planned: Callable[[Provider], bool]) -> list[Case]:
    """Every case of a run, in the order it runs: dtype, then shape, then op, then provider."""
    return [Case(dname, sname, op, shape, p) for dname in dtypes for sname in shapes for op in ops
            if (shape := shape_for(op, sname)) is not None for p in providers_for(op) if planned(p)]


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _mode_fn(mode: str, fwd: Callable, dys: tuple) -> Callable:
    if mode == "fwd":
        return fwd
    if mode == "fwd_bwd":
        return lambda: torch.autograd.backward(_as_tuple(fwd()), dys)
    state = {}

    def bwd():
        # The forward runs lazily in the first (untimed warm-up) call, so it lands on whatever stream
        # the timer uses, as its backward must.
        if "outs" not in state:
            state["outs"] = _as_tuple(fwd())
        torch.autograd.backward(state["outs"], dys, retain_graph=True)
    return bwd


class Copies:
    """Copy bandwidth at the byte counts the rows need, each measured once per timer kind."""

    def __init__(self, device, cfg, stream):
        self.device, self.cfg, self.stream, self.cache = device, cfg, stream, {}

    def measure(self, nbytes: int, dtype: torch.dtype, graph: bool) -> dict:
        elem = torch.empty((), dtype=dtype).element_size()
        numel = max(1, nbytes // (2 * elem))
        key = (numel, dtype, graph)
        if key not in self.cache:
            moved = bytecount.copy_bytes(numel, elem)
            k = rotation(self.device, moved, self.cfg) if graph else 1
            pairs = [(torch.randn(numel, device=self.device).to(dtype), torch.empty(numel, device=self.device,
                                                                                  dtype=dtype)) for _ in range(k)]
            fns = [(lambda s=s, d=d: d.copy_(s)) for s, d in pairs]
            (lo, ms, hi), timer = time_calls(fns, [], self.device, self.cfg, graph, self.stream)
            self.cache[key] = {"bytes": moved, "time_ms": ms, "time_ms_p20_p80": [lo, hi],
                               "gbps": moved / (ms * 1e6), "timer": timer}
            del pairs, fns
        return self.cache[key]


def _peak_memory(fn: Callable, leaves: list, device: torch.device) -> tuple[int | None, int | None]:
    if device.type != "cuda":
        return None, None  # the CPU allocator keeps no peak statistics
    clear_grads(leaves)
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak, peak - base


def bench_provider(p: Provider, op: str, shape: tuple, dtype: torch.dtype, modes: list[str], ctx: Context,
                   cfg: TimerConfig, graph: bool, k: int, stream, copies: Copies) -> list[dict]:
    device = ctx.device
    sets = [make_inputs(op, shape, dtype, device, seed=s) for s in range(k)]
    fwds = [p.build(inputs, ctx) for inputs in sets]
    n_out = 2 if op == "adaln_res" else 1
    g = torch.Generator(device=device).manual_seed(1234)
    dys = [tuple(torch.randn(sets[0]["x"].shape, generator=g, device=device).to(dtype) for _ in range(n_out))
           for _ in sets]
    leaves = [t for inputs in sets for t in inputs.values()]
    ctx_stream = torch.cuda.stream(stream) if graph else contextlib.nullcontext()
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream())
    with ctx_stream:
        # First call of each set: torch.compile and Triton's JIT/autotuning happen here, untimed.
        t0 = time.perf_counter()
        torch.autograd.backward(_as_tuple(fwds[0]()), dys[0])
        sync(device)
        first_call_s = time.perf_counter() - t0
        for f, dy in zip(fwds[1:], dys[1:]):
            torch.autograd.backward(_as_tuple(f()), dy)
        peak, extra = _peak_memory(lambda: torch.autograd.backward(_as_tuple(fwds[0]()), dys[0]), leaves, device)
    rows = []
    for mode in modes:
        nbytes = op_bytes(op, mode, shape, dtype)
        fns = [_mode_fn(mode, f, dy) for f, dy in zip(fwds, dys)]
        clear_grads(leaves)
        timer_note = None
        try:
            (lo, ms, hi), timer = time_calls(fns, leaves, device, cfg, graph, stream)
        except Exception as e:  # noqa: BLE001 - a provider that cannot be captured still gets a number
            if not graph:
                raise
            timer_note = f"cuda graph capture failed ({type(e).__name__}: {str(e)[:200]}); timed with do_bench"
            with contextlib.suppress(Exception):
                sync(device)
            fns = [_mode_fn(mode, fwds[0], dys[0])]
            (lo, ms, hi), timer = time_calls(fns, leaves, device, cfg, False, stream)
        copy = copies.measure(nbytes, dtype, graph and timer_note is None)
        gbps = nbytes / (ms * 1e6)
        rows.append({
            "status": "ok", "time_ms": ms, "time_ms_p20_p80": [lo, hi], "timer": timer, "timer_note": timer_note,
            "bytes": nbytes, "gbps": gbps, "copy_time_ms": copy["time_ms"], "copy_gbps": copy["gbps"],
            "pct_copy": 100.0 * gbps / copy["gbps"], "first_call_s": first_call_s,
            "peak_mem_bytes": peak if mode == "fwd_bwd" else None,
            "peak_mem_extra_bytes": extra if mode == "fwd_bwd" else None,
            "mode": mode,
        })
        del fns
    return rows


def _timer_kind(row: dict) -> str:
    return str(row.get("timer")).split("(")[0]


def _speedups(rows: list[dict]) -> list[dict]:
    """Baseline time / our time per (op, shape, dtype, mode); an entry whose two rows were timed by
    different timers (a failed CUDA-graph capture's do_bench fallback) carries "timers"."""
    out = []
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        if not r["ours"]:
            continue
        for b in ok:
            same = all(b[k] == r[k] for k in ("op", "shape_name", "dtype", "mode"))
            if same and not b["ours"]:
                out.append({"op": r["op"], "shape_name": r["shape_name"], "dtype": r["dtype"], "mode": r["mode"],
                            "baseline": b["provider"], "speedup": b["time_ms"] / r["time_ms"]})
                if _timer_kind(b) != _timer_kind(r):   # a capture fell back to do_bench on one side only
                    out[-1]["timers"] = [b.get("timer"), r.get("timer")]
        r["speedup_vs"] = {s["baseline"]: s["speedup"] for s in out
                           if all(s[k] == r[k] for k in ("op", "shape_name", "dtype", "mode"))}
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shapes", default="all", help="seed | prod | all | smoke | comma-separated names of " +
                    ", ".join(SHAPES))
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: " + ", ".join(DTYPES))
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated: " + ", ".join(ALL_OPS) +
                    " (default: " + ", ".join(OPS) + ")")
    ap.add_argument("--providers", default=None, help="comma-separated provider names (default: all)")
    ap.add_argument("--skip-providers", default=None, help="comma-separated provider names to leave out")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of this device/day's results file that this run does not redo (a later "
                         "run for one provider, say, joins the earlier table and its speedups)")
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, few repetitions; on a machine without CUDA, the torch backend on CPU")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting new rows after this many seconds")
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend of the compiled baselines (default inductor; aot_eager on CPU, "
                         "where inductor's C++ builds would dominate a smoke run)")
    ap.add_argument("--warmup-ms", type=float, default=10.0)
    ap.add_argument("--rep-ms", type=float, default=40.0)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = resolve_shapes("smoke" if args.smoke and args.shapes == "all" else args.shapes)
    dtypes, modes, ops = choices(args.dtypes, DTYPES), choices(args.modes, MODES), choices(args.ops, ALL_OPS)
    names = {p.name for op in ALL_OPS for p in providers_for(op)}
    only = None if not args.providers else set(choices(args.providers, names))
    skip = set() if not args.skip_providers else set(choices(args.skip_providers, names))
    cfg = TimerConfig(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    if args.smoke:
        cfg.rep_ms, cfg.warmup_ms, cfg.cpu_reps, cfg.cpu_warmup = min(cfg.rep_ms, 10.0), min(cfg.warmup_ms, 5.0), 3, 1
    ctx = Context(device=device, compile_backend=args.compile_backend or ("inductor" if device.type == "cuda"
                                                                          else "aot_eager"))
    compiler_settings, compiler_context = compile_settings(modes)
    env = report.collect_env(device)
    out_dir = Path(args.out) if args.out else report.RESULTS_DIR
    # Off CUDA, "auto" already means the torch backend; naming it keeps DYT_KERNELS_BACKEND=triton
    # from sending CPU tensors to the interpreter in a smoke run.
    backend = "torch" if device.type != "cuda" else None
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    copies = Copies(device, cfg, stream)
    budget = Budget(args.budget_s)
    config = {"device": str(device), "shapes": {n: SHAPES[n][1] for n in shapes}, "dtypes": dtypes, "modes": modes,
              "ops": ops, "smoke": bool(args.smoke), "compile_backend": ctx.compile_backend,
              "dyt_backend": backend or "auto", "timer": vars(cfg), "budget_s": args.budget_s,
              "compiler_settings": compiler_settings}
    section = {"config": config, "rows": [], "speedups": [], "copy_peak": None}

    predictions, gpu_model = predict.load(), predict.gpu_model_of(env.get("device_name"))
    config["predictions_for"] = gpu_model

    def planned(p) -> bool:
        return (only is None or p.name in only) and p.name not in skip

    cases = plan_cases(dtypes, shapes, ops, planned)
    if args.merge:
        prev = report.load_section(out_dir, env, "kernels")
        redo = {(c.op, c.provider.name, c.sname, c.dname) for c in cases}
        section["rows"] = [r for r in prev.get("rows", [])
                           if (r["op"], r["provider"], r["shape_name"], r["dtype"]) not in redo]
        section["previous_configs"] = prev.get("previous_configs", []) + ([prev["config"]] if "config" in prev else [])
        config["merged_rows"] = len(section["rows"])

    def save(render: bool) -> dict:
        section["speedups"] = _speedups(section["rows"])
        section["elapsed_s"] = budget.elapsed()
        return report.write_section(out_dir, env, "kernels", section, render=render)

    def run_case(case: Case) -> list[dict]:
        reason = (budget.reason() if budget.spent() else None) or case.provider.unavailable(ctx)
        if reason:
            return case.rows(modes, "skipped", reason)
        dtype = DTYPES[case.dname]
        fwd_bytes = op_bytes(case.op, "fwd", case.shape, dtype)
        graph, k = use_graph(device, fwd_bytes, cfg), rotation(device, fwd_bytes, cfg)
        label, t_start = f"{case.dname} {case.sname} {case.op}/{case.provider.name}", time.perf_counter()
        try:
            got = bench_provider(case.provider, case.op, case.shape, dtype, modes, ctx, cfg, graph, k, stream, copies)
        except Stop:
            raise
        except Exception as e:  # noqa: BLE001 - one broken provider must not end the run
            if stop_requested():
                raise Stop() from e
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(f"  {label}: error {msg}", flush=True)
            del e
            gc.collect()  # the traceback's frames hold the failed provider's tensors
            return case.rows(modes, "error", msg)
        times = "  ".join(f"{r['mode']} {r['time_ms'] * 1e3:.1f}us {r['gbps']:.0f}GB/s" for r in got)
        print(f"  {label}: {times}  (first call {got[0]['first_call_s']:.2f}s, "
              f"{time.perf_counter() - t_start:.1f}s)", flush=True)
        rows = [dict(case.base(), **r) for r in got]
        if case.provider.ours:
            for r in rows:   # the static model's estimate beside the measurement (bench/predict.py)
                pred = predictions.get(predict.key(case.op, case.sname, case.dname, gpu_model), {}).get(r["mode"])
                if pred:
                    r["predicted_pct_peak_copy"] = 100.0 * pred["fraction_of_copy"]
                    r["predicted_time_us"] = pred["time_us"]
        return rows

    from dyt_kernels import use_backend
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # CPU numbers only prove the harness runs; one thread keeps tiny ops from waiting on busy
        # cores for a scheduler slice (seen: 16-20 ms for a 1 µs op with 2 threads on a shared box).
        torch.set_num_threads(1)
    config["cpu_threads"] = torch.get_num_threads()
    try:
        with compiler_context, stop_on_sigterm(), use_backend(backend) if backend else contextlib.nullcontext():
            big = (256 << 20) if device.type == "cuda" else (4 << 20)
            section["copy_peak"] = copies.measure(2 * big, torch.float32, False)
            for i, case in enumerate(cases):
                section["rows"] += run_case(case)
                following = cases[i + 1] if i + 1 < len(cases) else None
                if following is None or (following.dname, following.sname, following.op) != (case.dname, case.sname,
                                                                                           case.op):
                    save(render=False)  # after each op's providers: a stopped run keeps what it measured
                if device.type == "cuda" and (following is None or (following.dname, following.sname) !=
                                              (case.dname, case.sname)):
                    gc.collect()  # free any cycles before the next shape's tensors (~0.3 s a call)
                    torch.cuda.empty_cache()
    except Stop:
        section["stopped"] = "stopped by SIGTERM (stage timeout)"
        done = {(r["op"], r["provider"], r["shape_name"], r["dtype"]) for r in section["rows"]}
        for case in cases:
            if (case.op, case.provider.name, case.sname, case.dname) not in done:
                section["rows"] += case.rows(modes, "skipped", section["stopped"])
    finally:
        torch.set_num_threads(threads)
    paths = save(render=True)
    _print_summary(section, paths)
    return section


def _print_summary(section: dict, paths: dict) -> None:
    rows = section["rows"]
    count = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "error")}
    print(f"kernels: {len(rows)} rows: {count['ok']} ok, {count['skipped']} skipped, {count['error']} error "
          f"in {section['elapsed_s']:.1f} s")
    for r in rows:
        if r["status"] == "error":
            print(f"  error {r['op']}/{r['provider']} {r['shape_name']} {r['dtype']} {r['mode']}: {r['reason']}")
    reasons = sorted({f"{r['op']}/{r['provider']}: {r['reason']}" for r in rows if r["status"] == "skipped"})
    for line in reasons[:10]:
        print(f"  skipped {line}")
    for s in section["speedups"]:
        if s["mode"] == "fwd_bwd":
            print(f"  ours vs {s['baseline']:<16} {s['op']:<9} {s['shape_name']:<10} {s['dtype']}: {s['speedup']:.2f}x")
    print(f"wrote {paths['json']}" + (f", {paths['md']}" if paths["md"] else "") +
          "".join(f", {p}" for p in paths["png"]))
