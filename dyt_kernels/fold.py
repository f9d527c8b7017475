"""Inference folding: a DyT's weight and bias move into the Linear layers that read its output.

    y = (w * tanh(a x) + b) W^T + c  =  tanh(a x) (W diag(w))^T + (W b + c)

so W' = W * w (column j scaled by w_j) and c' = W b + c, computed in float64 and rounded once into the
Linear's dtype, and the DyT keeps only tanh(alpha x). Exact up to that rounding.

Folding is right only if the DyT's output goes nowhere but into those Linears' matmuls: a residual add,
a modulation, a slice, a returned hidden state would all see tanh(a x) instead of the DyT output. The
module tree does not say where a tensor goes, so the model runs once on example inputs under a
TorchFunctionMode that sees every torch call: each DyT output is followed to its readers, and only a
DyT whose every reader is F.linear with a Linear's own (untied) weight and bias, called by that Linear's
forward, where each of those Linears reads nothing else, folds; and only if nothing else reads those
Linears' weights and biases (or views of them), since the fold rewrites them in place, and nothing but
the DyT's own forward reads its weight and bias, which the fold drops. An output still held by anything
once the run is over (returned, even inside an object, or kept by the model) does not fold either. Reading shape,
dtype and other metadata is not a use of the values.
One run sees one path through the model: a branch the example does not take (a different mode, an
optional output) is not seen, so pass inputs that take the path you will serve.
"""
from __future__ import annotations

import gc
import weakref
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .modules import DyT

# Reading these reveals nothing of the values, so they are not uses of a DyT's output.
_METADATA_METHODS = {"size", "dim", "numel", "nelement", "ndimension", "is_contiguous", "stride",
                     "storage_offset", "element_size", "is_floating_point", "is_complex", "get_device",
                     "data_ptr", "__len__"}
_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "is_cpu", "is_meta",
                   "layout", "is_leaf", "grad_fn", "is_sparse", "is_quantized", "is_nested", "names"}


def _is_metadata(func) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a Tensor property: func is the getter bound to its descriptor
        return getattr(getattr(func, "__self__", None), "__name__", "") in _METADATA_ATTRS
    return name in _METADATA_METHODS


