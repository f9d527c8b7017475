"""Where results go and how they read: environment stamp, JSON, Markdown, plots.

One results file per device and day, `<device-slug>-<YYYY-MM-DD>.json`, holding a section per
benchmark ("kernels", "models"); each run replaces its own section and re-renders the Markdown and
the charts from the whole file, so the kernel and model runs of one GPU window end up in one table.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:  # PackageNotFoundError, or a broken install's metadata
        return None


def collect_env(device: torch.device) -> dict:
    """Everything a number needs beside it to be comparable later."""
    now = _dt.datetime.now(_dt.timezone.utc)
    env = {
        "date": now.strftime("%Y-%m-%d"),
        "timestamp": now.isoformat(timespec="seconds"),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "dyt_kernels": _version("dyt_kernels"),
        "liger_kernel": _version("liger-kernel"),
        "backend_env": os.environ.get("DYT_KERNELS_BACKEND"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    head = _run(["git", "rev-parse", "HEAD"])
    # The GPU machine gets a copy of the tree that may lack .git: the caller can pass the hash.
    env["git_commit"] = os.environ.get("BENCH_GIT_COMMIT") or head
    env["git_dirty"] = None if head is None else bool(_run(["git", "status", "--porcelain", "--untracked-files=no"]))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "device_name": props.name,
            "sm_count": props.multi_processor_count,
            "l2_bytes": getattr(props, "L2_cache_size", None),
            "memory_bytes": props.total_memory,
            "capability": f"{props.major}.{props.minor}",
            "driver": _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        })
        env["device_slug"] = slug(props.name)
    else:
        env.update({"device_name": platform.processor() or platform.machine(), "driver": None, "device_slug": "cpu"})
    return env


def results_stem(env: dict) -> str:
    return f"{env['device_slug']}-{env['date']}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _clean(obj):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def load_section(out_dir: Path, env: dict, name: str) -> dict:
    """The `name` section of this device/day's results file, or {} when there is none."""
    path = Path(out_dir) / f"{results_stem(env)}.json"
    try:
        return json.loads(path.read_text()).get(name) or {}
    except (OSError, ValueError):
        return {}


