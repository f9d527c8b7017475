"""Worker functions for tests/test_distributed.py: each runs in one process of a CPU/gloo group (spawned
by torch.multiprocessing.spawn, which imports this module by name), checks what its rank sees against
float64, and raises AssertionError listing every failed check (spawn re-raises it in the parent).

The float64 oracle is the whole model in float64 on the whole batch (every rank's inputs, made from
one seed in every process), with DyT and ModulatedDyT computing tests/float64_checks.py's formulas
(formula_norms), so no dyt_kernels code is in the oracle.
"""
from __future__ import annotations

import contextlib
import copy
import os
import traceback

import torch
import torch.distributed as dist
from torch import nn

from dyt_kernels import DyT, ModulatedDyT, dyt, dyt_modulate, use_backend
from float64_checks import dyt_formula, modulate_formula

# fp32 against float64 through a few tiny layers (width <= 32, <= 2 * 2 * 4 rows per reduction):
# each value is O(1) and carries a few fp32 roundings (2^-24 ~ 6e-8) per layer, a reduction over n <= 64
# terms adds ~sqrt(n) * 6e-8 ~ 5e-7; 1e-5 leaves a factor of ten over that, and a real mistake (a
# gradient not averaged over ranks, one micro-batch lost, a shard read as the whole) is O(1e-1).
TOL = dict(atol=1e-5, rtol=1e-5)
BACKENDS = ("torch", "triton")


# --------------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------------

def init(rank: int, world: int, path: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)


def run_checks(rank: int, world: int, path: str, checks) -> None:
    """Run every (name, fn) in `checks`; raise one AssertionError naming the rank and each failure."""
    init(rank, world, path)
    failures = []
    try:
        for name, fn in checks:
            try:
                fn(rank, world)
            except Exception as e:  # noqa: BLE001 - each failure is reported with its name
                failures.append(f"[rank {rank}] {name}: {type(e).__name__}: {e}\n"
                                f"{''.join(traceback.format_tb(e.__traceback__)[-3:])}")
        # every rank reaches here (a failed check must not leave the other rank in a collective)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if failures:
        raise AssertionError("\n".join(failures))


@contextlib.contextmanager
def formula_norms():
    """DyT and ModulatedDyT compute float64_checks' formulas (the oracle's norms) inside the block."""
    dyt_forward, mod_forward = DyT.forward, ModulatedDyT.forward

    def dyt_f(self, x):
        return dyt_formula(x, self.alpha.reshape(-1), self.weight, self.bias, self.channels_last)

    def mod_f(self, x, shift, scale, residual=None, gate=None):
        h, r = modulate_formula(x, self.alpha, shift, scale, self.weight, self.bias, residual, gate)
        return h if residual is None else (h, r)

    DyT.forward, ModulatedDyT.forward = dyt_f, mod_f
    try:
        yield
    finally:
        DyT.forward, ModulatedDyT.forward = dyt_forward, mod_forward


# --------------------------------------------------------------------------------------------------
# The model: every norm flavour, a modulated norm with a gated residual, an optional unused branch
# --------------------------------------------------------------------------------------------------

D, L = 8, 3


class Block(nn.Module):
    def __init__(self, unused_branch: bool = False):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.norm = DyT(D, alpha_per_channel=True)
        self.bare = DyT(D, elementwise_affine=False)          # weight and bias None
        self.nobias = DyT(D, bias=False)
        self.ada = nn.Linear(D, 3 * D)
        self.mod = ModulatedDyT(D, elementwise_affine=True)
        self.mod_bare = ModulatedDyT(D)                       # weight and bias None
        self.head = nn.Linear(D, 2)
        self.unused = DyT(D) if unused_branch else None      # never called: find_unused_parameters
        with torch.no_grad():   # away from the init values, so every parameter's gradient matters
            for p in self.parameters():
                p.add_(torch.randn_like(p) * 0.3)

    def forward(self, x, c):
        h = self.nobias(self.bare(self.norm(self.inp(x))))
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)
        h2, r = self.mod(h, shift, scale, residual=x, gate=gate)
        return self.head(self.mod_bare(h2, shift, scale) + r)


