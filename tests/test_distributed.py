"""Distributed and parallel training with DyT: DDP, FSDP2 (fully_shard), DTensor / tensor parallelism,
torch.distributed.checkpoint, and threads, on CPU with the gloo backend, both backends.

Two-rank runs are spawned (torch.multiprocessing.spawn) into tests/distributed_workers.py, whose
checks compare every rank's gradients, outputs and states against the whole model in float64 on the
whole batch (DyT's formula from float64_checks, no dyt_kernels code in the oracle); the bound and its
derivation are there (TOL). One-rank runs use an in-process gloo group. Each spawn pays two imports of
torch (~3 s each on two cores), so the checks of an area share one spawn.
"""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import distributed_workers as W
from dyt_kernels import DyT, ModulatedDyT, convert_layernorm_to_dyt, dyt, dyt_modulate, use_backend
from float64_checks import dyt_formula, modulate_formula
from helpers import run_in_threads

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

BACKENDS = list(W.BACKENDS)


def _spawn(which: str, tmp_path, world: int = 2) -> None:
    """Run distributed_workers' `which` checks on `world` spawned ranks; fail with every rank's report."""
    import torch.multiprocessing as mp

    try:
        mp.spawn(W.entry, args=(world, str(tmp_path / "store"), which), nprocs=world, join=True)
    except mp.ProcessException as e:   # a rank raised (its report), or died (exit code or signal)
        pytest.fail(f"{type(e).__name__}: {e}", pytrace=False)


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (1,))


# --------------------------------------------------------------------------------------------------
# Two ranks: DDP, FSDP2, DTensor (the checks are in distributed_workers.py)
# --------------------------------------------------------------------------------------------------

def test_ddp_two_ranks(tmp_path):
    """DDP over DyT (per-channel alpha, no affine, no bias) and ModulatedDyT (affine, and weight/bias
    None) with a gated residual: plain, gradient_as_bucket_view, find_unused_parameters (an unused DyT),
    static_graph over three iterations, and two no_sync micro-batches before a synced one; then a
    converted timm ViT. Every rank's allreduced gradients against float64 of the whole batch."""
    pytest.importorskip("timm")
    _spawn("ddp_checks", tmp_path)


def test_fsdp2_two_ranks(tmp_path):
    """fully_shard on every norm and the root, reshard_after_forward True and False: gradients at two
    steps with an SGD step between, the full state dict after them, and that state loaded into an
    unsharded model, against float64. Then the FullyShardedDataParallel wrapper, use_orig_params False
    (the parameters become plain attributes in forward) and True: one SGD step against float64."""
    pytest.importorskip("torch.distributed.fsdp")
    _spawn("fsdp_checks", tmp_path)


def test_dtensor_two_ranks(tmp_path):
    """dyt on x sharded over batch, tokens or channels (7 channels: an uneven Shard(-1)) or replicated,
    with parameters replicated or Shard(0) and alpha scalar or per channel; dyt_modulate with x and the
    residual sharded, modulations replicated or sharded over batch; torch's SequenceParallel on a DyT.
    Outputs and gradients (full_tensor) against float64 of the global tensors."""
    pytest.importorskip("torch.distributed.tensor")
    _spawn("dtensor_checks", tmp_path)


# --------------------------------------------------------------------------------------------------
# One rank, in process
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ddp_kwargs", [{}, {"static_graph": True}, {"find_unused_parameters": True}],
                         ids=["plain", "static_graph", "find_unused"])
def test_ddp_one_rank(backend, ddp_kwargs, one_rank_group):
    """World size 1 in this process: DDP is then a pass-through that must change nothing."""
    W._ddp_case(0, 1, backend, steps=(0, 1), **ddp_kwargs)


def test_threads_share_modules(serial_interpreter):
    """One DyT and one ModulatedDyT called from six threads at once (an inference server), each with its
    own backend entered in the thread, shapes that change every call, and grad on or off: the signature
    cache and use_backend's ContextVar must not mix calls up. Every output (and dx) against float64."""
    from dyt_kernels.backend import get_backend
    D = 8
    norm, mod = DyT(D, alpha_per_channel=True), ModulatedDyT(D, elementwise_affine=True)
    with torch.no_grad():
        for p in (*norm.parameters(), *mod.parameters()):
            p.add_(torch.randn_like(p) * 0.3)
    barrier, failures = threading.Barrier(6), []

    def work(i):
        backend, g = BACKENDS[i % 2], torch.Generator().manual_seed(i)
        try:
            barrier.wait()
            for it in range(6):
                B, L = 1 + (i + it) % 3, 1 + (i * it) % 4
                x = torch.randn(B, L, D, generator=g, requires_grad=it % 2 == 0)
                shift, scale = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
                with use_backend(backend), torch.set_grad_enabled(it % 2 == 0):
                    assert get_backend() == backend
                    h = mod(norm(x), shift, scale)
                    dx = torch.autograd.grad(h.sum(), x)[0] if it % 2 == 0 else None
                x64 = x.detach().double().requires_grad_()
                y64 = dyt_formula(x64, *(p.detach().double() for p in norm.parameters()))
                a, w, b = (p.detach().double() for p in mod.parameters())
                h64, _ = modulate_formula(y64, a, shift.double(), scale.double(), w, b)
                torch.testing.assert_close(h.double(), h64, **W.TOL)
                if dx is not None:
                    torch.testing.assert_close(dx.double(), torch.autograd.grad(h64.sum(), x64)[0], **W.TOL)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            failures.append(f"thread {i} ({backend}): {type(e).__name__}: {e}")

    run_in_threads(work, [(i,) for i in range(6)])
    assert not failures, failures