def write_section(out_dir: Path, env: dict, name: str, section: dict, *, render: bool = True) -> dict:
    """Store `section` under `name` in the device/day results file, then re-render MD and charts.

    Returns {"json": path, "md": path, "png": [paths]}; with render=False (progress saves during a
    run) only the JSON is written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = results_stem(env)
    json_path = out_dir / f"{stem}.json"
    doc = {"schema": 1, "device": env.get("device_name"), "device_slug": env["device_slug"], "date": env["date"]}
    if json_path.exists():
        try:
            old = json.loads(json_path.read_text())
            doc.update({k: v for k, v in old.items() if k not in doc})
        except ValueError:
            pass  # a file cut off by a killed run: this run's section replaces it
    doc[name] = dict(section, env=env)
    _write_atomic(json_path, json.dumps(_clean(doc), indent=1, sort_keys=False) + "\n")
    paths = {"json": json_path, "md": None, "png": []}
    if not render:
        return paths
    md_path = out_dir / f"{stem}.md"
    _write_atomic(md_path, render_markdown(doc))
    paths["md"] = md_path
    if "kernels" in doc:
        paths["png"] = plot_kernels(doc["kernels"], out_dir / f"{stem}.png", out_dir / f"{stem}-speedup.png")
    return paths


# ----- Markdown -----------------------------------------------------------------------------------

def _fmt_time(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms * 1e3:.1f} µs" if ms < 1 else f"{ms:.3f} ms"


def _fmt_gbps(g: float) -> str:
    return f"{g:.0f}" if g >= 100 else f"{g:.3g}"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.1f} MiB"


def _env_lines(env: dict) -> list[str]:
    keys = ("device_name", "driver", "cuda_runtime", "torch", "triton", "liger_kernel", "git_commit", "git_dirty",
            "timestamp")
    return [", ".join(f"{k}: {env.get(k)}" for k in keys)]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


FALLBACK_MARK = " †"
FALLBACK_NOTE = ("† timed with do_bench: its CUDA-graph capture failed (the JSON's timer_note says why), so at "
                 "small shapes its time includes the host's launches, unlike the graph-replayed cells.")


def _kernels_md(sec: dict) -> list[str]:
    rows = sec.get("rows", [])
    cfg = sec.get("config", {})
    lines = ["## Kernel benchmarks", ""] + _env_lines(sec.get("env", {})) + [""]
    lines.append(f"Config: {json.dumps({k: cfg[k] for k in sorted(cfg) if k != 'shapes'})}")
    peak = sec.get("copy_peak") or {}
    if peak:
        lines.append(f"Copy bandwidth, one large `y.copy_(x)`: {peak.get('gbps', 0):.0f} GB/s "
                     f"({_fmt_bytes(peak.get('bytes'))} moved, {peak.get('timer')}).")
    lines += ["", "Cells: median time · GB/s over the minimum byte count (bench/bytecount.py) · % of the "
              "bandwidth of a `y.copy_(x)` moving the same bytes, timed the same way in the same run.", ""]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["op"], r["dtype"]), []).append(r)
    for (op, dtype), grp in groups.items():
        provs = list(dict.fromkeys(r["provider"] for r in grp))
        labels = {r["provider"]: r.get("label", r["provider"]) for r in grp}
        lines += [f"### {op} · {dtype}", ""]
        table = []
        keys = list(dict.fromkeys((r["shape_name"], tuple(r["shape"]), r["mode"]) for r in grp))
        for shape_name, shape, mode in keys:
            cells = [f"{shape_name} {'×'.join(map(str, shape))}", mode]
            for p in provs:
                r = next((r for r in grp if r["provider"] == p and r["shape_name"] == shape_name and r["mode"] == mode),
                         None)
                if r is None or r["status"] != "ok":
                    cells.append("skip" if r is None or r["status"] == "skipped" else "error")
                else:
                    pct = f" · {r['pct_copy']:.0f}%" if r.get("pct_copy") is not None else ""
                    cells.append(f"{_fmt_time(r['time_ms'])} · {_fmt_gbps(r['gbps'])}{pct}"
                                 f"{FALLBACK_MARK if r.get('timer_note') else ''}")
            table.append(cells)
        lines += _table(["shape", "mode"] + [labels[p] for p in provs], table) + [""]
        if any(r["status"] == "ok" and r.get("timer_note") for r in grp):
            lines += [FALLBACK_NOTE, ""]
    lines += _predictions_md(sec)
    all_sp = sec.get("speedups", [])
    for op in dict.fromkeys(s["op"] for s in all_sp):
        sp = [s for s in all_sp if s["op"] == op]
        baselines = list(dict.fromkeys(s["baseline"] for s in sp))
        lines += [f"### Speedup of ours, {op} (baseline time / our time; above 1: ours is faster)", ""]
        table = []
        for key in dict.fromkeys((s["shape_name"], s["dtype"], s["mode"]) for s in sp):
            cells = list(key)
            for b in baselines:
                s = next((s for s in sp if (s["shape_name"], s["dtype"], s["mode"]) == key and s["baseline"] == b),
                         None)
                cells.append("-" if s is None else f"{s['speedup']:.2f}×{FALLBACK_MARK if s.get('timers') else ''}")
            table.append(cells)
        lines += _table(["shape", "dtype", "mode"] + baselines, table) + [""]
        if any(s.get("timers") for s in sp):
            lines += [f"{FALLBACK_MARK.strip()} the two rows were timed differently (one's CUDA-graph capture failed): "
                      "not a speedup.", ""]
    mem = [r for r in rows
           if r["status"] == "ok" and r["mode"] == "fwd_bwd" and r.get("peak_mem_extra_bytes") is not None]
    if mem:
        lines += ["### Peak memory of forward+backward (allocated above the inputs)", ""]
        provs = list(dict.fromkeys(r["provider"] for r in mem))
        table = []
        for key in dict.fromkeys((r["op"], r["shape_name"], r["dtype"]) for r in mem):
            cells = list(key)
            for p in provs:
                r = next((r for r in mem if (r["op"], r["shape_name"], r["dtype"]) == key and r["provider"] == p), None)
                cells.append("-" if r is None else _fmt_bytes(r["peak_mem_extra_bytes"]))
            table.append(cells)
        lines += _table(["op", "shape", "dtype"] + provs, table) + [""]
    notes = {}
    for r in rows:
        if r["status"] != "ok":
            notes.setdefault((r["op"], r["provider"], r["status"], r.get("reason", "")), 0)
            notes[(r["op"], r["provider"], r["status"], r.get("reason", ""))] += 1
    if notes:
        lines += ["### Not measured", ""]
        lines += [f"- {op}/{p}: {st} ×{n}: {reason}" for (op, p, st, reason), n in notes.items()] + [""]
    return lines


def _predictions_md(sec: dict) -> list[str]:
    """Ours, measured against the static model's estimate (bench/predict.py, docs/PERFORMANCE.md),
    both as a share of the large copy's bandwidth measured in this run."""
    peak = (sec.get("copy_peak") or {}).get("gbps")
    rows = [r for r in sec.get("rows", []) if r["status"] == "ok" and r.get("predicted_pct_peak_copy") is not None]
    if not peak or not rows:
        return []
    lines = [f"### Predicted and measured, ours (% of the large copy's {peak:.0f} GB/s; model: "
             f"{sec.get('config', {}).get('predictions_for')})", ""]
    table = []
    for r in rows:
        got = 100.0 * r["gbps"] / peak
        gap = got - r["predicted_pct_peak_copy"]
        table.append([r["op"], f"{r['shape_name']} {'×'.join(map(str, r['shape']))}", r["dtype"], r["mode"],
                      f"{r['predicted_pct_peak_copy']:.0f}%", f"{got:.0f}%", f"{gap:+.0f}",
                      "check" if abs(gap) > 10 else ""])
    return lines + _table(["op", "shape", "dtype", "mode", "predicted", "measured", "points", "> 10 points"],
                          table) + [""]


