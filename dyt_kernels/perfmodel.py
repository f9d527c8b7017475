"""The static performance model: bytes each launch moves, and the time a Hopper GPU should need.

Written before any GPU measured the kernels; docs/PERFORMANCE.md explains the constants. A launch's
time is the largest of three limits, plus a fixed cost:

    memory   bytes / (copy bandwidth x min(1, bytes in flight per SM / Little's-law need))
             need = copy bandwidth / SMs x DRAM latency: what one SM must keep requested to stream
    issue    warp instructions / (SMs x 4 schedulers x clock)
    MUFU     warp MUFU operations / (SMs x 0.5 per clock)   (16 lanes per SM and clock)
    fixed    launch_us per launch: the launch, the first loads' latency and the tail's drain

A persistent grid that leaves SMs idle scales the first three by SMs / SMs used. The estimate is the
fraction of the copy bandwidth the op reaches over its *minimum* bytes (each input read once, each
output written once), the number the GPU benchmark reports: min_bytes / time / copy bandwidth.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPUModel:
    name: str = "H100 SXM"
    sm_count: int = 132
    peak_bw: float = 3.35e12        # bytes/s, HBM3 datasheet
    copy_fraction: float = 0.90     # a large device copy reaches ~90% of peak (H200 here: 4.3 of 4.8 TB/s)
    latency_ns: float = 700.0       # DRAM load latency under load (600-800 ns)
    clock_ghz: float = 1.755        # SM clock under a memory-bound load
    issue_per_clock: float = 4.0    # warp instructions per SM per clock
    mufu_per_clock: float = 0.5     # warp MUFU instructions per SM per clock
    launch_us: float = 2.5          # per launch: launch gap, first-load latency, tail drain

    @property
    def copy_bw(self) -> float:
        return self.peak_bw * self.copy_fraction

    @property
    def inflight_need(self) -> float:
        """Bytes one SM must have requested at any time to run at copy speed (Little's law)."""
        return self.copy_bw / self.sm_count * self.latency_ns * 1e-9


H100 = GPUModel()
H200 = GPUModel(name="H200", peak_bw=4.8e12)


@dataclass(frozen=True)
class LaunchCost:
    """One kernel launch as the model sees it."""
    name: str
    bytes: int                  # bytes it moves through DRAM
    inflight_per_sm: float      # main-stream bytes an SM has requested at once
    warp_instructions: float    # over the whole grid
    warp_mufu: float
    sms_used: int               # SMs that get work (a persistent grid may leave some idle)

    def time_s(self, gpu: GPUModel) -> tuple[float, str]:
        """(seconds, the limit that sets them)."""
        share = gpu.sm_count / max(1, min(self.sms_used, gpu.sm_count))
        mlp = min(1.0, self.inflight_per_sm / gpu.inflight_need) if self.inflight_per_sm else 1.0
        limits = {
            "memory": self.bytes / (gpu.copy_bw * mlp) * share,
            "issue": self.warp_instructions / (gpu.sm_count * gpu.issue_per_clock * gpu.clock_ghz * 1e9) * share,
            "mufu": self.warp_mufu / (gpu.sm_count * gpu.mufu_per_clock * gpu.clock_ghz * 1e9) * share,
        }
        limit = max(limits, key=limits.get)
        return limits[limit] + gpu.launch_us * 1e-6, limit


def estimate(launches: list[LaunchCost], min_bytes: int, gpu: GPUModel = H100) -> dict:
    """Time and fraction of copy bandwidth for an op made of these launches."""
    times = [launch.time_s(gpu) for launch in launches]
    total = sum(t for t, _ in times)
    return {"time_us": total * 1e6, "limits": [lim for _, lim in times],
            "fraction_of_copy": min_bytes / total / gpu.copy_bw}
