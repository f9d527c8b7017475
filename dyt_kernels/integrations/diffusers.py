"""fuse_modulation: diffusers' adaLN chains (norm, then * (1 + scale) + shift) through one dyt_modulate.

After the converter, a diffusers block computes DyT, then the modulation, as separate ops (and the
gated residual add before them as a third). Each class below is the diffusers class with a forward
that makes the same calls on the same public attributes (linear, silu, emb, norm, scale_shift_table,
attn1, ...) but hands norm + modulation (+ the residual add where the block's order allows) to
dyt_modulate. An instance is switched by assigning its __class__: parameters, buffers, state-dict
keys, isinstance checks and pickling stay those of the diffusers class, and the fused block gets
BasicTransformerBlock's entry in diffusers' block registry (its hooks look blocks up by exact class).
Any input the fused forward does not cover (a norm that is not a channels-last DyT or has hooks, a
non-(B, L, D) input, GLIGEN, feed-forward chunking) takes diffusers' own forward, which is the unfused conversion; a
conditioning whose batch is not the input's (one timestep beside B samples, which diffusers
broadcasts) takes diffusers' unfused expression at that one modulation.

Fused and unfused compute the same expressions in the same order (r = residual + gate * x, then
weight * tanh(alpha * r) + bias, then * (1 + scale) + shift), so on the torch backend they agree to
the last bit in fp32, and on the Triton backend to the kernels' tanh accuracy.
"""
from __future__ import annotations

import copy
from collections import Counter

from torch import Tensor, nn

from .._checks import modulation_fits
from ..functional import dyt_modulate
from ..modules import DyT

try:
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.normalization import (AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle,
                                                SD35AdaLayerNormZeroX)
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("fuse_modulation needs diffusers: pip install diffusers") from err


def _fusable(norm: nn.Module | None) -> bool:
    return isinstance(norm, DyT) and norm.channels_last and len(norm.normalized_shape) == 1


def _called_plainly(norm: nn.Module) -> bool:
    """Whether calling the norm runs its forward and nothing else: no hooks of its own, no forward replaced
    on the instance (as accelerate's offload hooks and diffusers' HookRegistry do, to bring its parameters
    to the device). The fused forwards read its parameters without calling it, which would skip those."""
    if norm._forward_hooks or norm._forward_pre_hooks or norm._backward_hooks or norm._backward_pre_hooks:
        return False
    forward = vars(norm).get("forward")
    # (a forward that is the class's own, bound to the norm, is what removing accelerate's or diffusers'
    # hooks leaves on the instance: plain again)
    return forward is None or (getattr(forward, "__func__", None) is type(norm).forward
                               and getattr(forward, "__self__", None) is norm)


def _fits(norm: nn.Module | None, x: Tensor) -> bool:
    return _fusable(norm) and x.dim() == 3 and x.shape[-1] == norm.normalized_shape[0] and _called_plainly(norm)


def _takes(x: Tensor, *modulations: Tensor | None) -> bool:
    """Whether dyt_modulate takes these shift / scale / gate tensors for x as they are."""
    B, L, D = x.shape
    return all(m is None or modulation_fits(m, B, L, D) for m in modulations)


def _per_token(m: Tensor) -> Tensor:
    return m if m.dim() == 3 else m[:, None]


def _modulate(norm: DyT, x: Tensor, shift: Tensor, scale: Tensor, residual: Tensor | None = None,
              gate: Tensor | None = None):
    """norm(r) * (1 + scale) + shift with r = residual + gate * x (r = x without a residual); (h, r) with one.

    A conditioning whose batch is not x's (a batch of one beside B samples, which diffusers broadcasts)
    is not a shape dyt_modulate takes: that case computes diffusers' own unfused expression.
    """
    if _takes(x, shift, scale, gate) and (residual is None or residual.shape == x.shape):
        return dyt_modulate(x, norm.alpha, shift, scale, norm.weight, norm.bias, residual=residual, gate=gate)
    r = x
    if residual is not None:
        r = (x if gate is None else _per_token(gate) * x) + residual
    h = norm(r) * (1 + _per_token(scale)) + _per_token(shift)
    return h if residual is None else (h, r)