# --------------------------------------------------------------------------------------------------
# DTensor beside plain tensors, and a sharded one-element alpha (one rank, in process)
# --------------------------------------------------------------------------------------------------

def _dyt_args(D=6):
    return torch.randn(4, 3, D), torch.rand(D) + 0.5, torch.randn(D), torch.randn(D)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("plain", ["alpha", "weight", "bias"])
def test_plain_parameter_beside_a_dtensor_x_is_refused_by_name(plain, backend, one_rank_group):
    """A DTensor x (tensor or sequence parallelism) with one per-channel argument left a plain tensor
    (a module torch's parallel styles did not distribute, a parameter built after parallelize_module):
    DTensor refuses the mix, but its error named none of dyt's arguments ("aten.mul.Tensor got mixed
    torch.Tensor and DTensor"). Now a TypeError names the argument; the all-DTensor call works."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = _mesh()
    x, a, w, b = _dyt_args()
    xd = distribute_tensor(x, mesh, [Shard(0)])
    args = {n: (t if n == plain else distribute_tensor(t, mesh, [Replicate()]))
            for n, t in (("alpha", a), ("weight", w), ("bias", b))}
    with use_backend(backend):
        with pytest.raises(TypeError, match=rf"^{plain} is a plain torch.Tensor but x is a DTensor"):
            dyt(xd, args["alpha"], args["weight"], args["bias"])
        y = dyt(xd, *(distribute_tensor(t, mesh, [Replicate()]) for t in (a, w, b)))
    torch.testing.assert_close(y.full_tensor().double(), dyt_formula(*(t.double() for t in (x, a, w, b))),
                               **W.TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtensor", ["alpha", "weight", "bias"])
def test_dtensor_parameter_beside_a_plain_x_is_refused_by_name(dtensor, backend, one_rank_group):
    """A plain x with a DTensor parameter: a module sharded by fully_shard called outside the root's
    forward (its parameters stay sharded DTensors), or parallelize_module's parameters fed a local
    tensor. Was DTensor's "got mixed torch.Tensor and DTensor"; now a TypeError naming it."""
    from torch.distributed.tensor import Shard, distribute_tensor

    x, a, w, b = _dyt_args()
    args = {n: (distribute_tensor(t, _mesh(), [Shard(0)]) if n == dtensor else t)
            for n, t in (("alpha", a), ("weight", w), ("bias", b))}
    with use_backend(backend), pytest.raises(TypeError, match=rf"^{dtensor} is a DTensor but x is a plain"):
        dyt(x, args["alpha"], args["weight"], args["bias"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("plain", ["shift", "scale", "gate"])
def test_plain_modulation_beside_a_dtensor_x_is_refused_by_name(plain, backend, one_rank_group):
    """dyt_modulate on a DTensor x with one of shift, scale, gate a plain tensor: a TypeError naming it
    (was DTensor's "aten.mul.Tensor got mixed torch.Tensor and DTensor")."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = _mesh()
    D = 6
    x, res = torch.randn(2, 3, D), torch.randn(2, 3, D)
    mods = {n: torch.randn(2, D) for n in ("shift", "scale", "gate")}
    rep = lambda t: distribute_tensor(t, mesh, [Replicate()])  # noqa: E731
    xd, rd = distribute_tensor(x, mesh, [Shard(0)]), distribute_tensor(res, mesh, [Shard(0)])
    given = {n: (t if n == plain else rep(t)) for n, t in mods.items()}
    with use_backend(backend), pytest.raises(TypeError, match=rf"^{plain} is a plain torch.Tensor but x is a DTensor"):
        dyt_modulate(xd, 0.5, given["shift"], given["scale"], residual=rd, gate=given["gate"])


def test_plain_residual_beside_a_dtensor_x_is_refused_by_name(one_rank_group):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = _mesh()
    x, res, shift = torch.randn(2, 3, 6), torch.randn(2, 3, 6), torch.randn(2, 6)
    with pytest.raises(TypeError, match=r"^residual is a plain torch.Tensor but x is a DTensor"):
        dyt_modulate(distribute_tensor(x, mesh, [Shard(0)]), 0.5, distribute_tensor(shift, mesh, [Replicate()]),
                     distribute_tensor(shift, mesh, [Replicate()]), residual=res)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixing_under_implicit_replication_and_one_element_plain_tensors_still_works(backend, one_rank_group):
    """What DTensor itself accepts stays accepted: a 1-element plain alpha (and a Python number) beside
    a DTensor x, and any plain argument inside torch's implicit_replication() context."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.experimental import implicit_replication

    x, a, w, b = _dyt_args()
    xd = distribute_tensor(x, _mesh(), [Shard(0)])
    want = dyt_formula(*(t.double() for t in (x, a, w, b)))
    with use_backend(backend):
        with implicit_replication():
            y = dyt(xd, a, w, b)
        torch.testing.assert_close(y.full_tensor().double(), want, **W.TOL)
        y = dyt(xd, a[:1])
        torch.testing.assert_close(y.full_tensor().double(), torch.tanh(a[0].double() * x.double()), **W.TOL)
        y = dyt(xd, 0.5)
        torch.testing.assert_close(y.full_tensor().double(), torch.tanh(0.5 * x.double()), **W.TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["dyt", "dyt_modulate"])
def test_sharded_one_element_alpha(op, backend, one_rank_group):
    """A one-element alpha DTensor sharded over dim 0 (a partition function that shards every 1-D
    parameter, as distribute_module's callers write): was DTensor's "This operation would remove or
    reshape sharded dimension 0, which requires redistribution" from inside the plain ops; now the
    value as a replicated alpha gives it, and its gradient (the sum of every element's share) too."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = _mesh()
    x, _, w, b = _dyt_args()
    a = torch.rand(1) + 0.5
    xd = distribute_tensor(x, mesh, [Shard(0)])
    ad = distribute_tensor(a, mesh, [Shard(0)]).requires_grad_()
    wd, bd = (distribute_tensor(t, mesh, [Replicate()]) for t in (w, b))
    a64 = a.double().requires_grad_()
    with use_backend(backend):
        if op == "dyt":
            out = dyt(xd, ad, wd, bd)
            want = dyt_formula(x.double(), a64, w.double(), b.double())
        else:
            s = distribute_tensor(torch.randn(4, 6), mesh, [Replicate()])
            out = dyt_modulate(xd, ad, s, s, wd, bd)
            want, _ = modulate_formula(x.double(), a64, s.full_tensor().double(), s.full_tensor().double(),
                                       w.double(), b.double())
        (da,) = torch.autograd.grad(out.sum(), ad)
    torch.testing.assert_close(out.full_tensor().double(), want, **W.TOL)
    # dalpha sums 72 terms of O(1): fp32 error ~ sqrt(72) * 6e-8 * 72 ~ 4e-5 at worst, relative 1e-5
    torch.testing.assert_close(da.full_tensor().double(), torch.autograd.grad(want.sum(), a64)[0], atol=1e-4,
                               rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Converting after wrapping or parallelizing: refused by name (convert._refuse_distributed_*)
# --------------------------------------------------------------------------------------------------

def test_converting_a_ddp_wrapped_model_is_refused(one_rank_group):
    """DDP's reducer keeps the replaced LayerNorm parameters and never allreduces the DyT ones: ranks drifted
    apart silently (find_unused_parameters=True) or DDP failed at the second step. Also nested in a model."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 1)), find_unused_parameters=True)
    with pytest.raises(ValueError, match=r"^model is wrapped in DistributedDataParallel"):
        convert_layernorm_to_dyt(ddp)
    with pytest.raises(ValueError, match=r"^model\.1 is wrapped in DistributedDataParallel"):
        convert_layernorm_to_dyt(nn.Sequential(nn.Linear(8, 8), ddp))
    assert isinstance(ddp.module[1], nn.LayerNorm)   # nothing was changed


def test_converting_after_fully_shard_is_refused_by_name(one_rank_group):
    from torch.distributed.fsdp import fully_shard

    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 1))
    fully_shard(model)
    with pytest.raises(ValueError, match="fully_shard"):
        convert_layernorm_to_dyt(model)


def test_converting_after_fsdp1_or_a_tensor_parallel_plan_is_refused_by_name(one_rank_group):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

    with pytest.raises(ValueError, match="FullyShardedDataParallel"):
        convert_layernorm_to_dyt(FullyShardedDataParallel(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)),
                                                           device_id=torch.device("cpu")))
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 1))
    parallelize_module(model, _mesh(), {"1": SequenceParallel()})
    with pytest.raises(ValueError, match=r"^1\.weight is a DTensor"):
        convert_layernorm_to_dyt(model)
