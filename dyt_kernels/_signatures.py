"""Argument signatures that passed the checks, each with a slot for its launch configurations.

functional.py looks a call up here before anything else: a call whose tensors match a signature
skips the checks and reuses the launches its first call worked out (ops/dyt.py, ops/modulate.py).
A signature is everything those depend on, for every tensor argument: Python type, layout and
device (type and index), dtype, shape, strides, the lazy negative and conjugate bits, requires_grad,
and whether it is a functorch wrapper (which torch's guard sees in the dispatch keys).
Matching is one C call per candidate: torch's TensorGuards (torch._C._dynamo.guards; the per-tensor
check torch.compile's tensor guards run), ~0.27 us for dyt's four tensors against ~1.7 us
for building and hashing the same facts as a tuple in Python. Where that class is missing or does
not tell apart what the self-test below needs, PyGuards, the same facts in Python, take its place.

Signatures are bucketed by x's shape (a cheap hash narrowing the candidates); a bucket holds a few
(flag, guard, slot) entries, flag being any non-tensor argument the slot depends on.
"""
from __future__ import annotations

import torch
from torch import Tensor


class _Absent(Tensor):
    """The type of the stand-ins for an absent optional tensor: no caller's tensor has this type, so
    a signature with the argument absent never matches a call that passes one, nor the reverse."""


def absent() -> Tensor:
    """A new stand-in for an absent tensor. Each position needs its own object: a guard refuses a
    call that passes one object twice. (On the CPU whatever torch's default device: creating it must
    neither initialize CUDA at import nor depend on torch.set_default_device.)"""
    return torch.empty(0, device="cpu").as_subclass(_Absent)


_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _facts(t) -> tuple:
    # (torch's guard sees a functorch wrapper by its dispatch keys; here it is asked)
    return (type(t), t.layout, t.device, t.dtype, t.shape, t.stride(), t.is_neg(), t.is_conj(), t.requires_grad,
            _wrapped(t))


class PyGuards:
    """TensorGuards' check in Python: the same facts, compared as tuples."""
    __slots__ = ("facts",)

    def __init__(self, *tensors: Tensor, **_):
        self.facts = tuple(_facts(t) for t in tensors)

    def check(self, *tensors) -> bool:
        if len(tensors) != len(self.facts) or len({id(t) for t in tensors}) != len(tensors):
            return False
        try:
            return all(_facts(t) == f for t, f in zip(tensors, self.facts))
        except (AttributeError, RuntimeError, TypeError):   # not a tensor; a layout without strides
            return False


def _c_guards():
    """torch's TensorGuards where it tells apart every fact a signature holds (checked on CPU
    tensors: type, dtype, shape, strides, negative bit, requires_grad, layout), else None. The
    tensors are made on the CPU explicitly, whatever torch's default device."""
    try:
        from torch._C._dynamo.guards import TensorGuards
        cpu = torch.device("cpu")
        a, b = torch.randn(2, 3, device=cpu), torch.randn(3, device=cpu)
        g = TensorGuards(a, b, dynamic_dims_sizes=None, dynamic_dims_strides=None)
        others = [
            (torch.nn.Parameter(a.clone()), b), (a.double(), b), (torch.randn(2, 4, device=cpu), b),
            (torch.randn(3, 3, device=cpu), b), (torch.empty_strided((2, 3), (1, 2), device=cpu), b),
            (torch._neg_view(a), b), (a, b.clone().requires_grad_()), (a.to_sparse(), b), (a, a),
        ]
        if g.check(a, b) is True and g.check(a.clone(), b.clone()) is True \
                and not any(g.check(*o) for o in others) and g.check(a, 0.5) is False:
            return TensorGuards
    except Exception:  # noqa: BLE001 - any difference in this private API: fall back to PyGuards
        pass
    return None


GUARDS = _c_guards() or PyGuards


class Signatures(dict):
    """Buckets of (flag, guard, slot) entries by x's shape; bounded, as shapes that change every call
    (dynamic sequence lengths) must not grow it without limit. Lookups are inlined by the callers:

        for flag, guard, slot in signatures.get(x.shape, ()):
            if flag == f and guard.check(x, ...): ...
    """
    LIMIT = 4096     # buckets
    PER_SHAPE = 8    # entries in one bucket (dtypes, layouts, requires_grad patterns)

    def add(self, key, flag, tensors: tuple, slot):
        """Remember `tensors` (the call's, absent ones as their stand-ins) under `key` with `slot`, and
        return `slot`; or None where they are not remembered: a call passing one tensor twice (weight
        is bias; no guard would match it), a non-dense tensor (the checks refuse them; building
        torch's guard on a sparse compressed tensor aborts the process) or a functorch wrapper (a
        tensor from inside a transform, or one that escaped it). So a call with a slot has plain
        dense tensors only, which autograd.lean_dyt_apply relies on."""
        if len({id(t) for t in tensors}) != len(tensors) or any(
                t.layout != torch.strided or _wrapped(t) for t in tensors):
            return None
        guard = GUARDS(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None)
        bucket = self.get(key)
        if bucket is None:
            if len(self) >= self.LIMIT:
                self.clear()
            bucket = self[key] = []
        elif len(bucket) >= self.PER_SHAPE:
            del bucket[0]
        bucket.append((flag, guard, slot))
        return slot

    def slots(self) -> list:
        return [slot for bucket in self.values() for _, _, slot in bucket]