class FusedAdaLayerNormZero(AdaLayerNormZero):
    def forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
        if not _fits(self.norm, x):
            return super().forward(x, timestep, class_labels, hidden_dtype, emb)
        if self.emb is not None:
            emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
        emb = self.linear(self.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        return _modulate(self.norm, x, shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class FusedAdaLayerNormZeroSingle(AdaLayerNormZeroSingle):
    def forward(self, x, emb=None):
        if not _fits(self.norm, x):
            return super().forward(x, emb)
        shift_msa, scale_msa, gate_msa = self.linear(self.silu(emb)).chunk(3, dim=1)
        return _modulate(self.norm, x, shift_msa, scale_msa), gate_msa


class FusedAdaLayerNormContinuous(AdaLayerNormContinuous):
    def forward(self, x, conditioning_embedding):
        if not _fits(self.norm, x):
            return super().forward(x, conditioning_embedding)
        emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
        scale, shift = emb.chunk(2, dim=1)
        return _modulate(self.norm, x, shift, scale)


class FusedSD35AdaLayerNormZeroX(SD35AdaLayerNormZeroX):
    def forward(self, hidden_states, emb=None):
        if not _fits(self.norm, hidden_states):
            return super().forward(hidden_states, emb)
        emb = self.linear(self.silu(emb))
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
         shift_msa2, scale_msa2, gate_msa2) = emb.chunk(9, dim=1)
        # Two modulations of one norm output: two fused calls, each recomputing the cheap tanh.
        h = _modulate(self.norm, hidden_states, shift_msa, scale_msa)
        h2 = _modulate(self.norm, hidden_states, shift_msa2, scale_msa2)
        return h, gate_msa, shift_mlp, scale_mlp, gate_mlp, h2, gate_msa2


class FusedBasicTransformerBlock(BasicTransformerBlock):
    """BasicTransformerBlock for norm_type 'ada_norm_zero' (DiT) and 'ada_norm_single' (PixArt-alpha).

    The MLP's norm takes the residual add before it: the gated self-attention add when the block has no
    cross-attention, the (ungated) cross-attention add when it has one.
    """

    def _mlp_norm(self):
        return self.norm3 if self.norm_type == "ada_norm_zero" else self.norm2

    def _covers(self, hidden_states, cross_attention_kwargs) -> bool:
        kwargs = cross_attention_kwargs or {}
        # _chunk_size is diffusers' own record of set_chunk_feed_forward (there is no public getter):
        # chunked feed-forward is left to diffusers' forward.
        return (hidden_states.dim() == 3 and "gligen" not in kwargs and "scale" not in kwargs
                and getattr(self, "_chunk_size", None) is None and _fits(self._mlp_norm(), hidden_states)
                and (self.norm_type == "ada_norm_zero" or _fits(self.norm1, hidden_states)))

    def __setstate__(self, state):   # unpickled (or deep-copied) in a process that never called fuse_modulation
        super().__setstate__(state)
        _register_with_diffusers_hooks()

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
        if not self._covers(hidden_states, cross_attention_kwargs):
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
        kwargs = dict(cross_attention_kwargs or {})
        batch_size = hidden_states.shape[0]
        if self.norm_type == "ada_norm_zero":
            norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(
                hidden_states, timestep, class_labels, hidden_dtype=hidden_states.dtype)
            gate_msa, gate_mlp = gate_msa.unsqueeze(1), gate_mlp.unsqueeze(1)
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
                self.scale_shift_table[None] + timestep.reshape(batch_size, 6, -1)).chunk(6, dim=1)
            norm_hidden_states = _modulate(self.norm1, hidden_states, shift_msa, scale_msa)
        if self.pos_embed is not None:
            norm_hidden_states = self.pos_embed(norm_hidden_states)

        attn_output = self.attn1(norm_hidden_states,
                                 encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
                                 attention_mask=attention_mask, **kwargs)
        branch, gate = attn_output, gate_msa  # the add still owed to hidden_states: hidden + gate * branch
        if self.attn2 is not None:
            hidden_states = gate * branch + hidden_states
            if self.norm_type == "ada_norm_zero":
                norm_hidden_states = self.norm2(hidden_states)
                if self.pos_embed is not None:
                    norm_hidden_states = self.pos_embed(norm_hidden_states)
            else:  # PixArt-alpha applies no norm before cross-attention
                norm_hidden_states = hidden_states
            branch = self.attn2(norm_hidden_states, encoder_hidden_states=encoder_hidden_states,
                                attention_mask=encoder_attention_mask, **kwargs)
            gate = None
        norm_hidden_states, hidden_states = _modulate(self._mlp_norm(), branch, shift_mlp, scale_mlp,
                                                      residual=hidden_states, gate=gate)
        ff_output = self.ff(norm_hidden_states)
        return gate_mlp * ff_output + hidden_states