def _tensors(obj):
    """Every tensor in a model's output: nested tuples, lists, dicts and dict-like outputs (ModelOutput)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict) or hasattr(obj, "values"):
        for item in obj.values():
            yield from _tensors(item)


@dataclass
class FoldReport:
    """folded: DyT name -> the Linears that took its weight and bias; left: DyT name -> why not."""
    folded: dict = field(default_factory=dict)
    left: dict = field(default_factory=dict)


class _Tracer(TorchFunctionMode):
    def __init__(self, outputs: dict, linear_of_weight: dict, dyts: dict):
        super().__init__()
        self.outputs = outputs                    # id(tensor) -> (dyt id, tensor kept alive)
        self.linear_of_weight = linear_of_weight  # id(weight) -> Linear
        self.readers = defaultdict(set)           # dyt id -> ids of Linears reading its output
        self.refused = {}                         # dyt id -> why it cannot fold
        self.linear_inputs = defaultdict(set)     # linear id -> dyt ids (None: a non-DyT input)
        # Folding rewrites a Linear's weight and bias in place: any read of them (or of a view made of
        # them beforehand) other than the Linear's own F.linear call would see the rewritten values.
        self.linear_params = {id(t): (id(m), t) for m in linear_of_weight.values()
                              for t in (m.weight, m.bias) if t is not None}
        self.linear_storages = defaultdict(set)   # (device, storage pointer) -> ids of Linears
        for m_id, t in self.linear_params.values():
            key = _storage_key(t)
            if key is not None:
                self.linear_storages[key].add(m_id)
        self.read_elsewhere = {}                  # linear id -> the first other read of its parameters
        # Folding drops a DyT's weight and bias: only its own forward may read them (tied DyTs: any owner's).
        self.dyt_params = defaultdict(set)        # id(parameter) -> ids of the DyTs holding it
        for d_id, d in dyts.items():
            for t in (d.weight, d.bias):
                if t is not None:
                    self.dyt_params[id(t)].add(d_id)
        self.active = []                          # tracked modules whose forward runs, innermost last

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func is torch._C._nn.linear:
            self._linear(args, kwargs)
        elif not _is_metadata(func):
            for t in _tensors((args, kwargs)):
                if id(t) in self.outputs:
                    self.refused.setdefault(self.outputs[id(t)][0], f"its output is read by {_name(func)}")
                self._param_read(t, func)
        return func(*args, **kwargs)

    def _dyt_param_read(self, t: Tensor, func) -> None:
        owners = self.dyt_params.get(id(t))
        if owners and not (self.active and id(self.active[-1]) in owners):
            for d_id in owners:
                self.refused.setdefault(d_id, f"its weight or bias is read by {_name(func)} outside its own forward")

    def _param_read(self, t: Tensor, func) -> None:
        """A read of t by func that is not a tracked module's own: of a DyT's or a Linear's parameter?"""
        self._dyt_param_read(t, func)
        own = self.linear_params.get(id(t))
        if own is not None and own[1] is t:
            owners = {own[0]}
        else:
            owners = self.linear_storages.get(_storage_key(t), ())
        for m_id in owners:
            self.read_elsewhere.setdefault(m_id, _name(func))

    def _linear(self, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        source = self.outputs.get(id(x), (None,))[0]
        linear = self.linear_of_weight.get(id(weight))
        # The Linear's own call: made by its forward (which reads self.bias afresh, so a bias the fold
        # adds is used), with its weight and bias.
        if (linear is not None and weight is linear.weight and bias is linear.bias
                and self.active and self.active[-1] is linear):
            self.linear_inputs[id(linear)].add(source)
            if source is not None:
                self.readers[source].add(id(linear))
            if isinstance(x, Tensor):
                self._param_read(x, F.linear)
            return
        if source is not None:
            self.refused.setdefault(source, "its output is read by F.linear with a weight that is not an "
                                            "untied nn.Linear's own, or outside that Linear's forward")
        for t in (x, weight, bias):
            if isinstance(t, Tensor):
                if id(t) in self.outputs and t is not x:
                    self.refused.setdefault(self.outputs[id(t)][0], "its output is used as a Linear weight")
                self._param_read(t, F.linear)


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


def _storage_key(t: Tensor):
    """Which memory a tensor views: (device, storage pointer), or None where that cannot be told."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001 - subclasses, sparse and meta tensors have no plain storage
        return None
    return (t.device, ptr) if ptr else None


def _returned(result, outputs: dict) -> set:
    return {outputs[id(t)][0] for t in _tensors(result) if id(t) in outputs}


def _kept(outputs: dict) -> set:
    """The DyTs whose outputs something still holds once the run is over: the model's result (also an
    output object that _tensors cannot walk, a plain dataclass), an attribute the model set, a list it
    appended to. Empties ``outputs``, which held them (alive, so their ids stay unique) until now."""
    refs = [(dyt_id, weakref.ref(t)) for dyt_id, t in outputs.values()]
    outputs.clear()
    gc.collect()
    return {dyt_id for dyt_id, ref in refs if ref() is not None}


def _untied_linears(model: nn.Module) -> dict[int, nn.Linear]:
    """id(weight) -> Linear, for Linears whose weight and bias no other module holds (no tying)."""
    owners = Counter(id(p) for m in model.modules() for p in m._parameters.values() if p is not None)
    return {id(m.weight): m for m in model.modules()
            if isinstance(m, nn.Linear) and owners[id(m.weight)] == 1
            and (m.bias is None or owners[id(m.bias)] == 1)}


@torch.no_grad()
def _fold_into(dyt: DyT, linears: list[nn.Linear]) -> None:
    w = dyt.weight.detach().double() if dyt.weight is not None else None
    b = dyt.bias.detach().double() if dyt.bias is not None else None
    for lin in linears:
        W = lin.weight.detach().double()
        c = lin.bias.detach().double() if lin.bias is not None else torch.zeros(W.shape[0], dtype=W.dtype,
                                                                                  device=W.device)
        if b is not None:
            c = c + W @ b
            if lin.bias is None:
                lin.bias = nn.Parameter(torch.empty_like(c, dtype=lin.weight.dtype), lin.weight.requires_grad)
        if w is not None:
            lin.weight.copy_(W * w)
        if lin.bias is not None:
            lin.bias.copy_(c)
    dyt.register_parameter("weight", None)
    dyt.register_parameter("bias", None)
    dyt.elementwise_affine = False


def fold_dyt_affine(model: nn.Module, *example_args, **example_kwargs) -> FoldReport:
    """For inference: fold each DyT's weight and bias into the Linears that alone read its output.

    Runs ``model(*example_args, **example_kwargs)`` once (no_grad) to see where each DyT output goes,
    then rewrites, in place, the DyTs that feed only Linear layers: they keep ``tanh(alpha * x)``, the
    Linears absorb ``W * weight`` and ``W @ bias + c`` (a bias-free Linear gains a bias). The model is
    then for inference: its state dict no longer has those DyT weights. Returns what was folded and why
    each other DyT was not.

    >>> import torch
    >>> from dyt_kernels import DyT, fold_dyt_affine
    >>> model = torch.nn.Sequential(DyT(8), torch.nn.Linear(8, 4)).eval()
    >>> _ = torch.nn.init.normal_(model[0].weight); x = torch.randn(2, 8); before = model(x)
    >>> fold_dyt_affine(model, x).folded
    {'0': ['1']}
    >>> torch.allclose(model(x), before, atol=1e-6), model[0].weight is None
    (True, True)
    """
    names = {id(m): n for n, m in model.named_modules()}
    dyts = {id(m): m for m in model.modules() if isinstance(m, DyT)}
    report = FoldReport()
    outputs: dict = {}

    def record(module, inputs, output):
        if isinstance(output, Tensor):
            outputs[id(output)] = (id(module), output)

    tracer = _Tracer(outputs, _untied_linears(model), dyts)

    def enter(module, inputs):
        tracer.active.append(module)

    def leave(module, inputs, output):
        if tracer.active and tracer.active[-1] is module:
            tracer.active.pop()

    hooks = [m.register_forward_hook(record) for m in dyts.values()]
    for m in list(dyts.values()) + list(tracer.linear_of_weight.values()):
        hooks += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave, always_call=True)]
    try:
        with torch.no_grad(), tracer:
            result = model(*example_args, **example_kwargs)
    finally:
        for h in hooks:
            h.remove()
    for dyt_id in _returned(result, outputs):
        tracer.refused.setdefault(dyt_id, "its output is returned by the model")
    called = {dyt_id for dyt_id, _ in outputs.values()}
    for dyt_id in _kept(outputs):  # while result lives: what it holds is what a caller would get
        tracer.refused.setdefault(dyt_id, "its output outlives the run (returned inside an object the fold "
                                          "cannot look into, or kept by the model), and would change")
    linears = {id(m): m for m in model.modules() if isinstance(m, nn.Linear)}
    for dyt_id, dyt in dyts.items():
        name = names[dyt_id]
        readers = tracer.readers.get(dyt_id, set())
        why = tracer.refused.get(dyt_id)
        if why is None and dyt.weight is None and dyt.bias is None:
            why = "it has no weight or bias"
        elif why is None and not (dyt.channels_last and len(dyt.normalized_shape) == 1):
            why = "it normalizes dim 1 or several dims, which a Linear does not contract"
        elif why is None and dyt_id not in called:
            why = "the example inputs did not run it"
        elif why is None and not readers:
            why = "no Linear reads its output"
        elif why is None:
            shared = [names[i] for i in readers if tracer.linear_inputs[i] != {dyt_id}]
            elsewhere = [f"{names[i]} (by {tracer.read_elsewhere[i]})" for i in readers
                         if i in tracer.read_elsewhere]
            if shared:
                why = f"{', '.join(shared)} also read(s) other inputs"
            elif elsewhere:
                why = (f"the weight or bias of {', '.join(sorted(elsewhere))} is also read elsewhere than "
                       f"in that Linear's own call, which would see the folded values")
        if why is not None:
            report.left[name] = why
            continue
        targets = sorted((linears[i] for i in readers), key=lambda m: names[id(m)])
        _fold_into(dyt, targets)
        report.folded[name] = [names[id(m)] for m in targets]
    return report
