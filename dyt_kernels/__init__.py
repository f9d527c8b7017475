"""dyt_kernels: fused Triton kernels for Dynamic Tanh (arXiv 2503.10622) and a drop-in nn.LayerNorm swap."""
from .backend import get_backend, use_backend
from .convert import convert_layernorm_to_dyt
from .functional import dyt, dyt_modulate, layernorm_modulate
from .modules import DyT, ModulatedDyT

__all__ = ["dyt", "DyT", "dyt_modulate", "ModulatedDyT", "layernorm_modulate", "convert_layernorm_to_dyt",
           "use_backend", "get_backend"]
__version__ = "0.1.0"