def batch(step: int, world: int):
    """The whole batch of a step (every rank makes the same one): 2 samples per rank."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(2 * world, L, D, generator=g), torch.randn(2 * world, D, generator=g)


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world)[rank].contiguous()


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return (out * out).mean()


def oracle_grads(model: nn.Module, steps, world: int) -> dict:
    """float64 gradients of the sum over `steps` of the whole batch's loss (as DDP's average of
    per-rank means gives it with equal shards)."""
    ref = copy.deepcopy(model).double()
    with formula_norms():
        for step in steps:
            x, c = batch(step, world)
            loss_of(ref(x.double(), c.double())).backward()
    return {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}


def assert_grads(model: nn.Module, want: dict, what: str) -> None:
    got = {n.removeprefix("module."): p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(got) == sorted(want), f"{what}: gradients for {sorted(got)}, float64 has {sorted(want)}"
    for n, g in got.items():
        torch.testing.assert_close(g.double(), want[n], **TOL, msg=lambda m: f"{what}, {n}: {m}")


# --------------------------------------------------------------------------------------------------
# DDP
# --------------------------------------------------------------------------------------------------

def _ddp_case(rank, world, backend, steps=(0,), no_sync_steps=(), **ddp_kwargs):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = Block(unused_branch=ddp_kwargs.get("find_unused_parameters", False))
    want = oracle_grads(model, (*no_sync_steps, *steps), world)
    ddp = DDP(model, **ddp_kwargs)
    with use_backend(backend):
        with ddp.no_sync():
            for step in no_sync_steps:
                x, c = batch(step, world)
                loss_of(ddp(shard(x, rank, world), shard(c, rank, world))).backward()
        for i, step in enumerate(steps):
            if i:   # static_graph: a second iteration, gradients zeroed between
                want = oracle_grads(model, (step,), world)
                ddp.zero_grad(set_to_none=True)
            x, c = batch(step, world)
            loss_of(ddp(shard(x, rank, world), shard(c, rank, world))).backward()
    assert_grads(ddp, want, f"DDP({ddp_kwargs}) backend {backend}")


def ddp_checks():
    out = []
    for backend in BACKENDS:
        out += [
            (f"ddp {backend}", lambda r, w, b=backend: _ddp_case(r, w, b)),
            (f"ddp bucket view {backend}", lambda r, w, b=backend: _ddp_case(r, w, b, gradient_as_bucket_view=True)),
            (f"ddp find_unused {backend}", lambda r, w, b=backend: _ddp_case(r, w, b, find_unused_parameters=True)),
            (f"ddp static_graph {backend}", lambda r, w, b=backend: _ddp_case(r, w, b, steps=(0, 1, 2),
                                                                               static_graph=True)),
            (f"ddp no_sync {backend}", lambda r, w, b=backend: _ddp_case(r, w, b, steps=(2,), no_sync_steps=(0, 1))),
        ]
    out.append(("ddp timm vit", _ddp_vit))
    return out


def _ddp_vit(rank, world):
    """A timm ViT converted to DyT under DDP, on both backends, against the converted model in float64
    (the caller skips where timm is missing)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dyt_kernels import convert_layernorm_to_dyt
    from library_models import vit

    for backend in BACKENDS:
        torch.manual_seed(0)
        model = convert_layernorm_to_dyt(vit())
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, DyT):
                    for p in m.parameters():
                        p.add_(torch.randn_like(p) * 0.3)
        images = torch.randn(2 * world, 3, 16, 16, generator=torch.Generator().manual_seed(7))
        ref = copy.deepcopy(model).double()
        with formula_norms():
            loss_of(ref(images.double())).backward()
        want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        ddp = DDP(model)
        with use_backend(backend):
            loss_of(ddp(shard(images, rank, world))).backward()
        assert_grads(ddp, want, f"DDP timm ViT backend {backend}")


# --------------------------------------------------------------------------------------------------
# DTensor: dyt and dyt_modulate on sharded and replicated arguments, against float64 of the globals
# --------------------------------------------------------------------------------------------------

def _mesh(world):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (world,))


def _dtensor_dyt(rank, world, backend, x_place, p_place, per_channel):
    from torch.distributed.tensor import DTensor, distribute_tensor

    mesh = _mesh(world)
    g = torch.Generator().manual_seed(3)
    Dc = 7   # odd: a Shard over channels is uneven on two ranks
    x = torch.randn(2 * world, L, Dc, generator=g)
    a = torch.rand(Dc if per_channel else 1, generator=g) + 0.5
    w, b = torch.randn(Dc, generator=g), torch.randn(Dc, generator=g)
    dy = torch.randn(x.shape, generator=g)
    xd = distribute_tensor(x, mesh, [x_place]).requires_grad_()
    pd = [distribute_tensor(p, mesh, [p_place]).requires_grad_() for p in (a, w, b)]
    with use_backend(backend):
        y = dyt(xd, *pd)
        grads = torch.autograd.grad(y, (xd, *pd), distribute_tensor(dy, mesh, y.placements))
    assert isinstance(y, DTensor)
    q = [t.double().requires_grad_() for t in (x, a, w, b)]
    y64 = dyt_formula(*q)
    want = torch.autograd.grad(y64, q, dy.double())
    what = f"dyt x {x_place} params {p_place} alpha {'per channel' if per_channel else 'scalar'} {backend}"
    torch.testing.assert_close(y.full_tensor().double(), y64, **TOL, msg=lambda m: f"{what}, y: {m}")
    for name, gd, g64 in zip(("x", "alpha", "weight", "bias"), grads, want):
        torch.testing.assert_close(gd.full_tensor().double(), g64, **TOL, msg=lambda m: f"{what}, d{name}: {m}")