def _register_with_diffusers_hooks() -> None:
    """Give the fused block BasicTransformerBlock's entry in diffusers' block registry.

    diffusers' hooks (LayerSkip for skip-layer guidance, FirstBlockCache, MagCache) look a block's
    metadata up by its exact class, so the fused class needs an entry of its own (a copy: register()
    writes the class into the metadata). Nothing to do where diffusers has no such registry.
    """
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry
    except ImportError:  # pragma: no cover - depends on the diffusers version
        return
    try:
        TransformerBlockRegistry.get(FusedBasicTransformerBlock)
        return
    except ValueError:
        pass
    try:
        metadata = copy.copy(TransformerBlockRegistry.get(BasicTransformerBlock))
    except ValueError:  # pragma: no cover - a diffusers version that does not register it
        return
    if hasattr(metadata, "_cached_parameter_indices"):
        metadata._cached_parameter_indices = None
    TransformerBlockRegistry.register(FusedBasicTransformerBlock, metadata)


FUSED = {AdaLayerNormZero: FusedAdaLayerNormZero, AdaLayerNormZeroSingle: FusedAdaLayerNormZeroSingle,
         AdaLayerNormContinuous: FusedAdaLayerNormContinuous, SD35AdaLayerNormZeroX: FusedSD35AdaLayerNormZeroX,
         BasicTransformerBlock: FusedBasicTransformerBlock}


def _ready(module: nn.Module) -> bool:
    """Whether the module's modulated norms are DyTs the fused forward can take."""
    if isinstance(module, BasicTransformerBlock):
        if module.norm_type == "ada_norm_zero":
            return _fusable(module.norm3)
        if module.norm_type == "ada_norm_single":
            return _fusable(module.norm1) and _fusable(module.norm2)
        return False
    return _fusable(module.norm)


def fuse_modulation(model: nn.Module) -> Counter:
    """Switch diffusers' adaLN modules whose norm is a DyT to the fused forwards; returns counts by class.

    Normally reached through ``convert_layernorm_to_dyt(model, fuse_modulation=True)``.

    >>> from diffusers import DiTTransformer2DModel
    >>> from dyt_kernels import convert_layernorm_to_dyt
    >>> from dyt_kernels.integrations.diffusers import fuse_modulation
    >>> dit = convert_layernorm_to_dyt(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8,
    ...     in_channels=4, num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10))
    >>> sorted(fuse_modulation(dit).items())
    [('AdaLayerNormZero', 1), ('BasicTransformerBlock', 1)]
    """
    counts: Counter = Counter()
    for m in model.modules():
        fused = FUSED.get(type(m))
        if fused is not None and _ready(m):
            counts[type(m).__name__] += 1
            m.__class__ = fused
    if counts["BasicTransformerBlock"]:
        _register_with_diffusers_hooks()
    _name_fused_classes(model, {cls.__name__: f.__name__ for cls, f in FUSED.items() if counts[cls.__name__]})
    return counts


def _name_fused_classes(model: nn.Module, renamed: dict) -> None:
    """Add the fused classes' names beside the diffusers classes' in the lists that accelerate and
    diffusers match by class name: `_no_split_modules` (device maps keep such a block on one device; a
    fused block missing from it was split across devices) and `_repeated_blocks` (regional compilation).
    Set on the instance, so the diffusers class's own lists are left as they are."""
    for m in model.modules():
        for attr in ("_no_split_modules", "_repeated_blocks"):
            names = getattr(m, attr, None)
            if isinstance(names, (list, tuple)):
                extra = [renamed[n] for n in names if n in renamed and renamed[n] not in names]
                if extra:
                    setattr(m, attr, [*names, *extra])