def _models_md(sec: dict) -> list[str]:
    lines = ["## Model benchmarks", ""] + _env_lines(sec.get("env", {})) + [""]
    if sec.get("status") == "skipped":
        return lines + [f"Skipped: {sec.get('reason')}", ""]
    cfg = sec.get("config", {})
    lines += [f"Config: {json.dumps(cfg)}", "",
              f"Norm share: {sec.get('matching_rule', '')}", ""]
    table = []
    rows = sec.get("rows", [])
    for r in rows:
        ok = r["status"] == "ok"
        share = r.get("norm_share")
        mode = r.get("mode", "compiled" if r["compiled"] else "eager")
        ln_mode = "compiled" if mode == "compiled-kernel" else mode   # LayerNorm has no kernel of ours
        ln = next((b for b in rows if b["status"] == "ok" and b["norm"] == "layernorm" and b["model"] == r["model"]
                   and b["step"] == r["step"] and b.get("mode", "compiled" if b["compiled"] else "eager") == ln_mode),
                  None)
        vs_ln = f"{r['steps_per_s'] / ln['steps_per_s']:.2f}×" if ok and ln and r["norm"] != "layernorm" else ""
        table.append([r["model"], r["norm"], mode, r["step"],
                      f"{r['steps_per_s']:.2f}" if ok else r["status"],
                      _fmt_time(r.get("step_ms")) if ok else "-", vs_ln,
                      f"{100 * share:.1f}% · {_fmt_time(r['norm_ms_per_step'])}" if ok and share is not None else "-",
                      _fmt_bytes(r.get("peak_mem_bytes")) if ok else "-",
                      f"{r['first_step_s']:.1f} s" if ok and r.get("first_step_s") is not None else "-",
                      "" if ok else str(r.get("reason", ""))[:120]])
    lines += _table(["model", "norm", "mode", "step", "steps/s", "time/step", "vs layernorm",
                     "norm+modulate share of kernel time · per step", "peak memory", "first step", "note"],
                    table) + [""]
    return lines


def _host_md(sec: dict) -> list[str]:
    cfg = sec.get("config", {})
    lines = ["## Host time per call", "", f"{cfg.get('note', '')}; best of {cfg.get('rounds')} batches of "
             f"{cfg.get('calls')} calls, tiny tensors, one CPU thread.", ""]
    if sec.get("stopped"):
        lines += [f"*{sec['stopped']}: the best of the rounds it finished.*", ""]
    table = [[r["op"], r["mode"], r["provider"], f"{r['us_per_call']:.1f} µs",
              "–" if r["vs_eager"] is None else f"{r['vs_eager']:.2f}×"] for r in sec.get("rows", [])]
    return lines + _table(["op", "mode", "who", "per call", "vs eager"], table) + [""]