def _dtensor_modulate(rank, world, backend, x_place, m_place):
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = _mesh(world)
    g = torch.Generator().manual_seed(4)
    B = 2 * world
    x, res = torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g)
    a = torch.rand(1, generator=g) + 0.5
    w, b = torch.randn(D, generator=g), torch.randn(D, generator=g)
    shift, scale, gate = (torch.randn(B, D, generator=g) for _ in range(3))
    dh, dr = torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g)
    xs = [distribute_tensor(t, mesh, [x_place]).requires_grad_() for t in (x, res)]
    ms = [distribute_tensor(t, mesh, [m_place]).requires_grad_() for t in (shift, scale, gate)]
    ps = [distribute_tensor(t, mesh, [Replicate()]).requires_grad_() for t in (a, w, b)]
    leaves = (*xs, *ms, *ps)
    with use_backend(backend):
        h, r = dyt_modulate(xs[0], ps[0], ms[0], ms[1], ps[1], ps[2], residual=xs[1], gate=ms[2])
        grads = torch.autograd.grad((h, r), leaves, (distribute_tensor(dh, mesh, h.placements),
                                                     distribute_tensor(dr, mesh, r.placements)))
    q = [t.double().requires_grad_() for t in (x, res, shift, scale, gate, a, w, b)]
    h64, r64 = modulate_formula(q[0], q[5], q[2], q[3], q[6], q[7], q[1], q[4])
    want = torch.autograd.grad((h64, r64), q, (dh.double(), dr.double()))
    what = f"dyt_modulate x {x_place} modulation {m_place} {backend}"
    torch.testing.assert_close(h.full_tensor().double(), h64, **TOL, msg=lambda m: f"{what}, h: {m}")
    torch.testing.assert_close(r.full_tensor().double(), r64, **TOL, msg=lambda m: f"{what}, r: {m}")
    names = ("x", "residual", "shift", "scale", "gate", "alpha", "weight", "bias")
    for name, gd, g64 in zip(names, grads, want):
        torch.testing.assert_close(gd.full_tensor().double(), g64, **TOL, msg=lambda m: f"{what}, d{name}: {m}")


