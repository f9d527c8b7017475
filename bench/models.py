"""Model benchmarks: a training step and a sampling step of PixArt-alpha and FLUX, norm=layernorm
against norm=dyt, eager and under torch.compile, in bf16 autocast.

    train   optimizer.zero_grad; cond = model.encode_prompts(prompts); out = model(x, t, cond);
            loss = mean(out^2); loss.backward(); AdamW step
            (the prompts are encoded inside the step: the text encoder is trained with the model)
    sample  under no_grad: out = model(x, t, cond), cond encoded once beforehand, as a sampler does

Modes (the optimizer step stays eager in all of them; each compiled config starts from a reset dynamo,
so it traces and compiles its own model):
    eager             the model as it is
    compiled          torch.compile(model): for DyT the forward reaches inductor as pointwise ops it fuses
                      into its neighbours, the backward is our kernel (the default compiled path)
    compiled-kernel   the same under use_backend("triton"): our kernels both ways (DyT rows only)
    reduce-overhead   torch.compile(model, mode="reduce-overhead"): the step replayed as CUDA graphs,
                      the host's launch overhead gone (CUDA only)
    eager-graphs      the eager step captured whole in one torch.cuda.CUDAGraph and replayed: forward,
                      backward and AdamW(capturable=True) for train (prompts tokenized once outside
                      the graph, the text encoder inside it); autocast without its weight cache, as
                      capture requires (CUDA only). Our eager kernels, no compiler, no host overhead.

Norm share: the step is profiled with torch.profiler and every GPU kernel whose name matches
`is_norm_kernel` counts as norm+modulate (on a CPU run: every CPU op, by self time). The rule:

    name contains "dyt" or "modulate"            our kernels and custom ops (_dyt_*_kernel,
                                                 _modulate_*_kernel, dyt_kernels::*)
    name contains layer_norm/layernorm/rms_norm/rmsnorm or gammabeta
                                                 ATen's LayerNorm/RMSNorm kernels (GammaBetaBackward is
                                                 LayerNorm's weight gradient) and Inductor's fused
                                                 kernels, which are named after the ATen ops they fuse
    name contains "tanh" but not "gelu"          DyT written as torch.tanh (eager ATen tanh kernels,
                                                 Inductor's fused_..._tanh_...); GELU's tanh
                                                 approximation is excluded

Eager baselines launch the modulate's mul/add as separate generic elementwise kernels, which no name
rule can tell apart from other adds, so their share is a lower bound; in compiled runs Inductor fuses
the modulate (and sometimes a neighbouring add) into the norm's kernel, which then counts whole.
The JSON lists the matched kernel names with their time, so the rule can be audited per run.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from . import report
from .runctl import Budget, Stop, choices, compile_settings, stop_on_sigterm, stop_requested
from .timing import sync

MODEL_NAMES = ("pixart", "flux")
STEP_KINDS = ("train", "sample")
COMPILE_MODES = ("eager", "eager-graphs", "compiled", "compiled-kernel", "reduce-overhead")  # cheap ones first
UNCOMPILED = ("eager", "eager-graphs")
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}

_NORM_NAMES = re.compile(r"dyt|modulate|layer_?norm|rms_?norm|gamma_?beta", re.IGNORECASE)
MATCHING_RULE = ("a kernel counts as norm+modulate when its name contains 'dyt', 'modulate', "
                 "'layer_norm'/'layernorm', "
                 "'rms_norm'/'rmsnorm' or 'gammabeta', or contains 'tanh' but not 'gelu' (case-insensitive); "
                 "eager shares miss the modulate's separate mul/add kernels")


def is_norm_kernel(name: str) -> bool:
    low = name.lower()
    return bool(_NORM_NAMES.search(low)) or ("tanh" in low and "gelu" not in low)


def load_builder():
    """(models.build_model, None), or (None, why not): the models need the train extra (einops), which
    a kernels-only install lacks; the model benchmark then records why it skipped."""
    try:
        from models import build_model
    except Exception as e:  # noqa: BLE001 - any import failure means: skip, and say why
        return None, f"the models package is not importable: {type(e).__name__}: {e}"
    return build_model, None


def prompts(batch: int) -> list[str]:
    """One digit per image, as numeral or word, every fifth one dropped: the training distribution."""
    from models.text import DIGIT_WORDS
    out = []
    for i in range(batch):
        d = i % 10
        out.append("" if i % 5 == 4 else (str(d) if i % 2 else DIGIT_WORDS[d]))
    return out


def make_batch(name: str, batch: int, in_channels: int, image_size: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, in_channels, image_size, image_size, generator=g, device=device)
    if name == "pixart":  # DDPM step indices in [0, 1000)
        t = torch.randint(0, 1000, (batch,), generator=g, device=device).float()
    else:  # rectified-flow time in [0, 1]
        t = torch.rand(batch, generator=g, device=device)
    return x, t


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def make_step(kind: str, model, fwd: Callable, x, t, texts: list[str], amp_dtype, device) -> Callable[[], None]:
    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    if kind == "train":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train_step():
            opt.zero_grad(set_to_none=True)
            with autocast():
                cond = model.encode_prompts(texts)
                loss = _first(fwd(x, t, cond)).float().square().mean()
            loss.backward()
            opt.step()
        return train_step

    with torch.no_grad(), autocast():
        cond = model.encode_prompts(texts)

    def sample_step():
        with torch.no_grad(), autocast():
            fwd(x, t, cond)
    return sample_step


def graphed_step(kind: str, model, x, t, texts: list[str], amp_dtype, device) -> Callable[[], None]:
    """make_step's step captured whole in one CUDA graph on its first call (after warm-up steps on a
    side stream, which compile the kernels and fill the launch caches); later calls replay it."""
    enc = model.text_encoder
    if not (hasattr(enc, "tokenizer") and hasattr(enc, "encode")):
        raise TypeError("eager-graphs needs a text encoder with tokenizer() and encode(ids, mask)")
    ids, mask = enc.tokenizer(texts, device=device)   # host work, outside the graph

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype, cache_enabled=False)

    if kind == "train":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=True)

        def body():
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = _first(model(x, t, enc.encode(ids, mask))).float().square().mean()
            loss.backward()
            opt.step()
    else:
        with torch.no_grad(), autocast():
            cond = enc.encode(ids, mask)

        def body():
            with torch.no_grad(), autocast():
                model(x, t, cond)
    graph = []

    def step():
        if not graph:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    body()
            torch.cuda.current_stream(device).wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                body()
            graph.append(g)
        graph[0].replay()
    return step


def time_steps(step: Callable, device: torch.device, steps: int, repeats: int) -> list[float]:
    """Steps per second of `repeats` blocks of `steps` back-to-back steps (one sync per block)."""
    rates = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        rates.append(steps / (time.perf_counter() - t0))
    return rates


def _self_time_us(evt, cuda: bool) -> float:
    if not cuda:
        return float(evt.self_cpu_time_total)
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, attr):
            return float(getattr(evt, attr))
    return 0.0


def norm_share(step: Callable, device: torch.device, steps: int) -> dict:
    """Profile `steps` steps; the time of kernels matching is_norm_kernel over all kernel time."""
    cuda = device.type == "cuda"
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync(device)
    per_name: dict = {}
    for evt in prof.events():
        on_gpu = str(evt.device_type).endswith("CUDA")
        if on_gpu != cuda:
            continue
        per_name[evt.name] = per_name.get(evt.name, 0.0) + _self_time_us(evt, cuda)
    total = sum(per_name.values())
    matched = {n: us for n, us in per_name.items() if is_norm_kernel(n)}
    norm_us = sum(matched.values())
    top = sorted(matched.items(), key=lambda kv: -kv[1])[:12]
    return {
        "norm_share": norm_us / total if total > 0 else None,
        "norm_ms_per_step": norm_us / 1e3 / steps,
        "kernel_ms_per_step": total / 1e3 / steps,
        "timeline": "gpu kernels" if cuda else "cpu ops (self time)",
        "matched": [{"name": n[:200], "ms_per_step": us / 1e3 / steps} for n, us in top],
    }


def unavailable(mode: str, norm: str, device: torch.device) -> str | None:
    """Why a (mode, norm) pair is not run here, or None."""
    if mode == "compiled-kernel" and norm != "dyt":
        return "compiled-kernel only differs from compiled where our kernels run (norm=dyt)"
    if mode in ("compiled-kernel", "reduce-overhead", "eager-graphs") and device.type != "cuda":
        return f"{mode} needs CUDA (our kernels / CUDA graphs)"
    return None


def _compiled(model, mode: str, compile_backend: str):
    if mode in UNCOMPILED:
        return model
    if mode == "reduce-overhead":
        return torch.compile(model, mode="reduce-overhead")
    return torch.compile(model, backend=compile_backend)


def bench_config(build, name: str, norm: str, mode: str, kind: str, args, device, amp_dtype,
                 compile_backend: str) -> dict:
    if mode not in UNCOMPILED:
        # A fresh dynamo per compiled config: its cache would otherwise hand this config's model (a
        # new instance; guards check parameter metadata, not identity) a graph traced for an earlier
        # config of the same structure, with no compile in first_step_s and that config's trace-time
        # state (on torch < mid-2026 dyt_kernels reads use_backend at trace time, unguarded).
        torch._dynamo.reset()
    torch.manual_seed(0)
    overrides = {**args.overrides.get(None, {}), **args.overrides.get(name, {})}
    model = build(name, preset=args.preset, norm=norm, in_channels=args.in_channels, image_size=args.image_size,
                  **overrides).to(device)
    model.train(kind == "train")
    fwd = _compiled(model, mode, compile_backend)
    x, t = make_batch(name, args.batch, args.in_channels, args.image_size, device)
    if mode == "eager-graphs":
        step = graphed_step(kind, model, x, t, prompts(args.batch), amp_dtype, device)
    else:
        step = make_step(kind, model, fwd, x, t, prompts(args.batch), amp_dtype, device)
    sync(device)
    t0 = time.perf_counter()
    step()  # compile, autotuning and lazy initialisation land here
    sync(device)
    first_step_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rates = time_steps(step, device, args.steps, args.repeats)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    prof = norm_share(step, device, args.profile_steps)
    rate = statistics.median(rates)
    row = {"status": "ok", "steps_per_s": rate, "step_ms": 1e3 / rate, "rates": rates, "first_step_s": first_step_s,
           "peak_mem_bytes": peak, "params": sum(p.numel() for p in model.parameters())}
    row.update(prof)
    row["norm_share_of_step"] = prof["norm_ms_per_step"] / row["step_ms"]
    return row


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--models", default=",".join(MODEL_NAMES))
    ap.add_argument("--norms", default=None, help="comma-separated (default: every norm of models.NORMS)")
    ap.add_argument("--compile", default=",".join(COMPILE_MODES), help="comma-separated: " + ", ".join(COMPILE_MODES))
    ap.add_argument("--step-kinds", default=",".join(STEP_KINDS), help="train, sample or both")
    ap.add_argument("--preset", default=None, help="models preset (default seed; small with --smoke)")
    ap.add_argument("--batch", type=int, default=None, help="default 1024 (4 with --smoke)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--in-channels", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per block (default 10; 2 with --smoke)")
    ap.add_argument("--repeats", type=int, default=None, help="timed blocks (default 3; 1 with --smoke)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (default 2; 0 smoke)")
    ap.add_argument("--profile-steps", type=int, default=None, help="profiled steps (default 3; 1 with --smoke)")
    ap.add_argument("--amp", default="bf16", choices=sorted(AMP))
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    ap.add_argument("--smoke", action="store_true", help="small preset, tiny batch, one short block")
    ap.add_argument("--device", default=None)
    ap.add_argument("--budget-s", type=float, default=None, help="start no new config after this many seconds")
    ap.add_argument("--compile-reserve-s", type=float, default=None,
                    help="start a compiled config only with this much budget left (default 40 on CUDA, 0 on CPU)")
    ap.add_argument("--compile-backend", default=None, help="default inductor; aot_eager on CPU")
    ap.add_argument("--override", action="append", default=[], metavar="[MODEL:]KEY=VALUE",
                    help="a build_model override (e.g. pixart:depth=2, hidden_size=64); repeatable")


def parse_overrides(items: list[str]) -> dict:
    """{model or None: {key: value}}; values parse as int, float, then string."""
    out: dict = {}
    for item in items:
        target, _, kv = item.rpartition(":") if ":" in item.split("=", 1)[0] else ("", "", item)
        key, sep, raw = kv.partition("=")
        if not sep or not key:
            raise SystemExit(f"--override wants [MODEL:]KEY=VALUE, got {item!r}")
        value: object = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                pass
        out.setdefault(target or None, {})[key] = value
    return out


def _defaults(args) -> None:
    smoke = args.smoke
    for attr, full, small in (("preset", "seed", "small"), ("batch", 1024, 4), ("steps", 10, 2), ("repeats", 3, 1),
                              ("warmup", 2, 0), ("profile_steps", 3, 1)):
        if getattr(args, attr) is None:
            setattr(args, attr, small if smoke else full)


def run(args: argparse.Namespace, builder: Callable | None = None) -> dict:
    """Run the configs args select; builder defaults to models.build_model (tests pass a stand-in)."""
    _defaults(args)
    args.overrides = parse_overrides(args.override)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = report.collect_env(device)
    out_dir = Path(args.out) if args.out else report.RESULTS_DIR
    compile_backend = args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
    reserve = args.compile_reserve_s if args.compile_reserve_s is not None else (40.0 if device.type == "cuda" else 0.0)
    config = {"device": str(device), "preset": args.preset, "batch": args.batch, "image_size": args.image_size,
              "in_channels": args.in_channels, "amp": args.amp, "steps": args.steps, "repeats": args.repeats,
              "warmup": args.warmup, "profile_steps": args.profile_steps, "compile_backend": compile_backend,
              "optimizer": "AdamW(lr=1e-4)", "loss": "mean(out^2)", "budget_s": args.budget_s,
              "overrides": {k or "*": v for k, v in args.overrides.items()}}
    section = {"config": config, "matching_rule": MATCHING_RULE, "rows": []}
    build, why = (builder, None) if builder is not None else load_builder()
    if build is None:
        section.update(status="skipped", reason=why)
        paths = report.write_section(out_dir, env, "models", section)
        print(f"models: skipped: {why}\nwrote {paths['json']}")
        return section
    from models import NORMS
    names, norms = choices(args.models, MODEL_NAMES), choices(args.norms or ",".join(NORMS), NORMS)
    modes, kinds = choices(args.compile, COMPILE_MODES), choices(args.step_kinds, STEP_KINDS)
    # Eager configs first: they are cheap, and a compile can eat most of a short budget. The norms
    # are innermost so that a budget cut leaves whole layernorm/dyt pairs.
    configs = [(c, n, nm, k) for c in modes for n in names for k in kinds for nm in norms]
    budget = Budget(args.budget_s)
    backend = "torch" if device.type != "cuda" else None
    from dyt_kernels import use_backend
    pending = list(configs)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # see kernels.run: CPU numbers only prove the harness runs
    config["cpu_threads"] = torch.get_num_threads()
    config["compiler_settings"], compiler_context = compile_settings([])
    try:
        with compiler_context, stop_on_sigterm(), use_backend(backend) if backend else contextlib.nullcontext():
            while pending:
                mode, name, norm, kind = pending[0]
                compiled = mode not in UNCOMPILED
                base = {"model": name, "norm": norm, "mode": mode, "compiled": compiled, "step": kind,
                        "preset": args.preset, "batch": args.batch}
                why = unavailable(mode, norm, device)
                if why:
                    row = dict(base, status="skipped", reason=why)
                elif budget.spent() or (compiled and budget.left() < reserve):
                    row = dict(base, status="skipped", reason=budget.reason() if budget.spent() else
                               f"less than {reserve:g} s of budget left for a compile")
                else:
                    try:
                        with use_backend("triton") if mode == "compiled-kernel" else contextlib.nullcontext():
                            row = dict(base, **bench_config(build, name, norm, mode, kind, args, device,
                                                            AMP[args.amp], compile_backend))
                    except Stop:
                        raise
                    except Exception as e:  # noqa: BLE001 - one failing config must not end the run
                        if stop_requested():
                            raise Stop() from e
                        msg = str(e).splitlines()[0][:300] if str(e) else ""
                        row = dict(base, status="error", reason=f"{type(e).__name__}: {msg}")
                    finally:
                        gc.collect()
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                section["rows"].append(row)
                pending.pop(0)
                print(_row_line(row), flush=True)
                section["elapsed_s"] = budget.elapsed()
                report.write_section(out_dir, env, "models", section, render=False)
    except Stop:
        section["stopped"] = "stopped by SIGTERM (stage timeout)"
        for mode, name, norm, kind in pending:
            section["rows"].append({"model": name, "norm": norm, "mode": mode, "compiled": mode not in UNCOMPILED,
                                    "step": kind,
                                    "preset": args.preset, "batch": args.batch, "status": "skipped",
                                    "reason": section["stopped"]})
    finally:
        torch.set_num_threads(threads)
    section["elapsed_s"] = budget.elapsed()
    paths = report.write_section(out_dir, env, "models", section)
    _print_summary(section, paths)
    return section


def _row_line(r: dict) -> str:
    mode = r.get("mode", "compiled" if r["compiled"] else "eager")
    head = f"  {r['model']:<6} {r['norm']:<9} {mode:<15} {r['step']:<6}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r['reason']}"
    share = r.get("norm_share")
    return (f"{head} {r['steps_per_s']:8.2f} steps/s  norm share {'-' if share is None else f'{100 * share:.1f}%'}"
            f"  first step {r['first_step_s']:.1f} s")


def _print_summary(section: dict, paths: dict) -> None:
    rows = section["rows"]
    count = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "error")}
    print(f"models: {len(rows)} configs: {count['ok']} ok, {count['skipped']} skipped, {count['error']} error "
          f"in {section['elapsed_s']:.1f} s")
    for r in rows:
        print(_row_line(r))
    print(f"wrote {paths['json']}" + (f", {paths['md']}" if paths["md"] else ""))