def render_markdown(doc: dict) -> str:
    lines = [f"# dyt_kernels benchmarks: {doc.get('device')} ({doc.get('date')})", ""]
    if "kernels" in doc:
        lines += _kernels_md(doc["kernels"])
    if "models" in doc:
        lines += _models_md(doc["models"])
    if "host" in doc:
        lines += _host_md(doc["host"])
    return "\n".join(lines) + "\n"


# ----- charts -------------------------------------------------------------------------------------

def plot_kernels(sec: dict, bw_path: Path, speedup_path: Path) -> list[Path]:
    """GB/s against bytes moved, one line per provider and dtype; speedup bars for fwd_bwd (or the
    first mode measured). Returns the paths written; none when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = [r for r in sec.get("rows", []) if r["status"] == "ok"]
    if not rows:
        return []
    ops = list(dict.fromkeys(r["op"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    styles = ["-", "--", ":", "-."]
    # One colour per provider (the same in every panel and dtype), one line style per dtype.
    colors = {}
    for r in rows:
        colors.setdefault(r["provider"], f"C{len(colors) % 10}")
    fig, axes = plt.subplots(len(ops), len(modes), figsize=(5 * len(modes), 3.6 * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            sel = [r for r in rows if r["op"] == op and r["mode"] == mode]
            for d, dtype in enumerate(dtypes):
                ls = styles[d % len(styles)]
                cp = sorted({(r["bytes"], r["copy_gbps"]) for r in sel if r["dtype"] == dtype and r.get("copy_gbps")})
                if cp:
                    ax.plot([b / 1e6 for b, _ in cp], [g for _, g in cp], ls, color="black", lw=2,
                            label=f"copy, same bytes ({dtype})" if j == 0 else None)
                for p in dict.fromkeys(r["provider"] for r in sel):
                    pts = sorted((r["bytes"], r["gbps"]) for r in sel if r["provider"] == p and r["dtype"] == dtype)
                    if pts:
                        ax.plot([b / 1e6 for b, _ in pts], [g for _, g in pts], ls, marker="o", ms=3,
                                color=colors[p], label=f"{p} ({dtype})" if j == 0 else None)
            ax.set_xscale("log")
            ax.set_title(f"{op} {mode}")
            ax.set_xlabel("minimum MB moved")
            ax.set_ylabel("GB/s")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{sec.get('env', {}).get('device_name')}: achieved bandwidth")
    fig.tight_layout()
    fig.savefig(bw_path, dpi=110)
    plt.close(fig)
    paths = [Path(bw_path)]

    sp = sec.get("speedups", [])
    mode = "fwd_bwd" if any(s["mode"] == "fwd_bwd" for s in sp) else (sp[0]["mode"] if sp else None)
    sp = [s for s in sp if s["mode"] == mode]
    if sp:
        sp_ops = list(dict.fromkeys(s["op"] for s in sp))
        fig, axes = plt.subplots(1, len(sp_ops), figsize=(6 * len(sp_ops), 4), squeeze=False)
        for ax, op in zip(axes[0], sp_ops):
            sel = [s for s in sp if s["op"] == op]
            groups = list(dict.fromkeys((s["shape_name"], s["dtype"]) for s in sel))
            baselines = list(dict.fromkeys(s["baseline"] for s in sel))
            width = 0.8 / max(len(baselines), 1)
            for k, b in enumerate(baselines):
                vals = [next((s["speedup"] for s in sel if (s["shape_name"], s["dtype"]) == g and s["baseline"] == b),
                             0.0) for g in groups]
                ax.bar([x + k * width for x in range(len(groups))], vals, width, label=b)
            ax.axhline(1.0, color="black", lw=1)
            ax.set_xticks([x + width * (len(baselines) - 1) / 2 for x in range(len(groups))])
            ax.set_xticklabels([f"{s}\n{d}" for s, d in groups], fontsize=7)
            ax.set_ylabel("speedup of ours (×)")
            ax.set_title(f"{op} {mode}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(speedup_path, dpi=110)
        plt.close(fig)
        paths.append(Path(speedup_path))
    return paths