def _sequence_parallel_module(rank, world, backend):
    """torch's SequenceParallel style on a DyT and a ModulatedDyT (parameters replicated DTensors, the
    input sharded over tokens), forward and backward against float64."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

    mesh = _mesh(world)
    torch.manual_seed(0)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.mod = DyT(D, alpha_per_channel=True), ModulatedDyT(D, elementwise_affine=True)
            with torch.no_grad():
                for p in self.parameters():
                    p.add_(torch.randn_like(p) * 0.3)

        def forward(self, x, shift, scale):
            return self.mod(self.norm(x), shift, scale)

    model = Two()
    ref = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(5)
    x, shift, scale = torch.randn(2, 2 * world, D, generator=g), torch.randn(2, D, generator=g), torch.randn(2, D, generator=g)
    with formula_norms():
        loss_of(ref(x.double(), shift.double(), scale.double())).backward()
    parallelize_module(model, mesh, {"norm": SequenceParallel(use_local_output=False)})
    with use_backend(backend):
        y = model.norm(shard(x.transpose(0, 1), rank, world).transpose(0, 1).contiguous())
        assert isinstance(y, DTensor)
        from torch.distributed.tensor import Replicate, distribute_tensor
        s, c = (distribute_tensor(t, mesh, [Replicate()]) for t in (shift, scale))
        mp = [distribute_tensor(p.detach(), mesh, [Replicate()]).requires_grad_() for p in model.mod.parameters()]
        h = dyt_modulate(y, mp[0], s, c, mp[1], mp[2])
        # the loss over the whole batch: h's local shard's share of the global mean
        (h.to_local() ** 2).sum().div(h.numel()).backward()
    want = {n: p.grad for n, p in ref.named_parameters()}
    for n, p in model.norm.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor().double(), want["norm." + n], **TOL,
                                   msg=lambda m: f"SequenceParallel DyT {backend}, {n}: {m}")
    for n, p in zip(("alpha", "weight", "bias"), mp):
        torch.testing.assert_close(p.grad.full_tensor().double(), want["mod." + n], **TOL,
                                   msg=lambda m: f"SequenceParallel modulate {backend}, {n}: {m}")


def dtensor_checks():
    from torch.distributed.tensor import Replicate, Shard

    out = []
    for backend in BACKENDS:
        for x_place in (Shard(0), Shard(1), Shard(-1), Replicate()):
            for p_place in (Replicate(), Shard(0)):
                for per_channel in (False, True):
                    out.append((f"dtensor dyt {x_place} {p_place} {per_channel} {backend}",
                                lambda r, w, b=backend, xp=x_place, pp=p_place, pc=per_channel:
                                _dtensor_dyt(r, w, b, xp, pp, pc)))
            for m_place in (Replicate(), Shard(0)) if x_place == Shard(0) else (Replicate(),):
                out.append((f"dtensor modulate {x_place} {m_place} {backend}",
                            lambda r, w, b=backend, xp=x_place, mp=m_place: _dtensor_modulate(r, w, b, xp, mp)))
        out.append((f"sequence parallel {backend}", lambda r, w, b=backend: _sequence_parallel_module(r, w, b)))
    return out


# --------------------------------------------------------------------------------------------------
# FSDP2 (fully_shard): sharded DTensor parameters, unsharded plain ones for forward and backward
# --------------------------------------------------------------------------------------------------

def _fsdp_case(rank, world, backend, reshard_after_forward):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = Block()
    ref = copy.deepcopy(model).double()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for m in (model.norm, model.bare, model.nobias, model.mod, model.mod_bare):
        fully_shard(m, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    what = f"fully_shard(reshard_after_forward={reshard_after_forward}) {backend}"
    for step in range(2):
        x, c = batch(step, world)
        with formula_norms():
            ref_opt.zero_grad()
            loss_of(ref(x.double(), c.double())).backward()
        want = {n: p.grad for n, p in ref.named_parameters()}
        opt.zero_grad()
        with use_backend(backend):
            loss_of(model(shard(x, rank, world), shard(c, rank, world))).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad.full_tensor().double(), want[n], **TOL,
                                       msg=lambda m: f"{what}, step {step}, d{n}: {m}")
        opt.step()
        ref_opt.step()
    # the full state dict after the steps: every parameter as the float64 model has it
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    want = ref.state_dict()
    if rank == 0:   # (cpu_offload: only rank 0 holds the full state dict)
        assert sorted(full) == sorted(want), f"{what}: full state dict keys {sorted(full)}"
        for n, v in full.items():
            torch.testing.assert_close(v.double(), want[n], **TOL, msg=lambda m: f"{what}, state {n}: {m}")
    # and back in: a fresh unsharded model loads it and computes what the sharded one does
    fresh = Block()
    if rank == 0:
        fresh.load_state_dict(full)
        x, c = batch(5, world)
        with torch.no_grad(), use_backend(backend):
            got = fresh(x, c)
        with formula_norms(), torch.no_grad():
            torch.testing.assert_close(got.double(), ref(x.double(), c.double()), **TOL,
                                       msg=lambda m: f"{what}, reloaded model: {m}")


def _fsdp1_case(rank, world, backend, use_orig_params):
    """The FullyShardedDataParallel wrapper: with use_orig_params=False the norms' parameters leave
    their modules' parameter dicts for plain tensor attributes during forward (DyT reads those). One
    SGD step (lr 1, so a wrong gradient moves a parameter by as much), then the full parameters."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.manual_seed(0)
    model = Block()
    ref = copy.deepcopy(model).double()
    wrapped = FSDP(model, device_id=torch.device("cpu"), use_orig_params=use_orig_params)
    opt, ref_opt = torch.optim.SGD(wrapped.parameters(), lr=1.0), torch.optim.SGD(ref.parameters(), lr=1.0)
    x, c = batch(0, world)
    with use_backend(backend):
        loss_of(wrapped(shard(x, rank, world), shard(c, rank, world))).backward()
    opt.step()
    with formula_norms():
        loss_of(ref(x.double(), c.double())).backward()
    ref_opt.step()
    want = dict(ref.named_parameters())
    with FSDP.summon_full_params(wrapped):
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach().double(), want[n].detach(), **TOL,
                                       msg=lambda m: f"FSDP(use_orig_params={use_orig_params}) {backend}, {n}: {m}")


def fsdp_checks():
    return [*((f"fsdp reshard={rs} {backend}", lambda r, w, b=backend, rs=rs: _fsdp_case(r, w, b, rs))
              for backend in BACKENDS for rs in (True, False)),
            *((f"fsdp1 use_orig_params={o} {backend}", lambda r, w, b=backend, o=o: _fsdp1_case(r, w, b, o))
              for backend in BACKENDS for o in (False, True))]


def entry(rank: int, world: int, path: str, which: str) -> None:
    """torch.multiprocessing.spawn's target: the checks `which` names (ddp_checks, dtensor_checks, ...)."""
    run_checks(rank, world, path, globals()[which]())
